"""Filesystem blob tier: the hot/warm store.

Layout under the root: `blobs/ab/cd/<key>` for committed blobs and `tmp/<session>/` for
blobs being written. Each process that writes owns one session directory, held by an
exclusive flock on `tmp/<session>/lock`; a session directory whose lock nobody holds was
left by a crash and is removed by `sweep_tmp` (safe while other processes are writing).
Commit is fsync(file) -> rename -> fsync(directory), so after a crash a blob is either
complete under its key or only a temp file.
The frame path uses `read_range`, which keeps a small cache of open descriptors and uses
one `os.pread` per call.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Iterator

from .base import BlobError, BlobInfo, BlobNotFound


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobWriter:
    """Writes a blob to a temp file; `commit` makes it durable and visible under its key."""

    def __init__(self, store: "FilesystemStore") -> None:
        self._store = store
        self.tmp_path = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._fh = open(self.tmp_path, "xb", buffering=0)
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self._fh.write(view)
            view = view[n:]
        self.size += len(data)

    def close(self) -> None:
        """Finish writing but keep the temp file (the caller will `adopt` or remove it)."""
        if not self._fh.closed:
            self._fh.close()

    def commit(self, key: str) -> None:
        try:
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
        self._store.adopt(self.tmp_path, key)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp_path.unlink(missing_ok=True)


class FilesystemStore:
    """Blobs as files under a root directory."""

    def __init__(self, root: Path, name: str = "hot", fd_cache_size: int = 256,
                 readonly: bool = False) -> None:
        """readonly: only read blobs (ls, stats, verify): no directories made, no session."""
        self.name = name
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.tmp_root = self.root / "tmp"
        self.readonly = readonly
        self.session = ""
        self._session_lock = -1
        if not readonly:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_root.mkdir(parents=True, exist_ok=True)
            self.session = uuid.uuid4().hex
            self.tmp_dir = self.tmp_root / self.session
            self.tmp_dir.mkdir()
            self._session_lock = os.open(self.tmp_dir / "lock", os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._session_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_cache_size = fd_cache_size
        self._lock = threading.Lock()

    # -- paths -------------------------------------------------------------
    def path_of(self, key: str) -> Path:
        return self.blob_dir / key[:2] / key[2:4] / key

    # -- writing -----------------------------------------------------------
    def writer(self) -> FileBlobWriter:
        return FileBlobWriter(self)

    def adopt(self, path: Path, key: str) -> None:
        """Durably move a finished file on the same filesystem into place as `key`."""
        dest = self.path_of(key)
        new_dirs = not dest.parent.exists()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(path, dest)
        except OSError as exc:
            raise BlobError(f"cannot place blob {key}: {exc.strerror}") from exc
        fsync_dir(dest.parent)
        if new_dirs:
            fsync_dir(dest.parent.parent)
            fsync_dir(self.blob_dir)

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
            raise BlobError(f"blob {key} is shorter than expected")
        return data

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path_of(key), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def delete(self, key: str) -> None:
        with self._lock:
            fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
        path = self.path_of(key)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def exists(self, key: str) -> bool:
        return self.path_of(key).exists()

    def size(self, key: str) -> int:
        try:
            return self.path_of(key).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def list(self) -> Iterator[BlobInfo]:
        if not self.blob_dir.exists():
            return
        for dirpath, _dirs, files in os.walk(self.blob_dir):
            for f in files:
                yield BlobInfo(f, os.stat(os.path.join(dirpath, f)).st_size)

    def session_alive(self, session: str) -> bool:
        """True while the process that owns `session` still holds its lock."""
        if session == self.session:
            return True
        lock = self.tmp_root / session / "lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def sweep_tmp(self) -> int:
        """Remove session directories left by crashed processes; returns how many."""
        n = 0
        for p in self.tmp_root.iterdir():
            if p.is_dir() and not self.session_alive(p.name):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._session_lock >= 0:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            os.close(self._session_lock)
            self._session_lock = -1
