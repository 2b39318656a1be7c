"""OpenAI batches in the SDK (producer.batches) against a real Redis, with no worker: the tests play
the worker's part through JobStore, so every path (finish, fail, cancel, expire, resume) is
driven exactly."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from producer.batches import Batches
from producer.client import Client
from producer.config import Settings
from producer.errors import InvalidRequest, JobNotFound, TooManyImages
from producer.files import FileStore
from producer.schema import JobStatus
from tests.conftest import REPO


@pytest.fixture
def env(redis_server: str, key_prefix: str):
    settings = Settings.load(REPO / "conf", key_prefix=key_prefix,
                             broker={"url": redis_server, "queue": key_prefix},
                             engine={"max_images": 2})
    client = Client(settings)
    files = FileStore.from_settings(settings)
    yield client, files, Batches(client, files)
    files.close()
    client.close()


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}}


def upload(files: FileStore, rows: list[Any]) -> str:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    return files.create(data, filename="in.jsonl", purpose="batch").id


def answer(client: Client, job_id: str, status: JobStatus = JobStatus.SUCCEEDED, tokens: int = 5) -> None:
    """Do what a worker does: take the job and finish it (with a result when it succeeded)."""
    job = client.status(job_id).job()
    client.store.start(job, token="t", worker="w", lease_timeout_s=30)
    if status is JobStatus.SUCCEEDED:
        key = client.keys.result(job_id)
        client.store.redis.set(key, json.dumps({
            "id": f"chatcmpl-{job_id}", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": tokens, "total_tokens": 20 + tokens}}))
        client.store.finish(job, status, result_location=f"redis:{key}")
    else:
        client.store.finish(job, status, error={"code": "image_fetch_failed", "message": "404 for the image"})


def rows(files: FileStore, file_id: str | None) -> list[dict[str, Any]]:
    return [] if file_id is None else [json.loads(x) for x in files.content(file_id).splitlines()]


def test_a_batch_runs_every_line_as_a_job_and_writes_both_files(env) -> None:
    client, files, batches = env
    batch = batches.create(upload(files, [line("a"), line("b"), line("c")]), "/v1/chat/completions")
    assert batch.status == "validating" and batch.request_counts.total == 0
    assert batch.model is None  # not read yet: it comes from the requests
    key, ttl = client.keys.openai_batch(batch.id), client.settings.store.ttl_s
    assert 24 * 3600 + ttl - 5 <= client.store.redis.ttl(key) <= 24 * 3600 + ttl  # its window, then as its jobs
    batch = batches.refresh(batch.id)
    assert batch.status == "in_progress" and batch.request_counts.total == 3 and batch.model == "m"
    ids = client.batch_jobs(batch.id)
    assert ids == [f"{batch.id}-1", f"{batch.id}-2", f"{batch.id}-3"]
    answer(client, ids[2])
    answer(client, ids[0], JobStatus.FAILED)
    assert batches.refresh(batch.id).status == "in_progress"  # one still queued
    answer(client, ids[1])
    batch = batches.refresh(batch.id)
    assert batch.status == "completed" and batch.finalizing_at and batch.completed_at
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert batch.usage["input_tokens"] == 40 and batch.usage["output_tokens"] == 10
    out = rows(files, batch.output_file_id)
    assert [r["custom_id"] for r in out] == ["b", "c"]  # input order
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "ok"
    err = rows(files, batch.error_file_id)
    assert [r["custom_id"] for r in err] == ["a"]
    assert err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"]["error"]["code"] == "image_fetch_failed"
    assert batch.id not in batches.active_ids()
    assert ttl - 5 <= client.store.redis.ttl(key) <= ttl  # ended: kept as long as its output files
    assert batches.refresh(batch.id) == batch  # final: nothing moves any more
    with pytest.raises(InvalidRequest, match="completed and cannot be cancelled"):
        batches.cancel(batch.id)


def test_a_body_that_fails_preflight_is_reported_and_never_queued(env) -> None:
    client, files, batches = env
    three_images = [{"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}] * 3
    rows_in = [line("ok"), line("hot", temperature=9), line("many", messages=[{"role": "user", "content": three_images}]),
               line("streamed", stream=True)]
    batch = batches.refresh(batches.create(upload(files, rows_in), "/v1/chat/completions").id)
    assert client.batch_jobs(batch.id) == [f"{batch.id}-1"]
    assert [(e["line"], e["code"], e["param"]) for e in batch.errors["data"]] == [
        (2, "invalid_request", "body.temperature"), (3, "too_many_images", "body.messages"),
        (4, "invalid_request", "body.stream")]
    answer(client, f"{batch.id}-1")
    batch = batches.refresh(batch.id)
    assert batch.status == "completed" and batch.request_counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
    assert [r["custom_id"] for r in rows(files, batch.error_file_id)] == ["hot", "many", "streamed"]


def test_a_file_with_format_errors_fails_the_whole_batch(env) -> None:
    client, files, batches = env
    bad = [line("a"), "[1]", {"method": "POST"}, line("a"), {**line("d"), "body": "text"},
           "[" * 100_000 + "]" * 100_000]  # nested deeper than Python's parser goes
    batch = batches.refresh(batches.create(upload(files, bad), "/v1/chat/completions").id)
    assert batch.status == "failed" and batch.failed_at
    assert [(e["line"], e["code"]) for e in batch.errors["data"]] == [
        (2, "invalid_json_line"), (3, "missing_required_parameter"), (4, "duplicate_custom_id"),
        (5, "missing_required_parameter"), (6, "invalid_json_line")]
    assert client.batch_jobs(batch.id) == []
    empty = batches.refresh(batches.create(upload(files, ["", "  "]), "/v1/chat/completions").id)
    assert empty.status == "failed" and empty.errors["data"][0]["code"] == "empty_file"


def test_submission_resumes_idempotently_after_a_crash(env) -> None:
    client, files, batches = env
    batch = batches.create(upload(files, [line("a"), line("b")]), "/v1/chat/completions")
    # A process died after recording the jobs but before the batch left 'validating'.
    batches._validate_and_submit(batch.id)
    batches._move(batch.id, ("in_progress",), "validating")
    def queued() -> int:
        return sum(client.store.redis.llen(key) for key in client.store.keys.queue_lists(client.queue))

    queue_len = queued()
    batch = batches.refresh(batch.id)
    assert batch.status == "in_progress"
    counts = client.batch(batch.id)
    assert counts.total == 2 and counts.queued == 2  # the same two jobs, not four
    assert queued() == queue_len + 2  # still-queued ones are re-sent


def test_cancelling_stops_queued_requests_and_keeps_finished_ones(env) -> None:
    client, files, batches = env
    batch = batches.refresh(batches.create(upload(files, [line("a"), line("b"), line("c")]), "/v1/chat/completions").id)
    ids = client.batch_jobs(batch.id)
    answer(client, ids[0])
    client.store.start(client.status(ids[1]).job(), token="t", worker="w", lease_timeout_s=30)  # running
    batch = batches.cancel(batch.id)
    assert batch.status == "cancelling"
    assert batches.refresh(batch.id).status == "cancelling"  # waits for the running one to stop
    client.store.finish(client.status(ids[1]).job(), JobStatus.CANCELLED)  # its worker aborted it
    batch = batches.refresh(batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert [r["custom_id"] for r in rows(files, batch.output_file_id)] == ["a"]
    assert [(r["custom_id"], r["error"]["code"]) for r in rows(files, batch.error_file_id)] == [
        ("b", "batch_cancelled"), ("c", "batch_cancelled")]
    assert batches.cancel(batch.id).status == "cancelled"  # a retried cancel gets the batch back


def test_a_batch_cancelled_while_validating_never_queues_anything(env) -> None:
    client, files, batches = env
    batch = batches.create(upload(files, [line("a")]), "/v1/chat/completions")
    assert batches.cancel(batch.id).status == "cancelling"
    batch = batches.refresh(batch.id)
    assert batch.status == "cancelled" and client.batch_jobs(batch.id) == []


def test_a_batch_past_its_window_expires_with_its_unfinished_requests(env) -> None:
    client, files, batches = env
    batch = batches.refresh(batches.create(upload(files, [line("a"), line("b")]), "/v1/chat/completions").id)
    answer(client, client.batch_jobs(batch.id)[0])
    batches._hset(batch.id, expires_at=int(time.time()) - 1)
    batch = batches.refresh(batch.id)
    assert batch.status == "expired" and batch.expired_at
    assert [r["custom_id"] for r in rows(files, batch.output_file_id)] == ["a"]
    err = rows(files, batch.error_file_id)
    assert err[0]["custom_id"] == "b" and err[0]["error"]["code"] == "batch_expired"


def test_creation_refuses_what_openai_refuses(env) -> None:
    client, files, batches = env
    good = upload(files, [line("a")])
    out = files.create(b"{}\n", filename="o.jsonl", purpose="batch_output").id
    for args, param in [((good, "/v1/embeddings"), "endpoint"), ((good, "/v1/chat/completions", "48h"), "completion_window"),
                        (("file-missing", "/v1/chat/completions"), "input_file_id"),
                        ((out, "/v1/chat/completions"), "input_file_id"),
                        ((good, "/v1/chat/completions", "24h", {str(i): "v" for i in range(17)}), "metadata")]:
        with pytest.raises(InvalidRequest) as caught:
            batches.create(*args)
        assert caught.value.context["param"] == param
    with pytest.raises(JobNotFound):
        batches.get("batch_missing")


def test_batches_list_newest_first_with_a_cursor(env) -> None:
    client, files, batches = env
    made = [batches.create(upload(files, [line("a")]), "/v1/chat/completions").id for _ in range(3)]
    page, more = batches.list(limit=2)
    assert [b.id for b in page] == made[::-1][:2] and more
    rest, more = batches.list(after=page[-1].id, limit=2)
    assert [b.id for b in rest] == [made[0]] and not more


def test_the_default_preflight_counts_images(env) -> None:
    client, files, batches = env
    with pytest.raises(TooManyImages):
        batches.preflight({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}] * 3}]})
