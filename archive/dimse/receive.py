"""Where pynetdicom writes incoming C-STORE data sets: our own spool file.

With `STORE_RECV_CHUNKED_DATASET`, pynetdicom streams each data set into a temporary file it
creates with `dimse_messages.NamedTemporaryFile`. We substitute `SpoolFile`, which
  - lives in the archive's session directory on the hot tier's filesystem (ingest then
    renames it into place: one write of the data, never the whole instance in memory),
  - hashes with sha256 while writing (ingest need not read it back), and
  - records a write failure (disk full) instead of raising inside pynetdicom's network
    thread, so the C-STORE can be answered 0xA700 rather than the association dying.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import dimse_messages


@dataclass
class Spooled:
    sha256: str
    size: int
    error: str | None


class SpoolFile:
    directory: Path | None = None

    def __init__(self, *args, **kwargs) -> None:
        assert self.directory is not None, "SpoolFile.directory is not set"
        self.name = str(self.directory / f"{uuid.uuid4().hex}.dcm")
        self._fh = open(self.name, "xb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._error: str | None = None

    @property
    def file(self) -> "SpoolFile":
        return self

    def write(self, data: bytes) -> int:
        if self._error is None:
            try:
                self._fh.write(data)
                self._hash.update(data)
                self._size += len(data)
            except OSError as exc:
                self._error = exc.strerror or str(exc)
        return len(data)

    def flush(self) -> None:
        if self._error is None:
            try:
                self._fh.flush()
            except OSError as exc:
                self._error = exc.strerror or str(exc)

    def close(self) -> None:
        if not self._fh.closed:
            try:
                self._fh.close()
            except OSError as exc:
                self._error = self._error or exc.strerror or str(exc)

    def finished(self) -> Spooled:
        """State once pynetdicom has received the whole data set (the C-STORE handler runs)."""
        self.flush()
        return Spooled(self._hash.hexdigest(), self._size, self._error)


def install(directory: Path) -> None:
    SpoolFile.directory = Path(directory)
    dimse_messages.NamedTemporaryFile = SpoolFile  # type: ignore[assignment]
