"""Bad input never kills the worker: each case ends `failed` with its own code, and the next job
still succeeds on the same (real) worker process."""

from __future__ import annotations

import json
import time

import pytest

from producer.broker import TASK_NAME, producer_app
from producer.schema import JobStatus
from tests.integration.conftest import Stack, image_file

pytestmark = pytest.mark.integration


def body(*urls: str, text: str = "这是什么") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            "max_tokens": 4, "temperature": 0}


def corrupt_image(stack: Stack) -> dict:
    path = stack.images / "corrupt.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    return body(path.as_uri())


def outside_roots(stack: Stack) -> dict:
    return body("file:///etc/hostname")


def too_many_images(stack: Stack) -> dict:
    url = image_file(stack.images, "many.png", "white").as_uri()
    return body(url, url, url, url)  # the worker allows 3


def over_long_prompt(stack: Stack) -> dict:
    url = image_file(stack.images, "long.png", "black").as_uri()
    return body(url, text="long story " * 600)  # > engine.max_input_len 1024 tokens


def unknown_content_type(stack: Stack) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}


CASES = {
    "corrupt image bytes": (corrupt_image, "image_decode_failed"),
    "a URL that 404s": (lambda s: body(f"{s.http_url}/missing.png"), "image_fetch_failed"),
    "a URL that stalls": (lambda s: body(f"{s.http_url}/stall.png"), "image_fetch_timeout"),
    "a file:// path outside the roots": (outside_roots, "image_url_forbidden"),
    "too many images": (too_many_images, "too_many_images"),
    "an over-long prompt": (over_long_prompt, "prompt_too_long"),
    "an unknown content type": (unknown_content_type, "unsupported_content"),
}


def assert_next_job_succeeds(stack: Stack) -> None:
    url = image_file(stack.images, "good.png", "green").as_uri()
    assert stack.client.submit(body(url)).wait(timeout=60).status is JobStatus.SUCCEEDED
    assert all(p.poll() is None for p in stack.workers), stack.log_tail(stack.workers[0])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_its_own_code_and_the_worker_goes_on(stack: Stack, case: str) -> None:
    make, code = CASES[case]
    handle = stack.client.submit(make(stack), validate=False)
    record = handle.wait(timeout=60)
    assert record.status is JobStatus.FAILED, record
    assert record.error["code"] == code, record.error
    assert record.error["message"]
    assert stack.store.redis.get(stack.client.keys.result(handle.id)) is None
    assert_next_job_succeeds(stack)


def test_a_stalled_url_is_retried_before_it_fails(stack: Stack) -> None:
    handle = stack.client.submit(body(f"{stack.http_url}/stall.png?again"), validate=False)
    record = handle.wait(timeout=60)
    assert (record.error["code"], record.retries, record.attempts) == ("image_fetch_timeout", 1, 2)


def test_a_malformed_job_pushed_to_the_queue_is_dead_lettered(stack: Stack) -> None:
    app = producer_app(stack.settings)
    queue = stack.settings.broker.queue
    # a Celery message whose job does not decode, but whose id can be read
    app.send_task(TASK_NAME, args=[json.dumps({"id": "job-raw-malformed", "request": 5})], queue=queue)
    # one with no job at all, and bytes that are not even a Celery message
    app.send_task(TASK_NAME, args=[], queue=queue)
    stack.store.redis.lpush(stack.store.keys.queue(queue), b"\x00garbage{")
    stack.store.redis.lpush(stack.store.keys.queue(queue), json.dumps({"not": "a celery message"}))
    deadline = time.monotonic() + 60
    while (record := stack.store.get("job-raw-malformed")) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the record appears when the worker reads the message
    assert record is not None, stack.log_tail(stack.workers[0])
    assert record.status is JobStatus.FAILED and record.error["code"] == "malformed_job"
    assert_next_job_succeeds(stack)
    dead = stack.store.dead_letters()
    assert all(d["reason"]["code"] == "malformed_job" for d in dead)
    raws = [d["raw"] for d in dead]
    assert "\x00garbage{" in raws and any("a celery message" in r for r in raws)
    assert any("job-raw-malformed" in r for r in raws) and len(dead) == 4
