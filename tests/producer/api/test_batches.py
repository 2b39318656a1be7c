"""The OpenAI Batch API through the official openai SDK, against a real `vlq api` and worker:
upload -> create -> poll -> download the output and error files."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from producer.batches import Batches
from producer.files import FileStore
from tests.producer.api.conftest import Api, assert_openai_error

pytestmark = pytest.mark.integration

FINAL = ("completed", "failed", "cancelled", "expired")


def request_line(api: Api, custom_id: str, **body: Any) -> dict[str, Any]:
    url = (api.stack.images / "demo.jpeg").as_uri()
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "QwenVL", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "这是什么"}]}], **body}}


def jsonl(lines: list[Any]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines).encode()


def poll(client, batch_id: str, timeout: float = 120) -> tuple[Any, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in FINAL:
            return batch, seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)


def test_a_batch_round_trip_through_the_openai_sdk(api: Api) -> None:
    client = api.openai()
    lines = [request_line(api, f"req-{i}", seed=i) for i in range(3)]
    bad = {"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "QwenVL", "messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]}}
    lines.insert(2, bad)  # line 3
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))

    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"run": "round-trip"})
    assert created.status == "validating" and created.metadata == {"run": "round-trip"}
    batch, seen = poll(client, created.id)

    order = ["validating", "in_progress", "finalizing", "completed"]
    assert batch.status == "completed", batch
    assert [s for s in order if s in seen] == seen  # only forward, in OpenAI's order
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 3, 1)
    assert batch.in_progress_at and batch.completed_at and batch.created_at <= batch.completed_at
    assert batch.usage.input_tokens == 3 * 285 and batch.usage.output_tokens == 3 * 4
    assert [(e.line, e.code) for e in batch.errors.data] == [(3, "unsupported_content")]

    output = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    by_id = {row["custom_id"]: row for row in output}
    assert sorted(by_id) == ["req-0", "req-1", "req-2"]
    for row in output:
        assert row["error"] is None and row["id"].startswith("batch_req_")
        assert row["response"]["status_code"] == 200
        body = row["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == 285
        assert body["vlq"]["metadata"]["custom_id"] == row["custom_id"]

    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad-body"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "unsupported_content"

    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert created.id in [b.id for b in client.batches.list(limit=100)]


def test_a_file_that_breaks_the_format_fails_validation_line_by_line(api: Api) -> None:
    client = api.openai()
    lines = [
        request_line(api, "a"),
        "{not json",
        request_line(api, "a"),  # duplicate custom_id
        {**request_line(api, "b"), "url": "/v1/embeddings"},
        {**request_line(api, "c"), "method": "GET"},
    ]
    uploaded = client.files.create(file=("broken.jsonl", jsonl(lines)), purpose="batch")
    batch, _ = poll(client, client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and batch.failed_at
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "invalid_url"), (5, "invalid_method")]
    assert batch.output_file_id is None and batch.error_file_id is None


def test_cancelling_a_batch_ends_cancelled_with_partial_results(api: Api) -> None:
    client = api.openai()
    lines = [request_line(api, f"slow-{i}", max_tokens=200, seed=i) for i in range(4)]
    uploaded = client.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(created.id).status == "validating":  # let its requests queue first
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch, seen = poll(client, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at, seen
    counts = batch.request_counts
    assert counts.total == 4 and counts.completed + counts.failed == 4 and counts.failed >= 1
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert all(e["response"] is None for e in errors)


def test_a_batch_finalizes_without_anyone_polling(api: Api) -> None:
    client = api.openai()
    uploaded = client.files.create(file=("quiet.jsonl", jsonl([request_line(api, "q")])), purpose="batch")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    # Read the batch through the SDK, which never moves it on: only the API's loop can finish it.
    files = FileStore.from_settings(api.stack.settings)
    batches = Batches(api.stack.client, files)
    deadline = time.monotonic() + 90
    while (status := batches.get(created.id).status) != "completed":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert batches.get(created.id).output_file_id
    files.close()


def test_batch_creation_checks_its_arguments(api: Api) -> None:
    with api.http() as http:
        uploaded = http.post("/v1/files", files={"file": ("x.jsonl", jsonl([request_line(api, "x")]))},
                             data={"purpose": "batch"}).json()
        cases = [
            ({"input_file_id": uploaded["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}, "endpoint"),
            ({"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "1h"},
             "completion_window"),
            ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
             "input_file_id"),
            ({"endpoint": "/v1/chat/completions"}, "input_file_id"),
            ({"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "metadata": {"k": 1}}, "metadata"),
        ]
        for payload, param in cases:
            err = assert_openai_error(http.post("/v1/batches", json=payload), 400, "invalid_request")
            assert err["param"] == param, err
        assert_openai_error(http.get("/v1/batches/batch_nope"), 404, "not_found")
        assert_openai_error(http.post("/v1/batches/batch_nope/cancel"), 404, "not_found")


def test_files_upload_list_read_and_delete(api: Api) -> None:
    client = api.openai()
    content = jsonl([request_line(api, "f")])
    f = client.files.create(file=("mine.jsonl", content), purpose="batch")
    assert client.files.retrieve(f.id).filename == "mine.jsonl"
    assert client.files.content(f.id).content == content
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert client.files.delete(f.id).deleted
    with api.http() as http:
        assert_openai_error(http.get(f"/v1/files/{f.id}"), 404, "not_found")
        assert_openai_error(http.get(f"/v1/files/{f.id}/content"), 404, "not_found")
        err = assert_openai_error(http.post("/v1/files", files={"file": ("a.jsonl", b"{}")},
                                            data={"purpose": "fine-tune"}), 400, "invalid_request")
        assert err["param"] == "purpose"
        err = assert_openai_error(http.post("/v1/files", data={"purpose": "batch"}), 400, "invalid_request")
        assert err["param"] == "file"
