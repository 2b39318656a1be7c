"""The Celery task: one job from message to result.

The task is thin; :class:`JobRunner` does the work and never lets bad input escape:

1. decode the message (:meth:`Job.from_wire`); an undecodable one goes to the dead-letter list,
   and is recorded ``failed`` with ``malformed_job`` when its id can be read;
2. take the job (:meth:`JobStore.start`): a delivery for a job that is finished, cancelled, or
   held by another live run is acknowledged and skipped;
3. validate the request (schema, image count, prompt length), load its images, hand it to the
   engine with the job's wall-clock deadline, and wait for the ``chat.completion``;
4. write the result (key = job id: a second delivery rewrites the same key) and mark the job
   ``succeeded``; or mark it ``failed`` with the error's code and message, or ``cancelled``.

Transient errors (an image server that timed out, Redis away) are retried with exponential
backoff, at most ``worker.max_retries`` times, with delays kept below the broker's visibility
timeout (the job's ``last_error`` says which retry comes when); then the job fails with the
error's own code and a message that says how many attempts were made and what to check. A result
store that is unavailable (S3 5xx) is tried again in place, as often, with the answer kept: the
engine's work is not done again.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

from producer.broker import TASK_NAME
from producer.config import Settings
from producer.errors import (
    BrokerUnavailable,
    DeadlineExceeded,
    EngineError,
    JobCancelled,
    MalformedJob,
    StoreUnavailable,
    TransientError,
    VlqError,
)
from producer.schema import ChatRequest, Job, JobStatus
from producer.state import JobStore
from worker.leases import Lease, LeaseKeeper
from worker.stores import ResultStores

log = logging.getLogger(__name__)


class ChatEngineLike(Protocol):
    """What the task needs of :class:`worker.engine.chat.ChatEngine`."""

    def validate(self, request: ChatRequest) -> None: ...

    def submit(self, request: ChatRequest, images: list[Any], *, request_id: str,
               deadline: float | None = None,
               on_delta: Callable[[str, list[dict[str, Any]]], None] | None = None) -> Any: ...

    def abort(self, request_id: str) -> None: ...


class ImageLoaderLike(Protocol):
    def load_all(self, urls: list[str]) -> list[Any]: ...


class EventWriter:
    """Appends streaming events to Redis from a background thread, so the engine's thread,
    which calls ``on_delta`` for every token, never waits on the network."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vlq-events", daemon=True)
        self._thread.start()

    def emit(self, job_id: str, event: dict[str, Any]) -> None:
        self._queue.put((job_id, event))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything emitted so far is in Redis (bounded)."""
        done = threading.Event()
        self._queue.put(("", {"_flush": done}))
        done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 256:  # write what piled up in one round trip per job
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._write(batch)
                    return
                batch.append(nxt)
            self._write(batch)

    def _write(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        by_job: dict[str, list[dict[str, Any]]] = {}
        flushes = []
        for job_id, event in batch:
            if "_flush" in event:
                flushes.append(event["_flush"])
            else:
                by_job.setdefault(job_id, []).append(event)
        for job_id, events in by_job.items():
            try:
                self.store.append_events(job_id, events)
            except VlqError as e:
                log.warning("job %s: could not write %d stream events: %s", job_id, len(events), e)
        for done in flushes:
            done.set()


@dataclass
class Outcome:
    """What a run ended with; ``retry_in`` asks the task to retry after that many seconds."""

    status: str
    retry_in: float | None = None


class _ResultNotWritten(Exception):
    """The result store stayed unavailable through every in-place try: fail the job, do not
    compute the answer again."""

    def __init__(self, error: VlqError) -> None:
        super().__init__(error.message)
        self.error = error


class JobRunner:
    """Runs jobs for one worker process: shared by all of Celery's threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: JobStore,
        engine: ChatEngineLike,
        images: ImageLoaderLike,
        results: ResultStores,
        leases: LeaseKeeper,
        worker_name: str,
        queue_name: str,
        events: EventWriter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.images = images
        self.results = results
        self.leases = leases
        self.worker_name = worker_name
        self.queue_name = queue_name
        self.events = events or EventWriter(store)

    def close(self) -> None:
        self.events.close()

    # -- the whole path --------------------------------------------------------------------------

    def run(self, raw: Any, retries: int = 0) -> Outcome:
        """Run one delivered message. Never raises for anything a message can contain."""
        received = time.time()
        try:
            job = Job.from_wire(raw)
        except MalformedJob as e:
            return self._malformed(raw, e)
        token = f"{self.worker_name}/{uuid.uuid4().hex[:12]}"
        try:
            taken = self.store.start(
                job,
                token=token,
                worker=self.worker_name,
                lease_timeout_s=self.settings.worker.lease_timeout_s,
                queue=self.queue_name,
            )
        except BrokerUnavailable as e:
            # Not taken: the message is acknowledged when we return, so ask for a retry.
            log.warning("job %s: cannot reach Redis to start it: %s", job.id, e)
            return Outcome("retry", self._backoff(retries))
        if not taken.started:
            log.info("job %s: skipped delivery (%s)", job.id, taken.status)
            return Outcome(f"skipped:{taken.status}")
        lease = self.leases.track(job.id, token, on_abort=lambda: self.engine.abort(job.id))
        log.info("job %s: started (attempt %d%s)", job.id, taken.attempt,
                 f", batch {job.batch_id}" if job.batch_id else "")
        try:
            return self._run_taken(job, lease, taken.attempt, retries, received)
        except BrokerUnavailable as e:
            # The record cannot be written; the lease goes stale and a live worker reclaims it.
            log.error("job %s: Redis unavailable while finishing, left for reclaim: %s", job.id, e)
            return Outcome("abandoned")
        finally:
            self.leases.untrack(lease)

    def _run_taken(
        self, job: Job, lease: Lease, attempt: int, retries: int, received: float
    ) -> Outcome:
        started = time.time()
        try:
            document = self._execute(job, lease, attempt, received)
            location = self._put_result(job, lease, document)
        except _ResultNotWritten as e:
            return self._fail(job, e.error)
        except JobCancelled as e:
            if lease.lost.is_set() and not lease.cancelled.is_set():
                log.info("job %s: stopped, another run holds it", job.id)
                return Outcome("lost")
            status, _ = self.store.finish(job, JobStatus.CANCELLED, error=e)
            log.info("job %s: %s", job.id, status.value)
            return Outcome(status.value)
        except TransientError as e:
            most = self.settings.worker.max_retries
            if retries < most:
                delay = self._backoff(retries)
                self.leases.untrack(lease)  # no renewal while the lease is parked for the retry
                if self.store.release_for_retry(job.id, lease.token, delay,
                                                e.with_note(f"retry {retries + 1} of {most} in {delay:.1f}s")):
                    log.warning("job %s: %s; retry %d/%d in %.1fs", job.id, e.code, retries + 1, most, delay)
                    return Outcome("retry", delay)
                return Outcome("lost")
            return self._fail(job, e.with_note(f"gave up after {retries + 1} attempts: {e.remedy}"))
        except VlqError as e:
            return self._fail(job, e)
        except Exception as e:  # a bug, not bad input: record it, keep the worker alive
            log.exception("job %s: unexpected error", job.id)
            return self._fail(job, EngineError(f"unexpected worker error: {type(e).__name__}: {e}"))
        status, changed = self.store.finish(job, JobStatus.SUCCEEDED, result_location=location)
        log.info("job %s: %s in %.0f ms (attempt %d; %s)%s", job.id, status.value,
                 (time.time() - started) * 1000, attempt, _breakdown(document),
                 "" if changed else " (already finished)")
        return Outcome(status.value)

    def _put_result(self, job: Job, lease: Lease, document: dict[str, Any]) -> str:
        """Write the answer to the job's result store, trying again in place (the lease renewed
        meanwhile) while the store is unavailable: a store that blinks costs a wait, not the
        answer's whole computation again. After ``worker.max_retries`` more tries the job fails
        with the store's error."""
        store = self.results.for_destination(job.destination)
        most = self.settings.worker.max_retries
        tries = 0
        while True:
            try:
                return store.put(job.id, document)
            except StoreUnavailable as e:
                if tries == most:  # the answer was computed once; computing it again would not help
                    raise _ResultNotWritten(e.with_note(
                        f"gave up after {most + 1} attempts to write the result: {e.remedy}")) from None
                delay = self._backoff(tries)
                tries += 1
                log.warning("job %s: could not write its result (%s); trying again in %.1fs, the answer kept",
                            job.id, e.message, delay)
                if lease.cancelled.wait(delay) or lease.lost.is_set():
                    self._check_stopped(job, lease)

    def _execute(self, job: Job, lease: Lease, attempt: int, received: float) -> dict[str, Any]:
        request = job.chat_request()
        self.engine.validate(request)
        self._check_stopped(job, lease)
        t0 = time.time()
        images = self.images.load_all(request.image_urls)
        images_ms = (time.time() - t0) * 1000
        self._check_stopped(job, lease)
        deadline = time.monotonic() + self.settings.worker.job_timeout_s
        on_delta = self._delta_writer(job.id, attempt) if request.stream else None
        t1 = time.time()
        future = self.engine.submit(
            request, images, request_id=job.id, deadline=deadline, on_delta=on_delta
        )
        if lease.stopped:  # a cancel that arrived while the request was being submitted
            self.engine.abort(job.id)
        try:
            # The engine enforces the deadline; this bound only guards against a stuck engine.
            document = future.result(timeout=self.settings.worker.job_timeout_s + 60)
        except FutureTimeout:
            self.engine.abort(job.id)
            raise DeadlineExceeded(
                f"job {job.id} did not finish within worker.job_timeout_s"
                f" ({self.settings.worker.job_timeout_s:g}s)"
            ) from None
        engine_ms = (time.time() - t1) * 1000
        if request.stream:
            self._emit_done(job.id, attempt, document)
        vlq = dict(document.get("vlq") or {})
        vlq.update(
            job_id=job.id,
            worker=self.worker_name,
            attempt=attempt,
            batch_id=job.batch_id,
            metadata=job.metadata,
            # [width, height] of each picture as decoded (what the boxes' pixels refer to)
            image_sizes=[_size(image) for image in images],
        )
        # Milliseconds: the engine's own (preprocess, queued, vision, prefill, decode, ttft,
        # total) plus the job's wait in the queue, its image fetching and the engine's wall time.
        vlq["timings"] = {
            **(vlq.get("timings") or {}),
            "job_queue": round(max(0.0, (received - job.created_at) * 1000), 3),
            "images": round(images_ms, 3),
            "engine_wall": round(engine_ms, 3),
        }
        return {**document, "vlq": vlq}

    def _check_stopped(self, job: Job, lease: Lease) -> None:
        if lease.cancelled.is_set() or self.store.cancel_requested(job.id):
            lease.cancelled.set()
            raise JobCancelled(f"job {job.id} was cancelled")
        if lease.lost.is_set():
            raise JobCancelled(f"job {job.id} is held by another run")

    def _delta_writer(self, job_id: str, attempt: int) -> Callable[[str, list[dict[str, Any]]], None]:
        """The engine's ``on_delta`` for a streamed job: each piece of text (and the logprob
        entries it completes) becomes a delta event, with where it starts in this attempt's answer
        (``offset`` in characters, ``token_offset`` in entries) so that readers skip what an
        earlier attempt already gave them). An attempt's first event also names the engine's
        ``system_fingerprint``, which streamed chunks carry from the first on."""
        offset = token_offset = 0
        fingerprint = getattr(self.engine, "system_fingerprint", None)

        def on_delta(text: str, logprobs: list[dict[str, Any]]) -> None:
            nonlocal offset, token_offset
            if not text and not logprobs:
                return
            event = {"type": "delta", "text": text, "offset": offset, "attempt": attempt}
            if logprobs:
                event.update(logprobs=logprobs, token_offset=token_offset)
            if offset == 0 and token_offset == 0 and fingerprint:
                event["system_fingerprint"] = fingerprint
            self.events.emit(job_id, event)
            offset += len(text)
            token_offset += len(logprobs)

        return on_delta

    def _emit_done(self, job_id: str, attempt: int, document: dict[str, Any]) -> None:
        choice = (document.get("choices") or [{}])[0]
        self.events.emit(job_id, {"type": "done", "finish_reason": choice.get("finish_reason"),
                                  "usage": document.get("usage"), "attempt": attempt})
        self.events.flush()

    # -- failures --------------------------------------------------------------------------------

    def _fail(self, job: Job, error: VlqError) -> Outcome:
        status, changed = self.store.finish(job, JobStatus.FAILED, error=error)
        if changed:
            log.warning("job %s: failed [%s] %s", job.id, error.code, error.message)
        return Outcome(status.value)

    def _malformed(self, raw: Any, error: MalformedJob) -> Outcome:
        log.warning("malformed message dead-lettered: %s", error.message)
        text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
        try:
            self.store.dead_letter(text, error)
            job_id = _readable_id(raw)
            if job_id:
                self.store.fail_unreadable(job_id, error, text)
        except VlqError as e:
            log.error("could not dead-letter a malformed message: %s", e)
        return Outcome("malformed")

    def _backoff(self, retries: int) -> float:
        w = self.settings.worker
        delay = min(w.retry_backoff_s * (2**retries), w.retry_backoff_max_s)
        # Celery holds a retry's message until it is due; Redis would deliver it again after
        # the visibility timeout, so a delay must stay well below it.
        return min(delay, self.settings.broker.visibility_timeout_s / 2)


def _breakdown(document: dict[str, Any]) -> str:
    """Where a job's time went, for its log line: image fetching, the wait for an engine slot,
    the model's parts (milliseconds), and the tokens written."""
    t = (document.get("vlq") or {}).get("timings") or {}
    parts = [f"{name} {t[key]:.0f} ms" for name, key in (
        ("images", "images"), ("slot wait", "queued"), ("vision", "vision"), ("prefill", "prefill"),
        ("decode", "decode")) if isinstance(t.get(key), (int, float))]
    tokens = (document.get("usage") or {}).get("completion_tokens")
    return ", ".join(parts + ([f"{tokens} tokens"] if tokens is not None else []))


def _readable_id(raw: Any) -> str | None:
    """The job id of an undecodable message, when one can be read safely."""
    data = raw
    if isinstance(raw, (str, bytes)):
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if not isinstance(data, dict):
        return None
    job_id = data.get("id")
    if isinstance(job_id, str) and 0 < len(job_id) <= 200 and all(
        c.isalnum() or c in "_.:-" for c in job_id
    ):
        return job_id
    return None


def register(app: Any, runner: JobRunner) -> Any:
    """Register the ``vlq.run_job`` task on ``app``, bound to ``runner``."""

    # shared=False: a shared task would be registered on every Celery app made later in this
    # process too (bound to this runner), shadowing their own.
    @app.task(name=TASK_NAME, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True,
              ignore_result=True, max_retries=None)
    def run_job(self: Any, raw: Any = None, *args: Any, **kwargs: Any) -> str:
        if args or kwargs:
            raw = {"unexpected_arguments": [raw, *args], "kwargs": kwargs}
        outcome = runner.run(raw, retries=self.request.retries or 0)
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in, max_retries=None)
        return outcome.status

    return run_job


def _size(image: Any) -> list[int] | None:
    size = getattr(image, "size", None)
    return list(size) if size is not None else None
