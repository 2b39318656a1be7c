"""``vlq worker``: start a GPU worker (imports torch only when it runs); ``vlq workers``: list them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from producer.cli.app import app, fail
from producer.client import Client
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


@app.command()
def workers(
    every: Annotated[bool, typer.Option("--all", help="also workers whose heartbeat stopped")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """List the workers registered in Redis: queue, GPU, checkpoint, jobs running, last heartbeat.

    A worker is live while its heartbeat is younger than worker.lease_timeout_s. Exits 1 when no
    live worker serves the queue (broker.queue), so scripts can wait for one.
    """
    try:
        client = Client.from_settings()
        rows = client.workers(stopped=every)
    except VlqError as e:
        fail(e)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
    elif rows:
        table = Table("worker", "queue", "gpu", "checkpoint", "running", "heartbeat", box=None)
        for row in rows:
            beat = f"{row['heartbeat_s_ago']:g}s ago" + ("" if row["live"] else " (stopped)")
            gpu = "cpu" if row.get("gpu") is None else str(row["gpu"])
            table.add_row(row["name"], str(row.get("queue")), gpu, str(row.get("checkpoint")),
                          str(row.get("running", 0)), beat)
        console = Console()
        if not console.is_terminal:  # a pipe or a log: whole names, not a table cut at 80 columns
            console = Console(width=500)
        console.print(table)
    queue = client.settings.broker.queue
    if not any(row["live"] and row.get("queue") == queue for row in rows):
        typer.echo(f"no live worker serves queue {queue!r}: start one (vlq worker --model DIR)", err=True)
        raise typer.Exit(1)
