"""Leases: how a worker proves its running jobs are alive, and recovers jobs of dead workers.

One :class:`LeaseKeeper` thread per worker process, every ``worker.heartbeat_s``:

1. renews the lease of each job this process runs (one round trip for all of them) and learns
   from the answers whether a job was cancelled (abort it in the engine) or taken over by another
   run (stop working on it);
2. writes the worker's registry entry (``Keys.workers``: host, pid, gpu, model, running jobs);
3. reclaims jobs whose lease went stale (older than ``worker.lease_timeout_s``, seconds) and
   sends them to their queue again, so a ``kill -9``'d worker's job runs again within seconds
   instead of after Redis's visibility timeout (hours). The stale run's message, when Redis
   eventually redelivers it, finds the job finished (or freshly held) and is skipped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producer.errors import VlqError, WorkerLost
from producer.outage import Outage
from producer.schema import Job
from producer.state import Heartbeat, JobStore
from worker.consumer_watch import ConsumerWatch

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """One run's hold on a job, as this process sees it."""

    job_id: str
    token: str
    on_abort: Callable[[], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def stopped(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def abort(self) -> None:
        if self.on_abort is not None:
            try:
                self.on_abort()
            except Exception:  # an abort that fails must not stop the keeper
                log.exception("aborting job %s failed", self.job_id)


FORGET_WORKERS_AFTER_S = 24 * 3600  # a dead worker stays listed (vlq workers --all) this long
FORGET_EVERY_S = 600.0  # how often a worker looks for such entries (not at every heartbeat)


class LeaseKeeper:
    """Heartbeats for this worker's running jobs, its registry entry, and reclaiming stale jobs.

    ``requeue(job, queue)`` sends a reclaimed job back to a queue ('' = the worker's own); a job
    reclaimed ``max_reclaims`` times already fails ``worker_lost`` instead.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        worker_name: str,
        heartbeat_s: float,
        lease_timeout_s: float,
        requeue: Callable[[Job, str], None],
        info: dict[str, Any] | None = None,
        max_reclaims: int = 3,
        watch: ConsumerWatch | None = None,
    ) -> None:
        self.store = store
        self.worker_name = worker_name
        self.heartbeat_s = heartbeat_s
        self.lease_timeout_s = lease_timeout_s
        self.max_reclaims = max_reclaims
        self.requeue = requeue
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
                     **(info or {})}
        self._leases: dict[tuple[str, str], Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._forgot_at = float("-inf")
        self.watch = watch  # told after each heartbeat whether Redis answered (ConsumerWatch)
        self._retired = False
        self._outage = Outage(log, "lease keeper")  # Redis away: one warning, not one every heartbeat

    # -- runs register here ----------------------------------------------------------------------

    def track(self, job_id: str, token: str, on_abort: Callable[[], None] | None = None) -> Lease:
        lease = Lease(job_id, token, on_abort)
        with self._lock:
            self._leases[(job_id, token)] = lease
        return lease

    def untrack(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop((lease.job_id, lease.token), None)

    def running(self) -> list[str]:
        with self._lock:
            return [job_id for job_id, _ in self._leases]

    # -- one cycle -------------------------------------------------------------------------------

    def beat(self) -> None:
        """Renew every tracked lease, act on cancels and losses, refresh the registry entry."""
        with self._lock:
            leases = list(self._leases.values())
        answers = self.store.heartbeat([(lease.job_id, lease.token) for lease in leases])
        for lease, answer in zip(leases, answers):
            if answer is Heartbeat.CANCEL and not lease.cancelled.is_set():
                log.info("job %s: cancel requested, aborting", lease.job_id)
                lease.cancelled.set()
                lease.abort()
            elif answer is Heartbeat.LOST and not lease.lost.is_set():
                log.warning("job %s: lease lost (finished or taken over elsewhere), aborting", lease.job_id)
                lease.lost.set()
                lease.abort()
        if not self._retired:
            self.store.register_worker(self.worker_name, {**self.info, "running": len(leases)})

    def retire(self) -> None:
        """Leave the worker registry now (the worker is stopping), while the running jobs'
        leases are still renewed until they finish."""
        self._retired = True
        try:
            self.store.unregister_worker(self.worker_name)
        except VlqError:
            pass

    def reclaim(self) -> list[str]:
        """Re-enqueue jobs whose lease is stale (and forget workers silent for a day). Returns
        their ids."""
        if time.monotonic() - self._forgot_at >= FORGET_EVERY_S:
            self._forgot_at = time.monotonic()
            for name in self.store.forget_workers(FORGET_WORKERS_AFTER_S):
                log.info("forgot worker %s: no heartbeat for a day", name)
        reclaimed = []
        for job_id in self.store.stale_leases(self.lease_timeout_s):
            try:
                found = self.store.reclaim(job_id, self.lease_timeout_s, self.max_reclaims)
            except WorkerLost as e:
                log.error("job %s: failed [%s]: %s", job_id, e.code, e.message)
                continue
            except VlqError as e:  # e.g. a stored message that no longer decodes
                log.error("cannot reclaim job %s: %s", job_id, e)
                continue
            if found is None:
                continue
            job, queue = found
            try:
                self.requeue(job, queue)
            except VlqError as e:
                log.error("reclaimed job %s but could not re-enqueue it: %s", job_id, e)
                continue
            log.warning("job %s: lease went stale, re-enqueued (queue %s)", job_id, queue or "default")
            reclaimed.append(job_id)
        return reclaimed

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vlq-leases", daemon=True)
        self._thread.start()

    def stop(self, unregister: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
            self._thread = None
        if unregister:
            try:
                self.store.unregister_worker(self.worker_name)
            except VlqError:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            for step in (self.beat, self.reclaim):
                try:
                    step()
                except VlqError as e:  # Redis away: keep trying, the leases will tell
                    self._outage.failed(str(e))
                    if self.watch is not None:
                        self.watch.redis_down()
                    break  # the next step would only hit the same wall and say so again
                except Exception:
                    log.exception("lease keeper step failed")
                else:
                    if step == self.beat:
                        self._outage.ok()
                        if self.watch is not None:
                            self.watch.check(len(self.running()))
            self._stop.wait(max(0.0, self.heartbeat_s - (time.monotonic() - started)))
