"""`vlq export` in-process: files in, files (or stdout) out, the summary on stderr."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from producer.cli import app
from producer.export import read_results, to_coco, to_label_studio
from tests.producer.test_export import LINES, write_lines


def test_export_writes_coco_and_reports_failed_images_on_stderr(tmp_path: Path) -> None:
    results = write_lines(tmp_path / "results.jsonl", LINES)
    out = tmp_path / "instances.json"
    res = CliRunner().invoke(app, ["export", str(results), "--format", "coco", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text(encoding="utf-8")) == to_coco(read_results(results))
    assert res.stdout == ""
    assert res.stderr.strip() == (f"4 images: 2 with boxes (3 boxes), 1 without, 1 failed (image_decode_failed x1);"
                                  f" 1 failed image left out of the COCO images (no size); coco written to {out}")


def test_export_writes_label_studio_tasks_to_stdout(tmp_path: Path) -> None:
    results = write_lines(tmp_path / "results.jsonl", LINES)
    res = CliRunner().invoke(app, ["export", str(results), "--format", "labelstudio", "--out", "-",
                                   "--image-prefix", "s3://photos/run1/", "--to-name", "img"])
    assert res.exit_code == 0, res.output
    tasks = json.loads(res.stdout)
    assert tasks == to_label_studio(read_results(results), image_prefix="s3://photos/run1/", to_name="img")
    assert [t["data"]["img"] for t in tasks][:2] == ["s3://photos/run1/a.jpg", "s3://photos/run1/b.png"]
    assert "labelstudio written to stdout" in res.stderr


def test_export_of_a_file_that_is_not_annotate_results_fails_with_a_coded_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    res = CliRunner().invoke(app, ["export", str(bad), "--format", "coco", "--out", str(tmp_path / "o.json")])
    assert res.exit_code == 1 and "error [invalid_request]" in res.stderr and "line 1" in res.stderr
    assert not (tmp_path / "o.json").exists()


def test_an_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    results = write_lines(tmp_path / "results.jsonl", LINES)
    res = CliRunner().invoke(app, ["export", str(results), "--format", "yolo", "--out", "-"])
    assert res.exit_code == 2 and "yolo" in res.stderr
