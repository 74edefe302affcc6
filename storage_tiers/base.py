"""The one interface every blob tier implements (filesystem today, S3 object storage next).

Blobs are immutable byte strings addressed by a key chosen by the archive. A store must make a
blob durable before `put_file`/`put_stream` return, and must never expose a half-written blob
under its final key. Nobody outside a store assumes a blob is a local file: a store that has a
local file to offer says so with `local_path`, and every caller has a streaming path that works
without it (`open`, `read_range`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Protocol, runtime_checkable


class BlobError(Exception):
    """A store could not do what was asked (I/O failure, disk full, store unreachable)."""


class BlobNotFound(BlobError):
    """No blob under that key."""


class StoreUnavailable(BlobError):
    """The store cannot be reached right now (an S3 endpoint down); other tiers still serve."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int


@runtime_checkable
class BlobStore(Protocol):
    name: str
    # True when `read_range` is a local pread of a few microseconds, cheap enough to run on an
    # event loop; False for stores whose reads wait on a network (they are awaited off the loop).
    inline_reads: bool

    def put_file(self, path: Path, key: str, *, owned: bool = False) -> None:
        """Store the finished local file `path` as `key`, durably. owned: the file is ours to
        consume (a rename when it is on the store's filesystem); otherwise it is left as is."""

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Store the bytes of `chunks` as `key`, durably, in bounded memory; returns the size."""

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (BlobError if the blob is shorter)."""

    def open(self, key: str) -> BinaryIO:
        """A sequential reader of the whole blob (BlobNotFound if there is none)."""

    def delete(self, key: str) -> None:
        """Remove `key` (no error if it is already gone)."""

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> BlobInfo:
        """Size of `key` (BlobNotFound if there is none)."""

    def list(self) -> Iterator[BlobInfo]:
        """Every blob in the store, in no particular order."""

    def local_path(self, key: str) -> Path | None:
        """A local file holding `key`'s bytes, for callers that can use one (pynetdicom sends a
        file in chunks); None when the store has no local file. Never required."""

    def close(self) -> None: ...
