"""Annotate a folder of images with one prompt: one job per image, one JSONL line per result.

    vlq annotate photos/ --prompt "Describe the picture." --out results.jsonl

- The folder is walked recursively for image files (:data:`IMAGE_EXTENSIONS`, any case).
- Each image becomes one job (a user message with the image and the prompt); all jobs of a run
  share a batch id. At most ``max_in_flight`` are queued at once, so a huge folder never floods
  Redis (inline images in particular), and each image is read and hashed only when its turn to
  be submitted comes, so the first jobs start at once however large the folder.
- Results are appended to the output file as they arrive, one line per image:
  ``{"path", "job_id", "status", "answer", "boxes", "image_size", "error", "fingerprint", "prompt",
  "model", "checkpoint"}`` (a succeeded one also ``finish_reason``, ``"length"`` when the answer
  was cut off at ``max_tokens``, and ``usage``); ``image_size`` is ``[width, height]`` as the
  worker decoded the image (None for a failed job). ``vlq export`` turns the file into COCO or
  Label Studio input (producer.export).
- With ``scores`` the jobs ask for logprobs: each box carries a ``score`` (how sure the model was
  of the tokens that wrote it, in (0, 1]) and each line an answer ``score`` likewise.
- Resuming: an image's *fingerprint* is the sha256 of its bytes, the prompt, the model name and
  the sampling options. A later run with the same output file skips every image whose
  fingerprint already has a ``succeeded`` line; failed ones are tried again (their new line is
  appended; the last line for a path is the current one), unless ``retry_failed`` is off: then
  an image whose current line failed (a corrupt file, say) is left alone. A done image found at
  a new path (a copy, or a file moved since) is not asked again: its line is copied to the new
  path, with ``copied_from`` naming the old one.

How images reach the worker (``transport``):

- ``file`` (default): ``file:///absolute/path`` URLs. The worker must see the same filesystem
  and list the folder (or a parent) in ``images.allowed_roots``.
- ``inline``: the bytes travel inside the job as ``data:`` URIs. Works with any worker; best for
  small images (each job carries its image through Redis).
- ``s3``: each image is uploaded once to ``s3://bucket/prefix/<sha256>.<ext>`` (the store's S3
  endpoint and credentials) and the job carries that URL; workers need ``images.allow_s3``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import mimetypes
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from producer.client import Client, new_batch_id
from producer.errors import InvalidRequest, JobNotFinished, VlqError
from producer.schema import Job, JobStatus
from producer.state import JobRecord

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

Transport = Literal["file", "inline", "s3"]


@dataclass(frozen=True)
class AnnotateOptions:
    """What to ask about every image, and how to send the images."""

    prompt: str
    model: str = "Qwen-VL-Chat"
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    transport: Transport = "file"
    upload_to: str | None = None  # s3://bucket/prefix for transport "s3"
    max_in_flight: int = 256
    timeout_s: float | None = None  # for the whole run
    scores: bool = False  # ask for logprobs: each box, and the answer, gets a score
    retry_failed: bool = True  # False: an image whose current line failed is left alone

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise InvalidRequest("the prompt is empty: pass --prompt TEXT")
        if self.max_in_flight < 1:
            raise InvalidRequest(f"--max-in-flight is {self.max_in_flight}: at least 1 job must be queued at once")
        if self.transport == "s3" and not (self.upload_to or "").startswith("s3://"):
            raise InvalidRequest("transport s3 needs an upload location: --upload s3://bucket/prefix")

    def sampling(self) -> dict[str, Any]:
        out = {"max_tokens": self.max_tokens, "temperature": self.temperature, "seed": self.seed,
               "logprobs": True if self.scores else None}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class AnnotateSummary:
    """What a run did."""

    found: int = 0
    skipped: int = 0
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    redone: int = 0  # done before by a checkpoint the live workers no longer serve
    copied: int = 0  # of the skipped: new paths of images already done (a copy or a move), their lines copied
    left_failed: int = 0  # failed before and not tried again (retry_failed False)
    batch_id: str | None = None
    out: Path | None = None
    failures: dict[str, int] = field(default_factory=dict)  # error code -> count


def check_folder(folder: Path) -> Path:
    """``folder`` if it is one, else InvalidRequest saying what it is instead."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise InvalidRequest(f"{folder} is a file, not a folder: annotate takes a folder of images "
                             "(for one image, use vlq submit)")
    raise InvalidRequest(f"there is no folder {folder}: check the path")


def check_out(out: Path) -> Path:
    """``out`` if a results file can go there, else InvalidRequest saying why (before any job is sent)."""
    if out.is_dir():
        raise InvalidRequest(f"--out {out} is a folder: name a file in it, such as {out / 'results.jsonl'}")
    return out


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted; hidden files and folders are skipped."""
    folder = check_folder(folder)
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            out.append(path)
    return sorted(out)


def fingerprint(image_sha256: str, options: AnnotateOptions) -> str:
    """Identity of one image's work: its bytes, the prompt, the model and the sampling options."""
    key = json.dumps(
        {"image": image_sha256, "prompt": options.prompt, "model": options.model,
         "sampling": options.sampling()},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(key.encode()).hexdigest()


def serving_checkpoints(client: Client) -> set[str]:
    """The checkpoints (``vlq.checkpoint`` of their results) that live workers of the client's
    queue serve now; empty when none is up or Redis cannot tell."""
    try:
        return {w["checkpoint"] for w in client.serving() if w.get("checkpoint")}
    except VlqError:
        return set()


def read_done(out: Path) -> dict[str, dict[str, Any]]:
    """Fingerprint -> line, for the lines of ``out`` that succeeded (unreadable lines are ignored)."""
    return _read_done(out)[0]


def _read_done(out: Path) -> tuple[dict[str, dict[str, Any]], set[tuple[str, str]], set[tuple[str, str]]]:
    """:func:`read_done`, the (fingerprint, path) pairs that have a succeeded line, and those whose
    path's current (last) line failed."""
    done: dict[str, dict[str, Any]] = {}
    paths: set[tuple[str, str]] = set()
    last: dict[str, tuple[str, str]] = {}  # path -> (fingerprint, status) of its last line
    if not out.is_file():
        return done, paths, set()
    with out.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not (isinstance(row, dict) and row.get("fingerprint")):
                continue
            last[str(row.get("path"))] = (row["fingerprint"], str(row.get("status")))
            if row.get("status") == "succeeded":
                done[row["fingerprint"]] = row
                paths.add((row["fingerprint"], str(row.get("path"))))
    failed = {(fp, path) for path, (fp, status) in last.items() if status != "succeeded"}
    return done, paths, failed


@dataclass(frozen=True)
class _Item:
    path: Path
    rel: str
    sha256: str
    fingerprint: str


class _LazyFile:
    """A JSONL file opened for appending on its first write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: Any = None

    def write(self, text: str) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = self.path.is_file() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
            self._f = self.path.open("a", encoding="utf-8")
            if torn:  # an earlier run was cut off mid-line: the new lines start on their own
                self._f.write("\n")
        self._f.write(text)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1)


class Annotator:
    """Runs :func:`annotate`; ``on_progress(summary)`` is called after every change."""

    def __init__(
        self,
        client: Client,
        options: AnnotateOptions,
        on_progress: Callable[[AnnotateSummary], None] | None = None,
    ) -> None:
        self.client = client
        self.options = options
        self.on_progress = on_progress or (lambda summary: None)
        self._s3 = None

    def _todo(self, folder: Path, paths: list[Path], out: Path, sink: _LazyFile,
              summary: AnnotateSummary) -> Iterator[_Item]:
        """The images still to do, one at a time: each is read and hashed only when the run is
        ready to submit it, so a large folder starts at once; done ones count as skipped. A done
        image found at a new path (a copy, or a file moved since) gets a copy of its line there,
        so that every path of the folder has one."""
        done, done_paths, failed = _read_done(out)
        # The request's model name does not say which weights answer: a line written by a
        # checkpoint that no live worker serves now is done again, not mixed in.
        serving = serving_checkpoints(self.client)
        for path in paths:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            fp = fingerprint(sha, self.options)
            rel = path.relative_to(folder).as_posix()
            if fp in done and serving and done[fp].get("checkpoint") not in serving | {None}:
                summary.redone += 1
            elif fp in done:
                if (fp, rel) not in done_paths:
                    sink.write(json.dumps({**done[fp], "path": rel, "copied_from": done[fp].get("path")},
                                          ensure_ascii=False) + "\n")
                    sink.flush()
                    done_paths.add((fp, rel))
                    summary.copied += 1
                summary.skipped += 1
                self.on_progress(summary)
                continue
            elif not self.options.retry_failed and (fp, rel) in failed:
                summary.left_failed += 1
                self.on_progress(summary)
                continue
            yield _Item(path, rel, sha, fp)

    def run(self, folder: Path, out: Path) -> AnnotateSummary:
        folder, out = Path(folder), check_out(Path(out))
        paths = find_images(folder)
        summary = AnnotateSummary(found=len(paths), out=out)
        self.on_progress(summary)
        sink = _LazyFile(out)  # created with its first line: a run that writes nothing leaves no file
        todo = self._todo(folder, paths, out, sink, summary)
        deadline = None if self.options.timeout_s is None else time.monotonic() + self.options.timeout_s
        pending: dict[str, _Item] = {}
        more = True
        try:
            while more or pending:
                room = self.options.max_in_flight - len(pending)
                chunk = list(itertools.islice(todo, room)) if more and room > 0 else []
                more = more and len(chunk) == room
                if chunk:
                    summary.batch_id = summary.batch_id or new_batch_id()
                    jobs = [self._job(item, summary.batch_id) for item in chunk]
                    # pending first: an interrupt inside submit_jobs still cancels what it recorded
                    pending.update({job.id: item for job, item in zip(jobs, chunk)})
                    self.client.submit_jobs(jobs)
                    summary.submitted += len(jobs)
                    self.on_progress(summary)
                if not pending:
                    continue
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                for record in self._next_finished(list(pending), left):
                    item = pending.pop(record.id)
                    self._write(sink, item, record, summary)
                    self.on_progress(summary)
        except BaseException:
            # Interrupted or timed out: do not leave work behind that nobody will collect.
            for job_id in pending:
                try:
                    self.client.cancel(job_id)
                except VlqError:
                    pass
            raise
        finally:
            sink.close()
        return summary

    def _next_finished(self, job_ids: list[str], timeout: float | None) -> list[JobRecord]:
        """The records of every job already finished, waiting (polling) until there is one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            statuses = self.client.store.statuses(job_ids)
            done = [j for j, st in zip(job_ids, statuses) if st is None or st.is_terminal]
            if done:
                lost = {"code": "not_found", "message": "the job's record vanished (expired?)"}
                return [
                    r or JobRecord(id=j, status=JobStatus.FAILED, error=lost)
                    for j, r in zip(done, self.client.store.get_many(done))
                ]
            if deadline is not None and time.monotonic() >= deadline:
                raise JobNotFinished(
                    f"{len(job_ids)} images still unfinished after the time limit; they were"
                    " cancelled; run the same command again to continue"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _job(self, item: _Item, batch_id: str) -> Job:
        body = {
            "model": self.options.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": self._url(item)}},
                        {"type": "text", "text": self.options.prompt},
                    ],
                }
            ],
            **self.options.sampling(),
        }
        return self.client.make_job(
            body, batch_id=batch_id, metadata={"path": item.rel, "fingerprint": item.fingerprint}
        )

    def _url(self, item: _Item) -> str:
        if self.options.transport == "inline":
            mime = mimetypes.guess_type(item.path.name)[0] or "application/octet-stream"
            return f"data:{mime};base64," + base64.b64encode(item.path.read_bytes()).decode()
        if self.options.transport == "s3":
            return self._upload(item)
        return item.path.resolve().as_uri()

    def _upload(self, item: _Item) -> str:
        bucket, _, prefix = (self.options.upload_to or "")[len("s3://"):].partition("/")
        key = f"{prefix.rstrip('/') + '/' if prefix else ''}{item.sha256}{item.path.suffix.lower()}"
        try:
            self.client.s3_client().put_object(
                Bucket=bucket, Key=key, Body=item.path.read_bytes(),
                ContentType=mimetypes.guess_type(item.path.name)[0] or "application/octet-stream",
            )
        except Exception as e:
            from producer.errors import StoreUnavailable

            raise StoreUnavailable(f"cannot upload {item.rel} to s3://{bucket}/{key}: {e}; --upload needs an"
                                   f" existing bucket {bucket!r} the credentials may write to") from e
        return f"s3://{bucket}/{key}"

    def _write(self, sink: Any, item: _Item, record: JobRecord, summary: AnnotateSummary) -> None:
        row: dict[str, Any] = {
            "path": item.rel,
            "job_id": record.id,
            "status": record.status.value,
            "answer": None,
            "boxes": [],
            "image_size": None,
            "error": None,
            "fingerprint": item.fingerprint,
            "prompt": self.options.prompt,
            "model": self.options.model,
            "checkpoint": None,  # which weights answered (the worker's checkpoint_id)
        }
        if record.status is JobStatus.SUCCEEDED:
            try:
                doc = self.client.result_of(record)
                choice = (doc.get("choices") or [{}])[0]
                row["answer"] = (choice.get("message") or {}).get("content")
                row["finish_reason"] = choice.get("finish_reason")  # "length": cut off, boxes may be missing
                row["boxes"] = doc.get("boxes") or []
                if self.options.scores:
                    row["score"] = answer_score(choice.get("logprobs"))
                row["image_size"] = _image_size(doc)
                row["usage"] = doc.get("usage")
                row["checkpoint"] = (doc.get("vlq") or {}).get("checkpoint")
                summary.succeeded += 1
            except VlqError as e:  # the result expired or its store is away: count it failed
                row.update(status="failed", error={"code": e.code, "message": e.message})
                summary.failed += 1
        elif record.status is JobStatus.CANCELLED:
            row["error"] = {"code": "cancelled", "message": "the job was cancelled"}
            summary.cancelled += 1
        else:
            row["error"] = record.error
            summary.failed += 1
        if row["error"]:
            code = row["error"].get("code", "internal_error")
            summary.failures[code] = summary.failures.get(code, 0) + 1
        sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        sink.flush()


def answer_score(logprobs: dict[str, Any] | None) -> float | None:
    """How sure the model was of its whole answer: the geometric mean of its tokens'
    probabilities, ``exp(mean logprob)``, from a result's ``choices[0].logprobs`` (None without)."""
    from worker.engine.grounding import mean_probability  # torch-free; keeps worker code out of importing producer

    return mean_probability([t["logprob"] for t in (logprobs or {}).get("content") or []])


def _image_size(doc: dict[str, Any]) -> list[int] | None:
    """[width, height] of the job's one image as the worker decoded it (None when unknown)."""
    sizes = (doc.get("vlq") or {}).get("image_sizes") or []
    if sizes and sizes[0]:
        return list(sizes[0])
    return next((list(b["image_size"]) for b in doc.get("boxes") or []
                 if isinstance(b, dict) and b.get("image_size")), None)


def annotate(
    client: Client,
    folder: Path,
    out: Path,
    options: AnnotateOptions,
    on_progress: Callable[[AnnotateSummary], None] | None = None,
) -> AnnotateSummary:
    """Annotate every image under ``folder`` not already done in ``out``; see the module doc.

    Raises :class:`JobNotFinished` when ``options.timeout_s`` passes (unfinished jobs are
    cancelled; rerun to continue)."""
    return Annotator(client, options, on_progress).run(folder, out)


__all__ = [
    "IMAGE_EXTENSIONS",
    "AnnotateOptions",
    "AnnotateSummary",
    "Annotator",
    "JobNotFinished",
    "annotate",
    "find_images",
    "fingerprint",
    "read_done",
]
