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

import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from storage_tiers import Spool

from . import compat


@dataclass
class Spooled:
    sha256: str
    size: int
    error: str | None


_lock = threading.Lock()
_unfinished: dict[threading.Thread, set["SpoolFile"]] = {}


class SpoolFile:
    """The file-like object pynetdicom writes a data set into: the staging Spool (the one
    receiving file of every entry point) with the interface pynetdicom's temporary file has,
    registered under its association until the C-STORE handler takes it."""

    directory: Path | None = None

    def __init__(self, *args, **kwargs) -> None:
        assert self.directory is not None, "SpoolFile.directory is not set"
        self._spool = Spool(self.directory / f"{uuid.uuid4().hex}.dcm")
        self.name = str(self._spool.path)
        self._discarded = False
        self._owner = threading.current_thread()
        with _lock:
            _unfinished.setdefault(self._owner, set()).add(self)

    @property
    def file(self) -> "SpoolFile":
        return self

    def write(self, data: bytes) -> int:
        return self._spool.write(data)

    def flush(self) -> None:  # unbuffered: every write is already in the file
        pass

    def close(self) -> None:
        self._spool.finish()

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
            return Spooled("", self._spool.size, "the association ended before the data set was handled")
        done = self._spool.finish()
        error = None if done.error is None else (done.error.strerror or str(done.error))
        return Spooled(done.sha256, done.size, error)

    def discard(self) -> int:
        """Close and delete the file; returns the bytes it held."""
        self._discarded = True
        size = self._spool.size
        self._spool.discard()
        return size


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
