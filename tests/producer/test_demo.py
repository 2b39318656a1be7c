"""The demo's generated images and the grounding answers it teaches its tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from producer.demo import make_images


def test_each_sample_image_has_a_square_where_its_taught_box_says(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "images", tmp_path / "teach.jsonl", "Outline the square.")
    assert [p.relative_to(tmp_path / "images").as_posix() for p in paths] == [
        "1-red.png", "2-blue.png", "more/3-green.png", "more/4-orange.png"]
    examples = [json.loads(line) for line in (tmp_path / "teach.jsonl").read_text().splitlines()]
    for path, example in zip(paths, examples):
        content = example["request"]["messages"][0]["content"]
        assert content[0]["image_url"]["url"] == str(path.resolve())
        assert content[1]["text"] == "Outline the square."
        x1, y1, x2, y2 = map(int, re.search(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>", example["answer"]).groups())
        with Image.open(path) as image:
            w, h = image.size
            centre = image.getpixel(((x1 + x2) / 2000 * w, (y1 + y2) / 2000 * h))
            outside = image.getpixel((0, 0) if x1 > 10 or y1 > 10 else (w - 1, h - 1))
        assert centre != outside and outside == (236, 234, 226)
