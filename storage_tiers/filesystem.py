"""Filesystem blob store: the hot and warm tiers.

Layout under the root: `blobs/ab/cd/<key>`. Placing a blob is fsync(file) -> rename ->
fsync(directory), so after a crash a blob is either complete under its key or absent. A file
on the same filesystem is renamed into place (no copy); one elsewhere is copied in bounded
memory. Ranged reads (the frame path) keep a small cache of open descriptors and cost one
`os.pread`, so they may run on an event loop (`inline_reads`).
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from .base import BlobError, BlobInfo, BlobNotFound

CHUNK = 4 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStore:
    """Blobs as files under a root directory."""

    inline_reads = True

    def __init__(self, root: Path, name: str = "hot", fd_cache_size: int = 256,
                 readonly: bool = False) -> None:
        """readonly: only read blobs (ls, stats, verify): no directories are made."""
        self.name = name
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.readonly = readonly
        if not readonly:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_cache_size = fd_cache_size
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FilesystemStore({self.name!r}, {str(self.root)!r})"

    def path_of(self, key: str) -> Path:
        return self.blob_dir / key[:2] / key[2:4] / key

    # -- writing -----------------------------------------------------------
    def _place(self, tmp: Path, key: str) -> None:
        """Durably rename a complete file on this filesystem into place as `key`."""
        dest = self.path_of(key)
        new_dirs = not dest.parent.exists()
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fsync_file(tmp)
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            raise BlobError(f"cannot place blob: {exc.strerror}") from exc
        fsync_dir(dest.parent)
        if new_dirs:
            fsync_dir(dest.parent.parent)
            fsync_dir(self.blob_dir)

    def put_file(self, path: Path, key: str, *, owned: bool = False) -> None:
        path = Path(path)
        if owned:
            try:
                self._place(path, key)
                return
            except BlobError as exc:
                if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno != errno.EXDEV:
                    raise
        with open(path, "rb") as fh:
            self.put_stream(key, iter(lambda: fh.read(CHUNK), b""))
        if owned:
            path.unlink(missing_ok=True)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        tmp = self.blob_dir / f".incoming-{uuid.uuid4().hex}"
        size = 0
        try:
            with open(tmp, "xb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
            self._place(tmp, key)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    # -- reading -----------------------------------------------------------
    def _fd(self, key: str) -> int:
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
                return fd
        try:
            fd = os.open(self.path_of(key), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc
        with self._lock:
            old = self._fds.get(key)
            if old is not None:
                os.close(fd)
                return old
            self._fds[key] = fd
            while len(self._fds) > self._fd_cache_size:
                _, victim = self._fds.popitem(last=False)
                os.close(victim)
        return fd

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(key), length, offset)
        if len(data) != length:
            raise BlobError("blob is shorter than expected")
        return data

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path_of(key), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def local_path(self, key: str) -> Path | None:
        path = self.path_of(key)
        return path if path.exists() else None

    def delete(self, key: str) -> None:
        with self._lock:
            fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
        path = self.path_of(key)
        path.unlink(missing_ok=True)
        if path.parent.exists():
            fsync_dir(path.parent)

    def exists(self, key: str) -> bool:
        return self.path_of(key).exists()

    def stat(self, key: str) -> BlobInfo:
        try:
            return BlobInfo(key, self.path_of(key).stat().st_size)
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def list(self) -> Iterator[BlobInfo]:
        if not self.blob_dir.exists():
            return
        for dirpath, _dirs, files in os.walk(self.blob_dir):
            for f in files:
                if f.startswith(".incoming-"):
                    continue
                try:
                    yield BlobInfo(f, os.stat(os.path.join(dirpath, f)).st_size)
                except FileNotFoundError:
                    continue

    def sweep_incoming(self, older_than: float = 6 * 3600) -> int:
        """Remove half-copied files a crashed put_stream left (never visible under a key).
        Only old ones: another process may be copying into this store right now."""
        import time

        n = 0
        if self.blob_dir.exists():
            now = time.time()
            for p in self.blob_dir.glob(".incoming-*"):
                try:
                    if now - p.stat().st_mtime > older_than:
                        p.unlink(missing_ok=True)
                        n += 1
                except FileNotFoundError:
                    continue
        return n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
