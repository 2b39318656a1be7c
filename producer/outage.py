"""One warning for a failure that repeats every few seconds, not one a tick.

Loops that touch Redis every second or two (a worker's lease keeper, the API's batch refresher)
would otherwise fill the log with the same line for as long as Redis is away. :class:`Outage`
logs the first failure, then a reminder every ``every_s`` seconds while it lasts, and one line
when it is over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Outage:
    """Call :meth:`failed` on every failed tick and :meth:`ok` on every good one."""

    def __init__(self, log: logging.Logger, what: str, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.what = what
        self.every_s = every_s
        self.clock = clock
        self.since: float | None = None  # when the current run of failures began
        self._said_at = 0.0

    def failed(self, error: str) -> None:
        now = self.clock()
        if self.since is None:
            self.since = self._said_at = now
            self.log.warning("%s: %s", self.what, error)
        elif now - self._said_at >= self.every_s:
            self._said_at = now
            self.log.warning("%s: still failing after %.0fs: %s", self.what, now - self.since, error)

    def ok(self) -> None:
        if self.since is not None:
            self.log.warning("%s: working again after %.0fs", self.what, self.clock() - self.since)
            self.since = None
