"""The S3 store on a real S3 server (SeaweedFS): what the contract suite cannot see. A frame read
is one small ranged GET (bytes counted on the wire), large blobs go up in parts in bounded
memory, async reads run concurrently, a stopped or frozen server is StoreUnavailable within the
timeout, credentials come from the environment, and an immutable tier is written with S3 Object
Lock and refuses deletes while retained."""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import S3_BUCKET, SeaweedFS
from storage_tiers import BlobError, BlobNotFound, S3Store, StoreUnavailable, create_bucket

MB = 1 << 20


@pytest.fixture
def store(seaweedfs, s3_prefix):
    s = S3Store("cold", bucket=S3_BUCKET, prefix=s3_prefix, **seaweedfs.store_kwargs())
    yield s
    s.close()


def _blocks(total: int, block: int = MB, seed: int = 0):
    """`total` bytes generated block by block (never all in memory), the same for the same seed."""
    base = random.Random(seed).randbytes(block)
    for i in range(0, total, block):
        n = min(block, total - i)
        yield (i.to_bytes(8, "little") + base[8:])[:n]


def _sha256(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # 5: reset VmHWM to the current RSS
        fh.write("5")


def _rss_mb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(field)


class Proxy:
    """A TCP proxy from 127.0.0.1:port to `target`, counting the bytes the server sends and the
    connections open at once. `frozen`: accept connections and never answer (a hung server)."""

    def __init__(self, target: int, ports=(0,)) -> None:
        self.target = target
        self.down = 0
        self.active = 0
        self.max_active = 0
        self.frozen = False
        self._lock = threading.Lock()
        self._sock = socket.socket()
        for port in ports:  # the first free one of these (0: any)
            try:
                self._sock.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        else:
            raise OSError(f"none of the ports {ports[0]}..{ports[-1]} is free")
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(client)
            if self.frozen:
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            self._conns.append(server)
            with self._lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while data := src.recv(256 * 1024):
                if downstream:
                    with self._lock:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if downstream:
                with self._lock:
                    self.active -= 1

    def close(self) -> None:
        self._sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass


@pytest.fixture
def proxy(seaweedfs):
    p = Proxy(seaweedfs.s3_port)
    yield p
    p.close()


def _via(proxy: Proxy, weed: SeaweedFS, prefix: str, **kw) -> S3Store:
    return S3Store("cold", bucket=S3_BUCKET, prefix=prefix, **{**weed.store_kwargs(), "endpoint": proxy.endpoint, **kw})


# -- reads -----------------------------------------------------------------------------------


def test_missing_blob_is_not_found_whatever_the_endpoint_port(seaweedfs, s3_prefix):
    """A 404 is BlobNotFound even when the endpoint's port holds "416" (a ranged GET's error text
    names the URL; it was once taken for a 416 Range Not Satisfiable, i.e. a short read)."""
    p = Proxy(seaweedfs.s3_port, ports=[*range(34160, 34170), *range(41600, 41700)])
    try:
        assert "416" in str(p.port)
        via = _via(p, seaweedfs, s3_prefix)
        with pytest.raises(BlobNotFound):
            via.read_range("0" * 32, 0, 1)
        with pytest.raises(BlobNotFound):
            asyncio.run(via.read_range_async("0" * 32, 0, 1))
        via.put_stream("d" * 32, [b"0123456789"])
        with pytest.raises(BlobError, match="shorter than expected"):  # a real 416 still is one
            via.read_range("d" * 32, 20, 4)
    finally:
        p.close()


def test_a_ranged_read_never_downloads_the_object(store, proxy, seaweedfs, s3_prefix):
    size = 64 * MB
    assert store.put_stream("f" * 32, _blocks(size)) == size
    via = _via(proxy, seaweedfs, s3_prefix)
    expected = b"".join(_blocks(size))[40 * MB + 3:40 * MB + 15]
    before = proxy.down
    for _ in range(10):
        assert via.read_range("f" * 32, 40 * MB + 3, 12) == expected
    per_read = (proxy.down - before) / 10
    assert per_read < 4096, per_read  # headers and 12 bytes, not 64 MB
    before = proxy.down  # the proxy does count a whole object when one is read
    with via.open("f" * 32) as fh:
        while fh.read(4 * MB):
            pass
    assert proxy.down - before >= size
    via.close()


def test_open_streams_in_bounded_memory(store):
    size = 96 * MB
    store.put_stream("a" * 32, _blocks(size, seed=3))
    _reset_peak_rss()
    base = _rss_mb("VmRSS")
    h = hashlib.sha256()
    with store.open("a" * 32) as fh:
        assert fh.read(0) == b""
        first = fh.read(10)
        h.update(first)
        while chunk := fh.read(MB + 7):
            h.update(chunk)
    assert h.hexdigest() == _sha256(_blocks(size, seed=3))
    assert _rss_mb() - base < 24, (base, _rss_mb())  # ~6 MB measured: a chunk at a time, not 96 MB


def test_concurrent_async_ranged_reads(store, proxy, seaweedfs, s3_prefix):
    data = os.urandom(8 * MB)
    store.put_stream("c" * 32, [data])
    via = _via(proxy, seaweedfs, s3_prefix)
    rnd = random.Random(5)
    spans = [(rnd.randrange(0, len(data) - 12288), rnd.randrange(1, 12288)) for _ in range(200)]

    async def main():
        sem = asyncio.Semaphore(16)

        async def one(off, n):
            async with sem:
                return await via.read_range_async("c" * 32, off, n)

        info = await via.stat_async("c" * 32)
        return info, await asyncio.gather(*(one(o, n) for o, n in spans))

    info, got = asyncio.run(main())
    assert info.size == len(data)
    assert got == [data[o:o + n] for o, n in spans]
    assert proxy.max_active >= 4, proxy.max_active  # in flight together, on one event loop

    async def errors():
        with pytest.raises(BlobNotFound):
            await via.read_range_async("0" * 32, 0, 1)
        with pytest.raises(BlobError):
            await via.read_range_async("c" * 32, len(data) - 4, 8)
        with pytest.raises(BlobNotFound):
            await via.stat_async("0" * 32)

    asyncio.run(errors())
    via.close()


# -- writes ----------------------------------------------------------------------------------

def _etag_parts(weed: SeaweedFS, key: str) -> int:
    """The part count of a multipart object's ETag ("<md5>-<parts>"); 1 for a single PUT."""
    etag = weed.client().head_object(Bucket=S3_BUCKET, Key=key)["ETag"].strip('"')
    return int(etag.rsplit("-", 1)[1]) if "-" in etag else 1


def test_large_stream_goes_up_in_parts_in_bounded_memory(store, seaweedfs, s3_prefix):
    size = 160 * MB
    key = "b" * 32
    _reset_peak_rss()
    base = _rss_mb("VmRSS")
    assert store.put_stream(key, _blocks(size, seed=1)) == size
    grown = _rss_mb() - base
    # ~32 MB measured (4 parts of 8 MiB in flight, the 16 MiB threshold buffer handed on); the
    # whole blob would be 160 MB
    assert grown < 64, grown
    assert _etag_parts(seaweedfs, f"{s3_prefix}/{key}") == size // store.part_size
    assert store.stat(key).size == size
    with store.open(key) as fh:
        assert _sha256(iter(lambda: fh.read(4 * MB), b"")) == _sha256(_blocks(size, seed=1))


def test_large_file_goes_up_in_parts_and_owned_is_consumed(store, seaweedfs, s3_prefix, tmp_path):
    size = 100 * MB + 123
    src = tmp_path / "big.bin"
    with open(src, "wb") as fh:
        for b in _blocks(size, seed=2):
            fh.write(b)
    _reset_peak_rss()
    base = _rss_mb("VmRSS")
    store.put_file(src, "d" * 32, owned=True)
    assert _rss_mb() - base < 64, _rss_mb() - base  # ~36 MB measured: 4 parts in flight, not the file
    assert not src.exists()
    assert _etag_parts(seaweedfs, f"{s3_prefix}/{'d' * 32}") == -(-size // store.part_size)
    assert store.read_range("d" * 32, size - 100, 100) == b"".join(_blocks(size, seed=2))[-100:]


def test_small_blobs_are_one_put_and_a_broken_large_stream_leaves_nothing(store, seaweedfs, s3_prefix):
    store.put_stream("e" * 32, _blocks(3 * MB))
    assert _etag_parts(seaweedfs, f"{s3_prefix}/{'e' * 32}") == 1

    def broken():
        yield from _blocks(40 * MB)  # past the threshold: a multipart upload had begun
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError):
        store.put_stream("9" * 32, broken())
    assert not store.exists("9" * 32)
    uploads = seaweedfs.client().list_multipart_uploads(Bucket=S3_BUCKET, Prefix=s3_prefix).get("Uploads", [])
    assert uploads == []  # aborted, not left to accumulate


# -- failures --------------------------------------------------------------------------------

@pytest.fixture
def doomed(tmp_path):
    """A SeaweedFS of this test's own, to freeze and to stop."""
    weed = SeaweedFS(tmp_path / "weed").start()
    yield weed
    weed.kill()


def _every_call(s: S3Store, tmp_path: Path) -> dict:
    src = tmp_path / "x.bin"
    src.write_bytes(b"x" * 1000)
    return {
        "read_range": lambda: s.read_range("1" * 32, 0, 10),
        "read_range_async": lambda: asyncio.run(s.read_range_async("1" * 32, 0, 10)),
        "stat": lambda: s.stat("1" * 32),
        "stat_async": lambda: asyncio.run(s.stat_async("1" * 32)),
        "exists": lambda: s.exists("1" * 32),
        "open": lambda: s.open("1" * 32).read(),
        "put_file": lambda: s.put_file(src, "2" * 32),
        "put_stream": lambda: s.put_stream("3" * 32, [b"abc"]),
        "list": lambda: list(s.list()),
        "delete": lambda: s.delete("1" * 32),
        "check": s.check,
    }


def test_a_frozen_then_stopped_server_is_unavailable_within_the_timeout(doomed, tmp_path):
    doomed.create_bucket("doomed")
    s = S3Store("cold", bucket="doomed", timeout=(0.5, 1), **doomed.store_kwargs())
    s.put_stream("1" * 32, [b"0123456789abc"])
    assert s.read_range("1" * 32, 0, 10) == b"0123456789"
    doomed.pause()  # accepts connections (the kernel does), answers nothing
    try:
        for what, call in _every_call(s, tmp_path).items():
            if what in ("put_file", "delete", "list", "stat_async", "exists"):
                continue  # the same requests as those timed here (and below, against the stopped server)
            t = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                call()
            took = time.monotonic() - t
            assert took < 1 + 2, (what, took)  # the request timeout (retries end with retry_timeout)
            msg = str(err.value)
            assert doomed.endpoint in msg and "no answer within the 1 s timeout" in msg and "\n" not in msg, msg
    finally:
        doomed.resume()
    doomed.kill()
    for what, call in _every_call(s, tmp_path).items():
        t = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            call()
        assert time.monotonic() - t < 2, what  # refused at once: no long retrying
        msg = str(err.value)
        assert doomed.endpoint in msg and "connection refused" in msg and "\n" not in msg, (what, msg)


def test_errors_are_ours_with_one_line_reasons(seaweedfs, s3_prefix):
    kw = seaweedfs.store_kwargs()
    with pytest.raises(BlobError, match="bucket 'no-such-bucket' does not exist") as err:
        S3Store("cold", bucket="no-such-bucket", **kw).check()
    assert not isinstance(err.value, StoreUnavailable)
    S3Store("cold", bucket=S3_BUCKET, prefix=s3_prefix, **kw).check()
    wrong = S3Store("cold", bucket=S3_BUCKET, **{**kw, "secret_key": "wrong"})
    with pytest.raises(BlobError) as err:
        wrong.read_range("1" * 32, 0, 1)
    assert not isinstance(err.value, (StoreUnavailable, BlobNotFound)) and "\n" not in str(err.value)
    assert "SignatureDoesNotMatch" in str(err.value) or "403" in str(err.value), str(err.value)
    with pytest.raises(BlobError):
        wrong.check()
    with pytest.raises(BlobError, match="invalid blob key"):
        S3Store("cold", bucket=S3_BUCKET, **kw).read_range("../x", 0, 1)


# -- credentials -----------------------------------------------------------------------------

def test_credentials_region_and_endpoint_from_the_environment(seaweedfs, s3_prefix, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BlobError, match="no credentials"):
        S3Store("cold", endpoint=seaweedfs.endpoint, bucket=S3_BUCKET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    s = S3Store("cold", bucket=S3_BUCKET, prefix=s3_prefix)
    assert (s.endpoint, s.region) == (seaweedfs.endpoint, "eu-west-3")
    s.put_stream("5" * 32, [b"from the environment"])
    assert s.read_range("5" * 32, 9, 11) == b"environment"
    # arguments win over the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(BlobError):
        S3Store("cold", bucket=S3_BUCKET, prefix=s3_prefix).stat("5" * 32)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "not-for-these-keys")  # nor mixed into the config's keys
    s2 = S3Store("cold", bucket=S3_BUCKET, prefix=s3_prefix, **seaweedfs.store_kwargs())
    assert s2.stat("5" * 32).size == 20
    with pytest.raises(BlobError, match="go together"):
        S3Store("cold", bucket=S3_BUCKET, access_key="only-one")


# -- immutable tiers -------------------------------------------------------------------------

def test_immutable_tier_writes_with_object_lock_and_refuses_deletes(seaweedfs, s3_prefix, tmp_path):
    kw = seaweedfs.store_kwargs()
    with pytest.raises(BlobError, match="retention_days"):
        S3Store("vault", bucket=S3_BUCKET, immutable=True, **kw)
    # a bucket without Object Lock: refused at start-up
    with pytest.raises(BlobError, match="no S3 Object Lock"):
        S3Store("vault", bucket=S3_BUCKET, immutable=True, retention_days=1, **kw).check()
    bucket = seaweedfs.create_bucket("pathpacs-locked", object_lock=True)  # SeaweedFS supports it
    s = S3Store("vault", bucket=bucket, prefix=s3_prefix, immutable=True, retention_days=2, **kw)
    s.check()
    s.put_stream("6" * 32, [b"kept for two days"])
    s.put_stream("7" * 32, _blocks(20 * MB))  # past the threshold: a multipart upload, locked too
    src = tmp_path / "a.bin"
    src.write_bytes(b"a file")
    s.put_file(src, "8" * 32, owned=True)
    assert not src.exists()
    client = seaweedfs.client()
    soon = datetime.now(timezone.utc) + timedelta(days=2)
    for key in ("6" * 32, "7" * 32, "8" * 32):
        ret = client.get_object_retention(Bucket=bucket, Key=f"{s3_prefix}/{key}")["Retention"]
        assert ret["Mode"] == "COMPLIANCE" and abs((ret["RetainUntilDate"] - soon).total_seconds()) < 120, ret
    assert s.read_range("7" * 32, 0, 8) == next(_blocks(MB))[:8]
    with pytest.raises(BlobError, match="retained until") as err:
        s.delete("6" * 32)
    assert not isinstance(err.value, BlobNotFound)
    assert s.read_range("6" * 32, 0, 4) == b"kept"
    s.delete("0" * 32)  # what is not there: no error
    # and the server itself refuses to delete the retained version, whoever asks
    version = client.head_object(Bucket=bucket, Key=f"{s3_prefix}/{'6' * 32}")["VersionId"]
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError):
        client.delete_object(Bucket=bucket, Key=f"{s3_prefix}/{'6' * 32}", VersionId=version)
    assert s.stat("6" * 32).size == 17


def test_create_bucket_helper(seaweedfs):
    create_bucket("pathpacs-made", **seaweedfs.store_kwargs())
    create_bucket("pathpacs-made", **seaweedfs.store_kwargs())  # already ours: not an error
    s = S3Store("cold", bucket="pathpacs-made", **seaweedfs.store_kwargs())
    s.check()
    assert list(s.list()) == []


def test_payload_is_signed_over_http_and_not_hashed_again_over_https(seaweedfs, s3_prefix):
    """Over TLS the body is not hashed a second time for the signature (ingest hashed it already);
    over plain HTTP the signature covers it, and SeaweedFS takes the signed PUT byte for byte."""
    tls = S3Store("cold", endpoint="https://s3.example.org", bucket=S3_BUCKET, access_key="a", secret_key="s")
    assert tls._store.config["unsigned_payload"] == "true"
    plain = S3Store("cold", bucket=S3_BUCKET, prefix=s3_prefix, **seaweedfs.store_kwargs())
    assert plain._store.config["unsigned_payload"] == "false"
    data = os.urandom(3 * MB)
    assert plain.put_stream("signed", [data]) == len(data)
    assert plain.read_range("signed", 0, len(data)) == data
