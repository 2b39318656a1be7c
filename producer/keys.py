"""Every Redis key vlq uses, in one place.

All keys start with a configurable prefix (``vlq`` by default) so that several deployments, or a
test run, can share one Redis without touching each other's data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix. ``Keys("vlq").job("job-1") == "vlq:job:job-1"``."""

    prefix: str = "vlq"

    def job(self, job_id: str) -> str:
        """Hash: the job's record (status, timestamps, attempts, error, worker, heartbeat, job JSON)."""
        return f"{self.prefix}:job:{job_id}"

    def result(self, job_id: str) -> str:
        """String: the job's JSON result when the destination is Redis (with TTL)."""
        return f"{self.prefix}:result:{job_id}"

    def events(self, job_id: str) -> str:
        """Stream: token deltas of a running job, for streaming clients."""
        return f"{self.prefix}:events:{job_id}"

    def batch(self, batch_id: str) -> str:
        """Hash: a batch's counters (total, queued, running, succeeded, failed, cancelled)."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_jobs(self, batch_id: str) -> str:
        """List: the job ids of a batch, in submission order."""
        return f"{self.prefix}:batch:{batch_id}:jobs"

    @property
    def leases(self) -> str:
        """Sorted set: running job ids scored by their last heartbeat (unix seconds)."""
        return f"{self.prefix}:leases"

    @property
    def workers(self) -> str:
        """Hash: worker name -> JSON of its last heartbeat (host, gpu, model, time)."""
        return f"{self.prefix}:workers"

    @property
    def dead_letters(self) -> str:
        """List: messages that could not be decoded into a job, with the reason."""
        return f"{self.prefix}:dead"
