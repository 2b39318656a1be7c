"""A real Celery worker thread running the real task code with a scripted engine.

Used by the SDK, CLI and task tests that need jobs to finish without loading a model. The
integration tests (tests/integration) run the real engine in a real worker process instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from producer.config import Settings
from producer.errors import JobCancelled, TooManyImages
from producer.state import JobStore
from worker.leases import LeaseKeeper
from worker.stores import ResultStores
from worker.tasks import JobRunner, register


class ScriptedEngine:
    """Answers "echo: <last text part>" at once, or holds requests until ``release``/``abort``
    when ``hold`` is set; ``fail`` makes every request raise it."""

    def __init__(self) -> None:
        self.hold = False
        self.fail: Exception | None = None
        self.checkpoint = "scripted@000000000000"
        self.submitted: list[dict] = []
        self.pending: dict[str, Future] = {}

    def validate(self, request) -> None:
        if len(request.image_urls) > 2:
            raise TooManyImages("at most 2 images")

    def submit(self, request, images, *, request_id, deadline=None, on_delta=None):
        self.submitted.append({"id": request_id, "images": images, "deadline": deadline})
        fut: Future = Future()
        if self.fail is not None:
            fut.set_exception(self.fail)
            return fut
        text = "echo: " + request.messages[-1].parts[-1].text
        if on_delta:
            for i in range(0, len(text), 4):
                on_delta(text[i:i + 4], [])
        doc = {"id": "chatcmpl-" + request_id, "object": "chat.completion",
               "model": request.model or "Qwen-VL-Chat",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
               "boxes": [{"ref": "it", "box": [1, 2, 3, 4]}], "vlq": {"checkpoint": self.checkpoint}}
        if self.hold:
            self.pending[request_id] = fut
            fut.doc = doc  # type: ignore[attr-defined]
        else:
            fut.set_result(doc)
        return fut

    def release(self, request_id: str) -> None:
        fut = self.pending.pop(request_id)
        fut.set_result(fut.doc)  # type: ignore[attr-defined]

    def abort(self, request_id: str) -> None:
        fut = self.pending.pop(request_id, None)
        if fut is not None:
            fut.set_exception(JobCancelled(f"{request_id} aborted"))


class ScriptedImages:
    """Returns one placeholder per URL, or raises ``error``."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def load_all(self, urls):
        if self.error is not None:
            raise self.error
        return [f"image:{i}" for i, _ in enumerate(urls)]


@dataclass
class ScriptedWorker:
    runner: JobRunner
    store: JobStore
    engine: ScriptedEngine
    images: ScriptedImages


def make_runner(settings: Settings) -> ScriptedWorker:
    store = JobStore.from_settings(settings)
    engine, images = ScriptedEngine(), ScriptedImages()
    leases = LeaseKeeper(store, worker_name="w-scripted", heartbeat_s=settings.worker.heartbeat_s,
                         lease_timeout_s=settings.worker.lease_timeout_s,
                         requeue=lambda job, q: None)
    runner = JobRunner(settings, store=store, engine=engine, images=images,
                       results=ResultStores.from_settings(settings, store.redis), leases=leases,
                       worker_name="w-scripted", queue_name=settings.broker.queue)
    return ScriptedWorker(runner, store, engine, images)


@contextlib.contextmanager
def scripted_worker(settings: Settings) -> Iterator[ScriptedWorker]:
    """A Celery worker thread (threads pool) on ``settings``' broker and queue."""
    from celery.contrib.testing.worker import start_worker

    from worker.celery_app import make_celery_app

    w = make_runner(settings)
    app = make_celery_app(settings)
    register(app, w.runner)
    w.runner.leases.start()
    try:
        with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=10):
            yield w
    finally:
        w.runner.leases.stop()
        w.runner.close()
        w.store.close()
