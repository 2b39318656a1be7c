"""The job record store: one Redis hash per job, shared by the SDK, the API and the workers.

A record (``Keys.job(id)``) holds the job's status, its timestamps (created, queued, started,
finished, last heartbeat), attempts, the worker and run token holding it, the error
``{code, message}`` of a failed job, its batch id, destination, where its result was written, and
the job JSON itself. Every transition is one Lua script, so a status and the batch counters
beside it always move together and only forward:

    queued ──start──> running ──finish──> succeeded | failed | cancelled
       └──────────────cancel──────────────────────────────────^

``running -> running`` is a new attempt (a redelivery or a reclaim). A terminal record never
changes again and expires after ``store.ttl_s``. Timestamps come from the Redis server's clock
(``TIME``), so leases written by one machine are judged by the same clock on another.

Leases: a running job's id sits in the sorted set ``Keys.leases`` scored by its last heartbeat.
The worker running it renews the score every ``worker.heartbeat_s``; a live worker that finds a
score older than ``worker.lease_timeout_s`` reclaims the job (:meth:`JobStore.reclaim`) and
re-enqueues it. A delivery that finds the job held by a fresh lease, or already terminal, is
skipped.
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

from producer.errors import BrokerUnavailable, DuplicateJob, VlqError, WorkerLost
from producer.keys import Keys
from producer.schema import Destination, Job, JobStatus

TERMINAL = tuple(s.value for s in JobStatus if s.is_terminal)

# -- Lua ------------------------------------------------------------------------------------------
# Shared prelude: server time, batch counter moves, and the creation of a record for a job that
# reached a worker without one (a message pushed by hand, or a record that expired).
_PRELUDE = """
local function now()
  local t = redis.call('TIME')
  return string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
end
local function is_terminal(st)
  return st == 'succeeded' or st == 'failed' or st == 'cancelled'
end
-- Every script that moves a status passes Keys.stats as its last key (deployment-wide counts).
local function move(bkey, from, to, ttl)
  local stats = KEYS[#KEYS]
  if from then redis.call('HINCRBY', stats, from, -1) end
  redis.call('HINCRBY', stats, to, 1)
  if bkey == '' then return end
  if from then redis.call('HINCRBY', bkey, from, -1) end
  redis.call('HINCRBY', bkey, to, 1)
  redis.call('EXPIRE', bkey, ttl)
end
local function create(jkey, bkey, bjobs, id, job, created, dest, batch, queue, status, ttl, t)
  redis.call('HSET', jkey, 'id', id, 'status', status, 'job', job, 'created_at', created,
             'queued_at', t, 'updated_at', t, 'attempts', 0, 'destination', dest,
             'batch_id', batch, 'queue', queue, 'holder', '', 'worker', '')
  if bkey ~= '' then
    redis.call('HINCRBY', bkey, 'total', 1)
    redis.call('RPUSH', bjobs, id)
    redis.call('EXPIRE', bjobs, ttl)
  end
  move(bkey, nil, status, ttl)
end
"""

# KEYS: job, batch, batch_jobs   ARGV: id, job, created_at, destination, batch_id, queue, ttl
_CREATE = _PRELUDE + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
create(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], 'queued',
       ARGV[7], now())
return 1
"""

# KEYS: job, leases, batch, batch_jobs
# ARGV: id, token, worker, lease_timeout, ttl, job, created_at, destination, batch_id, queue
# -> {outcome, attempts, holder}; outcome 'running' means this run holds the job now.
_START = _PRELUDE + """
local t = now()
local st = redis.call('HGET', KEYS[1], 'status')
if not st then
  create(KEYS[1], KEYS[3], KEYS[4], ARGV[1], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10],
         'queued', ARGV[5], t)
  st = 'queued'
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if is_terminal(st) then return {st, attempts, ''} end
if st == 'running' then
  local holder = redis.call('HGET', KEYS[1], 'holder') or ''
  local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if holder ~= '' and score and tonumber(score) >= tonumber(t) - tonumber(ARGV[4]) then
    return {'busy', attempts, holder}
  end
  if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', t, 'updated_at', t,
               'holder', '')
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('EXPIRE', KEYS[1], ARGV[5])
    move(KEYS[3], 'running', 'cancelled', ARGV[5])
    return {'cancelled', attempts, ''}
  end
else
  move(KEYS[3], 'queued', 'running', ARGV[5])
end
attempts = attempts + 1
redis.call('HSET', KEYS[1], 'status', 'running', 'holder', ARGV[2], 'worker', ARGV[3],
           'heartbeat_at', t, 'updated_at', t, 'attempts', attempts)
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', t)
end
redis.call('ZADD', KEYS[2], t, ARGV[1])
return {'running', attempts, ARGV[2]}
"""

# KEYS: job, leases   ARGV: id, token  -> 1 renewed, 2 renewed and cancel requested, 0 lost
# A lease released by a reclaim (holder '') is taken back: the worker was slow, not dead.
_HEARTBEAT = _PRELUDE + """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'running' then return 0 end
local holder = redis.call('HGET', KEYS[1], 'holder') or ''
if holder ~= ARGV[2] and holder ~= '' then return 0 end
local t = now()
redis.call('HSET', KEYS[1], 'holder', ARGV[2], 'heartbeat_at', t)
redis.call('ZADD', KEYS[2], t, ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 2 end
return 1
"""

# KEYS: job, leases   ARGV: id, token, delay_s, error  -> 1 released, 0 not held
# The lease is parked at now + delay: if no worker picks the retry up by then (plus the lease
# timeout), a reclaimer re-enqueues it.
_RELEASE = _PRELUDE + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if (redis.call('HGET', KEYS[1], 'holder') or '') ~= ARGV[2] then return 0 end
local t = now()
redis.call('HSET', KEYS[1], 'holder', '', 'last_error', ARGV[4], 'updated_at', t)
redis.call('HINCRBY', KEYS[1], 'retries', 1)
redis.call('ZADD', KEYS[2], tonumber(t) + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: job, leases, batch, batch_jobs
# ARGV: id, status, error, location, ttl, job, created_at, destination, batch_id, queue
# -> {final status, 1 if this call made it terminal}
_FINISH = _PRELUDE + """
local t = now()
local st = redis.call('HGET', KEYS[1], 'status')
if st and is_terminal(st) then return {st, 0} end
if not st then
  create(KEYS[1], KEYS[3], KEYS[4], ARGV[1], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10],
         'queued', ARGV[5], t)
  st = 'queued'
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', t, 'updated_at', t, 'holder', '')
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[4]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
move(KEYS[3], st, ARGV[2], ARGV[5])
return {ARGV[2], 1}
"""

# KEYS: job, leases, batch   ARGV: id, ttl  -> 'missing' | a terminal status | 'cancelling'
_CANCEL = _PRELUDE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if is_terminal(st) then return st end
local t = now()
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', t, 'updated_at', t,
             'cancel_requested', '1')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  move(KEYS[3], 'queued', 'cancelled', ARGV[2])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', t)
return 'cancelling'
"""

# KEYS: job, leases, batch   ARGV: id, lease_timeout, ttl, max_reclaims, error (when past it)
# -> {'fresh'} | {'gone'} | {'cancelled'} | {'failed'} | {'requeue', job, queue}
_RECLAIM = _PRELUDE + """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
local t = now()
if not score or tonumber(score) >= tonumber(t) - tonumber(ARGV[2]) then return {'fresh'} end
local st = redis.call('HGET', KEYS[1], 'status')
redis.call('ZREM', KEYS[2], ARGV[1])
if st ~= 'running' then return {'gone'} end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', t, 'updated_at', t,
             'holder', '')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  move(KEYS[3], 'running', 'cancelled', ARGV[3])
  return {'cancelled'}
end
if tonumber(redis.call('HGET', KEYS[1], 'reclaims') or '0') >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', t, 'updated_at', t, 'holder', '',
             'error', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  move(KEYS[3], 'running', 'failed', ARGV[3])
  return {'failed'}
end
local worker = redis.call('HGET', KEYS[1], 'worker') or ''
redis.call('HSET', KEYS[1], 'holder', '', 'updated_at', t, 'last_error', cjson.encode({code = 'worker_lost',
  message = 'worker ' .. worker .. ' stopped heartbeating while running the job; it was queued again'}))
redis.call('HINCRBY', KEYS[1], 'reclaims', 1)
return {'requeue', redis.call('HGET', KEYS[1], 'job'), redis.call('HGET', KEYS[1], 'queue') or ''}
"""


# -- records --------------------------------------------------------------------------------------


class JobRecord(BaseModel):
    """A snapshot of one job's record."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: JobStatus
    created_at: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    heartbeat_at: float | None = None
    attempts: int = 0
    retries: int = 0
    reclaims: int = 0
    worker: str | None = None
    error: dict[str, Any] | None = None
    last_error: dict[str, Any] | None = None
    batch_id: str | None = None
    queue: str | None = None
    destination: Destination = Destination()
    result_location: str | None = None
    cancel_requested: bool = False
    job_json: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    def job(self) -> Job:
        """The job message this record was created from."""
        if not self.job_json:
            raise VlqError(f"job {self.id} has no stored message")
        return Job.from_wire(self.job_json)

    def public(self) -> dict[str, Any]:
        """The record as JSON-ready data for users (without the job body)."""
        return self.model_dump(mode="json", exclude={"job_json"})

    @classmethod
    def from_hash(cls, job_id: str, h: dict[str, str]) -> JobRecord:
        def num(name: str) -> float | None:
            v = h.get(name)
            return float(v) if v not in (None, "") else None

        def obj(name: str) -> Any:
            v = h.get(name)
            return json.loads(v) if v else None

        return cls(
            id=job_id,
            status=JobStatus(h["status"]),
            created_at=num("created_at"),
            queued_at=num("queued_at"),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            updated_at=num("updated_at"),
            heartbeat_at=num("heartbeat_at"),
            attempts=int(h.get("attempts") or 0),
            retries=int(h.get("retries") or 0),
            reclaims=int(h.get("reclaims") or 0),
            worker=h.get("worker") or None,
            error=obj("error"),
            last_error=obj("last_error"),
            batch_id=h.get("batch_id") or None,
            queue=h.get("queue") or None,
            destination=Destination.model_validate(obj("destination") or {}),
            result_location=h.get("result") or None,
            cancel_requested=h.get("cancel_requested") == "1",
            job_json=h.get("job") or None,
        )


class BatchCounts(BaseModel):
    """A batch's progress: how many of its jobs are in each status."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def done(self) -> bool:
        return self.total > 0 and self.finished >= self.total


class StartOutcome(BaseModel):
    """What :meth:`JobStore.start` decided: run it (``started``) or skip this delivery."""

    model_config = ConfigDict(frozen=True)

    status: str  # running | busy | succeeded | failed | cancelled
    attempt: int
    holder: str = ""

    @property
    def started(self) -> bool:
        return self.status == "running"


class Heartbeat(enum.Enum):
    """A lease renewal's answer."""

    HELD = 1
    CANCEL = 2  # held, and a cancel was requested: abort the run
    LOST = 0  # another run holds the job, or it is terminal: stop working on it


# -- the store ------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_errors(url: str = "") -> Iterator[None]:
    """Turn Redis connection failures into :class:`BrokerUnavailable` (a coded, retryable error)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as e:
        where = f" at {safe_url(url)}" if url else ""
        raise BrokerUnavailable(f"cannot reach Redis{where}: {e}") from e


def safe_url(url: str) -> str:
    """The URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class JobStore:
    """Job records, batch counters, leases, events and dead letters in one Redis.

    Thread-safe (redis-py's client pools connections). Build with :meth:`from_url` or pass a
    client whose responses are decoded (``decode_responses=True``).
    """

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int, *, url: str = "") -> None:
        self.redis = client
        self.keys = keys
        self.ttl_s = int(ttl_s)
        self.url = url
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(_START)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._release = client.register_script(_RELEASE)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._reclaim = client.register_script(_RECLAIM)

    @classmethod
    def from_url(
        cls, url: str, keys: Keys, ttl_s: int, *, connect_timeout_s: float = 5.0
    ) -> JobStore:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout_s,
            socket_keepalive=True,
            health_check_interval=30,
        )
        return cls(client, keys, ttl_s, url=url)

    @classmethod
    def from_settings(cls, settings: Any) -> JobStore:
        """The store for ``settings`` (a :class:`producer.config.Settings`)."""
        return cls.from_url(
            settings.broker.url,
            Keys(settings.key_prefix),
            settings.store.ttl_s,
            connect_timeout_s=settings.broker.connect_timeout_s,
        )

    def close(self) -> None:
        self.redis.close()

    def ping(self) -> None:
        with redis_errors(self.url):
            self.redis.ping()

    # -- keys for one job ----------------------------------------------------------------------

    def _batch_keys(self, batch_id: str | None) -> tuple[str, str]:
        if not batch_id:
            return "", ""
        return self.keys.batch(batch_id), self.keys.batch_jobs(batch_id)

    def _job_args(self, job: Job, queue: str) -> list[Any]:
        return [
            job.to_json(),
            repr(job.created_at),
            job.destination.model_dump_json(),
            job.batch_id or "",
            queue,
        ]

    # -- producer side ---------------------------------------------------------------------------

    def create(self, job: Job, queue: str = "") -> None:
        """Record ``job`` as queued for ``queue`` (and count it in its batch). Raises
        :class:`DuplicateJob`."""
        if not self.create_many([job], queue)[0]:
            raise DuplicateJob(
                f"a job with id {job.id!r} already exists; submit without an id to get a fresh one",
                param="id",
            )

    def create_many(self, jobs: Sequence[Job], queue: str = "") -> list[bool]:
        """Record many jobs in one round trip; ``False`` where the id already existed."""
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for job in jobs:
                bkey, bjobs = self._batch_keys(job.batch_id)
                self._create(
                    keys=[self.keys.job(job.id), bkey, bjobs, self.keys.stats],
                    args=[job.id, *self._job_args(job, queue), self.ttl_s],
                    client=pipe,
                )
            return [bool(x) for x in pipe.execute()]

    def discard(self, job_id: str) -> None:
        """Remove a record whose message never reached the broker (and uncount it)."""
        rec = self.get(job_id)
        if rec is None:
            return
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.keys.job(job_id))
            pipe.hincrby(self.keys.stats, rec.status.value, -1)
            if rec.batch_id:
                pipe.hincrby(self.keys.batch(rec.batch_id), "total", -1)
                pipe.hincrby(self.keys.batch(rec.batch_id), rec.status.value, -1)
                pipe.lrem(self.keys.batch_jobs(rec.batch_id), 0, job_id)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None when there is none (never submitted, or expired)."""
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hgetall(self.keys.job(job_id))
            hashes = pipe.execute()
        return [
            JobRecord.from_hash(job_id, h) if h and "status" in h else None
            for job_id, h in zip(job_ids, hashes)
        ]

    def statuses(self, job_ids: Sequence[str]) -> list[JobStatus | None]:
        """Only the statuses, in one round trip (for polling many jobs)."""
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(self.keys.job(job_id), "status")
            return [JobStatus(s) if s else None for s in pipe.execute()]

    def cancel(self, job_id: str) -> str:
        """Cancel a job: a queued one becomes ``cancelled`` at once and is never run; a running
        one is flagged (``'cancelling'``) and its worker aborts it. Returns the outcome
        (``'missing'``, ``'cancelled'``, ``'cancelling'`` or the status it already ended with)."""
        with redis_errors(self.url):
            batch_id = self.redis.hget(self.keys.job(job_id), "batch_id")
            bkey, _ = self._batch_keys(batch_id)
            return self._cancel(
                keys=[self.keys.job(job_id), self.keys.leases, bkey, self.keys.stats],
                args=[job_id, self.ttl_s],
            )

    def stats(self) -> dict[str, int]:
        """Job counts by status over the deployment (see :attr:`producer.keys.Keys.stats`)."""
        with redis_errors(self.url):
            return {k: int(v) for k, v in self.redis.hgetall(self.keys.stats).items()}

    def batch(self, batch_id: str) -> BatchCounts:
        with redis_errors(self.url):
            counts = self.redis.hgetall(self.keys.batch(batch_id))
        return BatchCounts(batch_id=batch_id, **{k: int(v) for k, v in counts.items()})

    def batch_job_ids(self, batch_id: str, start: int = 0, stop: int = -1) -> list[str]:
        with redis_errors(self.url):
            return self.redis.lrange(self.keys.batch_jobs(batch_id), start, stop)

    # -- worker side -----------------------------------------------------------------------------

    def start(
        self, job: Job, *, token: str, worker: str, lease_timeout_s: float, queue: str = ""
    ) -> StartOutcome:
        """Try to take ``job`` for a run identified by ``token``.

        Starts it (status running, a new attempt, a fresh lease) unless it is terminal or held by
        another run whose lease is fresh; creates the record if the job arrived without one.
        """
        bkey, bjobs = self._batch_keys(job.batch_id)
        with redis_errors(self.url):
            status, attempts, holder = self._start(
                keys=[self.keys.job(job.id), self.keys.leases, bkey, bjobs, self.keys.stats],
                args=[job.id, token, worker, lease_timeout_s, self.ttl_s,
                      *self._job_args(job, queue)],
            )
        return StartOutcome(status=status, attempt=int(attempts), holder=holder or "")

    def heartbeat(self, leases: Sequence[tuple[str, str]]) -> list[Heartbeat]:
        """Renew the leases of ``(job_id, token)`` pairs in one round trip."""
        if not leases:
            return []
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for job_id, token in leases:
                self._heartbeat(
                    keys=[self.keys.job(job_id), self.keys.leases], args=[job_id, token], client=pipe
                )
            return [Heartbeat(int(x)) for x in pipe.execute()]

    def release_for_retry(self, job_id: str, token: str, delay_s: float, error: VlqError) -> bool:
        """Give up the lease until a retry ``delay_s`` from now (status stays running)."""
        with redis_errors(self.url):
            return bool(
                self._release(
                    keys=[self.keys.job(job_id), self.keys.leases],
                    args=[job_id, token, delay_s, json.dumps(error.to_dict(), default=str)],
                )
            )

    def finish(
        self,
        job: Job,
        status: JobStatus,
        *,
        error: VlqError | dict[str, Any] | None = None,
        result_location: str | None = None,
    ) -> tuple[JobStatus, bool]:
        """Move ``job`` to a terminal ``status``. Returns the job's final status and whether this
        call set it (False: it was already terminal, and stays as it was)."""
        if not status.is_terminal:
            raise ValueError(f"finish() needs a terminal status, not {status.value}")
        err = error.to_dict() if isinstance(error, VlqError) else error
        bkey, bjobs = self._batch_keys(job.batch_id)
        with redis_errors(self.url):
            final, changed = self._finish(
                keys=[self.keys.job(job.id), self.keys.leases, bkey, bjobs, self.keys.stats],
                args=[
                    job.id,
                    status.value,
                    json.dumps(err, default=str) if err else "",
                    result_location or "",
                    self.ttl_s,
                    *self._job_args(job, ""),
                ],
            )
        return JobStatus(final), bool(changed)

    def fail_unreadable(self, job_id: str, error: VlqError, raw: str) -> None:
        """Mark failed a job whose message could not be decoded but whose id could be read."""
        stub = json.dumps({"id": job_id, "unreadable": raw[:2000]})
        with redis_errors(self.url):
            self._finish(
                keys=[self.keys.job(job_id), self.keys.leases, "", "", self.keys.stats],
                args=[job_id, JobStatus.FAILED.value, json.dumps(error.to_dict(), default=str),
                      "", self.ttl_s, stub, repr(time.time()), "{}", "", ""],
            )

    def stale_leases(self, lease_timeout_s: float, limit: int = 100) -> list[str]:
        """Ids whose lease is older than ``lease_timeout_s`` by the Redis server's clock."""
        with redis_errors(self.url):
            sec, usec = self.redis.time()
            cutoff = sec + usec / 1e6 - lease_timeout_s
            return self.redis.zrangebyscore(self.keys.leases, "-inf", f"({cutoff}", 0, limit)

    def reclaim(self, job_id: str, lease_timeout_s: float, max_reclaims: int = 3) -> tuple[Job, str] | None:
        """Release a stale lease. Returns the job to re-enqueue and the queue it came from (''
        when unknown), or None: the lease is fresh again, the job finished, or it was cancelled
        because a cancel was pending. A job re-enqueued ``max_reclaims`` times already is failed
        instead, and :class:`WorkerLost` (its error) is raised."""
        lost = WorkerLost(
            f"the workers running job {job_id} stopped heartbeating {max_reclaims + 1} times"
            " (died, killed, or out of memory): the job itself may crash them, so it is not run again."
            " Check the workers' logs for this job id, then resubmit it, with smaller or fewer images"
            " if memory ran out", job_id=job_id, max_reclaims=max_reclaims)
        with redis_errors(self.url):
            batch_id = self.redis.hget(self.keys.job(job_id), "batch_id")
            bkey, _ = self._batch_keys(batch_id)
            out = self._reclaim(
                keys=[self.keys.job(job_id), self.keys.leases, bkey, self.keys.stats],
                args=[job_id, lease_timeout_s, self.ttl_s, max_reclaims, json.dumps(lost.to_dict())],
            )
        if out[0] == "failed":
            raise lost
        if out[0] != "requeue":
            return None
        return Job.from_wire(out[1]), out[2]

    def cancel_requested(self, job_id: str) -> bool:
        with redis_errors(self.url):
            return self.redis.hget(self.keys.job(job_id), "cancel_requested") == "1"

    def dead_letter(self, raw: Any, reason: VlqError | str) -> None:
        """Keep an undecodable message (truncated) with its reason in ``Keys.dead_letters``."""
        text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
        entry = {
            "at": time.time(),
            "reason": reason.to_dict() if isinstance(reason, VlqError) else {"message": reason},
            "raw": text[:10000],
        }
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            pipe.lpush(self.keys.dead_letters, json.dumps(entry))
            pipe.ltrim(self.keys.dead_letters, 0, 9999)
            pipe.execute()

    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        with redis_errors(self.url):
            return [json.loads(x) for x in self.redis.lrange(self.keys.dead_letters, 0, count - 1)]

    # -- workers ---------------------------------------------------------------------------------

    def register_worker(self, name: str, info: dict[str, Any]) -> None:
        with redis_errors(self.url):
            self.redis.hset(self.keys.workers, name, json.dumps({**info, "at": time.time()}))

    def unregister_worker(self, name: str) -> None:
        with redis_errors(self.url):
            self.redis.hdel(self.keys.workers, name)

    def forget_workers(self, older_than_s: float) -> list[str]:
        """Remove the registry entries whose last heartbeat is older than ``older_than_s`` (workers
        that died without unregistering); returns their names."""
        now = time.time()
        gone = [name for name, info in self.workers().items() if now - float(info.get("at", 0)) > older_than_s]
        if gone:
            with redis_errors(self.url):
                self.redis.hdel(self.keys.workers, *gone)
        return gone

    def workers(self, max_age_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Registered workers (name -> last heartbeat info); only recent ones with ``max_age_s``."""
        with redis_errors(self.url):
            raw = self.redis.hgetall(self.keys.workers)
        now = time.time()
        out = {}
        for name, value in raw.items():
            info = json.loads(value)
            if max_age_s is None or now - float(info.get("at", 0)) <= max_age_s:
                out[name] = info
        return out

    # -- events (streaming) ----------------------------------------------------------------------

    def append_events(self, job_id: str, events: Sequence[dict[str, Any]]) -> None:
        """Append events to the job's stream (``Keys.events``); values are JSON-encoded."""
        if not events:
            return
        key = self.keys.events(job_id)
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for ev in events:
                pipe.xadd(key, {"data": json.dumps(ev)}, maxlen=100_000, approximate=True)
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def read_events(
        self, job_id: str, after: str = "0", block_ms: int | None = None, count: int = 512
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after stream id ``after`` (waiting up to ``block_ms`` for the first one)."""
        with redis_errors(self.url):
            out = self.redis.xread({self.keys.events(job_id): after}, count=count, block=block_ms)
        if not out:
            return []
        return [(eid, json.loads(fields["data"])) for eid, fields in out[0][1]]
