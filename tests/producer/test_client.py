"""The SDK against a private Redis (and moto's S3), with a Celery worker thread running the real
task code around a scripted engine."""

from __future__ import annotations

import base64
import json
import threading
import time

import boto3
import pytest

from producer.client import Client
from producer.config import Settings
from producer.errors import (
    BrokerUnavailable,
    DuplicateJob,
    ImageDecodeError,
    InvalidRequest,
    JobCancelled,
    JobNotFinished,
    JobNotFound,
    TooManyImages,
    UnsupportedContent,
)
from producer.schema import Destination, Job, JobStatus
from tests.worker.scripted_worker import scripted_worker

IMG = "data:image/png;base64,AAAA"


def request(text: str = "what is this?", images: int = 1, **kw) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": IMG}} for _ in range(images)]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], **kw}


@pytest.fixture
def settings(redis_server: str, key_prefix: str) -> Settings:
    return Settings.load(
        key_prefix=key_prefix,
        broker={"url": redis_server, "queue": key_prefix},
        engine={"max_images": 2},
        worker={"heartbeat_s": 0.1, "lease_timeout_s": 5},
    )


@pytest.fixture
def client(settings: Settings):
    c = Client(settings)
    yield c
    c.close()


def queued_messages(client: Client) -> list[dict]:
    """The Celery messages waiting in the client's queue, decoded."""
    out = []
    redis, keys = client.store.redis, client.store.keys
    for raw in [raw for key in keys.queue_lists(client.queue) for raw in redis.lrange(key, 0, -1)]:
        envelope = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        out.append({"task": envelope["headers"]["task"], "args": args, "kwargs": kwargs,
                    "content_type": envelope["content-type"]})
    return out


def test_submit_records_the_job_queued_and_sends_one_json_message(client: Client) -> None:
    handle = client.submit(request(), metadata={"k": "v"})
    assert handle.status() is JobStatus.QUEUED
    [msg] = queued_messages(client)
    assert msg["task"] == "vlq.run_job" and msg["content_type"] == "application/json"
    job = Job.from_wire(msg["args"][0])
    assert job.id == handle.id and job.metadata == {"k": "v"} and job.request == request()
    rec = client.status(handle.id)
    assert rec.queue == client.queue and rec.destination == Destination()


def test_an_invalid_request_is_refused_before_anything_is_queued(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="messages"):
        client.submit({"messages": []})
    with pytest.raises(UnsupportedContent):
        client.submit({"messages": [{"role": "user", "content": [{"type": "video_url"}]}]})
    with pytest.raises(TooManyImages, match="at most 2"):
        client.submit(request(images=3))
    assert queued_messages(client) == []


def test_validation_can_be_left_to_the_worker(client: Client) -> None:
    handle = client.submit(request(images=3), validate=False)
    assert [Job.from_wire(m["args"][0]).id for m in queued_messages(client)] == [handle.id]


def test_a_job_id_in_use_is_refused(client: Client) -> None:
    client.submit(request(), job_id="job-fixed")
    with pytest.raises(DuplicateJob):
        client.submit(request(), job_id="job-fixed")
    assert len(queued_messages(client)) == 1


def test_results_go_to_s3_when_the_settings_say_so(settings: Settings) -> None:
    s3_settings = settings.model_copy(update={"store": settings.store.model_copy(
        update={"kind": "s3", "s3": settings.store.s3.model_copy(update={"bucket": "res", "prefix": "out/"})})})
    with Client(s3_settings) as c:
        rec = c.status(c.submit(request()).id)
    assert rec.destination == Destination(kind="s3", bucket="res", prefix="out/")


def test_a_job_runs_and_its_result_is_read_back(settings: Settings, client: Client) -> None:
    with scripted_worker(settings):
        handle = client.submit(request("hello"))
        doc = handle.result(timeout=10)
    assert doc["choices"][0]["message"]["content"] == "echo: hello"
    assert doc["vlq"]["job_id"] == handle.id
    rec = handle.wait()
    assert rec.status is JobStatus.SUCCEEDED and rec.started_at and rec.finished_at


def test_every_key_a_job_writes_is_under_the_key_prefix_the_brokers_too(settings: Settings, client: Client) -> None:
    before = set(client.store.redis.keys("*"))
    with scripted_worker(settings):
        client.submit(request("isolated")).result(timeout=10)
        for handle in client.submit_many([request("a"), request("b")]):
            handle.wait(timeout=10)
    new = set(client.store.redis.keys("*")) - before
    assert any(k.startswith(f"{settings.key_prefix}:broker:") for k in new)  # kombu's bindings and bookkeeping
    assert not [k for k in new if not k.startswith(settings.key_prefix + ":")]


def test_a_job_sent_ahead_runs_before_the_jobs_waiting_in_the_queue(settings: Settings, client: Client) -> None:
    from producer.broker import send_job

    waiting = [client.submit(request(f"waiting {i}")).id for i in range(6)]
    reclaimed = client.make_job(request("reclaimed"))  # as a worker re-enqueues a dead worker's job
    client.store.create(reclaimed, client.queue)
    send_job(client.celery, reclaimed, client.queue, ahead=True)
    with scripted_worker(settings):
        for job_id in [*waiting, reclaimed.id]:
            client.wait(job_id, timeout=10)
    started = sorted([*waiting, reclaimed.id], key=lambda job_id: client.status(job_id).started_at)
    assert started.index(reclaimed.id) < 4  # in the worker's first 4 (its threads), not 7th


def test_results_in_s3_are_read_back(settings: Settings, s3_server: str) -> None:
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="res")
    s = settings.model_copy(update={"store": settings.store.model_copy(update={
        "s3": settings.store.s3.model_copy(update={"endpoint_url": s3_server, "region": "us-east-1"})})})
    with scripted_worker(s), Client(s) as c:
        handle = c.submit(request("to s3"), destination={"kind": "s3", "bucket": "res", "prefix": "a/"})
        doc = handle.result(timeout=10)
        assert c.status(handle.id).result_location == f"s3://res/a/{handle.id}.json"
    assert doc["choices"][0]["message"]["content"] == "echo: to s3"


def test_a_batch_reports_its_counts(settings: Settings, client: Client) -> None:
    with scripted_worker(settings) as w:
        w.images.error = None
        handles = client.submit_many([request(f"q{i}") for i in range(5)])
        batch_id = handles[0].batch_id
        assert all(h.batch_id == batch_id for h in handles)
        records = list(client.as_completed([h.id for h in handles], timeout=10))
    counts = client.batch(batch_id)
    assert (counts.total, counts.succeeded, counts.queued, counts.running) == (5, 5, 0, 0)
    assert counts.done and {r.id for r in records} == {h.id for h in handles}
    assert client.batch_jobs(batch_id) == [h.id for h in handles]


def test_one_bad_item_submits_nothing_of_its_batch(client: Client) -> None:
    with pytest.raises(InvalidRequest):
        client.submit_many([request(), {"messages": "nope"}])
    assert queued_messages(client) == []


def test_a_failed_job_raises_its_coded_error(settings: Settings, client: Client) -> None:
    with scripted_worker(settings) as w:
        w.images.error = ImageDecodeError("image 1 is not a picture")
        handle = client.submit(request())
        with pytest.raises(ImageDecodeError, match="not a picture"):
            handle.result(timeout=10)
    assert client.status(handle.id).error["code"] == "image_decode_failed"


def test_waiting_gives_up_after_its_timeout(client: Client) -> None:
    handle = client.submit(request())
    t0 = time.monotonic()
    with pytest.raises(JobNotFinished, match="still queued"):
        handle.wait(timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(JobNotFinished):
        client.result(handle.id)  # no wait: not finished yet


def test_a_timeout_says_when_no_live_worker_serves_the_queue(client: Client, settings: Settings) -> None:
    handle = client.submit(request())
    with pytest.raises(JobNotFinished, match=f"no worker is serving queue '{settings.broker.queue}'"):
        handle.wait(timeout=0.1)
    with pytest.raises(JobNotFinished, match="no worker is serving"):
        list(client.as_completed([handle.id], timeout=0.1))
    client.store.register_worker("elsewhere", {"queue": "another-queue"})  # serves another queue
    with pytest.raises(JobNotFinished, match="no worker is serving"):
        handle.wait(timeout=0.1)
    client.store.register_worker("ours", {"queue": settings.broker.queue})
    with pytest.raises(JobNotFinished) as err:
        handle.wait(timeout=0.1)
    assert "no worker" not in err.value.message  # one is: the job is just waiting its turn
    # its heartbeat long gone: a worker that died does not count
    client.store.redis.hset(client.store.keys.workers, "ours", json.dumps({"queue": settings.broker.queue, "at": 0}))
    with pytest.raises(JobNotFinished, match="no worker is serving"):
        handle.wait(timeout=0.1)


def test_a_cancelled_queued_job_is_never_run(settings: Settings, client: Client) -> None:
    handle = client.submit(request())
    assert handle.cancel() == "cancelled"
    with scripted_worker(settings) as w:
        marker = client.submit(request("after"))
        marker.result(timeout=10)
        assert [s["id"] for s in w.engine.submitted] == [marker.id]
    with pytest.raises(JobCancelled):
        handle.result()


def test_cancelling_a_running_job_aborts_it(settings: Settings, client: Client) -> None:
    with scripted_worker(settings) as w:
        w.engine.hold = True
        handle = client.submit(request())
        deadline = time.monotonic() + 10
        while not w.engine.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handle.cancel() == "cancelling"
        assert handle.wait(timeout=10).status is JobStatus.CANCELLED


def test_unknown_ids_raise_not_found(client: Client) -> None:
    for call in (client.status, client.cancel, client.batch):
        with pytest.raises(JobNotFound):
            call("job-unknown")


def test_streaming_yields_deltas_then_the_final_event(settings: Settings, client: Client) -> None:
    with scripted_worker(settings):
        handle = client.submit(request("stream me", stream=True))
        events = list(handle.stream(timeout=10))
    assert "".join(e.text for e in events if e.type == "delta") == "echo: stream me"
    assert events[-1].type == "done" and events[-1].finish_reason == "stop"
    assert events[-1].usage["completion_tokens"] == 3


def test_streaming_a_job_without_token_events_yields_its_whole_answer(settings: Settings, client: Client) -> None:
    with scripted_worker(settings):
        handle = client.submit(request("batch job"))
        events = list(handle.stream(timeout=10))
    assert [(e.type, e.text) for e in events] == [("delta", "echo: batch job"), ("done", "")]


def test_a_restarted_job_does_not_repeat_streamed_text(client: Client) -> None:
    store = client.store
    job_id = "job-restarted"
    store.append_events(job_id, [{"type": "delta", "text": "Hello ", "offset": 0, "attempt": 1}])
    got: list[str] = []

    def follow() -> None:
        got.extend(e.text or e.type for e in client.stream(job_id, timeout=5))

    client.submit(request(), job_id=job_id)
    t = threading.Thread(target=follow)
    t.start()
    time.sleep(0.2)
    store.append_events(job_id, [
        {"type": "delta", "text": "Hello ", "offset": 0, "attempt": 2},
        {"type": "delta", "text": "world", "offset": 6, "attempt": 2},
        {"type": "done", "finish_reason": "stop", "usage": {}, "attempt": 2},
    ])
    t.join(5)
    assert got == ["Hello ", "world", "done"]


def test_a_restarted_job_does_not_repeat_streamed_logprob_entries(client: Client) -> None:
    store, job_id = client.store, "job-restarted-logprobs"
    a, b, c = ({"token": t, "logprob": -0.5} for t in ("Hel", "lo", " world"))
    store.append_events(job_id, [{"type": "delta", "text": "Hel", "offset": 0, "logprobs": [a], "token_offset": 0}])
    client.submit(request(), job_id=job_id)
    store.append_events(job_id, [  # the second attempt, from the start: "Hel" and its entry again
        {"type": "delta", "text": "Hello", "offset": 0, "logprobs": [a, b], "token_offset": 0, "attempt": 2},
        {"type": "delta", "text": " world", "offset": 5, "logprobs": [c], "token_offset": 2, "attempt": 2},
        {"type": "done", "finish_reason": "stop", "usage": {}, "attempt": 2},
    ])
    events = list(client.stream(job_id, timeout=5))
    assert [(e.text, e.logprobs) for e in events[:-1]] == [("Hel", [a]), ("lo", [b]), (" world", [c])]
    assert events[-1].type == "done"


def test_stream_events_name_the_fingerprint_of_the_attempt_that_answers(client: Client) -> None:
    store, job_id = client.store, "job-fingerprints"
    client.submit(request(), job_id=job_id)
    store.append_events(job_id, [
        {"type": "delta", "text": "Hel", "offset": 0, "attempt": 1, "system_fingerprint": "vlq-a"},
        {"type": "delta", "text": "Hello", "offset": 0, "attempt": 2, "system_fingerprint": "vlq-b"},
        {"type": "delta", "text": " you", "offset": 5, "attempt": 2},
        {"type": "done", "finish_reason": "stop", "usage": {}, "attempt": 2},
    ])
    events = list(client.stream(job_id, timeout=5))
    assert [(e.text, e.system_fingerprint) for e in events] == [
        ("Hel", "vlq-a"), ("lo", "vlq-b"), (" you", "vlq-b"), ("", "vlq-b")]


def test_a_stream_idle_timeout_counts_from_the_last_event_not_from_the_start(client: Client) -> None:
    store, job_id = client.store, "job-slow-stream"
    client.submit(request(), job_id=job_id)

    def trickle() -> None:  # 1.2 s of text, a piece every 0.2 s
        for i in range(6):
            time.sleep(0.2)
            store.append_events(job_id, [{"type": "delta", "text": f"{i} ", "offset": 2 * i}])
        store.append_events(job_id, [{"type": "done", "finish_reason": "stop", "usage": {}}])

    t = threading.Thread(target=trickle)
    t.start()
    events = list(client.stream(job_id, idle_timeout=0.6))
    t.join(5)
    assert "".join(e.text for e in events) == "0 1 2 3 4 5 " and events[-1].type == "done"


def test_a_stream_that_stays_silent_gives_up_and_says_the_job_goes_on(client: Client) -> None:
    handle = client.submit(request())
    t0 = time.monotonic()
    with pytest.raises(JobNotFinished, match=r"\(queued\) sent nothing new for 0.3s; no worker is serving queue"
                                             r" .*; it goes on") as err:
        list(client.stream(handle.id, idle_timeout=0.3))
    assert time.monotonic() - t0 < 1.5 and f"vlq result {handle.id} --wait" in err.value.message
    with pytest.raises(JobNotFinished, match=r"did not finish within 0.2s; no worker is serving .*; it goes on"):
        list(client.stream(handle.id, timeout=0.2, idle_timeout=10))


def test_a_silent_running_job_is_said_to_wait_for_a_slot_or_its_images(client: Client) -> None:
    handle = client.submit(request())
    client.store.start(handle.record().job(), token="t", worker="w", lease_timeout_s=30)
    with pytest.raises(JobNotFinished, match=r"\(running, no text yet: waiting for an engine slot or still"
                                             r" reading its images\) sent nothing new"):
        list(client.stream(handle.id, idle_timeout=0.3))


def test_streaming_a_failed_job_raises_its_error(settings: Settings, client: Client) -> None:
    with scripted_worker(settings) as w:
        w.images.error = ImageDecodeError("broken")
        handle = client.submit(request(stream=True))
        with pytest.raises(ImageDecodeError):
            list(handle.stream(timeout=10))


def test_an_unreachable_broker_raises_broker_unavailable(settings: Settings) -> None:
    from tests.conftest import free_port

    s = settings.model_copy(update={"broker": settings.broker.model_copy(
        update={"url": f"redis://127.0.0.1:{free_port()}/0", "connect_timeout_s": 0.3})})
    with Client(s) as c, pytest.raises(BrokerUnavailable, match="cannot reach Redis"):
        c.submit(request())


def test_bad_job_options_and_a_bad_item_of_many_are_named(client: Client) -> None:
    ok = request()
    with pytest.raises(InvalidRequest, match="metadata must hold JSON values only") as err:
        client.submit(ok, metadata={"when": object()})
    assert err.value.context["param"] == "metadata"
    with pytest.raises(InvalidRequest, match="destination.kind: Input should be 'redis' or 's3'") as err:
        client.submit(ok, destination={"kind": "ftp"})
    assert err.value.context["param"] == "destination.kind"
    bad = {"messages": [{"role": "wizard", "content": "hi"}]}
    with pytest.raises(InvalidRequest, match=r"^items\[2\]: .*'developer', not 'wizard'") as err:
        client.submit_many([ok, ok, bad, ok])
    assert err.value.context["param"] == "items[2].messages[0].role"
