"""API fixtures: one real `vlq worker` and one real `vlq api` (both subprocesses) for the whole
package, on a private Redis under a key prefix and queue of their own; plus in-thread servers
built with ``create_app`` for the tests that need other API settings (auth, size limits).

The stack comes from tests/integration/conftest.py (make_stack): the same worker settings the
queue's integration tests use (tiny checkpoint with the real tokenizer, 3 images at most, 1024
prompt tokens, 8 answer tokens by default).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from producer.config import Settings
from tests.conftest import REPO, free_port, stop_process, wait_for_port
from tests.integration.conftest import Stack, make_stack, vlq_command

API_START_S = 60.0


@dataclass
class Api:
    """A running API: its base URL, the stack behind it, and its log."""

    url: str
    stack: Stack
    log: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def openai(self, api_key: str = "unused", **kw: Any):
        from openai import OpenAI

        return OpenAI(base_url=self.v1, api_key=api_key, **{"max_retries": 0, "timeout": 120, **kw})

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="package")
def api_stack(redis_server: str, s3_server: str, tiny_model_dir: Path, tmp_path_factory, shared_data: Path):
    """A private stack with one worker; the seed's sample photos sit under its allowed root."""
    root = tmp_path_factory.mktemp("api-stack")
    with make_stack(redis_server, s3_server, tiny_model_dir, root) as stack:
        for photo in (shared_data / "images").iterdir():
            shutil.copy(photo, stack.images / photo.name)
        stack.start_worker()
        yield stack


@pytest.fixture(scope="package")
def api(api_stack: Stack) -> Iterator[Api]:
    """`vlq api` in a subprocess, in front of the stack's worker (prompt pre-flight on)."""
    port = free_port()
    log = api_stack.logs / "api.log"
    env = {**os.environ, **api_stack.env, "VLQ_ENGINE_MODEL_DIR": str(api_stack.model_dir),
           "VLQ_API_WAIT_TIMEOUT_S": "120"}
    proc = subprocess.Popen(
        [*vlq_command(), "api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
        cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=API_START_S, proc=proc)
        yield Api(f"http://127.0.0.1:{port}", api_stack, log)
    finally:
        stop_process(proc, timeout=15)


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def settings_with(stack: Stack, **api: Any) -> Settings:
    """The stack's settings with ``api`` fields replaced (auth tokens, limits...)."""
    return stack.settings.model_copy(update={"api": stack.settings.api.model_copy(update=api)})


# -- the seed's requests ----------------------------------------------------------------------------


def seed_body(seed_requests: Path, images: Path, name: str) -> dict[str, Any]:
    """A seed request with each image URL replaced by the local photo expected.json names for it
    (a file:// URL under the worker's allowed root)."""
    body = json.loads((seed_requests / name).read_text())
    stand_ins = json.loads((seed_requests / "expected.json").read_text())[name]["images_here"]
    for message in body["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    local = Path(stand_ins[part["image_url"]["url"]].split()[0]).name
                    part["image_url"]["url"] = (images / local).as_uri()
    return body


def expected_prompt_tokens(seed_requests: Path, name: str) -> int:
    return json.loads((seed_requests / "expected.json").read_text())[name]["expected_prompt_tokens"]


SEED_NAMES = ["single_image.json", "grounding_two_turn.json", "two_images.json", "openai_cli_single_image.json"]


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response has ``status`` and OpenAI's error shape (with ``code`` when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert err["code"] == code, err
    return err
