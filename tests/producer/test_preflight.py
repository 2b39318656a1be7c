"""Pre-flight checks (producer.preflight): schema and image count always, prompt length where the
tokenizer can be loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.config import Settings
from producer.errors import InvalidRequest, PromptTooLong, TooManyImages, UnsupportedContent
from producer.preflight import Preflight
from tests.conftest import REPO


def settings(**engine) -> Settings:
    return Settings.load(REPO / "conf", engine=engine)


def one_image(text: str = "这是什么") -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/demo.jpeg"}}, {"type": "text", "text": text}]}]}


def test_without_a_model_folder_only_schema_and_image_count_are_checked() -> None:
    check = Preflight(settings(max_images=1, max_input_len=100, max_seq_len=200))
    assert not check.checks_prompt_length
    assert check.check({"messages": [{"role": "user", "content": "字" * 500}]}).messages  # too long, unknown here
    with pytest.raises(TooManyImages):
        check.check({"messages": [{"role": "user", "content": one_image()["messages"][0]["content"] * 2}]})
    with pytest.raises(UnsupportedContent):
        check.check({"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]})
    with pytest.raises(InvalidRequest):
        check.check([])


def test_with_the_tokenizer_the_seed_prompt_counts_and_the_limit_hold(tiny_model_dir: Path, seed_requests: Path) -> None:
    check = Preflight(settings(model_dir=str(tiny_model_dir), max_input_len=300, max_seq_len=2048))
    assert check.checks_prompt_length
    if json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"] == 151936:
        body = json.loads((seed_requests / "single_image.json").read_text())
        assert check.prompt_tokens(check.check(body)) == 285
    with pytest.raises(PromptTooLong) as caught:
        check.check(one_image("字" * 100))
    assert "300" in caught.value.message


def test_a_model_folder_without_a_tokenizer_falls_back_to_the_workers_check(tmp_path: Path) -> None:
    check = Preflight(settings(model_dir=str(tmp_path)))
    assert not check.checks_prompt_length
    check.check(one_image("字" * 50_000))
