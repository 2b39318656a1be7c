"""The hand-over between callers' threads and an engine's scheduler thread.

Both engines (:class:`worker.engine.engine.TorchEngine` and the TensorRT-LLM one) take work the
same way: callers post submissions and aborts into a :class:`Mailbox` and return at once; the
engine's one thread sleeps until there is mail or unfinished work, then loops its ``step()``.
The errors both engines give for the same events live here too, so they say the same thing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from producer.errors import EngineError, JobCancelled

log = logging.getLogger(__name__)

SUBMIT = "submit"
ABORT = "abort"


class Mailbox:
    """Submissions and aborts from any thread, taken in by the engine's thread.

    ``busy`` tells whether the engine still has work of its own (waiting or running requests);
    the thread sleeps only when there is neither mail nor work.
    """

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self._items: list[tuple[str, object]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def post(self, kind: str, item: object) -> bool:
        """Hand ``item`` to the engine thread; False once the mailbox is closed."""
        with self._cond:
            if self._closed:
                return False
            self._items.append((kind, item))
            self._cond.notify()
            return True

    def take(self) -> list[tuple[str, object]]:
        """Everything posted so far, oldest first."""
        with self._cond:
            items, self._items = self._items, []
        return items

    def has_mail(self) -> bool:
        with self._cond:
            return bool(self._items)

    def start(self, step: Callable[[], None], busy: Callable[[], bool],
              on_error: Callable[[Exception], None]) -> None:
        """Run ``step`` on a daemon thread whenever there is mail or ``busy()``, until closed.

        An exception escaping ``step`` is logged and passed to ``on_error`` (which fails what is
        in flight); the thread goes on serving.
        """
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(step, busy, on_error), name=self.thread_name, daemon=True)
            self._thread.start()

    def close(self) -> list[tuple[str, object]]:
        """Stop the thread (after its current step) and return the mail it never took."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        return self.take()

    def _run(self, step: Callable[[], None], busy: Callable[[], bool],
             on_error: Callable[[Exception], None]) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._items and not busy():
                    self._cond.wait()
                if self._closed:
                    return
            try:
                step()
            except Exception as e:  # a bug outside the model: fail what is in flight, keep serving
                log.exception("%s: engine step failed", self.thread_name)
                on_error(e)


def duplicate_request(request_id: str) -> EngineError:
    """A request id already in the engine: a redelivered job meeting its own first run, which is
    not the request's fault (so not bad input: the job may run again later)."""
    return EngineError(
        f"request {request_id} is already in the engine; request ids must be unique",
        request_id=request_id)


def aborted(request_id: str) -> JobCancelled:
    return JobCancelled(f"request {request_id} was aborted", request_id=request_id)


def internal_error(exc: Exception) -> EngineError:
    return EngineError(f"internal engine error: {type(exc).__name__}: {exc}")
