"""COCO and Label Studio exports of hand-written annotate result lines (exact documents)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.errors import InvalidRequest
from producer.export import ExportSummary, export, read_results, to_coco, to_label_studio

CAT = {"phrase": "the cat", "kind": "box", "picture": 1, "box": [100, 200, 500, 750],
       "points": [[100, 200], [500, 750]], "image_size": [640, 480], "box_pixels": [64, 96, 320, 360],
       "points_pixels": [[64, 96], [320, 360]]}
DOG = {"phrase": "the dog", "kind": "box", "picture": 1, "box": [0, 0, 1000, 1000],
       "points": [[0, 0], [1000, 1000]], "image_size": [640, 480], "box_pixels": [0, 0, 640, 480],
       "points_pixels": [[0, 0], [640, 480]]}
SIGN = {"phrase": "the cat", "kind": "quad", "picture": 1, "box": [90, 100, 900, 900],
        "points": [[100, 100], [900, 120], [880, 900], [90, 880]], "image_size": [200, 100]}

LINES = [
    # an earlier run's line for sub/cat.jpg: superseded by the later one below
    {"path": "sub/cat.jpg", "status": "failed", "answer": None, "boxes": [], "image_size": None,
     "error": {"code": "image_fetch_timeout", "message": "slow"}, "model": "Qwen-VL-Chat"},
    {"path": "z.png", "status": "succeeded", "answer": "<quad>...</quad>", "boxes": [SIGN],
     "image_size": [200, 100], "error": None, "model": "Qwen-VL-Chat"},
    {"path": "b.png", "status": "failed", "answer": None, "boxes": [], "image_size": None,
     "error": {"code": "image_decode_failed", "message": "not an image"}, "model": "Qwen-VL-Chat"},
    {"path": "sub/cat.jpg", "status": "succeeded", "answer": "<ref>the cat</ref>...", "boxes": [CAT, DOG],
     "image_size": [640, 480], "error": None, "model": "Qwen-VL-Chat"},
    {"path": "a.jpg", "status": "succeeded", "answer": "Nothing to outline.", "boxes": [],
     "image_size": [100, 50], "error": None, "model": "Qwen-VL-Chat"},
]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "results.jsonl", LINES)


def test_the_last_line_of_each_path_counts_and_images_come_sorted_by_path(results: Path) -> None:
    lines = read_results(results)
    assert [(x.path, x.status, x.line_no) for x in lines] == [
        ("a.jpg", "succeeded", 5), ("b.png", "failed", 3), ("sub/cat.jpg", "succeeded", 4),
        ("z.png", "succeeded", 2)]
    assert lines[2].image_size == (640, 480) and [b.phrase for b in lines[2].boxes] == ["the cat", "the dog"]


def test_coco_has_every_sized_image_pixel_boxes_and_categories_from_the_phrases(results: Path) -> None:
    summary = ExportSummary()
    coco = to_coco(read_results(results), summary)
    assert coco.pop("info")["description"] == "vlq annotate results"  # pycocotools' COCO.info() reads it
    assert coco == {
        "licenses": [],
        "images": [  # the failed b.png is left out: COCO wants every image's width and height
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
            {"id": 2, "file_name": "sub/cat.jpg", "width": 640, "height": 480},
            {"id": 3, "file_name": "z.png", "width": 200, "height": 100},
        ],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 1, "bbox": [64, 96, 256, 264], "area": 67584,
             "iscrowd": 0, "phrase": "the cat"},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, 640, 480], "area": 307200,
             "iscrowd": 0, "phrase": "the dog"},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [18, 10, 162, 80], "area": 12960,
             "iscrowd": 0, "segmentation": [[20, 10, 180, 12, 176, 90, 18, 88]], "phrase": "the cat"},
        ],
        "categories": [{"id": 1, "name": "the cat", "supercategory": "object"},
                       {"id": 2, "name": "the dog", "supercategory": "object"}],
    }
    assert summary == ExportSummary(images=4, with_boxes=2, without_boxes=1, failed=1, boxes=3, categories=2,
                                    failures={"image_decode_failed": 1}, images_without_size=1)
    assert summary.line() == ("4 images: 2 with boxes (3 boxes), 1 without, 1 failed (image_decode_failed x1);"
                              " 1 failed image left out of the COCO images (no size)")


def test_label_studio_has_one_task_per_image_with_percent_rectangles(results: Path) -> None:
    tasks = to_label_studio(read_results(results), image_prefix="/data/local-files/?d=photos/")
    assert tasks == [
        {"data": {"image": "/data/local-files/?d=photos/a.jpg"},
         "predictions": [{"model_version": "Qwen-VL-Chat", "result": []}]},
        {"data": {"image": "/data/local-files/?d=photos/b.png"}, "predictions": []},
        {"data": {"image": "/data/local-files/?d=photos/sub/cat.jpg"},
         "predictions": [{"model_version": "Qwen-VL-Chat", "result": [
             {"id": "box0", "from_name": "label", "to_name": "image", "original_width": 640,
              "original_height": 480, "image_rotation": 0, "type": "rectanglelabels",
              "value": {"x": 10.0, "y": 20.0, "width": 40.0, "height": 55.0, "rotation": 0,
                        "rectanglelabels": ["the cat"]}},
             {"id": "box1", "from_name": "label", "to_name": "image", "original_width": 640,
              "original_height": 480, "image_rotation": 0, "type": "rectanglelabels",
              "value": {"x": 0.0, "y": 0.0, "width": 100.0, "height": 100.0, "rotation": 0,
                        "rectanglelabels": ["the dog"]}},
         ]}]},
        {"data": {"image": "/data/local-files/?d=photos/z.png"},
         "predictions": [{"model_version": "Qwen-VL-Chat", "result": [
             {"id": "box0", "from_name": "label", "to_name": "image", "original_width": 200,
              "original_height": 100, "image_rotation": 0, "type": "polygonlabels",
              "value": {"points": [[10.0, 10.0], [90.0, 12.0], [88.0, 90.0], [9.0, 88.0]],
                        "polygonlabels": ["the cat"]}},
         ]}]},
    ]


def test_label_studio_control_names_follow_the_labeling_config(results: Path) -> None:
    [task] = [t for t in to_label_studio(read_results(results), from_name="box", to_name="photo")
              if t["data"].get("photo") == "sub/cat.jpg"]
    assert {(r["from_name"], r["to_name"]) for r in task["predictions"][0]["result"]} == {("box", "photo")}


def test_a_line_without_image_size_takes_it_from_its_boxes(tmp_path: Path) -> None:
    old = {k: v for k, v in LINES[3].items() if k != "image_size"}  # written before annotate recorded sizes
    [line] = read_results(write_lines(tmp_path / "r.jsonl", [old]))
    assert line.image_size == (640, 480)
    assert to_coco([line])["images"] == [{"id": 1, "file_name": "sub/cat.jpg", "width": 640, "height": 480}]


def test_boxes_of_unknown_size_are_left_out_of_coco_but_not_of_label_studio(tmp_path: Path) -> None:
    bare = {"path": "x.jpg", "status": "succeeded", "boxes": [{"phrase": None, "box": [0, 500, 250, 1000]}]}
    lines = read_results(write_lines(tmp_path / "r.jsonl", [bare]))
    summary = ExportSummary()
    coco = to_coco(lines, summary)
    assert coco["annotations"] == [] and coco["images"] == []
    assert summary.boxes_without_size == 1 and "1 box left out" in summary.line()
    [result] = to_label_studio(lines)[0]["predictions"][0]["result"]
    assert result["value"] == {"x": 0.0, "y": 50.0, "width": 25.0, "height": 50.0, "rotation": 0,
                               "rectanglelabels": ["object"]}
    assert "original_width" not in result


def test_export_writes_the_document_and_leaves_no_temporary_file(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "instances.json"
    doc, summary = export(results, out, "coco")
    assert json.loads(out.read_text(encoding="utf-8")) == doc and summary.images == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["instances.json"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no results"),
        ("not json\n{also not\n", "line 1 is not JSON"),
        ('{"status": "succeeded"}\n', 'line 1 has no "path"'),
        ('{"path": "a.jpg", "image_size": [0, 5]}\n', "image_size"),
        ('{"path": "a.jpg", "boxes": [{"phrase": "x"}]}\n', "box 1 is not a grounding box"),
        ('{"path": "a.jpg", "boxes": [{"kind": "quad", "points": [[1, 2], [3, 4]]}]}\n', "box 1"),
    ],
)
def test_a_file_that_is_not_annotate_results_is_refused_naming_the_line(tmp_path: Path, text: str,
                                                                         message: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidRequest, match=message):
        read_results(path)


def test_lines_cut_off_mid_write_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    text = "".join(json.dumps(x) + "\n" for x in LINES[:2]) + '{"path": "c.jpg", "stat' + json.dumps(LINES[4]) + "\n"
    path.write_text(text, encoding="utf-8")
    doc, summary = export(path, None, "labelstudio")
    assert [t["data"]["image"] for t in doc] == ["sub/cat.jpg", "z.png"] and summary.unreadable_lines == [3]
    assert "1 line that is not JSON skipped (line 3: a run cut off?)" in summary.line()


@pytest.mark.parametrize("prefix, path, url", [
    ("/data/local-files/?d=photos/", "a#b & c+d 100%.png",
     "/data/local-files/?d=photos/a%23b%20%26%20c%2Bd%20100%25.png"),
    ("https://archive.example.com/photos/", "sub/café.jpg", "https://archive.example.com/photos/sub/caf%C3%A9.jpg"),
    ("s3://bucket/photos/", "a#b.png", "s3://bucket/photos/a#b.png"),
    ("", "sub/a b.png", "sub/a b.png"),
])
def test_label_studio_urls_encode_the_path_behind_a_url_prefix(tmp_path: Path, prefix: str, path: str,
                                                                url: str) -> None:
    line = {**LINES[4], "path": path}
    [task] = to_label_studio(read_results(write_lines(tmp_path / "r.jsonl", [line])), image_prefix=prefix)
    assert task["data"]["image"] == url


def test_a_folder_as_out_is_refused_before_anything_is_read(results: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="is a folder: name a file in it, such as .*instances.json"):
        export(results, tmp_path, "coco")


def test_a_missing_results_file_or_unknown_format_is_refused(results: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="vlq annotate"):
        read_results(tmp_path / "missing.jsonl")
    with pytest.raises(InvalidRequest, match="coco, labelstudio"):
        export(results, None, "yolo")  # type: ignore[arg-type]


def test_the_exporter_imports_without_torch_or_pillow() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['PIL'] = None\n"
            "import producer.cli, producer.export")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_min_score_leaves_out_the_unsure_boxes_and_scores_travel_into_both_formats(tmp_path: Path) -> None:
    scored = [{"path": "p.jpg", "status": "succeeded", "answer": "...", "image_size": [640, 480],
               "boxes": [{**CAT, "score": 0.91}, {**DOG, "score": 0.42}], "error": None}]
    results = write_lines(tmp_path / "scored.jsonl", scored)
    doc, summary = export(results, None, "coco", min_score=0.5)
    assert [(a["phrase"], a["score"]) for a in doc["annotations"]] == [("the cat", 0.91)]
    assert summary.boxes_below_min_score == 1 and "1 box scored under 0.5 left out" in summary.line()
    tasks, _ = export(results, None, "labelstudio")
    prediction = tasks[0]["predictions"][0]
    assert [r["score"] for r in prediction["result"]] == [0.91, 0.42] and prediction["score"] == pytest.approx(0.665)


def test_min_score_on_results_without_scores_says_to_annotate_with_scores(results: Path) -> None:
    with pytest.raises(InvalidRequest, match="vlq annotate --scores"):
        export(results, None, "coco", min_score=0.5)
