"""``vlq submit | status | result | cancel``: thin wrappers over :class:`producer.client.Client`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import typer

from producer.cli import show
from producer.cli.app import app, fail
from producer.client import Client, new_batch_id
from producer.errors import InvalidRequest, JobNotFinished, VlqError
from producer.schema import Job
from producer.state import JobRecord
from producer.text import counted


def client() -> Client:
    """The SDK client for ``conf/`` (or ``$VLQ_CONF_DIR``) and the ``VLQ_*`` variables."""
    return Client.from_settings()


MAX_LISTED = 10  # bad lines of a .jsonl file listed in one error


class Requests(NamedTuple):
    """What a request file holds: the jobs with their line numbers, the lines that are not valid
    requests with what is wrong, and how many requests (non-blank lines) there are in all."""

    items: list[tuple[int, dict[str, Any] | Job]]
    problems: list[tuple[int, str]]
    total: int

    def check(self, path: Path) -> None:
        """One error naming the bad lines (the first :data:`MAX_LISTED`), if there are any."""
        if not self.problems:
            return
        problems = sorted(self.problems)
        if path.suffix.lower() != ".jsonl":
            raise InvalidRequest(f"{path}: {problems[0][1]}")
        listed = "".join(f"\n  line {line_no}: {message}" for line_no, message in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise InvalidRequest(f"{path}: {len(problems)} of {self.total} requests are not valid, so none was "
                             f"submitted; fix these lines:{listed}{more}", lines=[n for n, _ in problems])


def read_requests(path: Path) -> Requests:
    """The jobs in a ``.json`` file (one object) or ``.jsonl`` file (one per line).

    Each object is a chat.completions body (``{"messages": ...}``), an OpenAI Batch line
    (``{"custom_id", "body", ...}``; the custom_id lands in the job's metadata) or a vlq job
    (``{"request": ...}``). A line that is none of these lands in ``problems``.
    """
    if not path.is_file():
        raise InvalidRequest(f"{path} is not a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    else:
        rows = [(1, text)]
    if not rows:
        raise InvalidRequest(f"{path} holds no requests")
    _check_suffix(path, text, rows)
    found = Requests([], [], len(rows))
    for line_no, raw in rows:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
            found.problems.append((line_no, f"not JSON ({e})"))
            continue
        if not isinstance(obj, dict):
            found.problems.append((line_no, "expected a JSON object"))
            continue
        try:
            found.items.append((line_no, _as_item(obj)))
        except VlqError as e:
            found.problems.append((line_no, e.message))
    return found


def _check_suffix(path: Path, text: str, rows: list[tuple[int, str]]) -> None:
    """A file whose content fits the other suffix: say so instead of listing JSON errors."""
    jsonl = path.suffix.lower() == ".jsonl"
    lines = [raw for _, raw in rows] if jsonl else [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return
    if jsonl and not _is_json(lines[0]) and isinstance(_loads(text), dict):
        raise InvalidRequest(f"{path} holds one JSON object over several lines: name it .json, or write one"
                             " request per line for a .jsonl batch")
    if not jsonl and _loads(text) is None and all(_is_json(line) for line in lines):
        raise InvalidRequest(f"{path} holds {len(lines)} JSON lines: name it .jsonl to submit them as a batch")


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _is_json(text: str) -> bool:
    return _loads(text) is not None


def _as_item(obj: dict[str, Any]) -> dict[str, Any] | Job:
    if "request" in obj:
        return Job.from_wire(obj)
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
    timeout: Annotated[float | None, typer.Option(help="seconds to wait with --wait", min=0.0)] = None,
) -> None:
    """Submit chat requests (OpenAI chat.completions bodies) as jobs; prints their ids.

    A .jsonl file becomes one batch (its id goes to stderr). With --wait, prints one JSON line
    per job as it finishes: its result, or {"id", "error"}; exits 1 if any failed.
    """
    try:
        found = read_requests(file)
        c = client()
        if file.suffix.lower() != ".jsonl":
            found.check(file)
            arg, kw = _submit_args(found.items[0][1])
            ids = [c.submit(arg, **kw).id]
        else:
            batch_id = new_batch_id()
            jobs = []
            for line_no, item in found.items:
                arg, kw = _submit_args(item)
                try:
                    jobs.append(c.make_job(arg, batch_id=batch_id, **kw))
                except VlqError as e:
                    found.problems.append((line_no, f"[{e.code}] {e.message}"))
            found.check(file)
            c.submit_jobs(jobs)
            ids = [job.id for job in jobs]
            typer.echo(f"batch {batch_id}: {counted(len(jobs), 'job')} (counts: vlq status {batch_id} --batch; "
                       f"results: vlq result {batch_id} --batch --wait)", err=True)
        for job_id in ids:
            typer.echo(job_id)
        if wait:
            warn_if_unserved(c)
        if wait and sum(_print_outcome(c, record) for record in c.as_completed(ids, timeout=timeout)):
            raise typer.Exit(1)
    except VlqError as e:
        fail(e)


def warn_if_unserved(c: Client) -> None:
    """Before a wait: say on stderr when no live worker serves the queue, instead of a silent wait."""
    hint = c.unserved_hint()
    if hint:
        typer.secho(f"warning: {hint.removeprefix('; ')}; waiting for one (Ctrl-C stops waiting)",
                    fg=typer.colors.YELLOW, err=True)


def _print_outcome(c: Client, record: JobRecord) -> bool:
    """Print a finished job's result, or ``{"id", "status", "error"}``; True if it did not succeed."""
    try:
        _print_json(c.result_of(record))
        return False
    except VlqError as e:
        line: dict[str, Any] = {"id": record.id}
        custom_id = _custom_id(record)
        if custom_id is not None:  # an OpenAI Batch line's: what its caller joins on
            line["custom_id"] = custom_id
        _print_json({**line, "status": record.status.value, "error": {"code": e.code, "message": e.message}})
        return True


def _custom_id(record: JobRecord) -> str | None:
    try:
        return record.job().metadata.get("custom_id")
    except VlqError:  # no stored message (a vanished record)
        return None


def _submit_args(item: dict[str, Any] | Job) -> tuple[Any, dict[str, Any]]:
    if isinstance(item, dict) and "__custom_id" in item:
        meta = {"custom_id": item["__custom_id"]} if item["__custom_id"] is not None else {}
        return item["body"], {"metadata": meta}
    return item, {}


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="a job id (or a batch id with --batch)")],
    batch: Annotated[bool, typer.Option("--batch", help="JOB_ID is a batch id: print its counts")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON (Unix times), also on a terminal")] = False,
) -> None:
    """Print a job's record (status, times, attempts, error) or a batch's counts.

    On a terminal: readable lines, times in the local zone. Otherwise, or with --json, one JSON
    object (times as Unix seconds), for scripts.
    """
    readable = not as_json and sys.stdout.isatty()
    try:
        c = client()
        if batch:
            counts = c.batch(job_id)
            if readable:
                typer.echo("\n".join(show.batch_lines(counts)))
            else:
                _print_json({**counts.model_dump(), "finished": counts.finished, "done": counts.done})
        else:
            record = c.status(job_id)
            if readable:
                typer.echo("\n".join(show.job_lines(record, time.time())))
            else:
                _print_json(record.public())
    except VlqError as e:
        fail(e)


@app.command()
def result(
    job_id: Annotated[str, typer.Argument(help="a job id (or a batch id with --batch)")],
    wait: Annotated[bool, typer.Option("--wait", help="wait until the job (every job of the batch) finishes")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait with --wait", min=0.0)] = None,
    batch: Annotated[bool, typer.Option("--batch", help="JOB_ID is a batch id: one JSON line per job")] = False,
) -> None:
    """Print a job's result (OpenAI chat.completion + boxes) as JSON; a failed job prints its error.

    With --batch, one line per finished job of the batch (its result, or {"id", "status",
    "error"}), in submission order, or as they finish with --wait; exits 1 if any failed or is
    not finished.
    """
    try:
        c = client()
        if not batch:
            if wait and not c.status(job_id).is_terminal:
                warn_if_unserved(c)
            _print_json(c.result(job_id, timeout=(timeout if wait else 0)))
            return
        counts = c.batch(job_id)  # an unknown batch: not_found
        if wait and not counts.done:
            warn_if_unserved(c)
        ids = c.batch_jobs(job_id)
        printed = failed = 0
        try:
            for record in c.as_completed(ids, timeout=timeout if wait else 0):
                printed += 1
                failed += _print_outcome(c, record)
        except JobNotFinished:
            left = len(ids) - printed
            typer.echo(f"{left} of {counted(len(ids), 'job')} {'is' if left == 1 else 'are'} not finished yet:"
                       f" vlq result {job_id} --batch --wait",
                       err=True)
            raise typer.Exit(1) from None
        if failed:
            raise typer.Exit(1)
    except VlqError as e:
        fail(e)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="a job id")]) -> None:
    """Cancel a job: a queued one is never run, a running one is aborted."""
    try:
        outcome = client().cancel(job_id)
        if outcome in ("succeeded", "failed"):
            outcome = f"already {outcome}, nothing to cancel"
        typer.echo(f"{job_id}: {outcome}")
    except VlqError as e:
        fail(e)

