"""Lease keeping against a private Redis: renewals, cancels, losses, reclaiming dead workers' jobs."""

from __future__ import annotations

import time

import pytest

from producer.keys import Keys
from producer.schema import Job, JobStatus
from producer.state import JobStore
from worker.leases import LeaseKeeper

REQUEST = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def store(redis_server: str, key_prefix: str) -> JobStore:
    s = JobStore.from_url(redis_server, Keys(key_prefix), ttl_s=600)
    yield s
    s.close()


def keeper(store: JobStore, requeued: list | None = None, timeout: float = 0.3, max_reclaims: int = 3) -> LeaseKeeper:
    return LeaseKeeper(
        store,
        worker_name="w-test",
        heartbeat_s=0.05,
        lease_timeout_s=timeout,
        requeue=lambda job, queue: requeued.append((job.id, queue)) if requeued is not None else None,
        info={"gpu": 0},
        max_reclaims=max_reclaims,
    )


def running_job(store: JobStore, token: str, queue: str = "q") -> Job:
    job = Job(request=REQUEST)
    store.create(job, queue)
    assert store.start(job, token=token, worker="w", lease_timeout_s=0.3).started
    return job


def test_a_beat_renews_tracked_leases_and_registers_the_worker(store: JobStore) -> None:
    job = running_job(store, "t1")
    before = store.redis.zscore(store.keys.leases, job.id)
    k = keeper(store)
    k.track(job.id, "t1")
    time.sleep(0.02)
    k.beat()
    assert store.redis.zscore(store.keys.leases, job.id) > before
    info = store.workers(max_age_s=10)["w-test"]
    assert info["running"] == 1 and info["gpu"] == 0


def test_a_cancel_request_aborts_the_run_once(store: JobStore) -> None:
    job = running_job(store, "t1")
    aborted = []
    k = keeper(store)
    lease = k.track(job.id, "t1", on_abort=lambda: aborted.append(job.id))
    store.cancel(job.id)
    k.beat()
    k.beat()
    assert lease.cancelled.is_set() and aborted == [job.id]


def test_a_run_whose_job_finished_elsewhere_is_told_it_lost(store: JobStore) -> None:
    job = running_job(store, "t1")
    aborted = []
    k = keeper(store)
    lease = k.track(job.id, "t1", on_abort=lambda: aborted.append(1))
    store.finish(job, JobStatus.SUCCEEDED)
    k.beat()
    assert lease.lost.is_set() and aborted == [1]


def test_stale_jobs_are_requeued_to_their_queue_once(store: JobStore) -> None:
    dead = running_job(store, "dead-run", queue="gpu-a")
    requeued: list = []
    k = keeper(store, requeued)
    assert k.reclaim() == []  # fresh
    time.sleep(0.4)
    assert k.reclaim() == [dead.id]
    assert requeued == [(dead.id, "gpu-a")]
    assert k.reclaim() == []
    record = store.get(dead.id)
    assert record.status is JobStatus.RUNNING and record.reclaims == 1
    assert record.last_error["code"] == "worker_lost" and "worker w stopped heartbeating" in record.last_error["message"]


def test_a_job_whose_workers_keep_dying_fails_worker_lost_after_max_reclaims(store: JobStore) -> None:
    job = running_job(store, "run-1")
    requeued: list = []
    k = keeper(store, requeued, max_reclaims=2)
    for attempt in (2, 3):  # two re-enqueues, each taken up by a worker that dies in its turn
        time.sleep(0.4)
        assert k.reclaim() == [job.id]
        assert store.start(job, token=f"run-{attempt}", worker="w", lease_timeout_s=0.3).started
    time.sleep(0.4)
    assert k.reclaim() == []  # the third loss: failed, not queued again
    assert len(requeued) == 2
    record = store.get(job.id)
    assert record.status is JobStatus.FAILED and record.error["code"] == "worker_lost"
    assert "stopped heartbeating 3 times" in record.error["message"] and "logs" in record.error["message"]
    assert store.redis.zscore(store.keys.leases, job.id) is None


def test_the_keeper_thread_keeps_a_long_job_alive_and_recovers_a_dead_one(store: JobStore) -> None:
    alive = running_job(store, "live-run")
    dead = running_job(store, "dead-run")
    requeued: list = []
    k = keeper(store, requeued)
    k.track(alive.id, "live-run")
    k.start()
    try:
        time.sleep(1.0)  # > 3 lease timeouts
    finally:
        k.stop()
    assert [j for j, _ in requeued] == [dead.id]
    assert "w-test" not in store.workers()  # unregistered on stop


def test_the_keeper_asks_its_watch_after_each_heartbeat_and_a_retired_worker_leaves_the_registry(
    store: JobStore
) -> None:
    from worker.consumer_watch import ConsumerWatch

    stalls: list[str] = []
    k = keeper(store)
    k.watch = ConsumerWatch(lambda: 1e9, threads=2, stall_s=0.2, on_stall=stalls.append)
    k.start()
    try:
        deadline = time.monotonic() + 5
        while not stalls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stalls and "2 of 2 threads are free" in stalls[0]
        assert "w-test" in store.workers()
        k.retire()  # what the worker does on a stall: leave the registry, keep renewing leases
        time.sleep(0.3)
        assert "w-test" not in store.workers()
    finally:
        k.stop()
