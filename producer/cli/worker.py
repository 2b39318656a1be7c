"""``vlq worker``: start a GPU worker (imports torch only when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from producer.cli.app import app, fail
from producer.config import Settings
from producer.errors import VlqError


@app.command()
def worker(
    model: Annotated[Path | None, typer.Option("--model", help="model folder (default: engine.model_dir)")] = None,
    gpu: Annotated[int | None, typer.Option("--gpu", help="GPU index to pin (default: CPU or all visible)")] = None,
    queue: Annotated[str | None, typer.Option("--queue", help="queue to serve (default: broker.queue)")] = None,
    concurrency: Annotated[int | None, typer.Option(help="job threads (default: engine.max_batch_size + 2)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run a worker: one engine pair on one GPU, taking jobs from the queue until stopped.

    Start one per GPU (vlq worker --model DIR --gpu N). SIGTERM or Ctrl-C finishes the running
    jobs, then exits.
    """
    try:
        from worker.main import run_worker  # after typer parsed: torch loads only for this command

        code = run_worker(Settings.load(), model, gpu, queue, concurrency, loglevel=log_level.upper())
    except VlqError as e:
        fail(e)
    raise typer.Exit(code)
