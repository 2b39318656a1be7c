"""`vlq annotate` end to end in-process: private Redis, scripted worker thread, real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from producer.cli import app
from producer.config import Settings
from tests.worker.scripted_worker import scripted_worker


@pytest.fixture
def settings(redis_server: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("VLQ_BROKER_URL", redis_server)
    monkeypatch.setenv("VLQ_BROKER_QUEUE", key_prefix)
    monkeypatch.setenv("VLQ_KEY_PREFIX", key_prefix)
    return Settings.load(worker={"heartbeat_s": 0.1, "lease_timeout_s": 5})


def test_annotate_writes_a_line_per_image_and_skips_them_next_time(tmp_path: Path, settings: Settings) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "out.jsonl"
    args = ["annotate", str(folder), "--prompt", "describe", "--out", str(out), "--inline"]
    with scripted_worker(settings):
        first = CliRunner().invoke(app, args, catch_exceptions=False)
        second = CliRunner().invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "3 images: 0 already done, 3 submitted, 3 succeeded, 0 failed" in first.stdout
    assert "3 images: 3 already done, 0 submitted" in second.stdout
    assert len(out.read_text().splitlines()) == 3
    assert {json.loads(x)["path"] for x in out.read_text().splitlines()} == {"0.png", "1.png", "2.png"}


def test_lines_written_by_a_checkpoint_no_worker_serves_now_are_done_again(tmp_path: Path,
                                                                          settings: Settings) -> None:
    from producer.client import Client

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    out = tmp_path / "out.jsonl"
    args = ["annotate", str(folder), "--prompt", "describe", "--out", str(out), "--inline"]
    store = Client(settings).store
    with scripted_worker(settings) as w:
        store.register_worker("w-base", {"queue": settings.broker.queue, "checkpoint": w.engine.checkpoint})
        assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
        again = CliRunner().invoke(app, args, catch_exceptions=False)  # the same weights: nothing to do
        assert "1 images: 1 already done, 0 submitted" in again.stdout
        w.engine.checkpoint = "tuned@111111111111"  # the workers now serve a fine-tune
        store.register_worker("w-base", {"queue": settings.broker.queue, "checkpoint": w.engine.checkpoint})
        moved = CliRunner().invoke(app, args, catch_exceptions=False)
    assert "1 images done before by another checkpoint than the workers serve now are done again" in moved.stderr
    assert "1 images: 0 already done, 1 submitted, 1 succeeded" in moved.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["checkpoint"] for r in rows] == ["scripted@000000000000", "tuned@111111111111"]


def test_a_folder_the_workers_may_not_read_is_warned_about_before_anything_fails(tmp_path: Path, settings: Settings,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    args = ["annotate", str(tmp_path), "--prompt", "p", "--out", str(tmp_path / "o.jsonl"), "--timeout", "0.5"]
    res = CliRunner().invoke(app, args)
    assert "is not under images.allowed_roots here (none)" in res.stderr and "--inline" in res.stderr
    monkeypatch.setenv("VLQ_IMAGES_ALLOWED_ROOTS", json.dumps([str(tmp_path)]))
    assert "allowed_roots" not in CliRunner().invoke(app, args).stderr


def test_inline_and_upload_exclude_each_other(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["annotate", str(tmp_path), "--prompt", "p", "--inline",
                                   "--upload", "s3://b/p"])
    assert res.exit_code == 1 and "error [invalid_request]" in res.stderr


def test_a_missing_folder_or_a_file_is_refused_before_any_progress_shows(tmp_path: Path) -> None:
    image = tmp_path / "one.png"
    Image.new("RGB", (4, 4)).save(image)
    missing = CliRunner().invoke(app, ["annotate", str(tmp_path / "nope"), "--prompt", "p"])
    assert missing.exit_code == 1 and "there is no folder" in missing.stderr and "annotate ━" not in missing.stderr
    a_file = CliRunner().invoke(app, ["annotate", str(image), "--prompt", "p"])
    assert a_file.exit_code == 1 and "is a file, not a folder" in a_file.stderr and "vlq submit" in a_file.stderr


@pytest.mark.parametrize("flags", [["--max-in-flight", "0"], ["--max-tokens", "0"], ["--temperature", "-1"],
                                   ["--timeout", "-5"]])
def test_out_of_range_numbers_are_refused_naming_the_flag_before_anything_runs(tmp_path: Path, flags) -> None:
    res = CliRunner().invoke(app, ["annotate", str(tmp_path), "--prompt", "p", *flags])
    assert res.exit_code == 2 and flags[0] in res.output and "annotate ━" not in res.output


def test_a_folder_given_as_out_is_refused_before_any_job_is_sent(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "one.png")
    res = CliRunner().invoke(app, ["annotate", str(tmp_path), "--prompt", "p", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "is a folder: name a file in it" in res.stderr and "annotate ━" not in res.stderr


def test_a_folder_without_images_says_what_annotate_looks_for(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "notes.txt").write_text("no pictures here")
    res = CliRunner().invoke(app, ["annotate", str(tmp_path), "--prompt", "p", "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 1, res.output  # a mistyped folder must not pass for a finished run
    assert "0 images" in res.stdout and "no images in" in res.stderr and ".jpg" in res.stderr
    assert not (tmp_path / "o.jsonl").exists()  # nothing written: no empty results file either


def test_a_run_nobody_serves_says_so_and_shows_progress_in_a_log(tmp_path: Path, settings: Settings,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.cli import annotate as annotate_cli

    monkeypatch.setattr(annotate_cli, "PLAIN_PROGRESS_S", 0.0)  # a line at every change
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    out = tmp_path / "out" / "o.jsonl"
    res = CliRunner().invoke(app, ["annotate", str(tmp_path), "--prompt", "p", "--out", str(out), "--inline",
                                   "--timeout", "1"])
    assert res.exit_code == 1
    assert f"warning: no worker is serving queue '{settings.broker.queue}' now: start one" in res.stderr
    assert "annotate: 0/2 done, ok 0 failed 0 skipped 0" in res.stderr  # stderr is no terminal here
    assert "they were cancelled; run the same command again" in res.stderr
    assert not out.exists()


def test_sigterm_cancels_the_queued_jobs_like_ctrl_c(tmp_path: Path, settings: Settings) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from producer.client import Client

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    proc = subprocess.Popen([sys.executable, "-c", "from producer.cli import main; main()", "annotate", str(tmp_path),
                             "--prompt", "p", "--out", str(tmp_path / "o.jsonl"), "--inline"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    client = Client(settings)
    deadline = time.monotonic() + 60
    while not client.store.redis.keys(f"{settings.key_prefix}:batch:*:jobs") and time.monotonic() < deadline:
        time.sleep(0.1)  # until its job is queued
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted: the unfinished jobs were cancelled" in err and "run the same command again" in err
    batch = client.store.redis.keys(f"{settings.key_prefix}:batch:*:jobs")[0].split(":")[-2]
    counts = client.batch(batch)
    assert counts.total == 1 and counts.cancelled == 1


def test_an_empty_prompt_is_refused_before_any_progress_shows(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["annotate", str(tmp_path), "--prompt", "  "])
    assert res.exit_code == 1 and "the prompt is empty" in res.stderr and "annotate ━" not in res.stderr
