"""S3-compatible object storage behind the BlobStore interface: the cold tier, or any tier a site
keeps on object storage (SeaweedFS, MinIO, Ceph RGW, a cloud's S3).

Client: obstore 0.12 (Rust object_store: native async, ranged reads, multipart). Measured against
boto3 1.44 on SeaweedFS 4.48, loopback, 2 cores (conformance/bench/s3.py, best of 2): 12 KB ranged
GETs at random offsets of a 300 MB object, one reader: obstore p50 1.1 ms / p99 4.7 ms, 754/s,
boto3 3.8 / 8.5 ms, 254/s; 8 concurrent readers: obstore (8 asyncio tasks, one loop, no thread)
4.4 / 11.9 ms, 1646/s, boto3 (8 threads, its only concurrency) 11.4 / 34 ms, 605/s. Multipart
upload of 1 GB (8 MiB parts, 4 in flight): obstore 163 MB/s, boto3 141 MB/s, both ~65 MB peak
RSS. This store over obstore: 786/s, 1563/s async, 156 MB/s. boto3 writes the objects of an
immutable tier only (obstore sends no per-object x-amz-object-lock-* headers) and administers
buckets (`create_bucket`, the Object Lock check).

- Keys: `prefix/key` in `bucket` (a prefix is a folder: "pathpacs/cold" and "pathpacs/cold/" are
  the same). Path-style requests to a custom endpoint, virtual-hosted to AWS's own.
- Reads: `read_range` is one ranged GET (a frame never downloads the whole object);
  `read_range_async`/`stat_async` await obstore's native async on the caller's event loop; `open`
  streams one GET in bounded memory.
- Writes: one PUT up to `multipart_threshold` (16 MiB), above it a multipart upload of
  `part_size` (8 MiB) parts, `parts_in_flight` (4) at a time: memory is bounded by the threshold
  and the parts in flight (~35 MB measured), whatever the size. Durable = the PUT /
  CompleteMultipartUpload succeeded; a failed upload is aborted and nothing appears under the key.
  Over https the payload is sent unsigned (`UNSIGNED-PAYLOAD`, as the AWS SDKs do over TLS): the
  client does not hash every byte a second time (measured: half the client CPU of an upload);
  over http the signature covers the body.
- Credentials: the `access_key`/`secret_key` arguments (the tier's config), else the standard
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) environment variables; region:
  the argument, else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1; endpoint: the argument,
  else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS. No credentials at all is an error (never
  a silent fall back to an instance-metadata lookup).
- Timeouts: `timeout=(connect, request)` seconds, default (3, 30); a bare number is the request
  timeout. Every request is bounded by them, retries (2, backoff 0.1-1 s) by the request timeout;
  a whole-object stream (`open`) is bounded per read instead (no read may stall longer than the
  request timeout). A stopped or unreachable endpoint never hangs a caller.
- Errors: a missing key is BlobNotFound; an endpoint that cannot be reached, a timeout or a 5xx
  is StoreUnavailable (one line naming the endpoint); anything else is BlobError. No client
  exception escapes.
- Immutable tiers (`immutable=True, retention_days=N`): objects are written with S3 Object Lock in
  COMPLIANCE mode, retained until now + N days; `check()` refuses a bucket without Object Lock;
  `delete` refuses while an object is retained (and, after, removes every version of it).
  SeaweedFS 4.48 enforces it (a versioned delete of a retained object is refused).
- The store never creates its bucket: `create_bucket` (tests, benchmarks, an administrator).
"""
from __future__ import annotations

import io
import itertools
import os
import re
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import S3Store as _ObjectStore

from .base import BlobError, BlobInfo, BlobNotFound, StoreUnavailable

CONNECT_TIMEOUT = 3.0
REQUEST_TIMEOUT = 30.0
MULTIPART_THRESHOLD = 16 << 20
PART_SIZE = 8 << 20
PARTS_IN_FLIGHT = 4
STREAM_CHUNK = 1 << 20  # what `open` holds at most, beside the caller's read size

# Words of a failure to reach the endpoint (obstore/reqwest and botocore), and 5xx statuses.
_UNAVAILABLE = re.compile(
    r"error sending request|kind: Connect|Connection refused|connection (?:closed|reset)|timed out|"
    r"TimedOut|operation timed out|dns error|IncompleteMessage|broken pipe|"
    r"status code: 5\d\d|Could not connect|Connect timeout|Read timeout|EndpointConnectionError",
    re.IGNORECASE)
# A ranged GET past the end: the status as obstore words it (or S3's error code), never a "416"
# inside the URL the message names (a port such as 34163 once made a missing blob a short read).
_RANGE_NOT_SATISFIABLE = re.compile(r"status code: 416\b|Range Not Satisfiable|InvalidRange", re.IGNORECASE)


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def _timeouts(timeout: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(timeout, (int, float)):
        return min(CONNECT_TIMEOUT, float(timeout)), float(timeout)
    connect, request = timeout
    return float(connect), float(request)


_PERFORMING = re.compile(r"(?:Generic S3 error: )?(?:Error performing list request: )?Error performing (\w+) "
                         r"(\S+) in ([\d.]+)(µs|ms|s)(?:, after (\d+) retries)?[^-]*- ")


def _reason(text: str, timeout: float | None = None) -> str:
    """One line of a client's error text: no debug dump, no URL (the caller names the endpoint and
    the key), an S3 error document as Code: Message, a request that ran out its time said so."""
    line = text.split("\n\nDebug source", 1)[0].strip()
    m = re.search(r"<Code>(.*?)</Code>(?:.*?<Message>(.*?)</Message>)?", line, re.S)
    if m:
        line = line[: line.find("<?xml") if "<?xml" in line else m.start()].rstrip(" :")
        line += f": {m.group(1)}" + (f": {m.group(2)}" if m.group(2) else "")
    p = _PERFORMING.search(line)
    if p:
        seconds = float(p.group(3)) / {"µs": 1e6, "ms": 1e3, "s": 1}[p.group(4)]
        rest = line[p.end():]
        if timeout and seconds >= 0.95 * timeout and "error sending request" in rest:
            rest = f"no answer within the {timeout:g} s timeout"
        elif "ConnectionRefused" in text:
            rest = "connection refused"
        retries = f", {p.group(5)} retries" if p.group(5) and p.group(5) != "0" else ""
        line = f"{p.group(1)} failed after {seconds:.2g} s{retries}: {rest}"
    line = " ".join(line.split())
    return line if len(line) <= 300 else line[:297] + "..."


class _Connection:
    """Endpoint, region and credentials as resolved from arguments and the environment."""

    def __init__(self, endpoint: str | None, region: str | None, access_key: str | None,
                 secret_key: str | None, who: str = "S3") -> None:
        self.region = region or _env("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1"
        custom = endpoint or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        # A custom endpoint gets path-style requests; AWS's own is left to the clients (virtual hosts).
        self.custom_endpoint = custom.rstrip("/") if custom else None
        self.endpoint = self.custom_endpoint or f"https://s3.{self.region}.amazonaws.com"
        self.token: str | None = None
        if access_key or secret_key:
            if not (access_key and secret_key):
                raise BlobError(f"{who}: access_key and secret_key go together (one of them is missing)")
            self.access_key, self.secret_key = access_key, secret_key
        else:
            self.access_key = _env("AWS_ACCESS_KEY_ID")
            self.secret_key = _env("AWS_SECRET_ACCESS_KEY")
            self.token = _env("AWS_SESSION_TOKEN")
            if not (self.access_key and self.secret_key):
                raise BlobError(f"{who} ({self.endpoint}): no credentials (access_key/secret_key in the tier's "
                                "config, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment)")

    def boto3(self, connect: float, request: float, retries: int = 2):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.custom_endpoint, region_name=self.region, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, aws_session_token=self.token,
            config=Config(connect_timeout=connect, read_timeout=request,
                          retries={"max_attempts": retries, "mode": "standard"},
                          s3={"addressing_style": "path" if self.custom_endpoint else "virtual"}))


def _boto_error(exc: Exception, what: str, key: str, endpoint: str, who: str = "S3") -> BlobError:
    """A botocore exception as ours (`who`: the tier, for the message)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in ("NoSuchKey", "NotFound", "404") and key:
            return BlobNotFound(key)
        msg = f"{code}: {err.get('Message', '')}".strip(": ")
        if status >= 500:
            return StoreUnavailable(f"{who}: endpoint {endpoint} unavailable: {what}: {msg} (HTTP {status})")
        return BlobError(f"{who} ({endpoint}): {what}: {msg} (HTTP {status})")
    if isinstance(exc, BotoCoreError) and _UNAVAILABLE.search(f"{type(exc).__name__} {exc}"):
        return StoreUnavailable(f"{who}: endpoint {endpoint} unavailable: {what}: {_reason(str(exc))}")
    return BlobError(f"{who} ({endpoint}): {what}: {type(exc).__name__}: {_reason(str(exc))}")


def create_bucket(bucket: str, *, endpoint: str | None = None, region: str | None = None,
                  access_key: str | None = None, secret_key: str | None = None, object_lock: bool = False,
                  timeout: float | tuple[float, float] = (CONNECT_TIMEOUT, REQUEST_TIMEOUT)) -> None:
    """Create `bucket` (an administrator's step, tests and benchmarks: a store never creates its
    bucket). object_lock: enabled at creation (it cannot be turned on later everywhere), which
    makes the bucket versioned. A bucket that is already ours is not an error."""
    conn = _Connection(endpoint, region, access_key, secret_key)
    client = conn.boto3(*_timeouts(timeout))
    kw: dict = {"Bucket": bucket}
    if object_lock:
        kw["ObjectLockEnabledForBucket"] = True
    if not conn.custom_endpoint and conn.region != "us-east-1":
        kw["CreateBucketConfiguration"] = {"LocationConstraint": conn.region}
    try:
        client.create_bucket(**kw)
    except Exception as exc:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou":
            return
        raise _boto_error(exc, f"create bucket {bucket}", "", conn.endpoint) from None
    finally:
        client.close()


class _IterReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (boto3's upload of a stream)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return 0
            self.size += len(chunk)
            self._buf = memoryview(chunk).cast("B")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class _StreamReader(io.RawIOBase):
    """A sequential reader over one streaming GET: holds one chunk (<= STREAM_CHUNK) at a time."""

    def __init__(self, stream, store: "S3Store", key: str) -> None:
        self._stream = stream
        self._store = store
        self._key = key
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        while not self._buf:
            if self._stream is None:
                return False
            try:
                chunk = next(self._stream)
            except StopIteration:
                self._stream = None
                return False
            except (ObstoreError, OSError) as exc:
                self._stream = None
                raise self._store._error(exc, "read", self._key) from None
            self._buf = memoryview(chunk).cast("B")
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read of a closed blob reader")
        if not self._fill():
            return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if self.closed:
            raise ValueError("read of a closed blob reader")
        out = bytearray()
        while len(out) < size and self._fill():
            take = self._buf[: size - len(out)]
            out += take
            self._buf = self._buf[len(take):]
        return bytes(out)

    def readall(self) -> bytes:
        out = bytearray()
        while self._fill():
            out += self._buf
            self._buf = memoryview(b"")
        return bytes(out)

    def close(self) -> None:
        self._stream = None  # dropping the stream closes its connection
        self._buf = memoryview(b"")
        super().close()


class S3Store:
    """Blobs as objects `prefix/key` in an S3 bucket (see the module docstring)."""

    inline_reads = False

    def __init__(self, name: str, *, endpoint: str | None = None, bucket: str, region: str | None = None,
                 prefix: str = "", access_key: str | None = None, secret_key: str | None = None,
                 immutable: bool = False, retention_days: int | None = None,
                 timeout: float | tuple[float, float] = (CONNECT_TIMEOUT, REQUEST_TIMEOUT),
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE,
                 parts_in_flight: int = PARTS_IN_FLIGHT) -> None:
        if not bucket:
            raise BlobError(f"S3 tier {name!r}: no bucket")
        if immutable and not (retention_days and retention_days > 0):
            raise BlobError(f"S3 tier {name!r} is immutable: it needs retention_days > 0")
        if part_size < 5 << 20:
            raise BlobError(f"S3 tier {name!r}: part_size below S3's 5 MiB minimum")
        self.name = name
        self._who = f"S3 tier {name!r}"
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.immutable = immutable
        self.retention_days = retention_days
        self.connect_timeout, self.timeout = _timeouts(timeout)
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        self._conn = _Connection(endpoint, region, access_key, secret_key, self._who)
        self.endpoint = self._conn.endpoint
        self.region = self._conn.region
        self._store = self._object_store(timeout=timedelta(seconds=self.timeout))
        # A whole-object stream may take longer than one request: bounded per read instead.
        self._stream_store = self._object_store(timeout=timedelta(days=1),
                                                read_timeout=timedelta(seconds=self.timeout))
        self._boto = None
        self._boto_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.name!r}, {self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _object_store(self, **client_options) -> _ObjectStore:
        c = self._conn
        credential = {"access_key_id": c.access_key, "secret_access_key": c.secret_key, "token": c.token,
                      "expires_at": None}
        # obstore also reads AWS_* variables itself: a provider makes the credentials exactly ours
        # (no AWS_SESSION_TOKEN of the environment added to a config's keys). Asked once: no expiry.
        kw: dict = {"credential_provider": lambda: credential}
        if c.custom_endpoint:
            kw["endpoint"] = c.custom_endpoint
        # Over TLS the body is protected already: no second sha256 of every byte for the
        # signature (ingest hashed it while receiving); over plain HTTP the signature covers it.
        return _ObjectStore(
            self.bucket, region=c.region, virtual_hosted_style_request=not c.custom_endpoint, **kw,
            unsigned_payload=c.endpoint.startswith("https://"),
            client_options={"allow_http": c.endpoint.startswith("http://"),
                            "connect_timeout": timedelta(seconds=self.connect_timeout), **client_options},
            retry_config={"max_retries": 2, "retry_timeout": timedelta(seconds=self.timeout),
                          "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1),
                                      "base": 2}})

    def _client(self):
        """boto3, for Object Lock (writes of an immutable tier, its checks) only."""
        with self._boto_lock:
            if self._boto is None:
                self._boto = self._conn.boto3(self.connect_timeout, self.timeout)
            return self._boto

    # -- names and errors --------------------------------------------------------------------
    def _path(self, key: str) -> str:
        if not key or "/" in key or key in (".", "..") or key.strip() != key:
            raise BlobError(f"invalid blob key {key!r}")
        return self.prefix + key

    def _error(self, exc: BaseException, what: str, key: str) -> BlobError:
        if isinstance(exc, FileNotFoundError):
            return BlobNotFound(key)
        text = str(exc)
        if _UNAVAILABLE.search(text) or isinstance(exc, (TimeoutError, ConnectionError)):
            return StoreUnavailable(f"{self._who}: endpoint {self.endpoint} unavailable: {what} {key}: "
                                    f"{_reason(text, self.timeout)}")
        if "NoSuchBucket" in text:
            return BlobError(f"{self._who}: bucket {self.bucket!r} does not exist at {self.endpoint} ({what} {key})")
        return BlobError(f"{self._who} ({self.endpoint}, bucket {self.bucket!r}): {what} {key}: {_reason(text)}")

    def _retain_until(self) -> datetime:
        return datetime.now(timezone.utc) + timedelta(days=self.retention_days or 0)

    def _lock_args(self) -> dict:
        return {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": self._retain_until()}

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=self.part_size,
                             max_concurrency=self.parts_in_flight)
        cfg.max_in_memory_upload_chunks = self.parts_in_flight  # a stream's parts held at once (default 10)
        return cfg

    # -- writing ------------------------------------------------------------------------------
    def put_file(self, path: Path, key: str, *, owned: bool = False) -> None:
        path = Path(path)
        dest = self._path(key)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise BlobError(f"cannot read {path}: {exc.strerror}") from exc
        if self.immutable:
            try:
                self._client().upload_file(str(path), self.bucket, dest, ExtraArgs=self._lock_args(),
                                           Config=self._transfer_config())
            except Exception as exc:
                raise _boto_error(exc, f"put {key}", "", self.endpoint, self._who) from None
        else:
            try:
                obstore.put(self._store, dest, path, use_multipart=size > self.multipart_threshold,
                            chunk_size=self.part_size, max_concurrency=self.parts_in_flight)
            except (ObstoreError, OSError) as exc:
                raise self._error(exc, "put", key) from None
        if owned:
            path.unlink(missing_ok=True)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        dest = self._path(key)
        it = iter(chunks)
        if self.immutable:
            reader = _IterReader(it)
            try:
                self._client().upload_fileobj(reader, self.bucket, dest, ExtraArgs=self._lock_args(),
                                              Config=self._transfer_config())
            except Exception as exc:
                from botocore.exceptions import BotoCoreError, ClientError

                if not isinstance(exc, (BotoCoreError, ClientError)):
                    raise  # the source's own failure (nothing was completed under the key)
                raise _boto_error(exc, f"put {key}", "", self.endpoint, self._who) from None
            return reader.size
        # Up to the threshold in memory: a small blob is one PUT; a larger one a multipart
        # upload of what was read so far and the rest, part by part.
        head: list[bytes] = []
        held = 0
        for chunk in it:
            head.append(bytes(chunk))
            held += len(chunk)
            if held > self.multipart_threshold:
                break
        else:
            try:
                obstore.put(self._store, dest, b"".join(head), use_multipart=False)
            except (ObstoreError, OSError) as exc:
                raise self._error(exc, "put", key) from None
            return held
        size = 0

        def counted() -> Iterator[bytes]:
            nonlocal size
            while head:  # handed on one by one: the upload holds them only until their part is sent
                chunk = head.pop(0)
                size += len(chunk)
                yield chunk
            for chunk in it:
                size += len(chunk)
                yield chunk

        try:
            obstore.put(self._store, dest, counted(), use_multipart=True, chunk_size=self.part_size,
                        max_concurrency=self.parts_in_flight)
        except (ObstoreError, OSError) as exc:
            raise self._error(exc, "put", key) from None
        return size

    # -- reading ------------------------------------------------------------------------------
    def _check_range(self, key: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise BlobError(f"bad range {offset}+{length} of {key}")

    def _short(self, key: str, offset: int, length: int, got: int) -> BlobError:
        return BlobError(f"blob {key} is shorter than expected: {got} of {length} bytes at {offset}")

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        self._check_range(key, offset, length)
        if length == 0:
            self.stat(key)
            return b""
        try:
            data = obstore.get_range(self._store, self._path(key), start=offset, length=length)
        except (ObstoreError, OSError) as exc:
            raise self._range_error(exc, key, offset, length) from None
        return self._range_data(data, key, offset, length)

    async def read_range_async(self, key: str, offset: int, length: int) -> bytes:
        """`read_range` awaited on the caller's event loop (no thread)."""
        self._check_range(key, offset, length)
        if length == 0:
            await self.stat_async(key)
            return b""
        try:
            data = await obstore.get_range_async(self._store, self._path(key), start=offset, length=length)
        except (ObstoreError, OSError) as exc:
            raise self._range_error(exc, key, offset, length) from None
        return self._range_data(data, key, offset, length)

    def _range_error(self, exc: Exception, key: str, offset: int, length: int) -> Exception:
        """What a failed ranged GET raises: a 416 (the range lies past the end) is a short read."""
        err = self._error(exc, "read", key)
        # the status code, not a "416" inside the URL the message names (a port such as 34163)
        if type(err) is BlobError and _RANGE_NOT_SATISFIABLE.search(str(exc)):
            return self._short(key, offset, length, 0)
        return err

    def _range_data(self, data, key: str, offset: int, length: int) -> bytes:
        if len(data) != length:
            raise self._short(key, offset, length, len(data))
        return bytes(data)

    def open(self, key: str) -> BinaryIO:
        try:
            res = obstore.get(self._stream_store, self._path(key))
            stream = res.stream(min_chunk_size=STREAM_CHUNK)
        except (ObstoreError, OSError) as exc:
            raise self._error(exc, "open", key) from None
        return _StreamReader(stream, self, key)  # type: ignore[return-value]

    def stat(self, key: str) -> BlobInfo:
        try:
            meta = obstore.head(self._store, self._path(key))
        except (ObstoreError, OSError) as exc:
            raise self._error(exc, "stat", key) from None
        return BlobInfo(key, int(meta["size"]))

    async def stat_async(self, key: str) -> BlobInfo:
        try:
            meta = await obstore.head_async(self._store, self._path(key))
        except (ObstoreError, OSError) as exc:
            raise self._error(exc, "stat", key) from None
        return BlobInfo(key, int(meta["size"]))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except BlobNotFound:
            return False
        return True

    def list(self) -> Iterator[BlobInfo]:
        n = len(self.prefix)
        try:
            for batch in obstore.list(self._store, prefix=self.prefix.rstrip("/") or None, chunk_size=1000):
                for meta in batch:
                    key = meta["path"][n:]
                    if key and "/" not in key:
                        yield BlobInfo(key, int(meta["size"]))
        except (ObstoreError, OSError) as exc:
            raise self._error(exc, "list", self.prefix or "/") from None

    def local_path(self, key: str) -> Path | None:
        return None

    # -- deleting -----------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        dest = self._path(key)
        if self.immutable:
            self._delete_retained(key, dest)
            return
        try:
            obstore.delete(self._store, dest)
        except FileNotFoundError:
            return
        except (ObstoreError, OSError) as exc:
            raise self._error(exc, "delete", key) from None

    def _delete_retained(self, key: str, dest: str) -> None:
        """An immutable tier's delete: refused while the object is retained; after, every version."""
        client = self._client()
        try:
            head = client.head_object(Bucket=self.bucket, Key=dest)
        except Exception as exc:
            err = _boto_error(exc, f"delete {key}", key, self.endpoint, self._who)
            if isinstance(err, BlobNotFound) or "(HTTP 404)" in str(err):
                return
            raise err from None
        until = head.get("ObjectLockRetainUntilDate")
        if until is not None and until > datetime.now(timezone.utc):
            raise BlobError(f"immutable tier {self.name!r}: {key} is retained until {until.isoformat()} "
                            "(S3 Object Lock, compliance mode)")
        try:
            listing = client.list_object_versions(Bucket=self.bucket, Prefix=dest)
            for v in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
                if v["Key"] == dest:
                    client.delete_object(Bucket=self.bucket, Key=dest, VersionId=v["VersionId"])
        except Exception as exc:
            raise _boto_error(exc, f"delete {key}", "", self.endpoint, self._who) from None

    # -- start-up -----------------------------------------------------------------------------
    def check(self) -> None:
        """At start-up: the endpoint answers, the bucket exists and these credentials may list it;
        for an immutable tier, the bucket has S3 Object Lock enabled. Raises StoreUnavailable or
        BlobError with a one-line reason."""
        try:
            obstore.list_with_delimiter(self._store, prefix=self.prefix.rstrip("/") or None)
        except (ObstoreError, OSError) as exc:
            err = self._error(exc, "list", self.prefix or "/")
            if "NoSuchBucket" in str(exc) or isinstance(exc, FileNotFoundError):
                raise BlobError(f"S3 tier {self.name!r}: bucket {self.bucket!r} does not exist at "
                                f"{self.endpoint}") from None
            raise err from None
        if not self.immutable:
            return
        try:
            conf = self._client().get_object_lock_configuration(Bucket=self.bucket)
            enabled = conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except Exception as exc:
            from botocore.exceptions import ClientError

            if not isinstance(exc, ClientError) or int(
                    exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500:
                raise _boto_error(exc, "object lock configuration", "", self.endpoint, self._who) from None
            enabled = False  # no configuration, or a server that does not know Object Lock
        if not enabled:
            raise BlobError(f"S3 tier {self.name!r} is immutable, but bucket {self.bucket!r} at {self.endpoint} "
                            "has no S3 Object Lock (create it with Object Lock enabled, on a server that "
                            "supports it)")

    def close(self) -> None:
        with self._boto_lock:
            if self._boto is not None:
                self._boto.close()
                self._boto = None
