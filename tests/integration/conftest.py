"""Integration fixtures: real `vlq worker` processes on the tiny checkpoint, a private Redis, moto S3,
and a loopback HTTP server for image URLs (one that serves, one that 404s, one that stalls).

Each test module starts its own worker(s) (module scope) under a key prefix and queue of its own,
so modules never see each other's jobs and the suite stays fast.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from PIL import Image

from producer.client import Client
from producer.config import Settings
from producer.state import JobStore
from tests.conftest import REPO, stop_process

BUCKET = "vlq-results"
WORKER_START_S = 120.0  # engine load on a busy 2-core machine, with margin


def vlq_command() -> list[str]:
    """The `vlq` console script of this interpreter's environment (or the module entry point)."""
    script = Path(sys.executable).parent / "vlq"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from producer.cli import main; main()"]


@dataclass
class Stack:
    """One module's private world: settings (as VLQ_* variables too), client, folders, workers."""

    env: dict[str, str]
    settings: Settings
    client: Client
    images: Path  # an allowed root for file:// images
    http_url: str
    s3_endpoint: str
    model_dir: Path
    logs: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def store(self) -> JobStore:
        return self.client.store

    def start_worker(self, *extra: str, wait: bool = True) -> subprocess.Popen:
        """Start `vlq worker --model DIR` in a subprocess; wait until it registers in Redis."""
        log = self.logs / f"worker-{len(self.workers)}.log"
        proc = subprocess.Popen(
            [*vlq_command(), "worker", "--model", str(self.model_dir), "--log-level", "INFO", *extra],
            cwd=REPO,
            env={**os.environ, **self.env},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log_path = log  # type: ignore[attr-defined]
        self.workers.append(proc)
        if wait:
            self.wait_registered(proc)
        return proc

    def wait_registered(self, proc: subprocess.Popen, timeout: float = WORKER_START_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{self.log_tail(proc)}")
            if any(info.get("pid") == proc.pid for info in self.store.workers(max_age_s=30).values()):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker not registered after {timeout}s:\n{self.log_tail(proc)}")

    def log_tail(self, proc: subprocess.Popen, lines: int = 40) -> str:
        path: Path = proc.log_path  # type: ignore[attr-defined]
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_workers(self) -> None:
        for proc in self.workers:
            stop_process(proc, timeout=20)

    def kill(self, proc: subprocess.Popen) -> None:
        """kill -9: no shutdown code runs, no message is acknowledged."""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def image_file(folder: Path, name: str, colour: str | tuple = "red", size: tuple[int, int] = (64, 48)) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


class _ImageServer(http.server.BaseHTTPRequestHandler):
    """/ok.png: a PNG; /missing: 404; /stall: headers never come (the fetch times out)."""

    png: bytes = b""
    stall_s: float = 5.0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/ok"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        elif self.path.startswith("/stall"):
            time.sleep(self.stall_s)
        else:
            self.send_error(404, "no such image")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def image_server(png: bytes) -> Iterator[str]:
    handler = type("Handler", (_ImageServer,), {"png": png})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings.load() with ``env`` applied, exactly as the worker subprocess will see them."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings.load(REPO / "conf")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def make_stack(redis_url: str, s3_endpoint: str, model_dir: Path, root: Path, **overrides: str) -> Iterator[Stack]:
    """A private stack (prefix, queue, folders, settings) with no worker started yet."""
    prefix = f"vlqit-{uuid.uuid4().hex[:10]}"
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    png = image_file(images, "served.png", "purple").read_bytes()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=BUCKET)  # the S3 server lives for the session; modules share it
    with image_server(png) as http_url:
        env = {
            "VLQ_BROKER_URL": redis_url,
            "VLQ_BROKER_QUEUE": prefix,
            "VLQ_KEY_PREFIX": prefix,
            "VLQ_STORE_S3": json.dumps({"bucket": BUCKET, "prefix": "results/", "endpoint_url": s3_endpoint,
                                        "region": "us-east-1"}),
            "VLQ_IMAGES_ALLOWED_ROOTS": json.dumps([str(images)]),
            "VLQ_IMAGES_FETCH_TIMEOUT_S": "1.0",
            "VLQ_ENGINE_DEVICE": "cpu",
            "VLQ_ENGINE_MAX_IMAGES": "3",
            "VLQ_ENGINE_MAX_INPUT_LEN": "1024",
            "VLQ_ENGINE_MAX_SEQ_LEN": "2048",
            "VLQ_ENGINE_DEFAULT_MAX_TOKENS": "8",
            "VLQ_WORKER_MAX_RETRIES": "1",
            "VLQ_WORKER_RETRY_BACKOFF_S": "0.2",
            "VLQ_WORKER_HEARTBEAT_S": "0.5",
            "VLQ_WORKER_LEASE_TIMEOUT_S": "3",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            **overrides,
        }
        settings = settings_from_env(env)
        client = Client(settings)
        stack = Stack(env, settings, client, images, http_url, s3_endpoint, model_dir, logs)
        try:
            yield stack
        finally:
            stack.stop_workers()
            client.close()


@pytest.fixture(scope="module")
def stack(redis_server: str, s3_server: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A private stack with one worker running for the whole module."""
    with make_stack(redis_server, s3_server, tiny_model_dir, tmp_path_factory.mktemp("stack")) as s:
        s.start_worker()
        yield s


def real_tokenizer(model_dir: Path) -> bool:
    """Whether the tiny checkpoint carries the real Qwen vocabulary (the seed's token counts hold)."""
    return json.loads((model_dir / "config.json").read_text())["vocab_size"] == 151936
