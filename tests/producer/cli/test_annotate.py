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


def test_a_folder_without_images_says_what_annotate_looks_for(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "notes.txt").write_text("no pictures here")
    res = CliRunner().invoke(app, ["annotate", str(tmp_path), "--prompt", "p", "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 0, res.output
    assert "0 images" in res.stdout and "no images in" in res.stderr and ".jpg" in res.stderr


def test_an_empty_prompt_is_refused_before_any_progress_shows(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["annotate", str(tmp_path), "--prompt", "  "])
    assert res.exit_code == 1 and "the prompt is empty" in res.stderr and "annotate ━" not in res.stderr
