"""The de-identified instance as a stream: a new header, then the stored pixel data element.

The stored bytes come through `Archive.instance_chunks` (sha256-checked: a damaged blob ends
the stream with Damaged before its last chunk). The header (everything before the Pixel Data
element, whose offset ingest recorded) is parsed by pydicom and rewritten de-identified in the
same transfer syntax; the Pixel Data element (encapsulated items or native bytes) is then
copied chunk by chunk without being decoded, so memory stays bounded for a 2 GB instance.
Elements after Pixel Data (trailing padding, digital signatures) are dropped, as Table E.1-1
asks of signatures.
"""
from __future__ import annotations

import io
import struct
from typing import Iterator

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from .deidentifier import DeidError

MAX_HEADER = 64 << 20  # a header (or a whole instance without pixel data) parsed in memory
ITEM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE0DD


class _Reader:
    """Exact reads over a chunk iterator (the rest drained at the end, so the hash is checked)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = memoryview(b"")

    def _fill(self) -> bool:
        for chunk in self.chunks:
            if chunk:
                self.buf = memoryview(bytes(self.buf) + chunk) if self.buf else memoryview(chunk)
                return True
        return False

    def read(self, n: int) -> bytes:
        parts, need = [], n
        while need:
            if not self.buf and not self._fill():
                raise DeidError(f"stored instance ends early ({n - need} of {n} bytes)")
            take = self.buf[:need]
            parts.append(bytes(take))
            self.buf = self.buf[len(take):]
            need -= len(take)
        return b"".join(parts)

    def copy(self, n: int) -> Iterator[bytes]:
        """`n` bytes as they come, in the store's chunks."""
        while n:
            if not self.buf and not self._fill():
                raise DeidError("stored instance ends inside its pixel data")
            take = self.buf[:n]
            self.buf = self.buf[len(take):]
            n -= len(take)
            yield bytes(take)

    def drain(self) -> None:
        self.buf = memoryview(b"")
        for _ in self.chunks:
            pass


def _header(data: bytes) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise DeidError(f"header cannot be parsed: {type(exc).__name__}: {exc}") from exc


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pixel_element(reader: _Reader, implicit: bool) -> Iterator[bytes]:
    """The Pixel Data element exactly as stored: its header, then native bytes or every item
    up to and including the sequence delimiter."""
    head = reader.read(8)
    group, elem = struct.unpack("<HH", head[:4])
    if implicit:
        (length,) = struct.unpack("<I", head[4:8])
    else:
        extra = reader.read(4)
        head += extra
        (length,) = struct.unpack("<I", extra)
    yield head
    if length != 0xFFFFFFFF:
        yield from reader.copy(length)
        return
    while True:
        item = reader.read(8)
        tag_g, tag_e, n = struct.unpack("<HHI", item)
        tag = (tag_g << 16) | tag_e
        yield item
        if tag == SEQ_DELIM:
            return
        if tag != ITEM or n == 0xFFFFFFFF:
            raise DeidError(f"malformed encapsulated pixel data (item ({tag_g:04X},{tag_e:04X}))")
        yield from reader.copy(n)


def deidentified_chunks(deid, archive, rec) -> Iterator[bytes]:
    """See the module docstring; DeidError before the first byte when the header cannot be
    de-identified."""
    if deid.excluded(rec) is not None:
        raise DeidError(f"instance {rec.sop} is left out of de-identified sets ({deid.excluded(rec)})")
    if str(rec.ts) == DeflatedExplicitVRLittleEndian and rec.pixel_offset is not None:
        raise DeidError("deflated instances with pixel data are not de-identified")
    head_len = rec.pixel_offset if rec.pixel_offset is not None else rec.size
    if head_len > MAX_HEADER:
        raise DeidError(f"header of {head_len} bytes is larger than {MAX_HEADER} bytes")
    reader = _Reader(iter(archive.instance_chunks(rec, source="de-identified retrieve")))
    ds = _header(reader.read(head_len))
    out = deid.dataset(ds)
    yield _encode(out)
    if rec.pixel_offset is not None:
        yield from _pixel_element(reader, str(rec.ts) == ImplicitVRLittleEndian)
    reader.drain()
