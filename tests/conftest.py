"""Fixtures shared by the whole suite.

- ``shared_data``: the folder ``../shared/data`` beside the checkout (the real Qwen-VL tokenizer,
  config and sample photos). Missing, tests that need it skip with the reason; with
  ``VLQ_REQUIRE_SHARED=1`` (CI) they fail instead.
- ``redis_server``: a private ``redis-server`` on a free loopback port for the whole session, so
  tests never touch anyone else's data. Missing binary: skip locally, fail in CI.
- ``key_prefix``: a fresh Redis key prefix per test.
- ``tiny_model_dir``: a tiny random Qwen-VL-Chat checkpoint in the official layout, with the real
  tokenizer when the shared data is there.
- ``s3_server``: moto's standalone S3 server on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLQ_SHARED_DIR", REPO.parent / "shared"))


def require(condition: bool, reason: str) -> None:
    """Skip the test with ``reason`` unless CI demands the resource (``VLQ_REQUIRE_SHARED=1``)."""
    if condition:
        return
    if os.environ.get("VLQ_REQUIRE_SHARED") == "1":
        pytest.fail(f"required resource missing: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    data = SHARED / "data"
    require(data.is_dir(), f"shared data folder {data} not found")
    return data


@pytest.fixture(scope="session")
def qwen_tiktoken(shared_data: Path) -> Path:
    path = shared_data / "qwen-vl" / "qwen.tiktoken"
    require(path.is_file(), f"real tokenizer {path} not found")
    return path


@pytest.fixture(scope="session")
def seed_requests(shared_data: Path) -> Path:
    path = shared_data / "seed_requests"
    require(path.is_dir(), f"seed requests {path} not found")
    return path


@pytest.fixture(scope="session")
def sample_images(shared_data: Path) -> Path:
    path = shared_data / "images"
    require(path.is_dir(), f"sample images {path} not found")
    return path


def start_redis(directory: Path, port: int | None = None, *extra: str) -> tuple[subprocess.Popen, int]:
    """Start a private redis-server in ``directory``; returns the process and its port."""
    binary = shutil.which("redis-server")
    require(binary is not None, "redis-server is not installed")
    port = port or free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
            *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_port(port, proc=proc)
    return proc, port


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """URL of a private Redis server for this test session (db 0)."""
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(proc)


@pytest.fixture
def key_prefix() -> str:
    return f"vlqtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint; with the real tokenizer (vocab 151936) when ../shared is there."""
    from engine_build.tiny_model import write_tiny_model

    tokenizer = SHARED / "data" / "qwen-vl" / "qwen.tiktoken"
    if os.environ.get("VLQ_REQUIRE_SHARED") == "1" and not tokenizer.is_file():
        pytest.fail(f"required resource missing: real tokenizer {tokenizer}")
    out = tmp_path_factory.mktemp("tiny-qwen-vl")
    write_tiny_model(out, tokenizer=tokenizer if tokenizer.is_file() else None, seed=0)
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """Endpoint URL of moto's standalone S3 server on loopback (credentials: any)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=30, proc=proc)
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


@pytest.fixture(autouse=True)
def _s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # Never reach a real AWS account from tests, whatever the developer's environment holds.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
