"""Folder annotation through the SDK, a private Redis and a Celery thread with a scripted engine."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from PIL import Image

from producer.annotate import AnnotateOptions, annotate, answer_score, find_images, fingerprint, read_done
from producer.client import Client
from producer.config import Settings
from producer.errors import ImageDecodeError, InvalidRequest, JobNotFinished
from producer.schema import JobStatus
from tests.worker.scripted_worker import scripted_worker


def make_folder(root: Path) -> Path:
    folder = root / "photos"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    colours = {"a.jpg": "red", "sub/b.PNG": "green", "sub/deeper/c.webp": "blue", ".hidden/h.png": "white"}
    for name, colour in colours.items():
        Image.new("RGB", (32, 24), colour).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def settings(redis_server: str, key_prefix: str) -> Settings:
    return Settings.load(key_prefix=key_prefix, broker={"url": redis_server, "queue": key_prefix},
                         worker={"heartbeat_s": 0.1, "lease_timeout_s": 5})


@pytest.fixture
def client(settings: Settings):
    with Client(settings) as c:
        yield c


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_images_are_found_recursively_by_extension_skipping_hidden(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    assert [p.relative_to(folder).as_posix() for p in find_images(folder)] == [
        "a.jpg", "sub/b.PNG", "sub/deeper/c.webp"]
    with pytest.raises(InvalidRequest, match="there is no folder"):
        find_images(tmp_path / "missing")
    with pytest.raises(InvalidRequest, match="is a file, not a folder"):
        find_images(folder / "a.jpg")


def test_the_fingerprint_follows_bytes_prompt_model_and_sampling() -> None:
    base = AnnotateOptions(prompt="describe")
    fp = fingerprint("aa", base)
    assert fp == fingerprint("aa", AnnotateOptions(prompt="describe"))
    assert len({fp, fingerprint("bb", base), fingerprint("aa", AnnotateOptions(prompt="count")),
                fingerprint("aa", AnnotateOptions(prompt="describe", model="other")),
                fingerprint("aa", AnnotateOptions(prompt="describe", max_tokens=5)),
                fingerprint("aa", AnnotateOptions(prompt="describe", scores=True))}) == 6


def test_scores_ask_for_logprobs_and_score_an_answer_by_its_tokens_geometric_mean() -> None:
    assert AnnotateOptions(prompt="p", scores=True).sampling() == {"logprobs": True}
    assert "logprobs" not in AnnotateOptions(prompt="p").sampling()
    logprobs = {"content": [{"token": "a", "logprob": -0.2}, {"token": "b", "logprob": -0.4}]}
    assert answer_score(logprobs) == pytest.approx(math.exp(-0.3), abs=1e-6)
    assert answer_score(None) is None and answer_score({"content": []}) is None


def test_a_folder_is_annotated_once_and_a_rerun_submits_nothing(
    tmp_path: Path, settings: Settings, client: Client
) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    options = AnnotateOptions(prompt="what colour?", max_in_flight=2)
    seen = []
    with scripted_worker(settings) as w:
        first = annotate(client, folder, out, options, on_progress=lambda s: seen.append(s.succeeded))
        assert (first.found, first.submitted, first.succeeded, first.failed) == (3, 3, 3, 0)
        assert len(w.engine.submitted) == 3
        second = annotate(client, folder, out, options)
        assert (second.found, second.skipped, second.submitted) == (3, 3, 0)
        assert len(w.engine.submitted) == 3
    lines = rows(out)
    assert sorted(r["path"] for r in lines) == ["a.jpg", "sub/b.PNG", "sub/deeper/c.webp"]
    for r in lines:
        assert r["status"] == "succeeded" and r["answer"] == "echo: what colour?"
        assert r["boxes"] == [{"ref": "it", "box": [1, 2, 3, 4]}] and r["error"] is None
        assert r["prompt"] == "what colour?" and r["model"] == "Qwen-VL-Chat" and r["job_id"]
    assert seen[-1] == 3
    record = client.status(lines[0]["job_id"])
    url = record.job().request["messages"][0]["content"][0]["image_url"]["url"]
    assert url == (folder / lines[0]["path"]).resolve().as_uri()  # file:// by default
    assert record.batch_id == first.batch_id


def test_the_run_counts_the_folder_first_and_reads_each_image_only_when_it_submits_it(
    tmp_path: Path, settings: Settings, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    reads: list[str] = []  # the images this (the producer's) thread read
    read_bytes, producer = Path.read_bytes, threading.current_thread()

    def counting(self: Path) -> bytes:
        if threading.current_thread() is producer:
            reads.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    progress: list[tuple[int, int, int, int]] = []

    def seen(s) -> None:
        progress.append((s.found, s.skipped, s.submitted, len(reads)))

    with scripted_worker(settings):
        annotate(client, folder, out, AnnotateOptions(prompt="p", max_in_flight=1), on_progress=seen)
        # the total shows before any image is read; then one image is read per job submitted
        assert progress[0] == (3, 0, 0, 0)
        assert [p[3] for p in progress if p[2] == 1][0] == 1
        reads.clear()
        progress.clear()
        annotate(client, folder, out, AnnotateOptions(prompt="p", max_in_flight=1), on_progress=seen)
    assert progress[0] == (3, 0, 0, 0) and [p[1] for p in progress] == [0, 1, 2, 3]  # skips count one by one


def test_a_done_image_copied_or_moved_to_a_new_path_gets_its_line_there_without_a_new_job(
    tmp_path: Path, settings: Settings, client: Client
) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    options = AnnotateOptions(prompt="p")
    with scripted_worker(settings) as w:
        annotate(client, folder, out, options)
        (folder / "sub" / "copy-of-a.jpg").write_bytes((folder / "a.jpg").read_bytes())
        (folder / "sub" / "deeper" / "c.webp").rename(folder / "c-moved.webp")
        second = annotate(client, folder, out, options)
        third = annotate(client, folder, out, options)
        assert len(w.engine.submitted) == 3  # the first run's only
    assert (second.found, second.skipped, second.copied, second.submitted) == (4, 4, 2, 0)
    assert (third.skipped, third.copied) == (4, 0)  # the copies have their lines now
    lines = {r["path"]: r for r in rows(out)}
    assert set(lines) == {"a.jpg", "sub/b.PNG", "sub/deeper/c.webp", "sub/copy-of-a.jpg", "c-moved.webp"}
    assert lines["sub/copy-of-a.jpg"]["copied_from"] == "a.jpg"
    assert lines["c-moved.webp"]["copied_from"] == "sub/deeper/c.webp"
    assert lines["sub/copy-of-a.jpg"]["job_id"] == lines["a.jpg"]["job_id"]
    assert lines["sub/copy-of-a.jpg"]["finish_reason"] == "stop"


def test_a_results_file_cut_off_mid_line_gets_its_next_lines_whole(
    tmp_path: Path, settings: Settings, client: Client
) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    out.write_text('{"path": "old.jpg", "status": "succ')  # a run that died mid-write
    with scripted_worker(settings):
        summary = annotate(client, folder, out, AnnotateOptions(prompt="p"))
    assert summary.succeeded == 3
    torn, *whole = out.read_text().splitlines()
    assert torn == '{"path": "old.jpg", "status": "succ'
    assert [json.loads(x)["status"] for x in whole] == ["succeeded"] * 3


def test_a_folder_as_out_or_no_room_in_flight_is_refused_before_any_job(tmp_path: Path, client: Client) -> None:
    folder = make_folder(tmp_path)
    with pytest.raises(InvalidRequest, match="is a folder: name a file in it"):
        annotate(client, folder, tmp_path, AnnotateOptions(prompt="p"))
    with pytest.raises(InvalidRequest, match="at least 1"):
        AnnotateOptions(prompt="p", max_in_flight=0)


def test_failed_images_are_retried_on_the_next_run(tmp_path: Path, settings: Settings, client: Client) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    options = AnnotateOptions(prompt="p")
    with scripted_worker(settings) as w:
        w.images.error = ImageDecodeError("unreadable")
        first = annotate(client, folder, out, options)
        assert (first.failed, first.failures) == (3, {"image_decode_failed": 3})
        assert all(r["error"]["code"] == "image_decode_failed" for r in rows(out))
        w.images.error = None
        second = annotate(client, folder, out, options)
    assert (second.skipped, second.submitted, second.succeeded) == (0, 3, 3)
    assert len(read_done(out)) == 3


def test_without_retrying_failed_images_only_new_ones_are_sent(tmp_path: Path, settings: Settings,
                                                               client: Client) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    with scripted_worker(settings) as w:
        w.images.error = ImageDecodeError("unreadable")
        annotate(client, folder, out, AnnotateOptions(prompt="p"))
        w.images.error = None
        Image.new("RGB", (8, 8), "black").save(folder / "new.png")
        second = annotate(client, folder, out, AnnotateOptions(prompt="p", retry_failed=False))
        assert len(w.engine.submitted) == 1  # only new.png reached the engine
    assert (second.found, second.left_failed, second.submitted, second.succeeded) == (4, 3, 1, 1)
    assert rows(out)[-1]["path"] == "new.png"


def test_a_new_prompt_runs_every_image_again(tmp_path: Path, settings: Settings, client: Client) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    with scripted_worker(settings):
        annotate(client, folder, out, AnnotateOptions(prompt="one"))
        again = annotate(client, folder, out, AnnotateOptions(prompt="two"))
    assert again.submitted == 3 and len(rows(out)) == 6


def test_inline_images_travel_as_data_uris(tmp_path: Path, settings: Settings, client: Client) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    with scripted_worker(settings):
        annotate(client, folder, out, AnnotateOptions(prompt="p", transport="inline"))
    by_path = {row["path"]: row for row in rows(out)}  # rows come in the order jobs finish
    for path, mime in {"a.jpg": "image/jpeg", "sub/b.PNG": "image/png", "sub/deeper/c.webp": "image/webp"}.items():
        record = client.status(by_path[path]["job_id"])
        url = record.job().request["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith(f"data:{mime};base64,"), (path, url[:40])


def test_running_out_of_time_cancels_what_is_left(tmp_path: Path, settings: Settings, client: Client) -> None:
    folder, out = make_folder(tmp_path), tmp_path / "results.jsonl"
    with pytest.raises(JobNotFinished, match="run the same command again"):
        annotate(client, folder, out, AnnotateOptions(prompt="p", timeout_s=0.3))  # no worker
    ids = [k.split(":")[-1] for k in client.store.redis.keys(client.keys.job("*"))]
    assert len(ids) == 3 and all(client.status(i).status is JobStatus.CANCELLED for i in ids)


def test_an_interrupt_while_submitting_cancels_the_jobs_already_recorded(tmp_path: Path, client: Client,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_folder(tmp_path)
    submit = client.submit_jobs

    def interrupted(jobs):  # Ctrl-C (or SIGTERM) arrives as the jobs are being sent
        submit(jobs)
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "submit_jobs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        annotate(client, folder, tmp_path / "results.jsonl", AnnotateOptions(prompt="p"))
    ids = [k.split(":")[-1] for k in client.store.redis.keys(client.keys.job("*"))]
    assert len(ids) == 3 and all(client.status(i).status is JobStatus.CANCELLED for i in ids)
