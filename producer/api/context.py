"""What every route needs, built once per app: settings, the SDK client, files, batches,
pre-flight checks, metrics; plus helpers to run the SDK's blocking calls off the event loop."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request

from producer.batches import Batches
from producer.client import Client
from producer.config import Settings
from producer.errors import InvalidRequest, JobNotFinished
from producer.files import FileStore
from producer.preflight import Preflight
from producer.schema import JobStatus
from producer.state import JobRecord

T = TypeVar("T")

# Threads that may sit in a blocking Redis read (streams, long polls); kept apart from the
# default pool so that many open streams never starve short calls.
WAIT_THREADS = 256
_POLL_MIN_S = 0.01
_POLL_MAX_S = 0.25


@dataclass
class ApiContext:
    settings: Settings
    client: Client
    files: FileStore
    batches: Batches
    preflight: Preflight
    metrics: Any  # producer.api.metrics.ApiMetrics
    refresher: Any  # producer.api.batches.BatchRefresher
    started_at: float
    _wait_limiter: anyio.CapacityLimiter | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a short blocking SDK call in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a call that may block for a while (a stream read) on the waiting threads."""
        if self._wait_limiter is None:  # made on first use, inside the server's event loop
            self._wait_limiter = anyio.CapacityLimiter(WAIT_THREADS)
        call = functools.partial(fn, *args, **kwargs)
        return await anyio.to_thread.run_sync(call, limiter=self._wait_limiter)

    async def wait_for_job(
        self, job_id: str, timeout: float, request: Request | None = None
    ) -> JobRecord | None:
        """Poll the job's record until it is terminal. Returns None when ``request``'s client
        went away first; raises :class:`JobNotFinished` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        delay = _POLL_MIN_S
        while True:
            record = await self.run(self.client.status, job_id)
            if record.is_terminal:
                return record
            if request is not None and await request.is_disconnected():
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                queued = record.status is JobStatus.QUEUED
                hint = await self.run(self.client.unserved_hint) if queued else ""
                raise JobNotFinished(
                    f"job {job_id} is still {record.status.value} after {timeout:g}s; its result will"
                    f" be at GET /v1/jobs/{job_id}{hint}",
                    job_id=job_id,
                )
            await anyio.sleep(min(delay, left))
            delay = min(delay * 1.5, _POLL_MAX_S)


def get_ctx(request: Request) -> ApiContext:
    return request.app.state.vlq


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """One page of a listing in OpenAI's envelope (``object: list``, first/last ids, has_more)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, or a 400 ``invalid_request`` saying what is wrong."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequest("the request has no body: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise InvalidRequest(f"the request body is not valid JSON ({e}): send one JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    return body
