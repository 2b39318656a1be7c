"""How the CLI shows a job or batch to a person: local times with their age, spans like ``1m 05s``.

Scripts get JSON instead (``--json``, or whenever stdout is not a terminal).
"""

from __future__ import annotations

from datetime import datetime

from producer.state import BatchCounts, JobRecord


def span(seconds: float) -> str:
    """``0.42s``, ``12.3s``, ``3m 05s``, ``2h 10m``, ``3d 4h``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def moment(ts: float) -> str:
    """A Unix time as local date and time, with its zone."""
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _error(error: dict) -> str:
    return f"[{error.get('code', '?')}] {error.get('message', '')}"


def job_lines(record: JobRecord, now: float) -> list[str]:
    """A job's record as aligned ``name  value`` lines under a ``JOB_ID  status`` heading."""
    rows: list[tuple[str, str]] = []
    if record.created_at is not None:
        rows.append(("created", f"{moment(record.created_at)} ({span(now - record.created_at)} ago)"))
    if record.started_at is not None:
        since = record.queued_at or record.created_at
        waited = f" (after {span(record.started_at - since)} in the queue)" if since is not None else ""
        rows.append(("started", moment(record.started_at) + waited))
    if record.finished_at is not None:
        ran = f" (ran {span(record.finished_at - record.started_at)})" if record.started_at is not None else ""
        rows.append(("finished", moment(record.finished_at) + ran))
    elif record.heartbeat_at is not None and record.started_at is not None:
        rows.append(("heartbeat", f"{span(now - record.heartbeat_at)} ago"))
    if record.worker:
        rows.append(("worker", record.worker))
    if record.attempts:
        again = [f"{n} {why}" for n, why in ((record.retries, "after errors"),
                                            (record.reclaims, "after its worker stopped")) if n]
        rows.append(("attempts", f"{record.attempts}" + (f" (run again {', '.join(again)})" if again else "")))
    if record.batch_id:
        rows.append(("batch", record.batch_id))
    if record.error:
        rows.append(("error", _error(record.error)))
    elif record.last_error and not record.is_terminal:
        rows.append(("last error", _error(record.last_error)))
    if record.cancel_requested and not record.is_terminal:
        rows.append(("cancel", "requested; the worker stops it at its next step"))
    if record.status.value == "succeeded":
        rows.append(("result", record.result_location or f"in Redis: vlq result {record.id}"))
    width = max((len(name) for name, _ in rows), default=0)
    return [f"{record.id}  {record.status.value}", *(f"  {name:<{width}}  {value}" for name, value in rows)]


def batch_lines(counts: BatchCounts) -> list[str]:
    """A batch's progress in one line, then what to run for its results."""
    parts = [f"{getattr(counts, s)} {s}" for s in ("queued", "running", "succeeded", "failed", "cancelled")
             if getattr(counts, s)]
    state = "done" if counts.done else "in progress"
    return [f"{counts.batch_id}  {state}: {counts.finished} of {counts.total} finished"
            + (f" ({', '.join(parts)})" if parts else ""),
            f"  results: vlq result {counts.batch_id} --batch" + ("" if counts.done else " --wait")]
