"""Every response carries an ``x-request-id``, kept from the client when usable, which the openai SDK
reads and the API's log ties to the job the request submitted."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from producer.api import create_app
from producer.api.request_id import request_id_of
from producer.client import Client
from producer.config import Settings
from tests.conftest import REPO
from tests.producer.api.conftest import Api, assert_openai_error, serve


def text_only(**kw) -> dict:
    return {"model": "QwenVL", "messages": [{"role": "user", "content": "hello"}], **kw}


@pytest.mark.parametrize("sent", [b"trace-42", b"a.b:c_d-1", b"x" * 128])
def test_a_usable_client_id_is_kept(sent: bytes) -> None:
    assert request_id_of({b"x-request-id": sent}) == sent.decode()


@pytest.mark.parametrize("sent", [None, b"", b"has space", b"x" * 129, b"semi;colon", "é".encode()])
def test_a_missing_or_unusable_client_id_is_replaced_by_a_new_one(sent: bytes | None) -> None:
    made = request_id_of({} if sent is None else {b"x-request-id": sent})
    assert made.startswith("req_") and len(made) == 36
    assert made != request_id_of({})


@pytest.mark.integration
def test_the_openai_sdk_sees_the_request_id_and_the_log_ties_it_to_the_job(api: Api) -> None:
    client = api.openai()
    raw = client.chat.completions.with_raw_response.create(**text_only(max_tokens=1),
                                                           extra_headers={"x-request-id": "trace-42"})
    completion = raw.parse()
    assert raw.headers["x-request-id"] == "trace-42" == completion._request_id
    job_id = raw.headers["x-vlq-job-id"]
    deadline = time.monotonic() + 10
    while f"job {job_id}: submitted (request trace-42)" not in api.log_tail(400):
        assert time.monotonic() < deadline, api.log_tail()
        time.sleep(0.1)
    made = client.chat.completions.create(**text_only(max_tokens=1))._request_id
    assert made.startswith("req_")


@pytest.mark.integration
def test_errors_and_streams_carry_a_request_id_too(api: Api) -> None:
    client = api.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**text_only(max_tokens=1, top_p=-1))
    assert caught.value.request_id.startswith("req_")
    with client.chat.completions.with_streaming_response.create(**text_only(max_tokens=1, stream=True)) as stream:
        assert stream.headers["x-request-id"].startswith("req_")
    with httpx.Client(base_url=api.url) as http:
        assert http.get("/no/such/route").headers["x-request-id"].startswith("req_")
        assert http.get("/healthz", headers={"X-Request-Id": "probe-1"}).headers["x-request-id"] == "probe-1"


class _BrokenClient(Client):
    def submit(self, *args, **kwargs):
        raise RuntimeError("a bug the user cannot see")


def test_an_internal_error_names_its_request_id_in_the_message_and_the_header(redis_server: str) -> None:
    prefix = "vlqtest-request-id"
    settings = Settings.load(REPO / "conf", key_prefix=prefix, broker={"url": redis_server, "queue": prefix})
    client = _BrokenClient(settings)
    try:
        with serve(create_app(settings, client=client)) as url, httpx.Client(base_url=url) as http:
            response = http.post("/v1/chat/completions", json=text_only(), headers={"x-request-id": "trace-500"})
    finally:
        client.close()
    err = assert_openai_error(response, 500, "internal_error")
    assert response.headers["x-request-id"] == "trace-500"
    assert "(request trace-500)" in err["message"] and "a bug" not in err["message"]
