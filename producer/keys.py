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

    def file(self, file_id: str) -> str:
        """Hash: an OpenAI Files API file's metadata (filename, purpose, bytes, created_at)."""
        return f"{self.prefix}:file:{file_id}"

    def file_content(self, file_id: str) -> str:
        """String: the file's bytes."""
        return f"{self.prefix}:file:{file_id}:content"

    @property
    def files(self) -> str:
        """Sorted set: file ids scored by creation time (unix seconds), for listing."""
        return f"{self.prefix}:files"

    def openai_batch(self, batch_id: str) -> str:
        """Hash: an OpenAI Batch API batch (status, timestamps, file ids, line errors). Its
        jobs are the vlq batch of the same id (``batch``/``batch_jobs``)."""
        return f"{self.prefix}:openai_batch:{batch_id}"

    def openai_batch_lock(self, batch_id: str) -> str:
        """String with TTL: held while one process validates or finalizes the batch."""
        return f"{self.prefix}:openai_batch:{batch_id}:lock"

    @property
    def openai_batches(self) -> str:
        """Sorted set: OpenAI batch ids scored by creation time, for listing."""
        return f"{self.prefix}:openai_batches"

    @property
    def openai_batches_active(self) -> str:
        """Set: OpenAI batch ids not yet in a final status (what the finalizer watches)."""
        return f"{self.prefix}:openai_batches:active"

    @property
    def stats(self) -> str:
        """Hash: job counts by status over the whole deployment (queued and running are current
        counts; succeeded, failed and cancelled only grow). Moved with every transition."""
        return f"{self.prefix}:stats"

    @property
    def leases(self) -> str:
        """Sorted set: running job ids scored by their last heartbeat (unix seconds)."""
        return f"{self.prefix}:leases"

    @property
    def workers(self) -> str:
        """Hash: worker name -> JSON of its last heartbeat (host, gpu, model, time)."""
        return f"{self.prefix}:workers"

    @property
    def broker(self) -> str:
        """The prefix of every key the broker (kombu) writes: its queue lists, its unacked hash and
        index, its bindings. Without it those would be global to the Redis database, shared by
        every deployment on it."""
        return f"{self.prefix}:broker:"

    def queue(self, name: str) -> str:
        """List: the broker's messages of priority 0 waiting in queue ``name``."""
        return f"{self.broker}{name}"

    def queue_lists(self, name: str) -> list[str]:
        """Lists: every priority of queue ``name``, served in this order (kombu keeps priorities
        3, 6 and 9 in lists beside the plain one; producer.broker sends new jobs at 3)."""
        return [self.queue(name) + suffix for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169")]

    @property
    def dead_letters(self) -> str:
        """List: messages that could not be decoded into a job, with the reason."""
        return f"{self.prefix}:dead"
