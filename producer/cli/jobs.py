"""``vlq submit | status | result | cancel``: thin wrappers over :class:`producer.client.Client`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from producer.cli.app import app, fail
from producer.client import Client, new_batch_id
from producer.errors import InvalidRequest, VlqError
from producer.schema import Job


def client() -> Client:
    """The SDK client for ``conf/`` (or ``$VLQ_CONF_DIR``) and the ``VLQ_*`` variables."""
    return Client.from_settings()


def read_requests(path: Path) -> list[dict[str, Any] | Job]:
    """The jobs in a ``.json`` file (one object) or ``.jsonl`` file (one per line).

    Each object is a chat.completions body (``{"messages": ...}``), an OpenAI Batch line
    (``{"custom_id", "body", ...}``; the custom_id lands in the job's metadata) or a vlq job
    (``{"request": ...}``).
    """
    if not path.is_file():
        raise InvalidRequest(f"{path} is not a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    else:
        rows = [(1, text)]
    out: list[dict[str, Any] | Job] = []
    for line_no, raw in rows:
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise InvalidRequest(f"{path}:{line_no}: not JSON ({e})", line=line_no) from None
        if not isinstance(obj, dict):
            raise InvalidRequest(f"{path}:{line_no}: expected a JSON object", line=line_no)
        out.append(_as_item(obj, path, line_no))
    if not out:
        raise InvalidRequest(f"{path} holds no requests")
    return out


def _as_item(obj: dict[str, Any], path: Path, line_no: int) -> dict[str, Any] | Job:
    if "request" in obj:
        try:
            return Job.from_wire(obj)
        except VlqError as e:
            raise InvalidRequest(f"{path}:{line_no}: {e.message}", line=line_no) from None
    if "body" in obj:
        body = dict(obj["body"]) if isinstance(obj["body"], dict) else obj["body"]
        return {"__custom_id": obj.get("custom_id"), "body": body}
    return obj


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False))


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="a .json request or a .jsonl file of requests")],
    wait: Annotated[bool, typer.Option("--wait", help="wait and print each result")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait with --wait")] = None,
) -> None:
    """Submit chat requests (OpenAI chat.completions bodies) as jobs; prints their ids.

    A .jsonl file becomes one batch (its id goes to stderr). With --wait, prints one JSON line
    per job as it finishes: its result, or {"id", "error"}; exits 1 if any failed.
    """
    try:
        items = read_requests(file)
        c = client()
        if len(items) == 1 and file.suffix.lower() != ".jsonl":
            arg, kw = _submit_args(items[0])
            ids = [c.submit(arg, **kw).id]
        else:
            batch_id = new_batch_id()
            jobs = []
            for n, item in enumerate(items, 1):
                arg, kw = _submit_args(item)
                try:
                    jobs.append(c.make_job(arg, batch_id=batch_id, **kw))
                except VlqError as e:
                    raise type(e)(f"{file}:{n}: {e.message}", code=e.code, line=n) from None
            c.submit_jobs(jobs)
            ids = [job.id for job in jobs]
            typer.echo(f"batch {batch_id}: {len(jobs)} jobs (vlq status --batch {batch_id})", err=True)
        for job_id in ids:
            typer.echo(job_id)
        if wait:
            failed = 0
            for record in c.as_completed(ids, timeout=timeout):
                try:
                    _print_json(c.result_of(record))
                except VlqError as e:
                    failed += 1
                    _print_json({"id": record.id, "status": record.status.value,
                                 "error": {"code": e.code, "message": e.message}})
            if failed:
                raise typer.Exit(1)
    except VlqError as e:
        fail(e)


def _submit_args(item: dict[str, Any] | Job) -> tuple[Any, dict[str, Any]]:
    if isinstance(item, dict) and "__custom_id" in item:
        meta = {"custom_id": item["__custom_id"]} if item["__custom_id"] is not None else {}
        return item["body"], {"metadata": meta}
    return item, {}


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="a job id (or a batch id with --batch)")],
    batch: Annotated[bool, typer.Option("--batch", help="JOB_ID is a batch id: print its counts")] = False,
) -> None:
    """Print a job's record (status, timestamps, attempts, error) or a batch's counts as JSON."""
    try:
        c = client()
        if batch:
            counts = c.batch(job_id)
            _print_json({**counts.model_dump(), "finished": counts.finished, "done": counts.done})
        else:
            _print_json(c.status(job_id).public())
    except VlqError as e:
        fail(e)


@app.command()
def result(
    job_id: Annotated[str, typer.Argument(help="a job id")],
    wait: Annotated[bool, typer.Option("--wait", help="wait until the job finishes")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait with --wait")] = None,
) -> None:
    """Print a job's result (OpenAI chat.completion + boxes) as JSON; a failed job prints its error."""
    try:
        c = client()
        doc = c.result(job_id, timeout=(timeout if wait else 0))
        _print_json(doc)
    except VlqError as e:
        fail(e)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="a job id")]) -> None:
    """Cancel a job: a queued one is never run, a running one is aborted."""
    try:
        outcome = client().cancel(job_id)
        typer.echo(f"{job_id}: {outcome}")
    except VlqError as e:
        fail(e)

