"""Where pynetdicom writes incoming C-STORE data sets: our own spool file.

With `STORE_RECV_CHUNKED_DATASET`, pynetdicom streams each data set into a temporary file it
creates with `dimse_messages.NamedTemporaryFile` (compat.use_spool_factory). We substitute
`SpoolFile`, which
  - lives in the archive's session directory on the hot tier's filesystem (ingest then
    renames it into place: one write of the data, never the whole instance in memory),
  - hashes with sha256 while writing (ingest need not read it back),
  - records a write failure (disk full) instead of raising inside pynetdicom's network
    thread, so the C-STORE can be answered 0xA700 rather than the association dying, and
  - is registered under the thread that created it (the association's DUL reactor thread)
    until the C-STORE handler takes it (`finished()`): when the association ends, whatever
    is still registered for its DUL thread (a transfer aborted midway, a data set the handler
    never saw) is deleted by `discard_unfinished`.
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import compat


@dataclass
class Spooled:
    sha256: str
    size: int
    error: str | None


_lock = threading.Lock()
_unfinished: dict[threading.Thread, set["SpoolFile"]] = {}


class SpoolFile:
    directory: Path | None = None

    def __init__(self, *args, **kwargs) -> None:
        assert self.directory is not None, "SpoolFile.directory is not set"
        self.name = str(self.directory / f"{uuid.uuid4().hex}.dcm")
        self._fh = open(self.name, "xb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._error: str | None = None
        self._discarded = False
        self._owner = threading.current_thread()
        with _lock:
            _unfinished.setdefault(self._owner, set()).add(self)

    @property
    def file(self) -> "SpoolFile":
        return self

    def write(self, data: bytes) -> int:
        if self._error is None:
            try:
                self._fh.write(data)
                self._hash.update(data)
                self._size += len(data)
            except (OSError, ValueError) as exc:  # ValueError: discarded (closed) meanwhile
                self._error = getattr(exc, "strerror", None) or str(exc)
        return len(data)

    def flush(self) -> None:
        if self._error is None:
            try:
                self._fh.flush()
            except (OSError, ValueError) as exc:
                self._error = getattr(exc, "strerror", None) or str(exc)

    def close(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError as exc:
                self._error = self._error or exc.strerror or str(exc)

    def finished(self) -> Spooled:
        """State once pynetdicom has received the whole data set (the C-STORE handler runs).
        From here on the file belongs to the handler (ingest), not to the association."""
        with _lock:
            owned = _unfinished.get(self._owner)
            if owned is not None:
                owned.discard(self)
                if not owned:
                    del _unfinished[self._owner]
            discarded = self._discarded
        if discarded:
            return Spooled("", self._size, "the association ended before the data set was handled")
        self.flush()
        return Spooled(self._hash.hexdigest(), self._size, self._error)

    def discard(self) -> int:
        """Close and delete the file; returns the bytes it held."""
        self._discarded = True
        self._error = self._error or "discarded"
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass
        return self._size


def discard_unfinished(thread: threading.Thread) -> tuple[int, int]:
    """Delete every spool file `thread` created that no handler took; (files, bytes)."""
    with _lock:
        spools = _unfinished.pop(thread, set())
    size = 0
    for spool in spools:
        try:
            size += spool.discard()
        except OSError:
            pass
    return len(spools), size


def unfinished_count() -> int:
    with _lock:
        return sum(len(s) for s in _unfinished.values())


def install(directory: Path) -> None:
    SpoolFile.directory = Path(directory)
    compat.use_spool_factory(SpoolFile)
