"""``vlq annotate FOLDER --prompt TEXT``: one job per image, results as JSONL (see producer.annotate)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from producer.annotate import IMAGE_EXTENSIONS, AnnotateOptions, AnnotateSummary, check_folder, check_out
from producer.annotate import annotate as run_annotate
from producer.cli.app import app, fail
from producer.cli.jobs import warn_if_unserved
from producer.client import Client
from producer.errors import InvalidRequest, VlqError


@app.command()
def annotate(
    folder: Annotated[Path, typer.Argument(help="folder of images (searched recursively)")],
    prompt: Annotated[str, typer.Option("--prompt", help="what to ask about every image")],
    out: Annotated[Path, typer.Option("--out", help="JSONL results, appended; reruns skip done images")] = Path("results.jsonl"),
    model: Annotated[str | None, typer.Option(help="model name in each request (default: api.served_model)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="answer length limit", min=1)] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy", min=0.0, max=2.0)] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    inline: Annotated[bool, typer.Option("--inline", help="send image bytes inside the jobs (data: URIs)")] = False,
    upload: Annotated[str | None, typer.Option("--upload", help="upload images to s3://bucket/prefix and send s3:// URLs")] = None,
    max_in_flight: Annotated[int, typer.Option(help="jobs queued at once", min=1)] = 256,
    timeout: Annotated[float | None, typer.Option(
        help="give up (and cancel what is left) after N seconds", min=0.0)] = None,
    scores: Annotated[bool, typer.Option(
        "--scores", help="score each box and answer (0..1) from the model's logprobs")] = False,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed/--no-retry-failed",
        help="try the images that failed before again (--no-retry-failed: leave them, e.g. corrupt files)")] = True,
) -> None:
    """Ask one question about every image in FOLDER; write one JSON line per image to --out.

    Images reach the workers as file:// URLs by default (the workers must share the filesystem
    and allow the folder in images.allowed_roots), as data: URIs with --inline, or through S3
    with --upload s3://bucket/prefix. A second run with the same prompt and model skips the
    images that already succeeded and retries the failed ones (--no-retry-failed: not those).
    """
    if inline and upload:
        fail(InvalidRequest("--inline and --upload exclude each other: choose one"))
    try:
        check_folder(folder)
        check_out(out)
        client = Client.from_settings()
        options = AnnotateOptions(
            prompt=prompt,
            model=model or client.settings.api.served_model,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            transport="inline" if inline else "s3" if upload else "file",
            upload_to=upload,
            max_in_flight=max_in_flight,
            timeout_s=timeout,
            scores=scores,
            retry_failed=retry_failed,
        )
        if options.transport == "file":
            warn_if_not_readable(folder, client.settings.images.allowed_roots)
        console = Console(stderr=True)
        with Progress(
            TextColumn("[bold]annotate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ok {task.fields[ok]} failed {task.fields[failed]} skipped {task.fields[skipped]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task("annotate", total=None, ok=0, failed=0, skipped=0)
            said = {"unserved": False, "at": time.monotonic()}

            def progress(s: AnnotateSummary) -> None:
                done = s.skipped + s.succeeded + s.failed + s.cancelled
                bar.update(task, total=s.found, completed=done, ok=s.succeeded, failed=s.failed, skipped=s.skipped)
                if s.submitted and not said["unserved"]:
                    said["unserved"] = True
                    warn_if_unserved(client)
                if not console.is_terminal and time.monotonic() - said["at"] >= PLAIN_PROGRESS_S:
                    said["at"] = time.monotonic()  # no live bar in a log file: a line now and then
                    typer.echo(f"annotate: {done}/{s.found} done, ok {s.succeeded} failed {s.failed}"
                               f" skipped {s.skipped}", err=True)

            with _sigterm_as_interrupt():
                summary = run_annotate(client, folder, out, options, progress)
    except VlqError as e:
        fail(e)
    except KeyboardInterrupt:
        so_far = f"results so far are in {out}" if out.is_file() else "no results were written yet"
        typer.echo(f"interrupted: the unfinished jobs were cancelled; {so_far}; run the same command again"
                   " to resume", err=True)
        raise typer.Exit(130) from None
    failures = ", ".join(f"{code} x{n}" for code, n in sorted(summary.failures.items()))
    if summary.copied:
        typer.echo(f"{summary.copied} images already done at another path (copies, or moved files) got a copy"
                   " of their line", err=True)
    if summary.left_failed:
        typer.echo(f"{summary.left_failed} images that failed before were left alone (--no-retry-failed); their"
                   " failed lines stay current", err=True)
    if summary.redone:
        typer.echo(f"{summary.redone} images done before by another checkpoint than the workers serve now"
                   " are done again; their new lines follow the old ones", err=True)
    typer.echo(
        f"{summary.found} images: {summary.skipped} already done, {summary.submitted} submitted,"
        f" {summary.succeeded} succeeded, {summary.failed} failed"
        + (f" ({failures})" if failures else "")
        + f"; results in {out}"
    )
    if not summary.found:
        typer.echo(f"no images in {folder}: annotate looks for {', '.join(sorted(IMAGE_EXTENSIONS))} files "
                   "in it and its subfolders (hidden ones skipped)", err=True)
    if summary.failed or not summary.found:
        raise typer.Exit(1)


def warn_if_not_readable(folder: Path, roots: list[Path]) -> None:
    """Images go as file:// URLs, which workers read only under images.allowed_roots: when this
    machine's settings (usually the workers' too) do not list ``folder``, say so before every
    image fails ``image_url_forbidden``."""
    where = folder.expanduser().resolve()
    if any(where.is_relative_to(Path(root).expanduser().resolve()) for root in roots):
        return
    listed = ", ".join(map(str, roots)) or "none"
    typer.secho(f"warning: {folder} is not under images.allowed_roots here ({listed}): if the workers' settings"
                " do not list it either, every image fails image_url_forbidden; add it"
                f" (VLQ_IMAGES_ALLOWED_ROOTS='[\"{where}\"]') or send the images with --inline",
                fg=typer.colors.YELLOW, err=True)


PLAIN_PROGRESS_S = 10.0  # how often a run whose stderr is not a terminal prints a progress line


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, systemd, a CI timeout) stops a run as Ctrl-C does: its queued jobs are
    cancelled rather than left for nobody to collect."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
