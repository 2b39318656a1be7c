"""`vlq api`: serves the HTTP API with uvicorn; a bad setting is one line and exit 1."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx

from tests.conftest import REPO, free_port, wait_for_port
from tests.integration.conftest import vlq_command


def test_vlq_api_serves_until_told_to_stop(redis_server: str, key_prefix: str) -> None:
    port = free_port()
    env = {**os.environ, "VLQ_BROKER_URL": redis_server, "VLQ_KEY_PREFIX": key_prefix,
           "VLQ_API_SERVED_MODEL": "my-qwen"}
    proc = subprocess.Popen([*vlq_command(), "api", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            assert http.get("/healthz").json()["broker"]["ok"] is True
            assert http.get("/v1/models").json()["data"][0]["id"] == "my-qwen"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    log = out.decode(errors="replace")
    # uvicorn shuts down warmly, then re-raises the signal it caught (so the exit says SIGTERM)
    assert proc.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log


def test_a_bad_setting_is_one_line_and_exit_1() -> None:
    env = {**os.environ, "VLQ_API_PORT": "not-a-port"}
    out = subprocess.run([*vlq_command(), "api"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("error [config_error]: bad setting api.port")
    assert "Traceback" not in out.stderr


def test_a_port_in_use_is_one_line_naming_the_flag() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([*vlq_command(), "api", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(f"error [config_error]: cannot listen on 127.0.0.1:{port}: ")
    assert "vlq api --port N" in out.stderr and "Traceback" not in out.stderr
