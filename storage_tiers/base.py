"""The one interface every blob tier implements.

Blobs are immutable byte strings addressed by a key chosen by the archive. A tier must
make a committed blob durable before `BlobWriter.commit` returns, and must never expose
a half-written blob under its final key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol


class BlobError(Exception):
    """A tier could not do what was asked (missing blob, I/O failure, disk full)."""


class BlobNotFound(BlobError):
    pass


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int


class BlobWriter(Protocol):
    """A blob being written: write chunks, then commit (durable + visible) or abort."""

    def write(self, data: bytes | memoryview) -> None: ...
    def commit(self, key: str) -> None: ...
    def abort(self) -> None: ...


class BlobStore(Protocol):
    name: str

    def writer(self) -> BlobWriter: ...
    def adopt(self, path: Path, key: str) -> None:
        """Take a finished local file (same filesystem) as blob `key`, durably."""
    def read_range(self, key: str, offset: int, length: int) -> bytes: ...
    def open(self, key: str) -> BinaryIO: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self) -> Iterator[BlobInfo]: ...
