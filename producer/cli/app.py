"""The ``vlq`` command: one Typer app; each command only translates flags into SDK calls.

Known errors print one line with what to do next and exit 1; set ``VLQ_DEBUG=1`` for the
traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from producer.errors import VlqError

app = typer.Typer(
    name="vlq",
    help="Queue-driven batch processing with Qwen-VL-Chat: submit, poll, annotate, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Markdown re-wraps each docstring paragraph to the terminal; "rich" would keep the source's
    # line breaks. Help texts are plain sentences with a blank line between paragraphs.
    rich_markup_mode="markdown",
)

# error code -> what the user should do next (one line)
NEXT_STEP: dict[str, str] = {
    "broker_unavailable": "start Redis (redis-server) or point VLQ_BROKER_URL at a running one",
    "config_error": "fix the flag or setting it names (settings: conf/*.yaml or VLQ_* variables)",
    "checkpoint_error": "check the model folder (make one with: python -m engine_build.tiny_model --out DIR)",
    "not_found": "check the id, and that VLQ_BROKER_URL and VLQ_KEY_PREFIX are those it was submitted with",
    "store_unavailable": ("check the store it names: Redis, or S3 (endpoint_url, credentials and bucket:"
                          " conf/store.yaml, or VLQ_STORE_S3='{\"endpoint_url\": \"http://host:port\"}')"),
    "store_rejected": "check that the S3 bucket exists and the credentials may write to it",
    "duplicate_job": "leave the id out to get a fresh one, or follow the existing job (vlq status ID)",
    "not_finished": "the job goes on: read it later (vlq result ID --wait), or drop it (vlq cancel ID)",
}


def fail(error: VlqError) -> None:
    """Print a VlqError as one line plus its next step, and exit 1."""
    hint = NEXT_STEP.get(error.code)
    typer.secho(f"error [{error.code}]: {error.message}", fg=typer.colors.RED, err=True)
    if hint:
        typer.echo(f"  next: {hint}", err=True)
    raise typer.Exit(1)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except VlqError as e:
        if os.environ.get("VLQ_DEBUG"):
            raise
        try:
            fail(e)
        except typer.Exit as exit_:
            sys.exit(exit_.exit_code)
