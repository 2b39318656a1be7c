"""Bearer tokens and the body size limit, on an in-thread server built with create_app (no worker:
nothing here reaches the queue)."""

from __future__ import annotations

import subprocess

import httpx
import openai
import pytest

from producer.api import create_app
from producer.config import Settings
from tests.conftest import REPO
from tests.producer.api.conftest import assert_openai_error, serve

TOKENS = ["s3cret-one", "s3cret-two"]
LIMIT = 4096


@pytest.fixture(scope="module")
def guarded(redis_server: str, tmp_path_factory) -> str:
    prefix = "vlqtest-auth"
    settings = Settings.load(REPO / "conf", key_prefix=prefix, broker={"url": redis_server, "queue": prefix},
                             api={"auth_tokens": TOKENS, "max_body_bytes": LIMIT, "wait_timeout_s": 2})
    with serve(create_app(settings)) as url:
        yield url


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-one"},
                                     {"Authorization": "Basic s3cret-one"}, {"Authorization": "Bearer s3cret-one2"}])
def test_a_request_without_a_valid_token_is_a_401(guarded: str, headers: dict) -> None:
    with httpx.Client(base_url=guarded) as http:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/jobs/x"),
                             ("GET", "/metrics"), ("GET", "/v1/batches"), ("GET", "/no/such/route")]:
            response = http.request(method, path, headers=headers)
            assert_openai_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.headers["x-request-id"].startswith("req_")  # refusals can be quoted too


def test_every_configured_token_is_accepted(guarded: str) -> None:
    with httpx.Client(base_url=guarded) as http:
        for token in TOKENS:
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_healthz_needs_no_token(guarded: str) -> None:
    with httpx.Client(base_url=guarded) as http:
        response = http.get("/healthz")
    assert response.status_code == 200 and response.json()["broker"]["ok"] is True


def test_the_openai_sdk_sees_an_authentication_error(guarded: str) -> None:
    bad = openai.OpenAI(base_url=guarded + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=guarded + "/v1", api_key=TOKENS[1], max_retries=0)
    assert good.models.list().data[0].id == "Qwen-VL-Chat"


def test_a_body_over_the_limit_is_a_413(guarded: str) -> None:
    auth = {"Authorization": f"Bearer {TOKENS[0]}"}
    big = b'{"messages": "' + b"x" * LIMIT + b'"}'
    with httpx.Client(base_url=guarded, headers=auth) as http:
        err = assert_openai_error(http.post("/v1/chat/completions", content=big), 413, "request_too_large")
        assert str(LIMIT) in err["message"]
        # no Content-Length: the body arrives chunked and is cut off once it crosses the limit
        chunked = http.post("/v1/chat/completions", content=iter([big[:3000], big[3000:]]))
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert_openai_error(chunked, 413, "request_too_large")
        upload = http.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "batch"})
        assert_openai_error(upload, 413, "request_too_large")


def test_curl_gets_413_for_a_chunked_body_over_the_limit(guarded: str) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-H", f"Authorization: Bearer {TOKENS[0]}", "-H", "Transfer-Encoding: chunked",
         "-H", "Content-Type: application/json", "--data-binary", "@-", "-w", "\n%{http_code}",
         guarded + "/v1/chat/completions"],
        input=b'{"messages": "' + b"y" * (2 * LIMIT) + b'"}', capture_output=True, timeout=30,
    )
    body, _, status = out.stdout.decode().rpartition("\n")
    assert status == "413", out.stdout
    assert '"code":"request_too_large"' in body.replace(" ", "")


def test_a_body_under_the_limit_goes_through(guarded: str) -> None:
    auth = {"Authorization": f"Bearer {TOKENS[0]}"}
    with httpx.Client(base_url=guarded, headers=auth) as http:
        # within the limit: it reaches the route, which finds the body wrong for its own reasons
        assert_openai_error(http.post("/v1/chat/completions", json={"messages": []}), 400, "invalid_request")
