"""POST /v1/chat/completions through a real `vlq api` and a real worker, driven by curl and by the
official openai SDK.

The seed's requests go as they are, images aside (local stand-ins, file:// under the worker's
allowed root), except that a ``max_tokens`` of 256 becomes 8: the tiny random model never stops
early, and prompt_tokens, the acceptance figure, do not depend on it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.producer.api.conftest import (
    SEED_NAMES,
    Api,
    assert_openai_error,
    expected_prompt_tokens,
    seed_body,
)

pytestmark = pytest.mark.integration


def fast(body: dict) -> dict:
    return {**body, "max_tokens": 8} if "max_tokens" in body else body


def one_image(api: Api, text: str = "这是什么", **kw) -> dict:
    url = (api.stack.images / "demo.jpeg").as_uri()
    return {"model": "QwenVL", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}], **kw}


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args],
                          capture_output=True, text=True, timeout=timeout + 5)


@pytest.mark.parametrize("name", SEED_NAMES)
def test_curl_gets_the_seed_prompt_token_counts(api: Api, seed_requests: Path, name: str, tmp_path: Path) -> None:
    body = fast(seed_body(seed_requests, api.stack.images, name))
    request = tmp_path / "request.json"
    request.write_text(json.dumps(body, ensure_ascii=False))
    headers = tmp_path / "headers.txt"
    out = curl("-D", str(headers), "-H", "Content-Type: application/json", "--data-binary", f"@{request}",
               f"{api.v1}/chat/completions")
    assert out.returncode == 0, out.stderr
    head = headers.read_text().lower()
    status_lines = [line for line in head.splitlines() if line.startswith("http/")]
    assert status_lines[-1].split()[1] == "200", head  # (after any "100 continue")
    assert "x-vlq-job-id: job-" in head
    doc = json.loads(out.stdout)
    assert doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-")
    assert doc["model"] == body["model"] or body["model"] == ""
    assert doc["usage"]["prompt_tokens"] == expected_prompt_tokens(seed_requests, name)
    assert doc["usage"]["total_tokens"] == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]
    choice = doc["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"  # 8 tokens cut the random model off: not "stop"
    assert isinstance(doc["boxes"], list) and doc["system_fingerprint"]


@pytest.mark.parametrize("name", SEED_NAMES)
def test_the_openai_sdk_gets_the_seed_prompt_token_counts(api: Api, seed_requests: Path, name: str) -> None:
    body = fast(seed_body(seed_requests, api.stack.images, name))
    completion = api.openai().chat.completions.create(**body)
    assert completion.usage.prompt_tokens == expected_prompt_tokens(seed_requests, name)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.model_extra["boxes"] == [] or isinstance(completion.model_extra["boxes"], list)


def test_streaming_yields_the_same_text_as_non_streaming_for_a_fixed_seed(api: Api) -> None:
    client = api.openai()
    body = one_image(api, max_tokens=12, seed=1234, temperature=1.0)
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.usage is not None and last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert last.model_extra["boxes"] == whole.model_extra["boxes"]
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_a_request_without_a_model_is_answered_as_the_served_model_whole_streamed_and_polled(api: Api) -> None:
    body = one_image(api, max_tokens=2)
    del body["model"]
    response = httpx.post(f"{api.v1}/chat/completions", json=body, timeout=120)
    streamed = list(api.openai().chat.completions.create(**body, stream=True, model=""))
    polled = httpx.get(f"{api.v1}/jobs/{response.headers['x-vlq-job-id']}", timeout=30).json()["result"]
    models = {response.json()["model"], polled["model"], *(c.model for c in streamed)}
    assert models == {"Qwen-VL-Chat"}  # api.served_model, never the worker's model folder


def test_the_openai_sdk_reads_logprobs_whole_or_streamed(api: Api) -> None:
    client = api.openai()
    body = one_image(api, max_tokens=6, seed=8, temperature=1.0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**body)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 6  # max_tokens: no stop token to leave out
    assert b"".join(bytes(t.bytes) for t in content).decode(errors="replace") == whole.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.logprob <= token.top_logprobs[0].logprob
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for choice in streamed for t in choice.logprobs.content] == content
    assert len(streamed) > 1  # each chunk with the tokens of its text
    for choice in streamed:
        if choice.delta.content:
            text = b"".join(bytes(t.bytes) for t in choice.logprobs.content).decode(errors="replace")
            assert choice.delta.content in text or "\ufffd" in text
    assert client.chat.completions.create(**one_image(api, max_tokens=2)).choices[0].logprobs is None


def test_a_raw_stream_is_server_sent_events_ending_with_done(api: Api, tmp_path: Path) -> None:
    request = tmp_path / "stream.json"
    request.write_text(json.dumps(one_image(api, max_tokens=5, seed=3, stream=True), ensure_ascii=False))
    out = curl("-N", "-H", "Content-Type: application/json", "--data-binary", f"@{request}",
               f"{api.v1}/chat/completions")
    assert out.returncode == 0, out.stderr
    events = [line for line in out.stdout.split("\n\n") if line.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    final = json.loads(events[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["prompt_tokens"] == 285 and final["usage"]["completion_tokens"] == 5


def test_include_usage_sends_usage_in_a_last_chunk_without_choices(api: Api) -> None:
    body = one_image(api, max_tokens=4, seed=5, stream=True, stream_options={"include_usage": True})
    chunks = list(api.openai().chat.completions.create(**body))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_every_streamed_chunk_names_the_engine_fingerprint_as_the_whole_answer_does(api: Api) -> None:
    client = api.openai()
    body = one_image(api, max_tokens=4, seed=5)
    whole = client.chat.completions.create(**body)
    assert whole.system_fingerprint.startswith("vlq-")
    chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3 and {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}


@pytest.mark.parametrize("stream", [False, True])
def test_an_image_outside_the_allowed_roots_is_a_400_in_openai_shape(api: Api, stream: bool) -> None:
    body = {"model": "QwenVL", "max_tokens": 4, "stream": stream, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}},
        {"type": "text", "text": "what is this?"}]}]}
    with api.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    err = assert_openai_error(response, 400, "image_url_forbidden")
    assert "/etc/hostname" in err["message"] or "allowed" in err["message"]
    with api.http() as http:
        job = http.get(f"/v1/jobs/{response.headers['x-vlq-job-id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "image_url_forbidden"


def test_an_image_server_that_stays_down_fails_once_and_the_openai_sdk_does_not_resend(api: Api) -> None:
    import openai

    sent: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
    url = f"http://127.0.0.1:{free_port()}/photo.jpg"  # nothing listens there
    body = {"model": "QwenVL", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is this?"}]}]}
    with pytest.raises(openai.InternalServerError) as caught:
        api.openai(max_retries=2, http_client=http).chat.completions.create(**body)
    assert sent == ["/v1/chat/completions"]  # the worker retried; the SDK sent it once
    response = caught.value.response
    assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
    error = caught.value.body
    assert error["code"] == "image_fetch_unavailable"
    assert "gave up after 2 attempts" in error["message"] and "data: URL" in error["message"]
    assert "will be retried" not in error["message"]
    with api.http() as client:
        job = client.get(f"/v1/jobs/{response.headers['x-vlq-job-id']}").json()
    assert job["status"] == "failed" and job["attempts"] == 2


def test_a_prompt_over_the_limit_is_refused_before_it_is_queued(api: Api) -> None:
    stats_before = api.stack.store.stats()
    body = one_image(api, text="猫" * 1200, max_tokens=4)  # 19 + 264 + ~1200 > 1024 tokens
    with api.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    err = assert_openai_error(response, 400, "prompt_too_long")
    assert "1024" in err["message"]
    assert "x-vlq-job-id" not in response.headers
    assert api.stack.store.stats().get("queued", 0) + api.stack.store.stats().get("running", 0) <= (
        stats_before.get("queued", 0) + stats_before.get("running", 0))


def test_too_many_images_are_refused_with_their_code(api: Api) -> None:
    url = (api.stack.images / "demo.jpeg").as_uri()
    body = {"messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": url}} for _ in range(4)), {"type": "text", "text": "hi"}]}]}
    with api.http() as http:
        assert_openai_error(http.post("/v1/chat/completions", json=body), 400, "too_many_images")


def test_a_client_that_leaves_mid_stream_cancels_its_job(api: Api) -> None:
    body = one_image(api, max_tokens=400, seed=9, stream=True)
    with api.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            job_id = response.headers["x-vlq-job-id"]
            lines = response.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
        # the connection is closed here, long before 400 tokens
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            status = http.get(f"/v1/jobs/{job_id}").json()["status"]
            if status == "cancelled":
                break
            time.sleep(0.2)
    assert status == "cancelled"


def test_a_job_id_header_lets_the_answer_be_read_again(api: Api) -> None:
    with api.http() as http:
        response = http.post("/v1/chat/completions", json=one_image(api, max_tokens=3, seed=1))
        assert response.status_code == 200
        job = http.get(f"/v1/jobs/{response.headers['x-vlq-job-id']}").json()
    assert job["status"] == "succeeded" and job["result"] == response.json()


def test_the_served_model_is_listed(api: Api) -> None:
    models = api.openai().models.list()
    assert [m.id for m in models.data] == [api.stack.settings.api.served_model]
    with httpx.Client(base_url=api.url) as http:
        assert_openai_error(http.get("/v1/models/gpt-4o"), 404, "model_not_found")


def test_a_job_cancelled_mid_stream_ends_the_stream_with_an_error_event(api: Api) -> None:
    import openai

    stream = api.openai().chat.completions.create(**one_image(api, max_tokens=400, seed=4), stream=True)
    job_id = stream.response.headers["x-vlq-job-id"]
    pieces = []
    with api.http() as http, pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            pieces.append(chunk)
            if len(pieces) == 3:
                assert http.delete(f"/v1/jobs/{job_id}").status_code == 200
    assert caught.value.body["code"] == "cancelled"
    assert 3 <= len(pieces) < 400


def test_a_client_that_stops_waiting_cancels_its_job(api: Api) -> None:
    marker = f"leaver-{time.time_ns()}"
    with api.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=one_image(api, max_tokens=400, user=marker), timeout=2.0)
    store, keys = api.stack.store, api.stack.client.keys
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        mine = [r for r in store.get_many([k.split(":job:")[1] for k in store.redis.keys(keys.job("*"))])
                if r is not None and marker in (r.job_json or "")]
        if mine and mine[0].status.value == "cancelled":
            break
        time.sleep(0.2)
    assert [r.status.value for r in mine] == ["cancelled"]
