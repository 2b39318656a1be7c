"""A two-turn grounding request through the queue returns its boxes, structured and in pixels.

The tiny checkpoint is first taught (engine_build.tiny_model.teach) to answer the seed's
grounding conversation with the seed's box, so the real answer text goes through the real
engine, the task, the result store and back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from producer.schema import JobStatus
from tests.integration.conftest import Stack, image_file, make_stack, real_tokenizer

pytestmark = pytest.mark.integration

ANSWER = "<ref>女生</ref><box>(441,382),(733,811)</box>"


def grounding_request(url: str) -> dict:
    """The seed's grounding_two_turn.json with a local picture."""
    return {
        "model": "QwenVL",
        "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "这是什么"}]},
            {"role": "assistant",
             "content": "图中是一名女子在沙滩上和狗玩耍，旁边的狗是一只拉布拉多犬，它们处于沙滩上。"},
            {"role": "user", "content": "输出女生的检测框。"},
        ],
        "max_tokens": 256,
        "temperature": 0,
    }


@pytest.fixture(scope="module")
def taught_stack(redis_server: str, s3_server: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from engine_build.tiny_model import teach

    root = tmp_path_factory.mktemp("grounding")
    model_dir = root / "taught-model"
    shutil.copytree(tiny_model_dir, model_dir)
    with make_stack(redis_server, s3_server, model_dir, root) as stack:
        picture = image_file(stack.images, "beach.jpg", "sandybrown", size=(640, 480))
        teach(model_dir, [{"request": grounding_request(picture.as_uri()), "answer": ANSWER}])
        stack.picture = picture  # type: ignore[attr-defined]
        stack.start_worker()
        yield stack


def test_a_two_turn_grounding_request_returns_its_boxes(taught_stack: Stack) -> None:
    stack = taught_stack
    handle = stack.client.submit(grounding_request(stack.picture.as_uri()))  # type: ignore[attr-defined]
    doc = handle.result(timeout=120)
    assert handle.record().status is JobStatus.SUCCEEDED
    assert doc["choices"][0]["message"]["content"] == ANSWER
    assert doc["choices"][0]["finish_reason"] == "stop"
    if real_tokenizer(stack.model_dir):
        assert doc["usage"]["prompt_tokens"] == 326  # the seed's figure
    [box] = doc["boxes"]
    assert box["phrase"] == "女生" and box["box"] == [441, 382, 733, 811]
    assert box["image_size"] == [640, 480]
    x1, y1, x2, y2 = box["box_pixels"]
    assert (x1, y1, x2, y2) == pytest.approx((441 / 1000 * 640, 382 / 1000 * 480, 733 / 1000 * 640, 811 / 1000 * 480), abs=1.5)
