"""The producer SDK: submit jobs, follow them, read their results.

    from producer.client import Client

    client = Client.from_settings()
    handle = client.submit({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What is in the picture?"}]}]})
    print(handle.result(timeout=60)["choices"][0]["message"]["content"])

Everything here reads and writes the job records in Redis (:mod:`producer.state`); jobs reach
workers as Celery messages sent by task name (:mod:`producer.broker`). Waiting polls the records,
never Celery's ``AsyncResult`` (which leaks in long-lived producers, celery#3813). No torch here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from producer.broker import producer_app, send_job
from producer.config import Settings
from producer.errors import (
    BadInput,
    BrokerUnavailable,
    ConfigError,
    DuplicateJob,
    InvalidRequest,
    JobCancelled,
    JobNotFinished,
    JobNotFound,
    StoreUnavailable,
    TooManyImages,
    VlqError,
    error_from_dict,
)
from producer.keys import Keys
from producer.schema import ChatRequest, Destination, Job, JobStatus, parse_chat_request
from producer.state import BatchCounts, JobRecord, JobStore, redis_errors, safe_url
from producer.text import counted

_POLL_MIN_S = 0.01
_POLL_MAX_S = 0.25


def new_batch_id() -> str:
    return "batch-" + uuid.uuid4().hex[:24]


def default_destination(settings: Settings) -> Destination:
    """Where results go when a job does not say: ``store.kind`` with its S3 bucket and prefix."""
    if settings.store.kind == "s3":
        return Destination(kind="s3", bucket=settings.store.s3.bucket, prefix=settings.store.s3.prefix)
    return Destination()


@dataclass(frozen=True)
class StreamEvent:
    """One item of :meth:`Client.stream`: a piece of answer text (with, when the request asked for
    logprobs, the ``choices[0].logprobs.content`` entries of the tokens it completes), or the
    final ``done`` event carrying ``finish_reason`` and ``usage``. ``system_fingerprint``: the
    answering engine's, once its worker has named it (None before, and from older workers)."""

    type: str  # "delta" | "done"
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    result: dict[str, Any] | None = field(default=None, repr=False)
    system_fingerprint: str | None = None


class Client:
    """Submit jobs and follow them. Thread-safe; build once and share.

    ``settings`` are the validated :class:`producer.config.Settings` (Redis URL, queue, key prefix,
    default result store). ``name_store``: not-found errors say which Redis and key prefix were
    searched (for the operator at a CLI); the HTTP API turns it off, as its callers have no use
    for the deployment's hosts.
    """

    def __init__(self, settings: Settings, *, store: JobStore | None = None, name_store: bool = True) -> None:
        self.settings = settings
        self.name_store = name_store
        self.keys = Keys(settings.key_prefix)
        self.store = store or JobStore.from_settings(settings)
        self.queue = settings.broker.queue
        self._celery = None
        self._s3 = None

    @classmethod
    def from_settings(cls, conf_dir: str | None = None, **overrides: Any) -> Client:
        """A client for ``Settings.load(conf_dir, **overrides)`` (conf/*.yaml + VLQ_* variables)."""
        return cls(Settings.load(conf_dir, **overrides))

    def close(self) -> None:
        """Close the Redis connections (and the Celery producer, if one was made); the client is
        also a context manager that does this on exit."""
        self.store.close()
        if self._celery is not None:
            self._celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def celery(self):
        if self._celery is None:
            self._celery = producer_app(self.settings)
        return self._celery

    # -- submitting -----------------------------------------------------------------------------

    def make_job(
        self,
        request_or_job: dict[str, Any] | ChatRequest | Job,
        *,
        destination: Destination | dict[str, Any] | None = None,
        batch_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        job_id: str | None = None,
        validate: bool = True,
    ) -> Job:
        """Build (and by default validate) the job :meth:`submit` would send; a bad id, batch id,
        destination or metadata raises :class:`InvalidRequest` naming the field."""
        if isinstance(destination, dict):
            try:
                destination = Destination.model_validate(destination)
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                field = ".".join(["destination", *(str(part) for part in first["loc"])])
                raise InvalidRequest(f"invalid job: {field}: {first['msg'].removeprefix('Value error, ')}",
                                     param=field) from None
        try:
            json.dumps(metadata or {})
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"invalid job: metadata must hold JSON values only ({e})", param="metadata") from None
        try:
            job = self._job(request_or_job, destination, batch_id, metadata, job_id)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            field = ".".join(str(part) for part in first["loc"]) or (
                "destination" if isinstance(destination, dict) else "job")
            message = first["msg"].removeprefix("Value error, ")
            if field in ("id", "batch_id"):
                message = f"{first['input']!r} is not an id: use 1 to 200 letters, digits, '_', '.', ':' or '-'"
            raise InvalidRequest(f"invalid job: {field}: {message}", param=field) from None
        if validate:
            self.preflight(job)
        return job

    def _job(self, request_or_job: dict[str, Any] | ChatRequest | Job, destination: Destination | dict[str, Any] | None,
             batch_id: str | None, metadata: dict[str, Any] | None, job_id: str | None) -> Job:
        if isinstance(destination, dict):
            destination = Destination.model_validate(destination)
        if isinstance(request_or_job, Job):
            update: dict[str, Any] = {}
            if destination is not None:
                update["destination"] = destination
            if batch_id is not None:
                update["batch_id"] = batch_id
            if metadata:
                update["metadata"] = {**request_or_job.metadata, **metadata}
            if job_id is not None:
                update["id"] = job_id
            return Job.model_validate({**request_or_job.model_dump(), **update})
        else:
            body = (
                request_or_job.model_dump(exclude_none=True)
                if isinstance(request_or_job, ChatRequest)
                else request_or_job
            )
            fields: dict[str, Any] = {
                "request": body,
                "destination": destination or default_destination(self.settings),
                "batch_id": batch_id,
                "metadata": metadata or {},
            }
            if job_id is not None:
                fields["id"] = job_id
            return Job(**fields)

    def preflight(self, job: Job) -> ChatRequest:
        """Check a job before it costs GPU time: the request body, and the image count against
        ``engine.max_images``. (The prompt length needs the tokenizer: the worker checks it.)"""
        request = parse_chat_request(job.request)
        limit = self.settings.engine.max_images
        if len(request.image_urls) > limit:
            raise TooManyImages(
                f"the request has {len(request.image_urls)} images; a worker accepts at most {limit}"
                " (engine.max_images): split it into several requests"
            )
        return request

    def submit(
        self,
        request_or_job: dict[str, Any] | ChatRequest | Job,
        *,
        destination: Destination | dict[str, Any] | None = None,
        batch_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        job_id: str | None = None,
        validate: bool = True,
    ) -> JobHandle:
        """Record one job as ``queued`` and send it to the workers' queue.

        ``request_or_job`` is an OpenAI chat.completions body (dict or :class:`ChatRequest`) or a
        ready :class:`Job` (``destination``, ``batch_id``, ``metadata`` then override its own).
        Without ``destination`` the result goes where ``store.kind`` says. ``validate=False``
        skips the producer-side checks (the worker checks everything again).

        Raises a :class:`BadInput` for an invalid request (:class:`InvalidRequest` naming the field
        in ``context["param"]``, :class:`UnsupportedContent`, :class:`TooManyImages`),
        :class:`DuplicateJob` for an id in use, :class:`BrokerUnavailable` when Redis cannot be
        reached.
        """
        job = self.make_job(
            request_or_job,
            destination=destination,
            batch_id=batch_id,
            metadata=metadata,
            job_id=job_id,
            validate=validate,
        )
        self.store.create(job, self.queue)
        try:
            send_job(self.celery, job, self.queue)
        except BrokerUnavailable:
            self._forget(job.id)
            raise
        return JobHandle(self, job.id, job.batch_id)

    def submit_many(
        self,
        items: Iterable[dict[str, Any] | ChatRequest | Job],
        *,
        batch_id: str | None = None,
        destination: Destination | dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        validate: bool = True,
    ) -> list[JobHandle]:
        """Submit many jobs as one batch (a fresh batch id unless given): all are validated
        first, so one bad item submits nothing (its error names it, ``items[i]``); then recorded
        and sent in few round trips. Follow progress with :meth:`batch`."""
        batch_id = batch_id or new_batch_id()
        jobs = []
        for i, item in enumerate(items):
            try:
                jobs.append(self.make_job(item, destination=destination, batch_id=batch_id, metadata=metadata,
                                          validate=validate))
            except BadInput as e:  # which item: items[i], as the CLI names lines and the API requests[i]
                param = e.context.get("param")
                raise type(e)(f"items[{i}]: {e.message}", code=e.code, **{
                    **e.context, "param": f"items[{i}]" + (f".{param}" if param else "")}) from None
        self.submit_jobs(jobs)
        return [JobHandle(self, job.id, job.batch_id) for job in jobs]

    def submit_jobs(self, jobs: Sequence[Job]) -> None:
        """Record and send ready jobs (no validation). Raises :class:`DuplicateJob` before
        sending anything when an id is in use."""
        if not jobs:
            return
        created = self.store.create_many(jobs, self.queue)
        dup = [j.id for j, ok in zip(jobs, created) if not ok]
        if dup:
            for job, ok in zip(jobs, created):
                if ok:
                    self._forget(job.id)
            raise DuplicateJob(f"job ids already in use: {', '.join(dup[:5])}", param="id")
        sent = 0
        try:
            with self.celery.producer_or_acquire() as producer:
                for job in jobs:
                    send_job(self.celery, job, self.queue, producer=producer)
                    sent += 1
        except BrokerUnavailable:
            for job in jobs[sent:]:
                self._forget(job.id)
            raise
        except Exception as e:  # kombu raises connection errors of several kinds here
            for job in jobs[sent:]:
                self._forget(job.id)
            raise BrokerUnavailable(f"cannot send jobs to the broker: {e}") from e

    def _forget(self, job_id: str) -> None:
        try:
            self.store.discard(job_id)
        except VlqError:
            pass

    # -- following ------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobRecord:
        """The job's record (status, timestamps, attempts, error). Raises :class:`JobNotFound`."""
        record = self.store.get(job_id)
        if record is None:
            hint = ("; that looks like a batch id: vlq status ID --batch (GET /v1/job_batches/ID)"
                    if job_id.startswith("batch") else "")
            raise JobNotFound(self._not_found(f"job {job_id!r}") + hint)
        return record

    def _not_found(self, what: str, gone: str = "its record expired") -> str:
        """A not-found message for ``what`` ("job 'job-…'"), naming where ids are looked up when
        :attr:`name_store`: a job submitted with another Redis or key prefix (another deployment,
        the demo's own) is not found here."""
        if not self.name_store:
            return f"no {what} (never submitted, or {gone})"
        where = f"{safe_url(self.store.url) or 'Redis'} under key prefix {self.settings.key_prefix!r}"
        return f"no {what} in {where} (never submitted there, or {gone})"

    def workers(self, *, stopped: bool = False) -> list[dict[str, Any]]:
        """The registered workers, by name: each one's registry entry (queue, gpu, checkpoint,
        running, ...) with ``name``, ``live`` (a heartbeat younger than ``worker.lease_timeout_s``)
        and ``heartbeat_s_ago``; ``stopped``: also those whose heartbeat stopped."""
        now, limit = time.time(), self.settings.worker.lease_timeout_s
        rows = []
        for name, info in sorted(self.store.workers().items()):
            age = now - float(info.get("at", 0))
            if age <= limit or stopped:
                rows.append({"name": name, "live": age <= limit, "heartbeat_s_ago": round(age, 1), **info})
        return rows

    def serving(self) -> list[dict[str, Any]]:
        """The live workers (:meth:`workers`) that serve this client's queue."""
        return [w for w in self.workers() if w.get("queue") == self.settings.broker.queue]

    def unserved_hint(self) -> str:
        """For a job still queued: a clause saying that no live worker serves this client's
        queue, when none does ("" otherwise, or when Redis cannot tell)."""
        try:
            if self.serving():
                return ""
        except VlqError:
            return ""
        return f"; no worker is serving queue {self.settings.broker.queue!r} now: start one (vlq worker --model DIR)"

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Poll until the job is terminal; returns its record. Raises :class:`JobNotFinished`
        after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_MIN_S
        while True:
            record = self.status(job_id)
            if record.is_terminal:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise JobNotFinished(
                    f"job {job_id} is still {record.status.value} after {timeout:g}s;"
                    f" wait longer or check the workers (vlq status {job_id})"
                    + (self.unserved_hint() if record.status is JobStatus.QUEUED else "")
                )
            sleep = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(sleep)
            delay = min(delay * 1.5, _POLL_MAX_S)

    def as_completed(
        self, job_ids: Sequence[str], timeout: float | None = None
    ) -> Iterator[JobRecord]:
        """Yield records of ``job_ids`` as each becomes terminal (polls all in one round trip).
        Raises :class:`JobNotFinished` after ``timeout`` for the ones left."""
        pending = list(dict.fromkeys(job_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_MIN_S
        while pending:
            statuses = self.store.statuses(pending)
            done = [j for j, s in zip(pending, statuses) if s is None or s.is_terminal]
            if done:
                for record, job_id in zip(self.store.get_many(done), done):
                    if record is None:
                        raise JobNotFound(self._not_found(f"job {job_id!r}"))
                    yield record
                finished = set(done)
                pending = [j for j in pending if j not in finished]
                delay = _POLL_MIN_S
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise JobNotFinished(f"{counted(len(pending), 'job')} still unfinished after {timeout:g}s"
                                     + (self.unserved_hint() if JobStatus.QUEUED in statuses else ""))
            time.sleep(delay)
            delay = min(delay * 1.5, _POLL_MAX_S)

    def result(self, job_id: str, timeout: float | None = 0) -> dict[str, Any]:
        """The job's result document (OpenAI ``chat.completion`` + ``boxes`` + ``vlq``).

        Waits up to ``timeout`` seconds (0, the default here: do not wait; None: no limit;
        :meth:`JobHandle.result` waits without limit by default). A failed job raises its own
        coded error, a cancelled one :class:`JobCancelled`, an unfinished one
        :class:`JobNotFinished` (the job goes on; cancel it with :meth:`cancel` if it is no
        longer wanted).
        """
        record = self.status(job_id) if timeout == 0 else self.wait(job_id, timeout)
        return self.result_of(record)

    def result_of(self, record: JobRecord) -> dict[str, Any]:
        """The result for a record already read (see :meth:`result`)."""
        if record.status is JobStatus.SUCCEEDED:
            return self._read_result(record)
        if record.status is JobStatus.FAILED:
            raise error_from_dict(record.error or {"code": "internal_error", "message": "failed"})
        if record.status is JobStatus.CANCELLED:
            raise JobCancelled(f"job {record.id} was cancelled")
        raise JobNotFinished(
            f"job {record.id} is {record.status.value}; wait for it (vlq result {record.id} --wait)"
        )

    def _read_result(self, record: JobRecord) -> dict[str, Any]:
        location = record.result_location or ""
        if location.startswith("s3://"):
            bucket, _, key = location[len("s3://"):].partition("/")
            return json.loads(self._s3_get(bucket, key))
        key = location[len("redis:"):] if location.startswith("redis:") else self.keys.result(record.id)
        with redis_errors(self.store.url):
            raw = self.store.redis.get(key)
        if raw is None:
            raise JobNotFound(f"the result of job {record.id} has expired (store.ttl_s)")
        return json.loads(raw)

    def _s3_get(self, bucket: str, key: str) -> bytes:
        try:
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("reading S3 results needs boto3: pip install 'vlq[s3]'") from None
        try:
            return self.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise JobNotFound(f"no result object s3://{bucket}/{key}") from None
            raise StoreUnavailable(f"cannot read s3://{bucket}/{key}: {e}") from e
        except BotoCoreError as e:
            raise StoreUnavailable(f"cannot read s3://{bucket}/{key}: {e}") from e

    def s3_client(self):
        """A boto3 S3 client for ``store.s3`` (made on first use)."""
        if self._s3 is None:
            import boto3

            s3 = self.settings.store.s3
            self._s3 = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region)
        return self._s3

    def cancel(self, job_id: str) -> str:
        """Cancel a job. A queued job becomes ``cancelled`` at once and is never run; a running
        one is aborted by its worker (returns ``'cancelling'``; wait for ``cancelled``). A
        finished job keeps its status, which is returned."""
        outcome = self.store.cancel(job_id)
        if outcome == "missing":
            raise JobNotFound(self._not_found(f"job {job_id!r}"))
        return outcome

    def batch(self, batch_id: str) -> BatchCounts:
        """A batch's counts: total, queued, running, succeeded, failed, cancelled."""
        counts = self.store.batch(batch_id)
        if counts.total == 0:
            hint = "; that is a job id: leave --batch out" if batch_id.startswith("job-") else ""
            raise JobNotFound(self._not_found(f"batch {batch_id!r}", "it expired") + hint)
        return counts

    def batch_jobs(self, batch_id: str) -> list[str]:
        """The ids of a batch's jobs in submission order."""
        return self.store.batch_job_ids(batch_id)

    def stream(self, job_id: str, timeout: float | None = None, *,
               idle_timeout: float | None = None) -> Iterator[StreamEvent]:
        """Yield the answer's text as the worker produces it, then one ``done`` event.

        Token-level deltas exist for jobs whose request says ``"stream": true``; for other jobs
        the whole answer arrives as one delta when the job finishes. If a job is restarted on
        another worker, text (and logprob entries) already yielded are not repeated. A failed job
        raises its error, a cancelled one :class:`JobCancelled`; :class:`JobNotFinished` after
        ``timeout`` seconds in all, or after ``idle_timeout`` seconds without a new event (a job
        still queued, or stalled). Either way the job goes on.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        idle_deadline = None if idle_timeout is None else time.monotonic() + idle_timeout
        emitted = tokens = 0  # characters of the answer, and logprob entries, yielded so far
        last = "0"
        fingerprint = None  # the answering engine's, from its attempt's first event
        while True:
            block = 500
            for end in (deadline, idle_deadline):
                if end is None:
                    continue
                left = end - time.monotonic()
                if left <= 0:
                    state = self.status(job_id).status.value
                    if state == "running" and not emitted:  # taken by a worker, maybe behind others for a slot
                        state = "running, no text yet: waiting for an engine slot or still reading its images"
                    what = (f"did not finish within {timeout:g}s" if end is deadline
                            else f"sent nothing new for {idle_timeout:g}s")
                    hint = self.unserved_hint() if state == "queued" else ""
                    raise JobNotFinished(f"job {job_id} ({state}) {what}{hint}; it goes on: fetch its result later"
                                         f" (vlq result {job_id} --wait, or GET /v1/jobs/{job_id})", job_id=job_id)
                block = max(1, min(block, int(left * 1000)))
            events = self.store.read_events(job_id, last, block_ms=block)
            if events and idle_timeout is not None:
                idle_deadline = time.monotonic() + idle_timeout
            if not events:
                record = self.status(job_id)
                if not record.is_terminal:
                    continue
                # Every event is written before the record turns terminal: read what is left.
                events = self.store.read_events(job_id, last)
                if not events:
                    yield from self._stream_from_result(record, emitted, tokens)
                    return
            for event_id, event in events:
                last = event_id
                fingerprint = event.get("system_fingerprint") or fingerprint
                if event.get("type") == "delta":
                    new = _unseen(event.get("text", ""), int(event.get("offset", 0)), emitted)
                    entries = _unseen(event.get("logprobs") or [], int(event.get("token_offset", 0)), tokens)
                    if new or entries:
                        emitted += len(new)
                        tokens += len(entries)
                        yield StreamEvent("delta", text=new, logprobs=entries, system_fingerprint=fingerprint)
                elif event.get("type") == "done":
                    yield StreamEvent("done", finish_reason=event.get("finish_reason"), usage=event.get("usage"),
                                      system_fingerprint=fingerprint)
                    return

    def _stream_from_result(self, record: JobRecord, emitted: int, tokens: int) -> Iterator[StreamEvent]:
        result = self.result_of(record)
        choice = (result.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content") or ""
        entries = ((choice.get("logprobs") or {}).get("content") or [])[tokens:]
        fingerprint = result.get("system_fingerprint")
        if len(content) > emitted or entries:
            yield StreamEvent("delta", text=content[emitted:], logprobs=entries, system_fingerprint=fingerprint)
        yield StreamEvent(
            "done",
            finish_reason=choice.get("finish_reason"),
            usage=result.get("usage"),
            result=result,
            system_fingerprint=fingerprint,
        )


def _unseen(items: Any, offset: int, seen: int) -> Any:
    """The part of ``items`` (text, or a list of entries) starting at ``offset`` of an answer that
    lies past its first ``seen`` items: what a reader has not had yet."""
    return items[max(0, seen - offset):] if offset + len(items) > seen else items[:0]


class JobHandle:
    """A submitted job (``id``, ``batch_id``): ``status()``, ``record()``, ``wait()``,
    ``result(timeout)``, ``cancel()``, ``stream()``; each calls the :class:`Client` method of
    the same name with this job's id."""

    def __init__(self, client: Client, job_id: str, batch_id: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.batch_id = batch_id

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def status(self) -> JobStatus:
        """The job's status now (queued, running, succeeded, failed, cancelled)."""
        return self.client.status(self.id).status

    def record(self) -> JobRecord:
        """The job's whole record: status, times, attempts, worker, error (:meth:`Client.status`)."""
        return self.client.status(self.id)

    def wait(self, timeout: float | None = None) -> JobRecord:
        """Poll until the job ends (None: no limit) and return its record; :class:`JobNotFinished`
        after ``timeout`` seconds, the job going on."""
        return self.client.wait(self.id, timeout)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait up to ``timeout`` seconds (None, the default here: no limit; 0: do not wait) and
        return the result document; errors as :meth:`Client.result`."""
        return self.client.result(self.id, timeout)

    def cancel(self) -> str:
        """Cancel the job: ``cancelled`` (it never runs), ``cancelling`` (its worker aborts it) or
        the status it had already ended with (:meth:`Client.cancel`)."""
        return self.client.cancel(self.id)

    def stream(self, timeout: float | None = None, *, idle_timeout: float | None = None) -> Iterator[StreamEvent]:
        """The answer's text as it is written, then a ``done`` event (:meth:`Client.stream`)."""
        return self.client.stream(self.id, timeout, idle_timeout=idle_timeout)
