"""The whole path through a real `vlq worker` process: SDK -> Redis -> Celery -> tiny model ->
result in Redis or S3, folder annotation, cancellation, streaming."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from producer.errors import JobCancelled
from producer.schema import JobStatus
from tests.integration.conftest import BUCKET, Stack, image_file, real_tokenizer, vlq_command

pytestmark = pytest.mark.integration


def one_image(url: str, text: str = "这是什么", **kw) -> dict:
    return {"model": "QwenVL", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}],
        "max_tokens": 8, "temperature": 0, **kw}


def test_a_single_image_request_is_answered(stack: Stack) -> None:
    url = image_file(stack.images, "single.jpg", "orange").as_uri()
    handle = stack.client.submit(one_image(url))
    doc = handle.result(timeout=60)
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["finish_reason"] in ("stop", "length")
    assert doc["usage"]["completion_tokens"] >= 1
    if real_tokenizer(stack.model_dir):
        assert doc["usage"]["prompt_tokens"] == 285  # the seed's figure for this request
    assert doc["vlq"]["job_id"] == handle.id and doc["vlq"]["attempt"] == 1
    rec = handle.wait()
    assert rec.status is JobStatus.SUCCEEDED and rec.result_location.startswith("redis:")
    assert rec.queued_at <= rec.started_at <= rec.finished_at


def test_a_two_image_request_is_answered(stack: Stack) -> None:
    first = image_file(stack.images, "two/a.jpg", "red").as_uri()
    second = image_file(stack.images, "two/b.png", "green", size=(30, 90)).as_uri()
    body = {"model": "QwenVL", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": first}},
        {"type": "image_url", "image_url": {"url": second}},
        {"type": "text", "text": "描述一下两张图片的不同。"}]}], "max_tokens": 8}
    doc = stack.client.submit(body).result(timeout=60)
    if real_tokenizer(stack.model_dir):
        assert doc["usage"]["prompt_tokens"] == 553
    assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]


def test_images_over_http_and_inline_data_work(stack: Stack) -> None:
    import base64

    inline = "data:image/png;base64," + base64.b64encode(
        image_file(stack.images, "inline.png", "blue").read_bytes()).decode()
    handles = stack.client.submit_many([one_image(f"{stack.http_url}/ok.png"), one_image(inline)])
    for h in handles:
        assert h.result(timeout=60)["usage"]["completion_tokens"] >= 1
    counts = stack.client.batch(handles[0].batch_id)
    assert (counts.total, counts.succeeded) == (2, 2)


def test_a_result_can_go_to_s3(stack: Stack) -> None:
    url = image_file(stack.images, "s3.jpg", "yellow").as_uri()
    handle = stack.client.submit(one_image(url), destination={"kind": "s3", "bucket": BUCKET, "prefix": "it/"})
    doc = handle.result(timeout=60)
    key = f"it/{handle.id}.json"
    assert handle.wait().result_location == f"s3://{BUCKET}/{key}"
    s3 = stack.client.s3_client()
    obj = s3.get_object(Bucket=BUCKET, Key=key)
    assert obj["ContentType"] == "application/json"
    assert json.loads(obj["Body"].read()) == doc
    assert stack.store.redis.get(stack.client.keys.result(handle.id)) is None  # not in Redis too


def test_a_streaming_job_streams_the_same_text_it_stores(stack: Stack) -> None:
    url = image_file(stack.images, "stream.jpg", "pink").as_uri()
    handle = stack.client.submit(one_image(url, max_tokens=12, seed=7, stream=True))
    events = list(handle.stream(timeout=60))
    doc = handle.result(timeout=5)
    assert "".join(e.text for e in events if e.type == "delta") == doc["choices"][0]["message"]["content"]
    assert events[-1].type == "done" and events[-1].usage == doc["usage"]
    assert {e.system_fingerprint for e in events} == {doc["system_fingerprint"]}  # from the first piece on


def test_a_job_cancelled_while_queued_never_runs(stack: Stack) -> None:
    url = image_file(stack.images, "busy.jpg", "grey").as_uri()
    # Keep every worker thread busy (concurrency = max_batch_size + 2 = 4) so the last job waits.
    busy = stack.client.submit_many([one_image(url, max_tokens=48) for _ in range(6)])
    victim = busy[-1]
    assert victim.cancel() == "cancelled"
    for h in busy[:-1]:
        assert h.wait(timeout=120).status is JobStatus.SUCCEEDED
    rec = victim.wait(timeout=5)
    assert rec.status is JobStatus.CANCELLED and rec.attempts == 0 and rec.started_at is None
    with pytest.raises(JobCancelled):
        victim.result()
    counts = stack.client.batch(victim.batch_id)
    assert (counts.succeeded, counts.cancelled, counts.running, counts.queued) == (5, 1, 0, 0)


def test_annotating_a_folder_twice_submits_nothing_the_second_time(stack: Stack, tmp_path) -> None:
    folder = stack.images / "album"
    for i, colour in enumerate(["red", "green", "blue"]):
        image_file(folder, f"{'sub/' if i else ''}{i}.jpg", colour)
    out = tmp_path / "results.jsonl"
    cmd = [*vlq_command(), "annotate", str(folder), "--prompt", "What colour is it?", "--out", str(out),
           "--max-tokens", "6", "--timeout", "120"]
    env = {**__import__("os").environ, **stack.env}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    assert "3 images: 0 already done, 3 submitted, 3 succeeded, 0 failed" in first.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == ["0.jpg", "sub/1.jpg", "sub/2.jpg"]
    assert all(r["status"] == "succeeded" and isinstance(r["answer"], str) for r in rows)
    jobs_before = len(stack.store.redis.keys(stack.client.keys.job("*")))
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "3 images: 3 already done, 0 submitted" in second.stdout
    assert len(stack.store.redis.keys(stack.client.keys.job("*"))) == jobs_before
    assert len(out.read_text().splitlines()) == 3


def test_a_redelivered_message_for_a_finished_job_is_skipped(stack: Stack) -> None:
    from producer.broker import producer_app, send_job

    url = image_file(stack.images, "again.jpg", "olive").as_uri()
    handle = stack.client.submit(one_image(url))
    doc = handle.result(timeout=60)
    job = handle.record().job()
    send_job(producer_app(stack.settings), job, stack.settings.broker.queue)  # as Redis would redeliver
    log = stack.workers[0].log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while f"job {handle.id}: skipped delivery (succeeded)" not in log.read_text():
        assert time.monotonic() < deadline, stack.log_tail(stack.workers[0])
        time.sleep(0.05)
    rec = handle.record()
    assert rec.status is JobStatus.SUCCEEDED and rec.attempts == 1
    assert handle.result() == doc


def test_cancelling_a_running_job_aborts_it_in_the_engine(stack: Stack) -> None:
    url = image_file(stack.images, "long.jpg", "navy").as_uri()
    handle = stack.client.submit(one_image(url, "Tell me everything.", max_tokens=600))
    deadline = time.monotonic() + 60
    while handle.status() is not JobStatus.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    assert handle.cancel() == "cancelling"
    t0 = time.monotonic()
    record = handle.wait(timeout=30)
    assert record.status is JobStatus.CANCELLED
    assert time.monotonic() - t0 < 5  # aborted at the next heartbeat, not run to its 600 tokens
    assert stack.store.redis.get(stack.client.keys.result(handle.id)) is None
    after = stack.client.submit(one_image(url))
    assert after.wait(timeout=60).status is JobStatus.SUCCEEDED


def test_a_destination_bucket_that_does_not_exist_fails_the_job_clearly(stack: Stack) -> None:
    url = image_file(stack.images, "nobucket.jpg", "maroon").as_uri()
    handle = stack.client.submit(one_image(url), destination={"kind": "s3", "bucket": "no-such-bucket"})
    record = handle.wait(timeout=60)
    assert record.status is JobStatus.FAILED, (record, stack.log_tail(stack.workers[0]))
    assert record.error["code"] == "store_rejected", record.error
    assert "NoSuchBucket" in record.error["message"], record.error
