"""``vlq export RESULTS.jsonl --format coco|labelstudio --out FILE`` (see producer.export)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from producer.cli.app import app, fail
from producer.errors import VlqError


class ExportFormat(str, Enum):
    coco = "coco"
    labelstudio = "labelstudio"


@app.command()
def export(
    results: Annotated[Path, typer.Argument(help="the JSONL that vlq annotate wrote (--out)")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="coco (detection JSON) or labelstudio (tasks JSON)")],
    out: Annotated[Path, typer.Option("--out", help="file to write; - for stdout")],
    image_prefix: Annotated[str, typer.Option(
        help="Label Studio: put before each image path in data.image, e.g. /data/local-files/?d=photos/")] = "",
    from_name: Annotated[str, typer.Option(help="Label Studio: name of the RectangleLabels control")] = "label",
    to_name: Annotated[str, typer.Option(help="Label Studio: name of the Image object (and the data key)")] = "image",
    min_score: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="leave out boxes scored under this (results of vlq annotate --scores)")] = None,
) -> None:
    """Turn vlq annotate results into a COCO dataset or Label Studio tasks with the boxes as predictions.

    Every image of the results file is exported (its last line counts), sorted by path; COCO
    file names are relative to the annotated folder. Images without boxes and failed images
    come with no annotations; a summary line on stderr counts them and names the failures.
    """
    # producer.export uses worker.engine.grounding (torch-free); imported here so that loading
    # producer.cli pulls in no worker code.
    from producer.export import export as run_export

    to_stdout = str(out) == "-"
    try:
        doc, summary = run_export(results, None if to_stdout else out, fmt.value, image_prefix=image_prefix,
                                  from_name=from_name, to_name=to_name, min_score=min_score)
    except VlqError as e:
        fail(e)
    if to_stdout:
        typer.echo(json.dumps(doc, ensure_ascii=False, indent=1))
    typer.echo(f"{summary.line()}; {fmt.value} written to {'stdout' if to_stdout else out}", err=True)
