"""The job task's logic against a private Redis, with a scripted engine and image loader.

The real engine and image loader run in tests/integration (a real worker process); here the
engine is a stand-in whose behaviour each test scripts, so every branch of the task is reached.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from producer.config import Settings
from producer.errors import ImageDecodeError, ImageFetchTimeout
from producer.schema import Job, JobStatus
from producer.state import JobStore
from tests.worker.scripted_worker import make_runner
from worker.tasks import register

IMG = "data:image/png;base64,AAAA"


def request(text: str = "what is this?", images: int = 1, **kw) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": IMG}} for _ in range(images)]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], **kw}


@pytest.fixture
def env(redis_server: str, key_prefix: str):
    settings = Settings.load(
        key_prefix=key_prefix,
        broker={"url": redis_server, "queue": key_prefix},  # a queue of its own, too
        worker={"max_retries": 2, "retry_backoff_s": 1.0, "heartbeat_s": 0.05, "lease_timeout_s": 5,
                "job_timeout_s": 30},
    )
    w = make_runner(settings)
    runner, store, engine, images = w.runner, w.store, w.engine, w.images
    yield runner, store, engine, images
    runner.leases.stop()
    runner.close()
    store.close()


def queued(store: JobStore, body: dict | None = None, **kw) -> Job:
    job = Job(request=body or request(), **kw)
    store.create(job)
    return job


def test_a_job_runs_to_a_result_keyed_by_its_id(env) -> None:
    runner, store, engine, _ = env
    job = queued(store, metadata={"path": "a.jpg"})
    assert runner.run(job.to_json()).status == "succeeded"
    rec = store.get(job.id)
    assert rec.status is JobStatus.SUCCEEDED and rec.attempts == 1 and rec.worker == "w-scripted"
    assert rec.result_location == f"redis:{store.keys.result(job.id)}"
    doc = json.loads(store.redis.get(store.keys.result(job.id)))
    assert doc["choices"][0]["message"]["content"] == "echo: what is this?"
    assert doc["vlq"]["job_id"] == job.id and doc["vlq"]["attempt"] == 1
    assert doc["vlq"]["metadata"] == {"path": "a.jpg"}
    assert set(doc["vlq"]["timings"]) >= {"job_queue", "images", "engine_wall"}
    assert engine.submitted[0]["images"] == ["image:0"]


def test_a_job_logs_its_start_and_where_its_time_went(env, caplog: pytest.LogCaptureFixture) -> None:
    runner, store, _, _ = env
    job = queued(store, batch_id="batch-logs")
    with caplog.at_level(logging.INFO, logger="worker.tasks"):
        runner.run(job.to_json())
    lines = [r.getMessage() for r in caplog.records if job.id in r.getMessage()]
    assert lines[0] == f"job {job.id}: started (attempt 1, batch batch-logs)"
    assert lines[-1].startswith(f"job {job.id}: succeeded in ") and "(attempt 1; images " in lines[-1]
    assert lines[-1].endswith("3 tokens)")


def test_the_engine_gets_the_jobs_wall_clock_deadline(env) -> None:
    runner, store, engine, _ = env
    before = time.monotonic()
    runner.run(queued(store).to_json())
    assert before + 29 < engine.submitted[0]["deadline"] <= time.monotonic() + 30


def test_a_redelivered_message_for_a_finished_job_is_skipped(env) -> None:
    runner, store, engine, _ = env
    job = queued(store)
    runner.run(job.to_json())
    assert runner.run(job.to_json()).status == "skipped:succeeded"
    assert len(engine.submitted) == 1 and store.get(job.id).attempts == 1


def test_a_bad_request_fails_with_its_code_and_leaves_no_result(env) -> None:
    runner, store, engine, _ = env
    body = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}
    job = queued(store, body)
    assert runner.run(job.to_json()).status == "failed"
    assert store.get(job.id).error["code"] == "unsupported_content"
    assert store.redis.get(store.keys.result(job.id)) is None and engine.submitted == []


def test_the_engines_own_checks_fail_the_job_with_their_code(env) -> None:
    runner, store, _, _ = env
    job = queued(store, request(images=3))
    runner.run(job.to_json())
    assert store.get(job.id).error["code"] == "too_many_images"


def test_a_bad_image_fails_the_job_at_once(env) -> None:
    runner, store, _, images = env
    images.error = ImageDecodeError("image 1 is not a picture")
    job = queued(store)
    assert runner.run(job.to_json()).retry_in is None
    assert store.get(job.id).error == {"code": "image_decode_failed", "message": "image 1 is not a picture"}


def test_a_transient_error_is_retried_with_backoff_then_fails_with_its_code(env) -> None:
    runner, store, _, images = env
    images.error = ImageFetchTimeout("the image server did not answer in 10s")
    job = queued(store)
    first = runner.run(job.to_json(), retries=0)
    second = runner.run(job.to_json(), retries=1)
    assert (first.status, first.retry_in, second.retry_in) == ("retry", 1.0, 2.0)
    rec = store.get(job.id)
    assert rec.status is JobStatus.RUNNING and rec.retries == 2
    assert rec.last_error == {"code": "image_fetch_timeout",
                              "message": "the image server did not answer in 10s; retry 2 of 2 in 2.0s"}
    last = runner.run(job.to_json(), retries=2)
    assert last.status == "failed" and last.retry_in is None
    error = store.get(job.id).error
    assert error["code"] == "image_fetch_timeout"
    assert error["message"] == ("the image server did not answer in 10s; gave up after 3 attempts: check that the"
                                " workers can reach the URL, or send the image inline as a data: URL")


class FlakyStore:
    """A result store that is unavailable for its first ``failures`` writes."""

    def __init__(self, real, failures: int) -> None:
        self.real, self.failures, self.calls = real, failures, 0

    def put(self, job_id: str, document: dict) -> str:
        from producer.errors import StoreUnavailable

        self.calls += 1
        if self.calls <= self.failures:
            raise StoreUnavailable("S3 answered 503 SlowDown")
        return self.real.put(job_id, document)


@pytest.mark.parametrize("failures, status", [(2, "succeeded"), (5, "failed")])
def test_a_result_store_that_blinks_is_tried_again_in_place_without_computing_the_answer_again(
    env, monkeypatch: pytest.MonkeyPatch, failures: int, status: str
) -> None:
    runner, store, engine, _ = env
    flaky = FlakyStore(runner.results.for_destination(Job(request=request()).destination), failures)
    monkeypatch.setattr(runner.results, "for_destination", lambda destination: flaky)
    monkeypatch.setattr(runner, "_backoff", lambda retries: 0.05)
    job = queued(store)
    outcome = runner.run(job.to_json(), retries=0)
    assert outcome.status == status and outcome.retry_in is None
    assert len(engine.submitted) == 1  # the answer was computed once
    assert flaky.calls == min(failures + 1, 3)  # max_retries 2: three writes at most
    record = store.get(job.id)
    assert record.status.value == status and record.attempts == 1
    if status == "failed":
        assert record.error["code"] == "store_unavailable"
        assert "gave up after 3 attempts to write the result" in record.error["message"]


def test_a_malformed_message_is_dead_lettered_and_failed_when_its_id_reads(env) -> None:
    runner, store, _, _ = env
    raw = json.dumps({"id": "job-broken", "request": "not an object"})
    assert runner.run(raw).status == "malformed"
    assert store.get("job-broken").error["code"] == "malformed_job"
    assert runner.run("{definitely not json").status == "malformed"
    assert runner.run(None).status == "malformed"
    dead = store.dead_letters()
    assert len(dead) == 3 and dead[-1]["reason"]["code"] == "malformed_job"


def test_a_job_cancelled_before_it_runs_is_never_run(env) -> None:
    runner, store, engine, _ = env
    job = queued(store)
    store.cancel(job.id)
    assert runner.run(job.to_json()).status == "skipped:cancelled"
    assert engine.submitted == []


def test_cancelling_a_running_job_aborts_it_in_the_engine(env) -> None:
    runner, store, engine, _ = env
    runner.leases.start()
    engine.hold = True
    job = queued(store, batch_id="b-cancel")
    out = {}
    t = threading.Thread(target=lambda: out.update(o=runner.run(job.to_json())))
    t.start()
    while not engine.pending:
        time.sleep(0.01)
    assert store.cancel(job.id) == "cancelling"
    t.join(5)
    assert out["o"].status == "cancelled"
    assert store.get(job.id).status is JobStatus.CANCELLED
    assert store.batch("b-cancel").cancelled == 1


def test_a_second_delivery_of_a_running_job_is_skipped(env) -> None:
    runner, store, engine, _ = env
    engine.hold = True
    job = queued(store)
    t = threading.Thread(target=runner.run, args=(job.to_json(),))
    t.start()
    while not engine.pending:
        time.sleep(0.01)
    assert runner.run(job.to_json()).status == "skipped:busy"
    engine.release(job.id)
    t.join(5)
    assert store.get(job.id).status is JobStatus.SUCCEEDED and len(engine.submitted) == 1


def test_an_engine_bug_fails_the_job_and_not_the_worker(env) -> None:
    runner, store, engine, _ = env
    engine.fail = RuntimeError("CUDA error: an illegal memory access")
    job = queued(store)
    assert runner.run(job.to_json()).status == "failed"
    err = store.get(job.id).error
    assert err["code"] == "engine_error" and "illegal memory access" in err["message"]


def test_a_streaming_job_writes_deltas_then_done_before_it_finishes(env) -> None:
    runner, store, _, _ = env
    job = queued(store, request("hello there", stream=True))
    runner.run(job.to_json())
    events = [e for _, e in store.read_events(job.id)]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == "echo: hello there"
    assert events[-1] == {"type": "done", "finish_reason": "stop", "attempt": 1,
                          "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def test_a_job_without_a_record_still_runs(env) -> None:
    runner, store, _, _ = env
    job = Job(request=request())
    assert runner.run(job.to_json()).status == "succeeded"


def test_the_celery_task_retries_transient_errors_through_the_broker(env) -> None:
    """Through a real Celery worker thread on the private Redis: a timeout, then success."""
    from celery.contrib.testing.worker import start_worker

    from producer.broker import send_job
    from worker.celery_app import make_celery_app

    runner, store, _, images = env
    images.error = ImageFetchTimeout("slow server")
    settings = runner.settings.model_copy(update={"worker": runner.settings.worker.model_copy(
        update={"retry_backoff_s": 0.2})})
    runner.settings = settings
    app = make_celery_app(settings)
    register(app, runner)
    job = queued(store)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False,
                      loglevel="WARNING", shutdown_timeout=10):
        send_job(app, job, settings.broker.queue)
        deadline = time.monotonic() + 10
        while store.get(job.id).retries < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        images.error = None
        while not store.get(job.id).is_terminal and time.monotonic() < deadline:
            time.sleep(0.02)
    rec = store.get(job.id)
    assert rec.status is JobStatus.SUCCEEDED and rec.attempts == 2 and rec.retries == 1


def test_an_image_host_the_policy_refuses_fails_the_job_at_once_naming_the_setting(env) -> None:
    from producer.config import ImageSettings
    from worker.images import ImageLoader

    runner, store, engine, _ = env
    runner.images = ImageLoader(ImageSettings(block_private_networks=True))
    body = request()
    body["messages"][0]["content"][0]["image_url"]["url"] = "http://169.254.169.254/latest/meta-data/"
    job = queued(store, body)
    try:
        outcome = runner.run(job.to_json())
    finally:
        runner.images.close()
    assert outcome.status == "failed" and outcome.retry_in is None
    error = store.get(job.id).error
    assert error["code"] == "image_url_forbidden" and "images.block_private_networks" in error["message"]
    assert error["picture"] == 1 and engine.submitted == []


def test_the_result_records_each_pictures_decoded_size(env) -> None:
    import base64
    import io

    from PIL import Image

    from producer.config import ImageSettings
    from worker.images import ImageLoader

    runner, store, _, _ = env
    runner.images = ImageLoader(ImageSettings())
    urls = []
    for size in ((64, 48), (30, 70)):
        buf = io.BytesIO()
        Image.new("RGB", size, "teal").save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    body = {"messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": "compare"}]}]}
    job = queued(store, body)
    try:
        assert runner.run(job.to_json()).status == "succeeded"
    finally:
        runner.images.close()
    doc = json.loads(store.redis.get(store.keys.result(job.id)))
    assert doc["vlq"]["image_sizes"] == [[64, 48], [30, 70]]
