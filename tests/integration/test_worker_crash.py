"""kill -9 of a worker mid-job: a new worker reclaims the job through its stale lease (seconds,
not the broker's visibility timeout), runs it, and exactly one result exists. A worker whose
broker consumer stops asking for jobs stops itself, for its supervisor to restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.schema import JobStatus
from tests.conftest import REPO
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


# `vlq worker` with a broker consumer that never sends BRPOP: the state a Celery reconnect that
# never resumed leaves a worker in (heartbeats go on, no job is ever taken).
STALLED_WORKER = """
import worker.celery_app
worker.celery_app.GuardedChannel._brpop_start = lambda self, timeout=None: None
from producer.cli import main
main()
"""


def test_a_worker_whose_consumer_stops_asking_for_jobs_stops_itself_for_its_supervisor(bare_stack: Stack) -> None:
    stack = bare_stack
    log = stack.logs / "stalled-worker.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_WORKER, "worker", "--model", str(stack.model_dir), "--log-level", "INFO"],
        cwd=REPO, env={**os.environ, **stack.env, "VLQ_WORKER_CONSUMER_STALL_S": "3"},
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.wait(timeout=120) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "the broker consumer has asked Redis for no job in" in text and "stopping so that its supervisor" in text
    assert all(info.get("pid") != proc.pid for info in stack.store.workers(max_age_s=60).values())
