"""Notice a worker whose broker consumer stopped asking Redis for jobs.

After a Redis restart, Celery's consumer can come back without ever sending BRPOP again
(celery#8091 and kin): its threads idle, its queue grows, and yet the worker looks healthy, since
its lease keeper goes on heartbeating. :class:`ConsumerWatch` runs in the lease keeper's loop: when
the consumer has sent no BRPOP (:data:`worker.celery_app.CONSUMER_PULSE`) for ``stall_s`` while
Redis answered the heartbeats all along and a thread was free all along, it calls ``on_stall``
once, which stops the worker so that its supervisor starts a fresh one.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class ConsumerWatch:
    """``pulse_age()``: seconds since the consumer's last BRPOP; ``threads``: the worker's Celery
    threads (with all of them running a job, the consumer rightly asks for nothing)."""

    def __init__(self, pulse_age: Callable[[], float], *, threads: int, stall_s: float,
                 on_stall: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.pulse_age = pulse_age
        self.threads = threads
        self.stall_s = stall_s
        self.on_stall = on_stall
        self.clock = clock
        self.fired = False
        self._quiet_since: float | None = None  # Redis up and a thread free, without a break, since

    def redis_down(self) -> None:
        """A heartbeat failed: the consumer may be waiting for Redis too."""
        self._quiet_since = None

    def check(self, running: int) -> bool:
        """After a heartbeat that reached Redis, with ``running`` jobs: True when it just fired."""
        now = self.clock()
        if running >= self.threads:  # every thread busy: nothing to ask for
            self._quiet_since = None
            return False
        if self._quiet_since is None:
            self._quiet_since = now
        if self.fired or self.stall_s <= 0:
            return False
        age = self.pulse_age()
        if age < self.stall_s or now - self._quiet_since < self.stall_s:
            return False
        self.fired = True
        self.on_stall(f"the broker consumer has asked Redis for no job in {age:.0f}s although Redis answers"
                      f" and {self.threads - running} of {self.threads} threads are free (a reconnect that"
                      " never resumed)")
        return True
