"""The OpenAI Batch API on top of vlq's queue: input file -> jobs -> output and error files.

A batch's lifecycle, as OpenAI defines it::

    validating ──> in_progress ──> finalizing ──> completed
        │               │ (cancel)                    
        │               └──> cancelling ──> cancelled
        │               └──> (24h window passed) ──> expired
        └──> failed (the input file is not a valid batch file)

**Validating** reads the input file line by line. A line that breaks the file format fails the
whole batch, as OpenAI does, with one ``errors.data`` entry per bad line (``code``, ``message``,
``param``, ``line``): not JSON (``invalid_json_line``), not an object, no ``custom_id`` or a
repeated one (``missing_required_parameter``, ``duplicate_custom_id``), ``method`` other than
POST (``invalid_method``), ``url`` other than the batch's endpoint (``invalid_url``), no
``body`` object; an empty file (``empty_file``) or more than 50,000 requests
(``too_many_requests``) too. A line whose *body* is wrong (what :class:`producer.preflight.Preflight`
checks: schema, image count, prompt length where the tokenizer is available; ``stream: true``)
does not stop the batch: it is not run, it is listed in ``errors.data`` with its line number, and
it lands in the error file as a 400 response with OpenAI's error body.

**In progress**: every valid line is one vlq job (id ``{batch_id}-{line}``, the batch id as the
jobs' vlq batch, ``custom_id`` and ``line`` in its metadata), so the SDK's batch counters give
``request_counts`` and ``vlq status --batch`` works on OpenAI batches too. Submission is
idempotent: if the process dies while submitting, the next :meth:`Batches.refresh` resumes it.

**Finalizing** starts when every job is terminal: the output file gets one line per success
(``{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}``,
the body being the job's chat.completion with vlq's ``boxes``), the error file one line per
failure (the response's status code and OpenAI error body; cancelled or expired requests get
``response: null`` and ``error: {code: batch_cancelled | batch_expired, message}``); both in
input-line order; join on ``custom_id``. ``request_counts.failed`` counts failed, rejected and
cancelled requests, so that ``completed + failed == total`` at the end.

:meth:`Batches.refresh` moves a batch on (resumes validation, expires it, finalizes it) and is
safe to call from anywhere at any time: a per-batch lock in Redis lets one process at a time do
the work, and each step is idempotent. The HTTP API calls it when a batch is read and from a
background loop, so finalizing never waits for a poll.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from producer.broker import send_job
from producer.client import Client
from producer.errors import (
    BadInput,
    BrokerUnavailable,
    InvalidRequest,
    JobNotFound,
    VlqError,
    error_from_dict,
)
from producer.files import FileStore
from producer.preflight import Preflight
from producer.schema import ChatRequest, Job, JobStatus
from producer.state import JobRecord, redis_errors

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_REQUESTS = 50_000
MAX_REPORTED_ERRORS = 1000  # errors.data entries kept on a batch object
LOCK_TTL_S = 600
SUBMIT_CHUNK = 500

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FINAL_STATUSES = ("failed", "completed", "expired", "cancelled")

_TIMESTAMPS = (
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
    "expired_at", "cancelling_at", "cancelled_at",
)

# KEYS: batch hash   ARGV: allowed statuses (comma-separated), new status, field, value, ...
# -> {1, old status} when moved, {0, status} when not (no such batch: {0, ''}).
_TRANSITION = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {0, ''} end
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == st then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return {1, st}
  end
end
return {0, st}
"""

# KEYS: lock   ARGV: token  -> 1 released, 0 not ours
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def new_openai_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


class LineError(BaseModel):
    """One entry of a batch's ``errors.data``: what is wrong with which input line."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class RejectedLine(BaseModel):
    """A line whose body failed pre-flight: never run, reported in the error file."""

    model_config = ConfigDict(frozen=True)

    line: int
    custom_id: str
    code: str
    message: str
    param: str | None = None
    status_code: int = 400


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchObject(BaseModel):
    """OpenAI's ``batch`` object, as ``GET /v1/batches/{id}`` returns it. ``model`` is None until
    the input file is validated, then the first request's (``api.served_model`` if none names one)."""

    model_config = ConfigDict(frozen=True)

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict[str, Any] | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class _Line(BaseModel):
    line: int
    custom_id: str
    body: dict[str, Any]


class Batches:
    """OpenAI batches for one vlq deployment: create, read, list, cancel, and :meth:`refresh`.

    ``preflight`` checks each line's body (default: the schema and the image count); the API
    passes :meth:`producer.preflight.Preflight.check`, which also checks prompt lengths.
    """

    def __init__(
        self,
        client: Client,
        files: FileStore,
        *,
        preflight: Callable[[Any], ChatRequest] | None = None,
        served_model: str | None = None,
        on_result: Callable[[JobRecord, dict[str, Any] | None], None] | None = None,
    ) -> None:
        self.client = client
        self.files = files
        self.keys = client.keys
        self.redis = client.store.redis
        self.url = client.store.url
        self.preflight = preflight or Preflight(client.settings, load_tokenizer=False).check
        self.served_model = served_model or client.settings.api.served_model
        self.on_result = on_result  # told of each finished request as its batch is finalized
        self._transition = self.redis.register_script(_TRANSITION)
        self._unlock = self.redis.register_script(_UNLOCK)

    # -- create / read ---------------------------------------------------------------------------

    def create(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, Any] | None = None,
    ) -> BatchObject:
        """Record a batch as ``validating``; :meth:`refresh` validates and submits it."""
        if endpoint != ENDPOINT:
            raise InvalidRequest(
                f"endpoint {endpoint!r} is not served; vlq batches run {ENDPOINT}", param="endpoint"
            )
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequest(
                f"completion_window must be one of {sorted(COMPLETION_WINDOWS)}, not {completion_window!r}",
                param="completion_window",
            )
        _check_metadata(metadata)
        try:
            f = self.files.get(input_file_id)
        except JobNotFound:
            raise InvalidRequest(
                f"no file {input_file_id!r}: upload the input with POST /v1/files (purpose batch)",
                param="input_file_id",
            ) from None
        if f.purpose != "batch":
            raise InvalidRequest(
                f"file {input_file_id} has purpose {f.purpose!r}; a batch input needs purpose 'batch'",
                param="input_file_id",
            )
        batch_id = new_openai_batch_id()
        now = int(time.time())
        fields = {
            "id": batch_id,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "created_at": now,
            "expires_at": now + COMPLETION_WINDOWS[completion_window],
            "metadata": json.dumps(metadata) if metadata is not None else "",
        }  # no model yet: the requests name it, and they are read when the batch is validated
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.keys.openai_batch(batch_id), mapping=fields)
            # kept as long as its jobs can be: the window, then store.ttl_s (reset when it ends)
            pipe.expire(self.keys.openai_batch(batch_id), COMPLETION_WINDOWS[completion_window] + self.files.ttl_s)
            pipe.zadd(self.keys.openai_batches, {batch_id: time.time()})
            pipe.sadd(self.keys.openai_batches_active, batch_id)
            pipe.execute()
        return self.get(batch_id)

    def get(self, batch_id: str) -> BatchObject:
        """The batch object with live ``request_counts``. Raises :class:`JobNotFound`."""
        h = self._hash(batch_id)
        if h is None:
            raise JobNotFound(f"no batch {batch_id!r} (never created, or it expired)", param="batch_id")
        return self._object(h)

    def list(self, *, after: str | None = None, limit: int = 20) -> tuple[list[BatchObject], bool]:
        """Batches, newest first, after the batch id ``after``; and whether more follow."""
        if not 1 <= limit <= 100:
            raise InvalidRequest("limit must be between 1 and 100", param="limit")
        with redis_errors(self.url):
            if after is None:
                ids = self.redis.zrevrange(self.keys.openai_batches, 0, limit)
            else:
                rank = self.redis.zrevrank(self.keys.openai_batches, after)
                if rank is None:
                    raise InvalidRequest(f"no batch {after!r} to list after", param="after")
                ids = self.redis.zrevrange(self.keys.openai_batches, rank + 1, rank + 1 + limit)
        out: list[BatchObject] = []
        gone = []
        for batch_id in ids[:limit]:
            h = self._hash(batch_id)
            if h is None:
                gone.append(batch_id)
            else:
                out.append(self._object(h))
        if gone:
            with redis_errors(self.url):
                self.redis.zrem(self.keys.openai_batches, *gone)
        return out, len(ids) > limit

    def active_ids(self) -> list[str]:
        """Batches not yet in a final status (what a background loop should :meth:`refresh`)."""
        with redis_errors(self.url):
            return sorted(self.redis.smembers(self.keys.openai_batches_active))

    # -- cancel ----------------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> BatchObject:
        """Cancel a batch: queued requests never run, running ones are aborted; the batch stays
        ``cancelling`` until they stop, then finalizes its partial output as ``cancelled``. Cancelling
        a cancelling or cancelled batch again returns it; a finished one raises
        :class:`InvalidRequest`."""
        now = int(time.time())
        moved, status = self._move(
            batch_id, ("validating", "in_progress"), "cancelling", cancelling_at=now, stop_reason="cancel"
        )
        if not moved and status == "":
            raise JobNotFound(f"no batch {batch_id!r} (never created, or it expired)", param="batch_id")
        if not moved and status == "cancelled":
            return self.get(batch_id)  # cancelled already: a retried cancel gets the batch, not an error
        if not moved and status not in ("cancelling",):
            raise InvalidRequest(
                f"batch {batch_id} is {status} and cannot be cancelled", param="batch_id"
            )
        self._cancel_jobs(batch_id)
        return self.get(batch_id)

    def _cancel_jobs(self, batch_id: str) -> None:
        for job_id in self.client.batch_jobs(batch_id):
            try:
                self.client.store.cancel(job_id)
            except VlqError as e:
                log.warning("batch %s: could not cancel %s: %s", batch_id, job_id, e)

    # -- moving a batch on -----------------------------------------------------------------------

    def refresh(self, batch_id: str) -> BatchObject:
        """Do whatever the batch is waiting for: validate and submit it, expire it, or write its
        output and error files once every request is finished. Idempotent; returns the batch."""
        h = self._hash(batch_id)
        if h is None:
            raise JobNotFound(f"no batch {batch_id!r} (never created, or it expired)", param="batch_id")
        status = h["status"]
        if status in FINAL_STATUSES:
            with redis_errors(self.url):  # left in the active set by a process that stopped at the wrong moment
                self.redis.srem(self.keys.openai_batches_active, batch_id)
            return self._object(h)
        if status == "validating" or (status == "cancelling" and not h.get("jobs")):
            self._with_lock(batch_id, self._validate_and_submit)
            h = self._hash(batch_id) or h
            status = h["status"]
        expired = int(time.time()) >= int(h.get("expires_at") or 0)
        if status == "in_progress" and expired and not h.get("stop_reason"):
            self._hset(batch_id, stop_reason="expire")
            self._cancel_jobs(batch_id)
            h = self._hash(batch_id) or h
        if status in ("in_progress", "finalizing", "cancelling") and self._all_finished(h):
            self._with_lock(batch_id, self._finalize)
            h = self._hash(batch_id) or h
        return self._object(h)

    def _with_lock(self, batch_id: str, work: Callable[[str], None]) -> bool:
        lock = self.keys.openai_batch_lock(batch_id)
        token = uuid.uuid4().hex
        with redis_errors(self.url):
            if not self.redis.set(lock, token, nx=True, ex=LOCK_TTL_S):
                return False
        try:
            work(batch_id)
        finally:
            with redis_errors(self.url):
                self._unlock(keys=[lock], args=[token])
        return True

    def _all_finished(self, h: dict[str, str]) -> bool:
        if not h.get("jobs"):
            return h["status"] == "cancelling"  # cancelled before anything was submitted
        expected = int(h["jobs"])
        if expected == 0:
            return True
        counts = self.client.store.batch(h["id"])
        return counts.total >= expected and counts.finished >= counts.total

    # -- validating ------------------------------------------------------------------------------

    def _validate_and_submit(self, batch_id: str) -> None:
        h = self._hash(batch_id)
        # A batch found validating with its jobs counted was cut off while submitting: running
        # this again resubmits the same job ids, which is idempotent.
        if h is None or h["status"] != "validating":
            return  # cancelled before validation: nothing to submit, finalize marks it cancelled
        try:
            lines, structural = self._read_lines(h["input_file_id"], h["endpoint"])
        except JobNotFound:
            structural = [LineError(code="file_not_found", message=f"input file {h['input_file_id']} is gone",
                                    param="input_file_id")]
            lines = []
        now = int(time.time())
        if structural:
            self._move(batch_id, ("validating",), "failed", failed_at=now,
                       errors=json.dumps([e.model_dump() for e in structural[:MAX_REPORTED_ERRORS]]))
            self._deactivate(batch_id)
            log.info("batch %s: failed validation (%d bad lines)", batch_id, len(structural))
            return

        jobs: list[Job] = []
        rejected: list[RejectedLine] = []
        for item in lines:
            try:
                if item.body.get("stream"):
                    raise InvalidRequest("stream is not supported in a batch", param="body.stream")
                self.preflight(item.body)
                jobs.append(
                    self.client.make_job(
                        item.body,
                        job_id=f"{batch_id}-{item.line}",
                        batch_id=batch_id,
                        metadata={"custom_id": item.custom_id, "line": item.line},
                        validate=False,
                    )
                )
            except BadInput as e:
                param = e.context.get("param")
                rejected.append(RejectedLine(
                    line=item.line, custom_id=item.custom_id, code=e.code, message=e.message,
                    param=f"body.{param}" if param and not str(param).startswith("body") else param,
                    status_code=e.http_status,
                ))
        line_errors = [
            LineError(code=r.code, message=r.message, param=r.param, line=r.line).model_dump()
            for r in rejected[:MAX_REPORTED_ERRORS]
        ]
        self._hset(
            batch_id,
            lines=len(lines),
            rejected=json.dumps([r.model_dump() for r in rejected]),
            errors=json.dumps(line_errors) if line_errors else "",
            model=_first_model(lines) or self.served_model,
            jobs=len(jobs),
        )
        self._submit(jobs)
        moved, status = self._move(batch_id, ("validating",), "in_progress", in_progress_at=int(time.time()))
        if not moved and status == "cancelling":
            self._cancel_jobs(batch_id)  # a cancel arrived while the jobs were being submitted
        log.info("batch %s: %d requests queued, %d rejected", batch_id, len(jobs), len(rejected))

    def _read_lines(self, file_id: str, endpoint: str) -> tuple[list[_Line], list[LineError]]:
        errors: list[LineError] = []
        lines: list[_Line] = []
        seen: set[str] = set()
        for n, raw in enumerate(_split_lines(self.files.iter_content(file_id)), 1):
            if not raw.strip():
                continue
            if len(lines) + len(errors) >= MAX_REQUESTS:
                errors.append(LineError(code="too_many_requests", line=n, message=(
                    f"the file has more than {MAX_REQUESTS} requests; split it into several batches")))
                break
            err, item = _check_line(raw, n, endpoint, seen)
            if err is not None:
                errors.append(err)
            elif item is not None:
                lines.append(item)
        if not lines and not errors:
            errors.append(LineError(code="empty_file", message="the input file holds no requests",
                                    param="input_file_id"))
        return lines, errors

    def _submit(self, jobs: Sequence[Job]) -> None:
        """Record and send jobs; ids already recorded are sent again only while still queued (a
        resumed submission), which workers treat as a duplicate delivery."""
        store = self.client.store
        for start in range(0, len(jobs), SUBMIT_CHUNK):
            chunk = jobs[start:start + SUBMIT_CHUNK]
            created = store.create_many(chunk, self.client.queue)
            statuses = store.statuses([j.id for j in chunk])
            to_send = [j for j, new, st in zip(chunk, created, statuses) if new or st is JobStatus.QUEUED]
            try:
                with self.client.celery.producer_or_acquire() as producer:
                    for job in to_send:
                        send_job(self.client.celery, job, self.client.queue, producer=producer)
            except BrokerUnavailable:
                raise
            except Exception as e:  # kombu raises connection errors of several kinds here
                raise BrokerUnavailable(f"cannot send batch jobs to the broker: {e}") from e

    # -- finalizing ------------------------------------------------------------------------------

    def _finalize(self, batch_id: str) -> None:
        h = self._hash(batch_id)
        if h is None or h["status"] in FINAL_STATUSES or not self._all_finished(h):
            return
        stop = h.get("stop_reason") or ""
        if h["status"] == "in_progress" and not stop:
            self._move(batch_id, ("in_progress",), "finalizing", finalizing_at=int(time.time()))
        output = self.files.writer(filename=f"{batch_id}_output.jsonl", purpose="batch_output",
                                   file_id=f"file-{batch_id}-output")
        errors = self.files.writer(filename=f"{batch_id}_error.jsonl", purpose="batch_output",
                                   file_id=f"file-{batch_id}-errors")
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        n_out = n_err = 0
        try:
            for line in self._result_lines(batch_id, h, stop):
                ok = line["error"] is None and line["response"]["status_code"] == 200
                if ok:
                    u = line["response"]["body"].get("usage") or {}
                    usage["input_tokens"] += int(u.get("prompt_tokens") or 0)
                    usage["output_tokens"] += int(u.get("completion_tokens") or 0)
                    usage["total_tokens"] += int(u.get("total_tokens") or 0)
                data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
                if ok:
                    output.write(data)
                    n_out += 1
                else:
                    errors.write(data)
                    n_err += 1
            out_file = output.commit().id if n_out else None
            err_file = errors.commit().id if n_err else None
        except BaseException:
            output.abort()
            errors.abort()
            raise
        if not n_out:
            output.abort()
        if not n_err:
            errors.abort()
        final = {"cancel": "cancelled", "expire": "expired"}.get(stop, "completed")
        now = int(time.time())
        fields: dict[str, Any] = {
            f"{final}_at": now,
            "output_file_id": out_file or "",
            "error_file_id": err_file or "",
            "usage": json.dumps({
                **usage,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            }),
        }
        self._move(batch_id, ("in_progress", "finalizing", "cancelling"), final, **fields)
        self._deactivate(batch_id)
        log.info("batch %s: %s (%d ok, %d errors)", batch_id, final, n_out, n_err)

    def _result_lines(self, batch_id: str, h: dict[str, str], stop: str) -> Iterator[dict[str, Any]]:
        rejected = [RejectedLine.model_validate(r) for r in json.loads(h.get("rejected") or "[]")]
        rejected_lines = ((r.line, 0, r) for r in rejected)
        job_lines = ((_line_of(batch_id, rec), 1, rec) for rec in self._records(batch_id))
        for _, _, item in heapq.merge(rejected_lines, job_lines, key=lambda x: (x[0], x[1])):
            if isinstance(item, RejectedLine):
                yield _error_response_line(item.custom_id, f"{batch_id}-{item.line}", item.status_code,
                                           item.code, item.message, item.param)
            else:
                yield self._record_line(item, stop)

    def _records(self, batch_id: str) -> Iterator[JobRecord]:
        ids = self.client.batch_jobs(batch_id)
        for start in range(0, len(ids), SUBMIT_CHUNK):
            page = ids[start:start + SUBMIT_CHUNK]
            for job_id, record in zip(page, self.client.store.get_many(page)):
                if record is not None:
                    yield record
                else:
                    log.warning("batch %s: record of %s expired before finalizing", batch_id, job_id)

    def _record_line(self, record: JobRecord, stop: str) -> dict[str, Any]:
        meta = record.job().metadata if record.job_json else {}
        custom_id = str(meta.get("custom_id", record.id))
        if record.status is JobStatus.SUCCEEDED:
            try:
                body = self.client.result_of(record)
            except VlqError as e:
                return _error_response_line(custom_id, record.id, 500, e.code, e.message, None)
            if self.on_result is not None:
                self.on_result(record, body)
            return {
                "id": _request_line_id(record.id),
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": record.id, "body": body},
                "error": None,
            }
        if record.status is JobStatus.FAILED:
            if self.on_result is not None:
                self.on_result(record, None)
            err = error_from_dict(record.error or {"code": "internal_error", "message": "failed"})
            return _error_response_line(custom_id, record.id, err.http_status, err.code, err.message,
                                        err.context.get("param"))
        if stop == "expire":
            code = "batch_expired"
            message = "This request could not be executed before the completion window expired."
        elif stop == "cancel":
            code, message = "batch_cancelled", "The batch was cancelled before this request finished."
        else:
            code, message = "cancelled", f"job {record.id} was cancelled"
        return {"id": _request_line_id(record.id), "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": message}}

    # -- storage helpers -------------------------------------------------------------------------

    def _hash(self, batch_id: str) -> dict[str, str] | None:
        with redis_errors(self.url):
            h = self.redis.hgetall(self.keys.openai_batch(batch_id))
        return h or None

    def _hset(self, batch_id: str, **fields: Any) -> None:
        with redis_errors(self.url):
            self.redis.hset(self.keys.openai_batch(batch_id), mapping={k: str(v) for k, v in fields.items()})

    def _move(self, batch_id: str, allowed: Sequence[str], status: str, **fields: Any) -> tuple[bool, str]:
        args: list[Any] = [",".join(allowed), status]
        for k, v in fields.items():
            args += [k, str(v)]
        with redis_errors(self.url):
            moved, old = self._transition(keys=[self.keys.openai_batch(batch_id)], args=args)
        return bool(moved), old

    def _deactivate(self, batch_id: str) -> None:
        """The batch just ended: off the active set, and its record kept ``store.ttl_s`` more, as
        long as its output and error files (list() drops the ids whose record is gone)."""
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.srem(self.keys.openai_batches_active, batch_id)
            pipe.expire(self.keys.openai_batch(batch_id), self.files.ttl_s)
            pipe.execute()

    def _object(self, h: dict[str, str]) -> BatchObject:
        data: dict[str, Any] = {k: h.get(k) or None for k in (
            "id", "endpoint", "model", "input_file_id", "completion_window", "status",
            "output_file_id", "error_file_id")}
        for k in _TIMESTAMPS:
            data[k] = int(float(h[k])) if h.get(k) else None
        errors = json.loads(h["errors"]) if h.get("errors") else None
        data["errors"] = {"object": "list", "data": errors} if errors else None
        data["metadata"] = json.loads(h["metadata"]) if h.get("metadata") else None
        data["usage"] = json.loads(h["usage"]) if h.get("usage") else None
        data["request_counts"] = self._counts(h)
        return BatchObject.model_validate(data)

    def _counts(self, h: dict[str, str]) -> RequestCounts:
        if not h.get("lines"):
            return RequestCounts()
        rejected = len(json.loads(h.get("rejected") or "[]"))
        counts = self.client.store.batch(h["id"])
        return RequestCounts(
            total=int(h["lines"]),
            completed=counts.succeeded,
            failed=counts.failed + counts.cancelled + rejected,
        )


# -- line helpers ---------------------------------------------------------------------------------


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        rest += chunk
        *complete, rest = rest.split(b"\n")
        yield from complete
    if rest:
        yield rest


def _check_line(raw: bytes, n: int, endpoint: str, seen: set[str]) -> tuple[LineError | None, _Line | None]:
    def bad(code: str, message: str, param: str | None = None) -> tuple[LineError, None]:
        return LineError(code=code, message=f"line {n}: {message}", param=param, line=n), None

    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        return bad("invalid_json_line", f"not valid JSON ({e}); each line must be one JSON object")
    if not isinstance(obj, dict):
        return bad("invalid_json_line", "each line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("missing_required_parameter", "custom_id must be a non-empty string", "custom_id")
    if custom_id in seen:
        return bad("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line", "custom_id")
    seen.add(custom_id)
    if obj.get("method", "POST") != "POST":
        return bad("invalid_method", f"method must be POST, not {obj.get('method')!r}", "method")
    if obj.get("url") != endpoint:
        return bad("invalid_url", f"url must be the batch's endpoint {endpoint!r}, not {obj.get('url')!r}",
                   "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return bad("missing_required_parameter",
                   "body must be a JSON object (the chat.completions request)", "body")
    return None, _Line(line=n, custom_id=custom_id, body=body)


def _first_model(lines: Sequence[_Line]) -> str | None:
    for item in lines:
        model = item.body.get("model")
        if isinstance(model, str) and model:
            return model
    return None


def _line_of(batch_id: str, record: JobRecord) -> int:
    suffix = record.id[len(batch_id) + 1:]
    return int(suffix) if suffix.isdigit() else 0


def _request_line_id(job_id: str) -> str:
    return "batch_req_" + job_id


def _error_response_line(
    custom_id: str, request_id: str, status_code: int, code: str, message: str, param: Any
) -> dict[str, Any]:
    return {
        "id": _request_line_id(request_id),
        "custom_id": custom_id,
        "response": {
            "status_code": status_code,
            "request_id": request_id,
            "body": {"error": {
                "message": message,
                "type": "invalid_request_error" if status_code < 500 else "server_error",
                "param": param,
                "code": code,
            }},
        },
        "error": None,
    }


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise InvalidRequest("metadata must be an object of at most 16 pairs", param="metadata")
    for k, v in metadata.items():
        if not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise InvalidRequest(
                "metadata keys must be strings of at most 64 characters and values strings of at"
                " most 512", param="metadata")
