"""A two-turn grounding request through the queue returns its boxes, structured and in pixels;
a folder annotated with boxes exports to COCO and Label Studio.

The tiny checkpoint is first taught (engine_build.tiny_model.teach) to answer the seed's
grounding conversation with the seed's box, and the annotate prompt with a box for one picture
and plain text for another, so the real answer text goes through the real engine, the task, the
result store, the annotate results file and the exporters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer.annotate import AnnotateOptions, annotate
from producer.cli import app
from producer.schema import JobStatus
from tests.integration.conftest import Stack, image_file, make_stack, real_tokenizer

pytestmark = pytest.mark.integration

ANSWER = "<ref>女生</ref><box>(441,382),(733,811)</box>"
OUTLINE = "Outline the square."
SQUARE = "<ref>the square</ref><box>(250,125),(625,750)</box>"
NO_SQUARE = "There is no square."


def annotate_request(url: str) -> dict:
    """What vlq annotate sends for one image (the model name and sampling do not reach the prompt)."""
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": OUTLINE}]}]}


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
        dataset = stack.images / "dataset"
        square = image_file(dataset, "square.png", "crimson", size=(640, 480))
        blank = image_file(dataset, "sub/blank.png", "lightgray", size=(320, 240))
        (dataset / "broken.png").write_bytes(b"not a picture\n" * 10)
        teach(model_dir, [
            {"request": grounding_request(picture.as_uri()), "answer": ANSWER},
            {"request": annotate_request(square.as_uri()), "answer": SQUARE},
            {"request": annotate_request(blank.as_uri()), "answer": NO_SQUARE},
        ])
        stack.picture = picture  # type: ignore[attr-defined]
        stack.dataset = dataset  # type: ignore[attr-defined]
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


def test_an_annotated_folder_exports_to_coco_and_label_studio(taught_stack: Stack, tmp_path: Path) -> None:
    stack = taught_stack
    results = tmp_path / "results.jsonl"
    summary = annotate(stack.client, stack.dataset, results,  # type: ignore[attr-defined]
                       AnnotateOptions(prompt=OUTLINE, temperature=0, max_tokens=64, timeout_s=120))
    assert (summary.succeeded, summary.failed, summary.failures) == (2, 1, {"image_decode_failed": 1})
    rows = {r["path"]: r for r in map(json.loads, results.read_text(encoding="utf-8").splitlines())}
    assert rows["square.png"]["answer"] == SQUARE and rows["sub/blank.png"]["answer"] == NO_SQUARE
    assert rows["square.png"]["image_size"] == [640, 480] and rows["sub/blank.png"]["image_size"] == [320, 240]
    assert rows["broken.png"]["image_size"] is None

    coco_file = tmp_path / "instances.json"
    res = CliRunner().invoke(app, ["export", str(results), "--format", "coco", "--out", str(coco_file)])
    assert res.exit_code == 0, res.output
    assert ("3 images: 1 with boxes (1 box), 1 without, 1 failed (image_decode_failed x1);"
            " 1 failed image left out of the COCO images (no size)") in res.stderr
    assert json.loads(coco_file.read_text(encoding="utf-8")) == {
        "info": {"description": "vlq annotate results", "contributor": "vlq"},
        "licenses": [],
        "images": [  # not broken.png: the worker could not read it, so it has no size
            {"id": 1, "file_name": "square.png", "width": 640, "height": 480},
            {"id": 2, "file_name": "sub/blank.png", "width": 320, "height": 240},
        ],
        # (250,125),(625,750) on the 0..1000 grid of a 640x480 picture
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [160, 60, 240, 300], "area": 72000,
                         "iscrowd": 0, "phrase": "the square"}],
        "categories": [{"id": 1, "name": "the square", "supercategory": "object"}],
    }

    res = CliRunner().invoke(app, ["export", str(results), "--format", "labelstudio", "--out", "-",
                                   "--image-prefix", "/data/local-files/?d=dataset/"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [
        {"data": {"image": "/data/local-files/?d=dataset/broken.png"}, "predictions": []},
        {"data": {"image": "/data/local-files/?d=dataset/square.png"},
         "predictions": [{"model_version": "Qwen-VL-Chat", "result": [
             {"id": "box0", "from_name": "label", "to_name": "image", "original_width": 640, "original_height": 480,
              "image_rotation": 0, "type": "rectanglelabels",
              "value": {"x": 25.0, "y": 12.5, "width": 37.5, "height": 62.5, "rotation": 0,
                        "rectanglelabels": ["the square"]}}]}]},
        {"data": {"image": "/data/local-files/?d=dataset/sub/blank.png"},
         "predictions": [{"model_version": "Qwen-VL-Chat", "result": []}]},
    ]


def test_annotate_with_scores_gives_each_box_and_answer_a_score(taught_stack: Stack, tmp_path: Path) -> None:
    stack = taught_stack
    results = tmp_path / "scored.jsonl"
    summary = annotate(stack.client, stack.dataset, results,  # type: ignore[attr-defined]
                       AnnotateOptions(prompt=OUTLINE, temperature=0, max_tokens=64, timeout_s=120, scores=True))
    assert (summary.succeeded, summary.failed) == (2, 1)  # broken.png fails
    rows = {r["path"]: r for r in map(json.loads, results.read_text(encoding="utf-8").splitlines())}
    square, blank = rows["square.png"], rows["sub/blank.png"]
    assert square["answer"] == SQUARE and blank["answer"] == NO_SQUARE  # greedy: the same answers
    [box] = square["boxes"]
    assert 0.5 < box["score"] <= 1.0  # taught: the model is sure of it
    assert 0.5 < square["score"] <= 1.0 and 0.5 < blank["score"] <= 1.0
    coco_file = tmp_path / "instances.json"
    res = CliRunner().invoke(app, ["export", str(results), "--format", "coco", "--out", str(coco_file)])
    assert res.exit_code == 0, res.output
    [ann] = json.loads(coco_file.read_text(encoding="utf-8"))["annotations"]
    assert ann["score"] == box["score"]
