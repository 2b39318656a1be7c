"""The job record store against a real (private) Redis: transitions, leases, batches, events."""

from __future__ import annotations

import time

import pytest

from producer.errors import BrokerUnavailable, DuplicateJob, ImageDecodeError
from producer.keys import Keys
from producer.schema import Job, JobStatus
from producer.state import Heartbeat, JobStore

REQUEST = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def store(redis_server: str, key_prefix: str) -> JobStore:
    s = JobStore.from_url(redis_server, Keys(key_prefix), ttl_s=600)
    yield s
    s.close()


def job(**kw) -> Job:
    return Job(request=REQUEST, **kw)


def test_create_records_a_queued_job_with_its_message(store: JobStore) -> None:
    j = job(metadata={"k": 1})
    store.create(j)
    rec = store.get(j.id)
    assert rec.status is JobStatus.QUEUED
    assert rec.attempts == 0 and rec.queued_at and rec.created_at == pytest.approx(j.created_at)
    assert rec.job() == j
    assert store.redis.ttl(store.keys.job(j.id)) == -1  # live records never expire


def test_creating_an_id_twice_raises_duplicate_job(store: JobStore) -> None:
    j = job()
    store.create(j)
    with pytest.raises(DuplicateJob):
        store.create(j)


def test_start_takes_a_queued_job_with_a_fresh_lease(store: JobStore) -> None:
    j = job()
    store.create(j)
    out = store.start(j, token="t1", worker="w1", lease_timeout_s=30)
    assert out.started and out.attempt == 1
    rec = store.get(j.id)
    assert rec.status is JobStatus.RUNNING and rec.worker == "w1" and rec.started_at
    assert store.redis.zscore(store.keys.leases, j.id) == pytest.approx(rec.heartbeat_at)


def test_a_second_delivery_is_skipped_while_the_lease_is_fresh(store: JobStore) -> None:
    j = job()
    store.create(j)
    store.start(j, token="t1", worker="w1", lease_timeout_s=30)
    out = store.start(j, token="t2", worker="w2", lease_timeout_s=30)
    assert out.status == "busy" and out.holder == "t1"
    assert store.get(j.id).attempts == 1


def test_a_stale_lease_is_taken_over_as_a_new_attempt(store: JobStore) -> None:
    j = job()
    store.create(j)
    store.start(j, token="t1", worker="w1", lease_timeout_s=0.05)
    time.sleep(0.1)
    out = store.start(j, token="t2", worker="w2", lease_timeout_s=0.05)
    assert out.started and out.attempt == 2
    assert store.heartbeat([(j.id, "t1")]) == [Heartbeat.LOST]
    assert store.heartbeat([(j.id, "t2")]) == [Heartbeat.HELD]


def test_a_finished_job_never_moves_again_and_expires(store: JobStore) -> None:
    j = job()
    store.create(j)
    store.start(j, token="t1", worker="w1", lease_timeout_s=30)
    assert store.finish(j, JobStatus.SUCCEEDED, result_location="redis:x") == (JobStatus.SUCCEEDED, True)
    assert store.finish(j, JobStatus.FAILED, error=ImageDecodeError("bad")) == (JobStatus.SUCCEEDED, False)
    out = store.start(j, token="t2", worker="w2", lease_timeout_s=30)
    assert not out.started and out.status == "succeeded"
    rec = store.get(j.id)
    assert rec.status is JobStatus.SUCCEEDED and rec.error is None and rec.result_location == "redis:x"
    assert rec.finished_at >= rec.started_at
    assert store.redis.zscore(store.keys.leases, j.id) is None
    assert 0 < store.redis.ttl(store.keys.job(j.id)) <= 600


def test_a_failure_keeps_its_code_and_message(store: JobStore) -> None:
    j = job()
    store.create(j)
    store.finish(j, JobStatus.FAILED, error=ImageDecodeError("image 1 is not an image"))
    assert store.get(j.id).error == {"code": "image_decode_failed", "message": "image 1 is not an image"}


def test_cancelling_a_queued_job_is_immediate_and_its_delivery_is_skipped(store: JobStore) -> None:
    j = job(batch_id="b1")
    store.create(j)
    assert store.cancel(j.id) == "cancelled"
    assert not store.start(j, token="t", worker="w", lease_timeout_s=30).started
    assert store.get(j.id).status is JobStatus.CANCELLED
    counts = store.batch("b1")
    assert (counts.total, counts.queued, counts.cancelled) == (1, 0, 1)


def test_cancelling_a_running_job_flags_it_for_its_worker(store: JobStore) -> None:
    j = job()
    store.create(j)
    store.start(j, token="t1", worker="w1", lease_timeout_s=30)
    assert store.cancel(j.id) == "cancelling"
    assert store.get(j.id).status is JobStatus.RUNNING
    assert store.heartbeat([(j.id, "t1")]) == [Heartbeat.CANCEL]
    assert store.cancel_requested(j.id)
    store.finish(j, JobStatus.CANCELLED)
    assert store.cancel(j.id) == "cancelled"
    assert store.cancel("job-none") == "missing"


def test_reclaim_requeues_only_running_jobs_whose_lease_went_stale(store: JobStore) -> None:
    stale, fresh = job(), job()
    for j in (stale, fresh):
        store.create(j, queue="gpu-a")
    store.start(stale, token="a", worker="dead", lease_timeout_s=0.05)
    time.sleep(0.1)
    store.start(fresh, token="b", worker="live", lease_timeout_s=0.05)
    assert store.stale_leases(0.05) == [stale.id]
    assert store.reclaim(stale.id, 0.05) == (stale, "gpu-a")  # back to the queue it came from
    assert store.reclaim(stale.id, 0.05) is None  # the lease is released: reclaimed only once
    assert store.reclaim(fresh.id, 0.05) is None
    rec = store.get(stale.id)
    assert rec.status is JobStatus.RUNNING and rec.reclaims == 1
    # the re-enqueued message is taken at once: nobody holds the job now
    assert store.start(stale, token="c", worker="live", lease_timeout_s=0.05).attempt == 2


def test_a_slow_worker_takes_its_reclaimed_lease_back(store: JobStore) -> None:
    j = job()
    store.create(j)
    store.start(j, token="a", worker="slow", lease_timeout_s=0.05)
    time.sleep(0.1)
    assert store.reclaim(j.id, 0.05) == (j, "")
    assert store.heartbeat([(j.id, "a")]) == [Heartbeat.HELD]
    assert store.start(j, token="b", worker="other", lease_timeout_s=30).status == "busy"


def test_reclaiming_a_job_with_a_pending_cancel_cancels_it(store: JobStore) -> None:
    j = job(batch_id="b2")
    store.create(j)
    store.start(j, token="a", worker="dead", lease_timeout_s=0.05)
    store.cancel(j.id)
    time.sleep(0.1)
    assert store.reclaim(j.id, 0.05) is None
    assert store.get(j.id).status is JobStatus.CANCELLED
    assert store.batch("b2").cancelled == 1 and store.batch("b2").running == 0


def test_a_retry_parks_the_lease_until_it_is_due(store: JobStore) -> None:
    j = job()
    store.create(j)
    store.start(j, token="a", worker="w", lease_timeout_s=0.05)
    assert store.release_for_retry(j.id, "a", 5.0, ImageDecodeError("x"))
    time.sleep(0.1)
    assert store.stale_leases(0.05) == []  # not reclaimed while the retry is pending
    rec = store.get(j.id)
    assert rec.retries == 1 and rec.last_error["code"] == "image_decode_failed"
    assert store.start(j, token="b", worker="w2", lease_timeout_s=0.05).started


def test_batch_counters_follow_every_transition(store: JobStore) -> None:
    jobs = [job(batch_id="b3") for _ in range(4)]
    assert store.create_many(jobs) == [True] * 4
    store.start(jobs[0], token="a", worker="w", lease_timeout_s=30)
    store.start(jobs[1], token="b", worker="w", lease_timeout_s=30)
    store.finish(jobs[1], JobStatus.SUCCEEDED)
    store.finish(jobs[2], JobStatus.FAILED, error={"code": "x", "message": "y"})
    store.cancel(jobs[3].id)
    c = store.batch("b3")
    assert (c.total, c.queued, c.running, c.succeeded, c.failed, c.cancelled) == (4, 0, 1, 1, 1, 1)
    assert not c.done
    store.finish(jobs[0], JobStatus.SUCCEEDED)
    assert store.batch("b3").done
    assert store.batch_job_ids("b3") == [j.id for j in jobs]


def test_a_job_that_reaches_a_worker_without_a_record_gets_one(store: JobStore) -> None:
    j = job(batch_id="b4")
    assert store.start(j, token="a", worker="w", lease_timeout_s=30).started
    assert store.get(j.id).status is JobStatus.RUNNING
    assert store.batch("b4").running == 1


def test_an_unreadable_job_with_an_id_is_recorded_failed(store: JobStore) -> None:
    from producer.errors import MalformedJob

    store.fail_unreadable("job-raw", MalformedJob("not a vlq job"), "{garbage")
    rec = store.get("job-raw")
    assert rec.status is JobStatus.FAILED and rec.error["code"] == "malformed_job"


def test_events_come_back_in_order(store: JobStore) -> None:
    store.append_events("j", [{"type": "delta", "text": "a"}, {"type": "done"}])
    events = store.read_events("j")
    assert [e for _, e in events] == [{"type": "delta", "text": "a"}, {"type": "done"}]
    assert store.read_events("j", events[-1][0]) == []


def test_an_unreachable_redis_raises_broker_unavailable() -> None:
    from tests.conftest import free_port

    store = JobStore.from_url(f"redis://:secret@127.0.0.1:{free_port()}/0", Keys("x"), 60,
                              connect_timeout_s=0.5)
    with pytest.raises(BrokerUnavailable) as e:
        store.get("job-1")
    assert "secret" not in e.value.message and e.value.retryable
