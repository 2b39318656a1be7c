"""Export ``vlq annotate`` results to annotation tools: COCO detection JSON and Label Studio tasks.

    vlq export results.jsonl --format coco --out instances.json
    vlq export results.jsonl --format labelstudio --out tasks.json --image-prefix "/data/local-files/?d=photos/"

The input is the JSONL that ``vlq annotate`` appends to (one line per image and run; the last
line for a path is the current one, as for annotate's resuming). Every image of the file is
exported, sorted by path:

- **COCO** (``info``, ``licenses``, ``images``, ``annotations``, ``categories``):
  ``images[].file_name`` is the path relative to the annotated folder, ``width``/``height`` the
  image's pixels. Images whose size is unknown (failed jobs: the worker never read them) are
  left out, as COCO wants every image sized; the summary counts them. Each box becomes one
  annotation with ``bbox = [x, y, w, h]`` in pixels, ``area``, ``iscrowd: 0``, its ``phrase``
  and the category of that phrase (a box without phrase gets the category ``object``);
  categories are numbered from 1 in the order their phrases first appear.
- **Label Studio**: one task per image, ``{"data": {"image": PREFIX + path}, "predictions":
  [{"model_version", "result": [...]}]}`` with ``rectanglelabels`` (``polygonlabels`` for
  ``<quad>`` regions) in percent of the image, for a labeling config whose ``<Image
  name="image" value="$image"/>`` is labelled by ``<RectangleLabels name="label" ...>``. Behind
  a URL prefix (``http(s)://``, or a path such as ``/data/local-files/?d=``) the image path is
  percent-encoded (``#``, ``&``, ``+``, ``%``, spaces, non-ASCII), ``/`` kept; behind any other
  prefix (``s3://bucket/``, or none) it is appended as it is.

Boxes are in the image's stored pixel grid, as the model saw it: vlq, like the reference model,
ignores a JPEG's EXIF orientation. A phone photo stored sideways with an orientation tag is
shown upright by browsers and Label Studio, so its boxes land rotated there; rotate such files
(``exiftran -ai``, ``mogrify -auto-orient``) before annotating.

A line that is not JSON (a run cut off mid-write) is skipped and counted; a file with no
readable line at all is refused.

Boxes carry their ``score`` when the results came from ``vlq annotate --scores``; ``min_score``
then leaves out the boxes scored under it. Images whose job succeeded without boxes are exported
with no annotations (an empty prediction); failed or cancelled ones with no annotations and no
prediction, and counted in the :class:`ExportSummary`. The box conversions are
:mod:`worker.engine.grounding`'s (torch-free).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from producer.errors import InvalidRequest
from producer.text import counted
from worker.engine.grounding import (
    DEFAULT_LABEL,
    GroundingBox,
    coco_annotations,
    coco_categories,
    label_studio_prediction,
)

Format = Literal["coco", "labelstudio"]
FORMATS: tuple[Format, ...] = ("coco", "labelstudio")
DEFAULT_MODEL_VERSION = "qwen-vl-chat"


@dataclass(frozen=True)
class ResultLine:
    """The current annotate result of one image."""

    line_no: int
    path: str
    status: str
    boxes: tuple[GroundingBox, ...] = ()
    image_size: tuple[int, int] | None = None
    error: dict[str, Any] | None = None
    model: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


@dataclass
class ExportSummary:
    """What an export wrote; ``failures`` counts the failed images by error code."""

    images: int = 0
    with_boxes: int = 0
    without_boxes: int = 0
    failed: int = 0
    boxes: int = 0
    categories: int = 0
    boxes_without_size: int = 0  # COCO needs pixels: such boxes (results from before sizes were recorded) are left out
    boxes_below_min_score: int = 0
    min_score: float | None = None
    failures: dict[str, int] = field(default_factory=dict)
    images_without_size: int = 0  # COCO: left out (failed jobs), as COCO images need width and height
    unreadable_lines: list[int] = field(default_factory=list)  # skipped: not JSON (a run cut off mid-write)

    def line(self) -> str:
        """One human line, e.g. ``3 images: 1 with boxes (2 boxes), 1 without, 1 failed (image_decode_failed x1)``."""
        text = (f"{counted(self.images, 'image')}: {self.with_boxes} with boxes ({counted(self.boxes, 'box')}),"
                f" {self.without_boxes} without, {self.failed} failed")
        if self.failures:
            text += " (" + ", ".join(f"{code} x{n}" for code, n in sorted(self.failures.items())) + ")"
        if self.boxes_below_min_score:
            text += f"; {counted(self.boxes_below_min_score, 'box')} scored under {self.min_score} left out"
        if self.boxes_without_size:
            text += (f"; {counted(self.boxes_without_size, 'box')} left out: the image size is unknown"
                     " (annotate again to record it)")
        if self.images_without_size:
            text += f"; {counted(self.images_without_size, 'failed image')} left out of the COCO images (no size)"
        if self.unreadable_lines:
            bad = self.unreadable_lines
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            text += (f"; {counted(len(bad), 'line')} that {'is' if len(bad) == 1 else 'are'} not JSON skipped"
                     f" (line {shown}: a run cut off?)")
        return text


# -- reading -------------------------------------------------------------------------------------


def read_results(path: Path, unreadable: list[int] | None = None) -> list[ResultLine]:
    """The current line of every image in an annotate results file, sorted by path.

    Lines that are not JSON (a run cut off mid-write) are skipped, their numbers added to
    ``unreadable``; a file with no JSON line at all, or a JSON line that is not an annotate
    result, raises :class:`InvalidRequest` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"{path} is not a file: pass the --out file of vlq annotate")
    current: dict[str, ResultLine] = {}
    skipped: list[tuple[int, Exception]] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError) as e:
                skipped.append((line_no, e))
                continue
            line = parse_result_line(row, line_no=line_no, source=path)
            current[line.path] = line  # a later run's line replaces an earlier one
    if not current and skipped:
        line_no, e = skipped[0]
        raise InvalidRequest(f"{path} line {line_no} is not JSON ({e}): is this a vlq annotate results file?")
    if not current:
        raise InvalidRequest(f"{path} holds no results: run vlq annotate FOLDER --out {path} first")
    if unreadable is not None:
        unreadable += [line_no for line_no, _ in skipped]
    return [current[p] for p in sorted(current)]


def parse_result_line(row: Any, *, line_no: int = 1, source: Path | str = "results") -> ResultLine:
    """One annotate line as a :class:`ResultLine` (boxes tagged with the image's size)."""
    where = f"{source} line {line_no}"
    if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
        raise InvalidRequest(f"{where} has no \"path\": is this a vlq annotate results file?")
    size = _size(row.get("image_size"), where)
    raw_boxes = row.get("boxes") or []
    if not isinstance(raw_boxes, list):
        raise InvalidRequest(f"{where}: \"boxes\" must be a list")
    boxes = tuple(_box(b, where, n, size) for n, b in enumerate(raw_boxes, 1))
    if size is None:  # lines written before annotate recorded the size: the boxes know it
        size = next((b.image_size for b in boxes if b.image_size), None)
    error = row.get("error")
    return ResultLine(
        line_no=line_no,
        path=row["path"],
        status=str(row.get("status") or "failed"),
        boxes=boxes,
        image_size=size,
        error=error if isinstance(error, dict) else None,
        model=row.get("model") if isinstance(row.get("model"), str) else None,
    )


def _size(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        return value[0], value[1]
    raise InvalidRequest(f"{where}: \"image_size\" must be [width, height] in pixels, not {value!r}")


def _box(data: Any, where: str, n: int, size: tuple[int, int] | None) -> GroundingBox:
    """A result's box dict (``GroundingBox.to_dict`` form; a bare ``box`` is read as two corners)."""
    try:
        if "points" not in data:
            x1, y1, x2, y2 = (int(v) for v in data["box"])
            data = {**data, "kind": "box", "points": [[x1, y1], [x2, y2]]}
        box = GroundingBox.from_dict({"kind": "box", **data})
        if len(box.points) != (2 if box.kind == "box" else 4):
            raise ValueError(f"{len(box.points)} points for a {box.kind}")
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidRequest(f"{where}: box {n} is not a grounding box ({type(e).__name__}: {e})") from None
    if box.image_size is None and size is not None:
        box = box.with_image(box.picture, size)
    return box


# -- converting ----------------------------------------------------------------------------------


def to_coco(lines: list[ResultLine], summary: ExportSummary | None = None) -> dict[str, Any]:
    """A COCO detection dataset (``images``, ``annotations``, ``categories``) for ``lines``."""
    summary = summary if summary is not None else ExportSummary()
    images, annotations = [], []
    categories: dict[str, int] = {}
    for line in lines:
        _count(line, summary)
        if line.image_size is None:  # a failed job: the worker never read the image
            summary.images_without_size += 1
            summary.boxes_without_size += len(line.boxes)
            continue
        image_id = len(images) + 1
        width, height = line.image_size
        images.append({"id": image_id, "file_name": line.path, "width": width, "height": height})
        sized = [b for b in line.boxes if b.image_size is not None]
        summary.boxes_without_size += len(line.boxes) - len(sized)
        anns = coco_annotations(sized, image_id=image_id, categories=categories, first_id=len(annotations) + 1)
        for ann, box in zip(anns, sized):
            ann["phrase"] = box.phrase
        annotations += anns
    summary.categories = len(categories)
    info = {"description": "vlq annotate results", "contributor": "vlq"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": coco_categories(categories)}


def to_label_studio(
    lines: list[ResultLine],
    summary: ExportSummary | None = None,
    *,
    image_prefix: str = "",
    from_name: str = "label",
    to_name: str = "image",
) -> list[dict[str, Any]]:
    """Label Studio tasks (a JSON list) for ``lines``; ``data[to_name]`` is ``image_prefix + path``."""
    summary = summary if summary is not None else ExportSummary()
    tasks = []
    for line in lines:
        _count(line, summary)
        predictions = []
        if line.succeeded:
            predictions.append(label_studio_prediction(
                line.boxes, model_version=line.model or DEFAULT_MODEL_VERSION,
                from_name=from_name, to_name=to_name,
            ))
        tasks.append({"data": {to_name: image_url(image_prefix, line.path)}, "predictions": predictions})
    summary.categories = len({b.phrase or DEFAULT_LABEL for line in lines if line.succeeded for b in line.boxes})
    return tasks


def image_url(prefix: str, path: str) -> str:
    """``prefix + path``, the path percent-encoded (``/`` kept) behind a URL prefix (``http(s)://``
    or one starting with ``/``), where ``#``, ``&``, ``+`` or ``%`` in a file name would otherwise
    point somewhere else; as it is behind any other prefix (``s3://bucket/``) or none."""
    if prefix.startswith(("http://", "https://", "/")):
        return prefix + quote(path, safe="/")
    return prefix + path


def keep_confident(lines: list[ResultLine], min_score: float, summary: ExportSummary) -> list[ResultLine]:
    """``lines`` with only the boxes scored ``min_score`` or more (counted in ``summary``).

    Raises :class:`InvalidRequest` when a box has no score: its results came from a run without
    ``vlq annotate --scores``.
    """
    out = []
    for line in lines:
        unscored = next((b for b in line.boxes if b.score is None), None)
        if unscored is not None:
            raise InvalidRequest(
                f"{line.path} (line {line.line_no}) has boxes without a score: --min-score needs the results "
                "of vlq annotate --scores (run it again with --scores; the images are done again once)")
        kept = tuple(b for b in line.boxes if b.score >= min_score)
        summary.boxes_below_min_score += len(line.boxes) - len(kept)
        out.append(replace(line, boxes=kept))
    summary.min_score = min_score
    return out


def _count(line: ResultLine, summary: ExportSummary) -> None:
    summary.images += 1
    if not line.succeeded:
        summary.failed += 1
        code = (line.error or {}).get("code") or line.status
        summary.failures[code] = summary.failures.get(code, 0) + 1
    elif line.boxes:
        summary.with_boxes += 1
        summary.boxes += len(line.boxes)
    else:
        summary.without_boxes += 1


# -- the whole export ----------------------------------------------------------------------------


def export(
    results: Path,
    out: Path | None,
    fmt: Format,
    *,
    image_prefix: str = "",
    from_name: str = "label",
    to_name: str = "image",
    min_score: float | None = None,
) -> tuple[Any, ExportSummary]:
    """Read ``results``, convert to ``fmt`` and write it to ``out`` (atomically; None: write nothing).

    ``min_score`` leaves out the boxes scored under it (:func:`keep_confident`). Returns the
    exported document and its summary.
    """
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if out is not None and Path(out).is_dir():
        name = "instances.json" if fmt == "coco" else "tasks.json"
        raise InvalidRequest(f"--out {out} is a folder: name a file in it, such as {Path(out) / name}")
    summary = ExportSummary()
    lines = read_results(results, summary.unreadable_lines)
    if min_score is not None:
        lines = keep_confident(lines, min_score, summary)
    if fmt == "coco":
        doc: Any = to_coco(lines, summary)
    else:
        doc = to_label_studio(lines, summary, image_prefix=image_prefix, from_name=from_name, to_name=to_name)
    if out is not None:
        write_json(Path(out), doc)
    return doc, summary


def write_json(path: Path, doc: Any) -> None:
    """Write ``doc`` as JSON to ``path`` through a temporary file, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "FORMATS",
    "ExportSummary",
    "Format",
    "ResultLine",
    "export",
    "image_url",
    "parse_result_line",
    "read_results",
    "to_coco",
    "to_label_studio",
    "write_json",
]
