"""Malformed input answers with a clear 4xx in OpenAI's error shape, never a 500. An in-thread
server with no worker: nothing here should ever need one."""

from __future__ import annotations

import json

import httpx
import pytest

from producer.api import create_app
from producer.config import Settings
from tests.conftest import REPO
from tests.producer.api.conftest import assert_openai_error, serve

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}


def chat(**kw) -> dict:
    return {"model": "QwenVL", "messages": [{"role": "user", "content": [IMAGE, {"type": "text", "text": "hi"}]}], **kw}


@pytest.fixture(scope="module")
def server(redis_server: str, tiny_model_dir) -> str:
    prefix = "vlqtest-errors"  # no worker serves this queue
    settings = Settings.load(
        REPO / "conf", key_prefix=prefix, broker={"url": redis_server, "queue": prefix},
        api={"wait_timeout_s": 1.5},
        engine={"model_dir": str(tiny_model_dir), "max_images": 3, "max_input_len": 1024, "max_seq_len": 2048},
    )
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture
def http(server: str):
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_a_400(http: httpx.Client, raw: bytes) -> None:
    err = assert_openai_error(http.post("/v1/chat/completions", content=raw), 400, "invalid_request")
    assert "JSON" in err["message"] or "body" in err["message"]


@pytest.mark.parametrize(
    "body, code, param",
    [
        ({"model": "QwenVL"}, "invalid_request", "messages"),
        ({"messages": []}, "invalid_request", "messages"),
        (chat(temperature=5), "invalid_request", "temperature"),
        (chat(max_tokens=0), "invalid_request", "max_tokens"),
        (chat(n=2), "invalid_request", "n"),
        (chat(tools=[{"type": "function"}]), "invalid_request", "tools"),
        (chat(response_format={"type": "json_object"}), "invalid_request", "response_format"),
        (chat(top_logprobs=2), "invalid_request", "top_logprobs"),
        (chat(top_k=10**30), "invalid_request", "top_k"),
        (chat(logit_bias={"1234": -100}), "invalid_request", "logit_bias"),
        (chat(top_p=-0.5), "invalid_request", "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"},
                       {"role": "user", "content": "hi"}]}, "invalid_request", "messages[1].role"),
        ({"messages": [{"role": "system", "content": [IMAGE]}, {"role": "user", "content": "hi"}]},
         "invalid_request", "messages[0].content"),
        (chat(logprobs=True, top_logprobs=21), "invalid_request", "top_logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "unsupported_content", "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "invalid_request", "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
         "invalid_request", "messages[1].role"),
        ({"messages": [{"role": "user", "content": [IMAGE] * 4 + [{"type": "text", "text": "x"}]}]},
         "too_many_images", "messages"),
        ({"messages": [{"role": "user", "content": "字" * 1100}]}, "prompt_too_long", None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
         "invalid_request", None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/data/a.jpg"}}]}]},
         "invalid_request", "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "invalid_request", "messages[0].content[0].text"),
        (chat(tool_choice="required"), "invalid_request", "tool_choice"),
        (chat(functions=[{"name": "f"}]), "invalid_request", "functions"),
        (chat(modalities=["text", "audio"]), "invalid_request", "modalities"),
        (chat(audio={"voice": "alloy", "format": "wav"}), "invalid_request", "audio"),
        (chat(stream_options={"include_usage": True}), "invalid_request", "stream_options"),
        ({"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function"}]},
                       {"role": "user", "content": "and?"}]}, "invalid_request", "messages[1].tool_calls"),
    ],
)
def test_a_bad_chat_request_is_a_400_naming_its_problem(http: httpx.Client, body: dict, code: str, param) -> None:
    err = assert_openai_error(http.post("/v1/chat/completions", json=body), 400, code)
    if param is not None:
        assert err["param"] == param, err


def test_a_chat_request_nobody_answers_times_out_with_a_504_naming_its_job(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat(max_tokens=2))
    err = assert_openai_error(response, 504, "timeout")
    job_id = response.headers["x-vlq-job-id"]
    assert f"/v1/jobs/{job_id}" in err["message"]
    assert "no worker is serving queue" in err["message"]  # and says why nobody answers
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # still there, not lost
    assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_unknown_routes_and_methods_answer_in_openai_shape(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing"), 404, "not_found")
    assert_openai_error(http.put("/v1/chat/completions", json={}), 405, "method_not_allowed")


def test_bad_query_parameters_are_a_400(http: httpx.Client) -> None:
    err = assert_openai_error(http.get("/v1/batches", params={"limit": 1000}), 400, "invalid_request")
    assert err["param"] == "limit"
    err = assert_openai_error(http.get("/v1/jobs/x", params={"wait": "soon"}), 400, "invalid_request")
    assert err["param"] == "wait"


@pytest.mark.parametrize("value", [None, 0, 1.5, "s", [], {}, [None], [{}], {"messages": None},
                                   {"messages": [None]}, {"messages": [{"content": 1}]},
                                   {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                                   {"messages": [{"role": "user", "content": "x"}], "stop": 5},
                                   {"messages": [{"role": "user", "content": "x"}], "seed": "x"},
                                   {"messages": [{"role": "user", "content": "x"}], "stream": "maybe"}])
def test_junk_never_causes_a_500(http: httpx.Client, value) -> None:
    for path in ("/v1/chat/completions", "/v1/jobs", "/v1/job_batches", "/v1/batches"):
        response = http.post(path, content=json.dumps(value))
        assert 400 <= response.status_code < 500, (path, value, response.text)
        assert set(response.json()["error"]) == {"message", "type", "code", "param"}


def test_json_nested_deeper_than_python_can_parse_is_a_400(http: httpx.Client) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/chat/completions", "/v1/jobs", "/v1/job_batches", "/v1/batches"):
        assert_openai_error(http.post(path, content=deep), 400, "invalid_request")


@pytest.mark.parametrize("bad", ["a b", "a/b", "*", "x" * 201])
def test_an_id_that_is_not_an_id_is_a_400_naming_the_field(http: httpx.Client, bad: str) -> None:
    for path, body, param in [("/v1/jobs", {"id": bad, "request": chat()}, "id"),
                              ("/v1/jobs", {"batch_id": bad, "request": chat()}, "batch_id"),
                              ("/v1/job_batches", {"id": bad, "requests": [chat()]}, None)]:
        err = assert_openai_error(http.post(path, json=body), 400, "invalid_request")
        assert "letters, digits" in err["message"] and param in (None, err["param"]), (path, err)
