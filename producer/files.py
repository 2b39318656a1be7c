"""Files for the OpenAI Batch surface: uploaded input files and generated output/error files.

A file is a metadata hash (``Keys.file``) beside its bytes (``Keys.file_content``), indexed by
creation time in ``Keys.files``. Both expire with the job records (``store.ttl_s``), so a batch's
output lives as long as the results it was built from. Bytes are written in chunks
(:meth:`FileStore.writer`) and read in ranges (:meth:`FileStore.iter_content`), so a large output
file never has to sit in one Python string on either side.

    files = FileStore.from_settings(settings)
    f = files.create(b'{"custom_id": "a", ...}\\n', filename="in.jsonl", purpose="batch")
    files.content(f.id)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict

from producer.errors import InvalidRequest, JobNotFound
from producer.keys import Keys
from producer.state import redis_errors

Purpose = Literal["batch", "batch_output"]
UPLOAD_PURPOSES = ("batch",)
READ_CHUNK = 1 << 20


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


class FileObject(BaseModel):
    """OpenAI's ``file`` object."""

    model_config = ConfigDict(frozen=True)

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> FileObject:
        return cls(
            id=h["id"],
            bytes=int(h.get("bytes") or 0),
            created_at=int(float(h.get("created_at") or 0)),
            filename=h.get("filename") or "",
            purpose=h.get("purpose") or "batch",
            expires_at=int(float(h["expires_at"])) if h.get("expires_at") else None,
        )


class FileWriter:
    """Appends a file's bytes to a scratch key; :meth:`commit` publishes them under the file's
    id in one step (a file is never seen half-written, and a rewrite replaces it whole)."""

    def __init__(self, store: FileStore, file_id: str, filename: str, purpose: str) -> None:
        self.store = store
        self.id = file_id
        self.filename = filename
        self.purpose = purpose
        self.size = 0
        self._scratch = store.keys.file_content(file_id) + ":writing:" + uuid.uuid4().hex[:8]
        self._buffer: list[bytes] = []
        self._buffered = 0
        with redis_errors(store.url):
            store.redis.delete(self._scratch)

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= READ_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        with redis_errors(self.store.url):
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.append(self._scratch, b"".join(self._buffer))
            pipe.expire(self._scratch, 3600)
            pipe.execute()
        self._buffer.clear()
        self._buffered = 0

    def commit(self) -> FileObject:
        self._flush()
        return self.store._publish(self.id, self._scratch, self.size, self.filename, self.purpose)

    def abort(self) -> None:
        with redis_errors(self.store.url):
            self.store.redis.delete(self._scratch)


class FileStore:
    """Files in Redis under one key prefix. Thread-safe."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int, *, url: str = "") -> None:
        # Bytes in, bytes out: file contents are not text to the store.
        self.redis = client
        self.keys = keys
        self.ttl_s = int(ttl_s)
        self.url = url

    @classmethod
    def from_settings(cls, settings: Any) -> FileStore:
        client = redis.Redis.from_url(
            settings.broker.url,
            decode_responses=False,
            socket_connect_timeout=settings.broker.connect_timeout_s,
            socket_keepalive=True,
            health_check_interval=30,
        )
        return cls(client, Keys(settings.key_prefix), settings.store.ttl_s, url=settings.broker.url)

    def close(self) -> None:
        self.redis.close()

    # -- writing ---------------------------------------------------------------------------------

    def create(
        self, content: bytes, *, filename: str, purpose: str, file_id: str | None = None
    ) -> FileObject:
        """Store ``content`` as a new file (or replace ``file_id``)."""
        writer = self.writer(filename=filename, purpose=purpose, file_id=file_id)
        writer.write(content)
        return writer.commit()

    def writer(self, *, filename: str, purpose: str, file_id: str | None = None) -> FileWriter:
        """A writer for a file built in pieces; nothing is visible before ``commit()``."""
        return FileWriter(self, file_id or new_file_id(), filename, purpose)

    def _publish(self, file_id: str, scratch: str, size: int, filename: str, purpose: str) -> FileObject:
        now = time.time()
        meta = {
            "id": file_id,
            "bytes": size,
            "created_at": repr(now),
            "filename": filename,
            "purpose": purpose,
            "expires_at": repr(now + self.ttl_s),
        }
        content_key = self.keys.file_content(file_id)
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            if size:
                pipe.rename(scratch, content_key)
            else:
                pipe.set(content_key, b"")
            pipe.expire(content_key, self.ttl_s)
            pipe.delete(self.keys.file(file_id))
            pipe.hset(self.keys.file(file_id), mapping=meta)
            pipe.expire(self.keys.file(file_id), self.ttl_s)
            pipe.zadd(self.keys.files, {file_id: now})
            pipe.execute()
        return FileObject.from_hash({k: str(v) for k, v in meta.items()})

    def delete(self, file_id: str) -> None:
        """Delete a file. Raises :class:`JobNotFound` (``not_found``) when there is none."""
        with redis_errors(self.url):
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.keys.file(file_id))
            pipe.delete(self.keys.file_content(file_id))
            pipe.zrem(self.keys.files, file_id)
            removed = pipe.execute()[0]
        if not removed:
            raise self._missing(file_id)

    # -- reading ---------------------------------------------------------------------------------

    def get(self, file_id: str) -> FileObject:
        """The file's metadata. Raises :class:`JobNotFound` (``not_found``)."""
        with redis_errors(self.url):
            h = self.redis.hgetall(self.keys.file(file_id))
        if not h:
            raise self._missing(file_id)
        return FileObject.from_hash({k.decode(): v.decode() for k, v in h.items()})

    def content(self, file_id: str) -> bytes:
        """The whole file. Prefer :meth:`iter_content` for large files."""
        return b"".join(self.iter_content(file_id))

    def iter_content(self, file_id: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """The file's bytes in chunks. Raises :class:`JobNotFound` before yielding anything when
        the file does not exist."""
        key = self.keys.file_content(file_id)
        with redis_errors(self.url):
            size = self.redis.strlen(key)
            exists = size or self.redis.exists(key)
        if not exists:
            raise self._missing(file_id)

        def chunks() -> Iterator[bytes]:
            for start in range(0, size, chunk):
                with redis_errors(self.url):
                    yield self.redis.getrange(key, start, min(start + chunk, size) - 1)

        return chunks()

    def list(
        self,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: Literal["asc", "desc"] = "desc",
    ) -> tuple[list[FileObject], bool]:
        """Files by creation time (``desc``: newest first), after the file id ``after``.
        Returns the page and whether more follow. Expired files are dropped from the index."""
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be 'asc' or 'desc'", param="order")
        with redis_errors(self.url):
            ids = [x.decode() for x in (
                self.redis.zrevrange(self.keys.files, 0, -1) if order == "desc"
                else self.redis.zrange(self.keys.files, 0, -1)
            )]
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        out: list[FileObject] = []
        gone: list[str] = []
        for start in range(0, len(ids), 500):
            page = ids[start:start + 500]
            with redis_errors(self.url):
                pipe = self.redis.pipeline(transaction=False)
                for file_id in page:
                    pipe.hgetall(self.keys.file(file_id))
                hashes = pipe.execute()
            for file_id, h in zip(page, hashes):
                if not h:
                    gone.append(file_id)
                    continue
                f = FileObject.from_hash({k.decode(): v.decode() for k, v in h.items()})
                if purpose is None or f.purpose == purpose:
                    out.append(f)
            if len(out) > limit:
                break
        if gone:
            with redis_errors(self.url):
                self.redis.zrem(self.keys.files, *gone)
        return out[:limit], len(out) > limit

    @staticmethod
    def _missing(file_id: str) -> JobNotFound:
        return JobNotFound(f"no file {file_id!r} (never uploaded, deleted, or expired)", param="file_id")
