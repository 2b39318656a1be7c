"""The Files store (producer.files) against a real Redis."""

from __future__ import annotations

import pytest

from producer.config import Settings
from producer.errors import InvalidRequest, JobNotFound
from producer.files import FileStore
from tests.conftest import REPO


@pytest.fixture
def files(redis_server: str, key_prefix: str):
    store = FileStore.from_settings(Settings.load(REPO / "conf", key_prefix=key_prefix,
                                                  broker={"url": redis_server}, store={"ttl_s": 3600}))
    yield store
    store.close()


def test_a_file_reads_back_byte_for_byte_in_chunks(files: FileStore) -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one write and read chunk
    f = files.create(data, filename="blob.bin", purpose="batch")
    assert f.bytes == len(data) and f.object == "file" and f.status == "processed"
    assert f.expires_at - f.created_at == 3600
    assert files.content(f.id) == data
    assert [len(c) for c in files.iter_content(f.id, chunk=500_000)] == [500_000, 500_000, 280_000]
    assert files.get(f.id) == f


def test_a_file_is_invisible_until_committed_and_a_rewrite_replaces_it(files: FileStore) -> None:
    writer = files.writer(filename="out.jsonl", purpose="batch_output", file_id="file-fixed")
    writer.write(b"one\n")
    with pytest.raises(JobNotFound):
        files.get("file-fixed")
    writer.commit()
    again = files.writer(filename="out.jsonl", purpose="batch_output", file_id="file-fixed")
    again.write(b"two\n")
    again.commit()
    assert files.content("file-fixed") == b"two\n"


def test_an_empty_file_exists_and_is_empty(files: FileStore) -> None:
    f = files.create(b"", filename="empty.jsonl", purpose="batch")
    assert files.content(f.id) == b"" and f.bytes == 0


def test_files_list_by_purpose_newest_first_and_page_with_after(files: FileStore) -> None:
    ids = [files.create(b"x", filename=f"{i}.jsonl", purpose="batch").id for i in range(3)]
    out = files.create(b"y", filename="o.jsonl", purpose="batch_output").id
    page, more = files.list(purpose="batch", limit=2)
    assert [f.id for f in page] == [ids[2], ids[1]] and more
    rest, more = files.list(purpose="batch", after=ids[1], limit=2)
    assert [f.id for f in rest] == [ids[0]] and not more
    assert [f.id for f in files.list(order="asc")[0]] == [*ids, out]
    with pytest.raises(InvalidRequest):
        files.list(order="sideways")  # type: ignore[arg-type]


def test_a_deleted_file_is_gone(files: FileStore) -> None:
    f = files.create(b"x", filename="x.jsonl", purpose="batch")
    files.delete(f.id)
    for read in (files.get, files.content, files.delete):
        with pytest.raises(JobNotFound):
            read(f.id)
    assert f.id not in [x.id for x in files.list()[0]]
