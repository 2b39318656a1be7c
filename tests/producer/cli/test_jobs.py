"""`vlq submit | status | result | cancel` against a private Redis and a scripted worker thread."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer.cli import app
from producer.cli.jobs import MAX_LISTED
from producer.client import Client
from producer.config import Settings
from producer.state import JobStore
from tests.integration.conftest import vlq_command
from tests.worker.scripted_worker import scripted_worker

REQUEST = {"messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "text", "text": "hi"}]}]}


@pytest.fixture
def env(redis_server: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"VLQ_BROKER_URL": redis_server, "VLQ_BROKER_QUEUE": key_prefix, "VLQ_KEY_PREFIX": key_prefix}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.load(worker={"heartbeat_s": 0.1, "lease_timeout_s": 5})


def vlq(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_settings_come_from_the_environment(settings: Settings, env: dict[str, str]) -> None:
    assert (settings.broker.url, settings.broker.queue, settings.key_prefix) == (
        env["VLQ_BROKER_URL"], env["VLQ_BROKER_QUEUE"], env["VLQ_KEY_PREFIX"])


def test_submit_wait_prints_the_result(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(REQUEST))
    with scripted_worker(settings):
        res = vlq("submit", str(path), "--wait", "--timeout", "10")
    assert res.exit_code == 0, res.output
    job_id, doc = res.stdout.splitlines()
    assert json.loads(doc)["choices"][0]["message"]["content"] == "echo: hi"
    status = json.loads(vlq("status", job_id).stdout)
    assert status["status"] == "succeeded" and status["attempts"] == 1 and "job_json" not in status
    assert json.loads(vlq("result", job_id).stdout)["vlq"]["job_id"] == job_id


def on_a_terminal(*args: str, env: dict[str, str]) -> str:
    """What `vlq ARGS` prints with a pseudo-terminal as its stdout."""
    main, child = pty.openpty()
    try:
        subprocess.run([*vlq_command(), *args], stdout=child, stderr=subprocess.PIPE, env={**os.environ, **env},
                       timeout=60, check=True)
    finally:
        os.close(child)
    out = b""
    while True:
        try:
            piece = os.read(main, 65536)
        except OSError:  # the terminal closed: everything is read
            break
        if not piece:
            break
        out += piece
    os.close(main)
    return out.decode().replace("\r\n", "\n")


def test_status_is_readable_on_a_terminal_and_json_in_a_pipe_or_with_json(settings: Settings,
                                                                        env: dict[str, str]) -> None:
    with Client(settings) as c:
        job_id = c.submit(REQUEST).id
    shown = on_a_terminal("status", job_id, env=env)
    assert shown.splitlines()[0] == f"{job_id}  queued" and " ago)" in shown.splitlines()[1]
    assert json.loads(on_a_terminal("status", job_id, "--json", env=env))["status"] == "queued"
    piped = subprocess.run([*vlq_command(), "status", job_id], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=60)
    assert json.loads(piped.stdout)["id"] == job_id


def test_a_jsonl_file_is_one_batch_and_openai_batch_lines_keep_their_custom_id(
    tmp_path: Path, settings: Settings
) -> None:
    path = tmp_path / "many.jsonl"
    lines = [REQUEST, {"custom_id": "row-7", "method": "POST", "url": "/v1/chat/completions", "body": REQUEST}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with scripted_worker(settings):
        res = vlq("submit", str(path), "--wait", "--timeout", "10")
    assert res.exit_code == 0, res.output
    ids = res.stdout.splitlines()[:2]
    batch_id = res.stderr.split()[1].rstrip(":")
    counts = json.loads(vlq("status", "--batch", batch_id).stdout)
    assert (counts["total"], counts["succeeded"], counts["done"]) == (2, 2, True)
    docs = [json.loads(x) for x in res.stdout.splitlines()[2:]]
    assert {d["vlq"]["job_id"] for d in docs} == set(ids)
    assert [d["vlq"]["metadata"] for d in docs if d["vlq"]["metadata"]] == [{"custom_id": "row-7"}]


def job_of(line: dict) -> str:
    """The job id of a line of results: a chat.completion's vlq block, or a failure's id."""
    return line["vlq"]["job_id"] if "vlq" in line else line["id"]


def test_a_batch_submitted_without_waiting_is_collected_later_in_submission_order(
    tmp_path: Path, settings: Settings
) -> None:
    path = tmp_path / "many.jsonl"
    three_images = {"messages": [{"role": "user", "content": [
        *REQUEST["messages"][0]["content"][:1] * 3, {"type": "text", "text": "too many for this engine"}]}]}
    as_batch_line = {"custom_id": "row-2", "method": "POST", "url": "/v1/chat/completions", "body": three_images}
    path.write_text("\n".join(json.dumps(x) for x in [REQUEST, as_batch_line, REQUEST]) + "\n")
    res = vlq("submit", str(path))
    ids = res.stdout.split()
    batch_id = res.stderr.split()[1].rstrip(":")
    early = vlq("result", batch_id, "--batch")
    assert early.exit_code == 1 and early.stdout == ""
    assert early.stderr.strip() == f"3 of 3 jobs are not finished yet: vlq result {batch_id} --batch --wait"
    with scripted_worker(settings):
        late = vlq("result", batch_id, "--batch", "--wait", "--timeout", "10")
    assert late.exit_code == 1  # one failed
    lines = [json.loads(x) for x in late.stdout.splitlines()]
    assert sorted(map(job_of, lines)) == sorted(ids)
    failed = [d for d in lines if "error" in d]
    assert failed == [{"id": ids[1], "custom_id": "row-2", "status": "failed",  # what its caller joins on
                       "error": {"code": "too_many_images", "message": "at most 2 images"}}]
    again = vlq("result", batch_id, "--batch")  # all finished: in submission order, no waiting
    assert [job_of(json.loads(x)) for x in again.stdout.splitlines()] == ids
    assert again.exit_code == 1 and again.stderr == ""


def test_an_unknown_batch_is_not_found(env) -> None:
    res = vlq("result", "batch-nope", "--batch")
    assert res.exit_code == 1 and res.stderr.startswith("error [not_found]: no batch 'batch-nope'")


def test_every_bad_line_is_reported_with_its_number_and_nothing_is_sent(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(REQUEST), "", json.dumps({"messages": []}), "{not json", "[1, 2]", json.dumps(REQUEST),
             json.dumps({"messages": [{"role": "user", "content": [
                 *({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}} for _ in range(30))]}]})]
    path.write_text("\n".join(lines) + "\n")
    res = vlq("submit", str(path))
    assert res.exit_code == 1
    assert res.stderr.splitlines()[:5] == [
        f"error [invalid_request]: {path}: 4 of 6 requests are not valid, so none was submitted; fix these lines:",
        "  line 3: [invalid_request] invalid request: messages: List should have at least 1 item after validation,"
        " not 0",
        "  line 4: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        "  line 5: expected a JSON object",
        "  line 7: [too_many_images] the request has 30 images; a worker accepts at most 26 (engine.max_images):"
        " split it into several requests",
    ]
    assert JobStore.from_settings(settings).stats().get("queued", 0) == 0


def test_a_long_list_of_bad_lines_is_cut_short(tmp_path: Path, env) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(["nope"] * 25) + "\n")
    lines = vlq("submit", str(path)).stderr.splitlines()
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1] == "  ... and 15 more"


def test_result_of_an_unfinished_job_says_how_to_wait(tmp_path: Path, env) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(REQUEST))
    job_id = vlq("submit", str(path)).stdout.strip()
    res = vlq("result", job_id)
    assert res.exit_code == 1 and "error [not_finished]" in res.stderr and "--wait" in res.stderr
    assert "or drop it (vlq cancel ID)" in res.stderr
    assert vlq("cancel", job_id).stdout.strip() == f"{job_id}: cancelled"
    res = vlq("result", job_id)
    assert res.exit_code == 1 and "error [cancelled]" in res.stderr


def test_unknown_ids_print_one_line_and_the_next_step(env) -> None:
    res = vlq("status", "job-nope")
    assert res.exit_code == 1
    first, hint = res.stderr.splitlines()
    assert first.startswith("error [not_found]: no job 'job-nope' in redis://") and " under key prefix '" in first
    assert hint == "  next: check the id, and that VLQ_BROKER_URL and VLQ_KEY_PREFIX are those it was submitted with"
    res = vlq("result", "job-nope", "--batch")
    assert res.exit_code == 1 and "that is a job id: leave --batch out" in res.stderr
    res = vlq("status", "batch-nope")
    assert res.exit_code == 1 and "that looks like a batch id: vlq status ID --batch" in res.stderr


def test_an_unreachable_broker_says_to_start_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("VLQ_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("VLQ_BROKER_CONNECT_TIMEOUT_S", "0.3")
    res = vlq("status", "job-x")
    assert res.exit_code == 1 and "error [broker_unavailable]" in res.stderr
    assert "next: start Redis" in res.stderr


def test_workers_lists_the_live_ones_and_exits_1_when_none_serves_the_queue(settings: Settings) -> None:
    store = JobStore.from_settings(settings)
    none = vlq("workers")
    assert none.exit_code == 1 and f"no live worker serves queue '{settings.broker.queue}'" in none.stderr
    assert none.stdout == ""  # no empty table
    store.register_worker("w-live", {"queue": settings.broker.queue, "gpu": 0, "checkpoint": "qwen@abc", "running": 2})
    store.register_worker("w-cpu", {"queue": settings.broker.queue, "gpu": None})
    long_name = "vlq-gpu0-" + "a" * 60 + "@a-host-with-a-long-name.example.internal"
    store.register_worker(long_name, {"queue": settings.broker.queue, "gpu": 0})
    store.register_worker("w-dead", {"queue": settings.broker.queue, "gpu": 1})
    store.redis.hset(store.keys.workers, "w-dead", json.dumps({"queue": settings.broker.queue, "gpu": 1, "at": 0}))
    res = vlq("workers")
    assert res.exit_code == 0, res.output
    assert "w-live" in res.stdout and "qwen@abc" in res.stdout and "w-dead" not in res.stdout
    assert long_name in res.stdout  # not cut to a terminal's width in a pipe
    [cpu_row] = [line.split() for line in res.stdout.splitlines() if line.strip().startswith("w-cpu")]
    assert cpu_row[2] == "cpu", res.stdout
    rows = [json.loads(line) for line in vlq("workers", "--all", "--json").stdout.splitlines()]
    assert [(r["name"], r["live"], r.get("running")) for r in rows if r["name"] != long_name] == [
        ("w-cpu", True, None), ("w-dead", False, None), ("w-live", True, 2)]
    assert store.forget_workers(3600) == ["w-dead"]
    assert sorted(store.workers()) == sorted(["w-cpu", "w-live", long_name])


def test_a_file_whose_content_fits_the_other_suffix_says_to_rename_it(tmp_path: Path, env) -> None:
    lines = tmp_path / "two.json"
    lines.write_text(json.dumps(REQUEST) + "\n" + json.dumps(REQUEST) + "\n")
    res = vlq("submit", str(lines))
    assert res.exit_code == 1 and "holds 2 JSON lines: name it .jsonl" in res.stderr
    pretty = tmp_path / "one.jsonl"
    pretty.write_text(json.dumps(REQUEST, indent=2))
    res = vlq("submit", str(pretty))
    assert res.exit_code == 1 and "holds one JSON object over several lines: name it .json" in res.stderr
