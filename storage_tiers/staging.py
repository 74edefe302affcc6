"""Local staging: where incoming bytes are received before they become a blob of some tier.

One process that receives owns one session directory, `ROOT/<session>/`, held by an exclusive
flock on `ROOT/<session>/lock`. A session directory whose lock nobody holds was left by a crash
and is removed by `sweep` (safe while other processes are receiving). Every receiver (C-STORE,
STOW-RS, import, conversion) writes through a `Spool`: the bytes are hashed with sha256 as they
are written, once, and a write failure (disk full) is recorded instead of raised mid-stream so
the receiver can answer with the right status.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Spooled:
    """A finished spool: its file, digest and size, or the write error that stopped it."""

    path: Path
    sha256: str
    size: int
    error: OSError | None = None


class Spool:
    """A file being received into staging, hashed while written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = open(path, "xb", buffering=0)
        self._hash = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of `data`; after a failure, later writes are dropped (see `error`)."""
        n = len(data)
        if self.error is not None:
            return n
        try:
            view = memoryview(data)
            while view:
                w = self._fh.write(view)
                view = view[w:]
            self._hash.update(data)
            self.size += n
        except OSError as exc:
            self.error = exc
        except ValueError:  # written after discard() closed it (an aborted transfer)
            self.error = OSError("the spool file was discarded")
        return n

    def finish(self) -> Spooled:
        """Close the file (it stays for the caller to place or discard)."""
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError as exc:
                self.error = self.error or exc
        return Spooled(self.path, self._hash.hexdigest(), self.size, self.error)

    def discard(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError:
                pass
        self.path.unlink(missing_ok=True)

    @property
    def closed(self) -> bool:
        return self._fh.closed


class Staging:
    """This process's session directory under `root` (created on open, removed on close)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.session = uuid.uuid4().hex
        self.dir = self.root / self.session
        self.dir.mkdir()
        self._lock = os.open(self.dir / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def path(self, suffix: str = ".part") -> Path:
        """A fresh file name in the session directory."""
        return self.dir / f"{uuid.uuid4().hex}{suffix}"

    def spool(self, suffix: str = ".part") -> Spool:
        return Spool(self.path(suffix))

    def session_alive(self, session: str) -> bool:
        """True while the process that owns `session` still holds its lock."""
        if session == self.session:
            return True
        lock = self.root / session / "lock"
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

    def others_alive(self) -> bool:
        """Whether another live process has a session here (a server using the archive)."""
        return any(p.is_dir() and p.name != self.session and self.session_alive(p.name)
                   for p in self.root.iterdir())

    def sweep(self) -> int:
        """Remove session directories left by crashed processes; returns how many."""
        n = 0
        for p in self.root.iterdir():
            if p.is_dir() and not self.session_alive(p.name):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    def close(self) -> None:
        if self._lock >= 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.close(self._lock)
            self._lock = -1
