"""``vlq generate`` as a real subprocess on the tiny checkpoint."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SEED_FILES = ["single_image.json", "grounding_two_turn.json", "two_images.json", "openai_cli_single_image.json"]


def vlq(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "vlq"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from producer.cli import main; main()"]
    env = dict(os.environ)
    env.pop("VLQ_CONF_DIR", None)  # the defaults, whoever runs the suite
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def local_request(seed_requests: Path, sample_images: Path, name: str, folder: Path) -> Path:
    """The seed request ``name`` with its images replaced by the local files of expected.json,
    copied beside the request and named by relative file:// URLs."""
    expected = json.loads((seed_requests / "expected.json").read_text())[name]
    body = json.loads((seed_requests / name).read_text())
    for url, local in expected["images_here"].items():
        source = sample_images.parent / local.split()[0]
        shutil.copy(source, folder / source.name)
        for message in body["messages"]:
            if isinstance(message["content"], list):
                for part in message["content"]:
                    if part.get("type") == "image_url" and part["image_url"]["url"] == url:
                        part["image_url"]["url"] = f"file://./{source.name}"
    path = folder / name
    path.write_text(json.dumps(body, ensure_ascii=False))
    return path


@pytest.mark.parametrize("name", SEED_FILES)
def test_vlq_generate_reports_the_seed_prompt_tokens(name, seed_requests, sample_images, tiny_model_dir, tmp_path):
    want = json.loads((seed_requests / "expected.json").read_text())[name]["expected_prompt_tokens"]
    request = local_request(seed_requests, sample_images, name, tmp_path)
    done = vlq("generate", "--model", str(tiny_model_dir), "--request", request.name,
               "--max-tokens", "2", "--device", "cpu", "--seed", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["object"] == "chat.completion"
    assert result["usage"]["prompt_tokens"] == want
    assert 1 <= result["usage"]["completion_tokens"] <= 2
    assert result["choices"][0]["finish_reason"] in ("stop", "length")
    assert result["vlq"]["seed"] == 1 and result["boxes"] == []


def test_vlq_generate_reads_data_uris_from_anywhere(sample_images, tiny_model_dir, tmp_path):
    data = base64.b64encode((sample_images / "highfive.jpg").read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
        {"type": "text", "text": "简述一下这张图片的内容。"}]}]}
    folder = tmp_path / "requests"
    folder.mkdir()
    (folder / "r.json").write_text(json.dumps(body))
    done = vlq("generate", "--model", str(tiny_model_dir), "--request", str(folder / "r.json"),
               "--max-tokens", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["prompt_tokens"] == 290


def test_vlq_generate_refuses_files_outside_its_folders_with_a_coded_error(sample_images, tiny_model_dir, tmp_path):
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": (sample_images / "demo.jpeg").as_uri()}},
        {"type": "text", "text": "hi"}]}]}
    (tmp_path / "r.json").write_text(json.dumps(body))
    done = vlq("generate", "--model", str(tiny_model_dir), "--request", "r.json", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert "error [image_url_forbidden]" in done.stderr
    assert "Traceback" not in done.stderr


def test_vlq_generate_names_a_missing_model_folder(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    done = vlq("generate", "--model", str(tmp_path / "nope"), "--request", "r.json", cwd=tmp_path)
    assert done.returncode == 1
    assert "error [checkpoint_error]" in done.stderr and "does not exist" in done.stderr
    assert "next:" in done.stderr


def test_vlq_generate_refuses_a_request_that_is_not_json(tmp_path, tiny_model_dir):
    (tmp_path / "r.json").write_text("{not json")
    done = vlq("generate", "--model", str(tiny_model_dir), "--request", "r.json", cwd=tmp_path)
    assert done.returncode == 1 and "error [invalid_request]" in done.stderr
