"""kill -9 of a worker mid-job: a new worker reclaims the job through its stale lease (seconds,
not the broker's visibility timeout), runs it, and exactly one result exists."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from producer.schema import JobStatus
from tests.integration.conftest import BUCKET, Stack, image_file, make_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bare_stack(redis_server: str, s3_server: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A private stack whose workers each test starts (and kills) itself."""
    with make_stack(redis_server, s3_server, tiny_model_dir, tmp_path_factory.mktemp("crash")) as s:
        yield s


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def test_a_job_whose_worker_is_killed_completes_once_on_a_new_worker(bare_stack: Stack) -> None:
    stack = bare_stack
    first = stack.start_worker()
    url = image_file(stack.images, "crash.jpg", "teal").as_uri()
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it at length."}]}],
        "max_tokens": 250, "temperature": 0}
    handle = stack.client.submit(body, destination={"kind": "s3", "bucket": BUCKET, "prefix": "crash/"})
    wait_for(lambda: handle.status() is JobStatus.RUNNING, 60, "the job never started")
    time.sleep(0.5)  # well inside the engine now
    before = handle.record()
    assert before.status is JobStatus.RUNNING and before.attempts == 1
    stack.kill(first)

    second = stack.start_worker()
    record = handle.wait(timeout=180)
    assert record.status is JobStatus.SUCCEEDED, (record, stack.log_tail(second))
    assert (record.attempts, record.reclaims) == (2, 1)
    assert record.worker != before.worker
    s3 = stack.client.s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="crash/").get("Contents", [])]
    assert keys == [f"crash/{handle.id}.json"]
    doc = handle.result()
    assert doc["vlq"]["attempt"] == 2 and doc["vlq"]["worker"] == record.worker
    assert stack.store.redis.zscore(stack.client.keys.leases, handle.id) is None
    log = second.log_path.read_text()  # type: ignore[attr-defined]
    assert f"job {handle.id}: lease went stale, re-enqueued" in log
