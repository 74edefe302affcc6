"""The BlobStore contract: what every tier must do, run against every store we have.

STORES: the filesystem store, and the S3 store on a real SeaweedFS (the session's, tests apart by
prefix); nothing here knows which store it tests beyond its factory. A store must place blobs
durably and atomically, answer ranged reads exactly, stream whole blobs, and say "not found" in
its own words (BlobNotFound), never with an OSError.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage_tiers import BlobError, BlobNotFound, BlobStore, FilesystemStore, S3Store, Staging


def filesystem(tmp_path: Path, request) -> FilesystemStore:
    return FilesystemStore(tmp_path / "fs", name="hot")


def s3(tmp_path: Path, request) -> S3Store:
    from conftest import S3_BUCKET

    weed = request.getfixturevalue("seaweedfs")  # started once per session, on first use
    return S3Store("cold", bucket=S3_BUCKET, prefix=request.getfixturevalue("s3_prefix"), **weed.store_kwargs())


STORES = {"filesystem": filesystem, "s3": s3}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    s = STORES[request.param](tmp_path, request)
    yield s
    s.close()


def _file(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_is_a_blobstore(store):
    assert isinstance(store, BlobStore)
    assert isinstance(store.inline_reads, bool) and store.name


def test_put_file_then_read_back_exactly(store, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = _file(tmp_path, data)
    store.put_file(src, "k1")
    assert src.exists()  # not owned: left as it was
    assert store.exists("k1") and store.stat("k1").size == len(data)
    with store.open("k1") as fh:
        assert fh.read() == data
    assert store.read_range("k1", 0, 10) == data[:10]
    assert store.read_range("k1", len(data) - 5, 5) == data[-5:]
    assert store.read_range("k1", 1 << 20, 4096) == data[1 << 20:(1 << 20) + 4096]


def test_put_file_owned_consumes_the_file(store, tmp_path):
    src = _file(tmp_path, b"owned bytes")
    store.put_file(src, "k2", owned=True)
    assert not src.exists()
    with store.open("k2") as fh:
        assert fh.read() == b"owned bytes"


def test_put_stream_in_chunks(store):
    chunks = [os.urandom(1 << 20) for _ in range(5)] + [b"tail"]
    assert store.put_stream("k3", iter(chunks)) == sum(map(len, chunks))
    with store.open("k3") as fh:
        assert fh.read() == b"".join(chunks)


def test_failed_stream_leaves_nothing_under_the_key(store):
    def chunks():
        yield b"first part"
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError):
        store.put_stream("k4", chunks())
    assert not store.exists("k4")
    assert [b.key for b in store.list()] == []


def test_missing_blob_is_blobnotfound_everywhere(store):
    with pytest.raises(BlobNotFound):
        store.open("nope")
    with pytest.raises(BlobNotFound):
        store.stat("nope")
    with pytest.raises(BlobNotFound):
        store.read_range("nope", 0, 1)
    assert not store.exists("nope")
    store.delete("nope")  # deleting what is gone is not an error


def test_read_past_the_end_is_an_error_not_short_data(store, tmp_path):
    store.put_file(_file(tmp_path, b"0123456789"), "k5")
    with pytest.raises(BlobError):
        store.read_range("k5", 5, 10)


def test_delete_and_list(store, tmp_path):
    for k in ("a1", "b2", "c3"):
        store.put_file(_file(tmp_path, k.encode() * 10, k), k)
    assert sorted(b.key for b in store.list()) == ["a1", "b2", "c3"]
    assert {b.key: b.size for b in store.list()}["b2"] == 20
    store.delete("b2")
    assert sorted(b.key for b in store.list()) == ["a1", "c3"]
    with pytest.raises(BlobNotFound):
        store.read_range("b2", 0, 1)


def test_replacing_a_key_is_atomic(store, tmp_path):
    store.put_file(_file(tmp_path, b"old" * 100), "k6")
    assert store.read_range("k6", 0, 3) == b"old"
    store.delete("k6")
    store.put_file(_file(tmp_path, b"new" * 100, "n"), "k6")
    assert store.read_range("k6", 0, 3) == b"new"


def test_local_path_is_optional_but_truthful(store, tmp_path):
    store.put_file(_file(tmp_path, b"local?"), "k7")
    path = store.local_path("k7")
    if path is not None:
        assert Path(path).read_bytes() == b"local?"
    assert store.local_path("nope") is None


# -- staging, the local component every receiver writes through ------------------------------

def test_spool_hashes_while_writing_and_sweeps_dead_sessions(tmp_path):
    import hashlib

    st = Staging(tmp_path / "tmp")
    spool = st.spool()
    spool.write(b"abc")
    spool.write(memoryview(b"def"))
    done = spool.finish()
    assert done.sha256 == hashlib.sha256(b"abcdef").hexdigest() and done.size == 6 and done.error is None
    assert done.path.read_bytes() == b"abcdef" and done.path.parent == st.dir
    dead = tmp_path / "tmp" / ("0" * 32)
    dead.mkdir()
    (dead / "x.part").write_bytes(b"left by a crash")
    other = Staging(tmp_path / "tmp")  # a live session is never swept
    assert st.sweep() == 1 and not dead.exists() and other.dir.exists()
    other.close()
    st.close()
    assert not st.dir.exists()
