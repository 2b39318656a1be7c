"""The demo's generated images and the grounding answers it teaches its tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from producer.demo import make_images, show


def test_each_sample_image_has_a_square_where_its_taught_box_says(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "images", tmp_path / "teach.jsonl", "Outline the square.")
    assert [p.relative_to(tmp_path / "images").as_posix() for p in paths] == [
        "1-red.png", "2-blue.png", "more/3-green.png", "more/4-orange.png"]
    examples = [json.loads(line) for line in (tmp_path / "teach.jsonl").read_text().splitlines()]
    for path, example in zip(paths, examples):
        content = example["request"]["messages"][0]["content"]
        assert content[0]["image_url"]["url"] == path.resolve().as_uri()  # a chat request: a URL
        assert content[1]["text"] == "Outline the square."
        x1, y1, x2, y2 = map(int, re.search(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>", example["answer"]).groups())
        with Image.open(path) as image:
            w, h = image.size
            centre = image.getpixel(((x1 + x2) / 2000 * w, (y1 + y2) / 2000 * h))
            outside = image.getpixel((0, 0) if x1 > 10 or y1 > 10 else (w - 1, h - 1))
        assert centre != outside and outside == (236, 234, 226)


def test_show_prints_each_images_latest_answer_with_its_boxes_and_scores(tmp_path: Path, capsys) -> None:
    box = {"phrase": "the red square", "box_pixels": [10, 20, 30.4, 40], "score": 0.9968}
    rows = [
        {"path": "a.png", "status": "failed", "error": {"code": "image_decode_failed"}},
        {"path": "a.png", "status": "succeeded", "answer": "<ref>the red square</ref>", "boxes": [box]},
        {"path": "b.png", "status": "succeeded", "answer": "none", "boxes": [{**box, "score": None}]},
    ]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    show(results)
    out = capsys.readouterr().out
    assert "a.png: '<ref>the red square</ref>'\n      -> the red square at [10, 20, 30, 40] px, score 0.997" in out
    assert "b.png: 'none'\n      -> the red square at [10, 20, 30, 40] px\n" in out
    assert "failed" not in out  # only the latest line of an image counts
