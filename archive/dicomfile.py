"""Parse a stored DICOM file once: its header, and where each frame's bytes lie.

This is the only place the archive reads a Part 10 file's structure. The header is read
with pydicom up to (not into) Pixel Data; the pixel data element is then walked item by
item (8-byte item headers, values skipped) so a 2 GB slide is never read into memory.
The result is a frame table: for each frame, the (offset, length) of its fragment(s) in
the file. The frame path later serves frames from that table with ranged reads.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
ITEM = 0xE000FFFE  # (FFFE,E000) read little endian as one uint32: group first
SEQ_DELIM = 0xE0DDFFFE
DEFLATED = {"1.2.840.10008.1.2.1.99"}  # Deflated Explicit VR LE: the whole data set is zlib


class DicomFileError(ValueError):
    """The file is not a DICOM file we can store (truncated, malformed, no UIDs...)."""


@dataclass
class Fragment:
    offset: int
    length: int


@dataclass
class ParsedFile:
    """What ingest needs to know about a file, read once."""

    file_meta: FileMetaDataset
    dataset: Dataset  # header only, no pixel data
    transfer_syntax: UID
    pixel_offset: int | None = None  # offset of the Pixel Data element's tag
    pixel_value_offset: int | None = None
    pixel_length: int | None = None  # None for encapsulated (undefined length)
    encapsulated: bool = False
    frames: list[list[Fragment]] = field(default_factory=list)
    end_of_dataset: int = 0
    deflated: bool = False

    @property
    def number_of_frames(self) -> int:
        return len(self.frames)


def _read_exact(fp: BinaryIO, n: int) -> bytes:
    data = fp.read(n)
    if len(data) != n:
        raise DicomFileError("file is truncated inside the pixel data")
    return data


def _int_attr(ds: Dataset, name: str, default: int | None = None) -> int | None:
    value = ds.get(name, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomFileError(f"{name} has an invalid value {value!r}")


def parse_file(path: Path) -> ParsedFile:
    """Read header and frame table of a Part 10 file. Raises DicomFileError on bad input."""
    size = path.stat().st_size
    with open(path, "rb") as fp:
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
        except InvalidDicomError as exc:
            raise DicomFileError(f"not a DICOM Part 10 file: {exc}") from exc
        except (EOFError, OSError, ValueError, KeyError, struct.error, TypeError) as exc:
            raise DicomFileError(f"malformed or truncated DICOM data: {exc}") from exc
        except Exception as exc:  # pydicom raises a variety of errors on garbage
            raise DicomFileError(f"malformed DICOM data: {type(exc).__name__}: {exc}") from exc
        meta = ds.file_meta
        ts = meta.get("TransferSyntaxUID")
        if not ts:
            raise DicomFileError("file meta has no Transfer Syntax UID")
        ts = UID(str(ts))
        parsed = ParsedFile(file_meta=meta, dataset=ds, transfer_syntax=ts, end_of_dataset=size)
        if str(ts) in DEFLATED:
            # Deflated data sets have no byte offsets to record; stored and served whole.
            parsed.deflated = True
            return parsed
        pos = fp.tell()
        if pos >= size:
            return parsed  # no pixel data
        head = fp.read(8)
        if len(head) < 8:
            raise DicomFileError("file is truncated after the header")
        group, elem = struct.unpack("<HH", head[:4])
        tag = (group << 16) | elem
        if tag not in PIXEL_TAGS:
            # Anything else here means pydicom stopped early: a malformed data set.
            raise DicomFileError(f"unexpected element ({group:04X},{elem:04X}) where pixel data was expected")
        parsed.pixel_offset = pos
        implicit = ts == pydicom.uid.ImplicitVRLittleEndian
        if implicit:
            (length,) = struct.unpack("<I", head[4:8])
            value_offset = pos + 8
        else:
            vr = head[4:6]
            if vr in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OL", b"OV"):
                (length,) = struct.unpack("<I", _read_exact(fp, 4))
                value_offset = pos + 12
            else:
                raise DicomFileError(f"pixel data has an invalid VR {vr!r}")
        parsed.pixel_value_offset = value_offset
        if length == 0xFFFFFFFF:
            parsed.encapsulated = True
            parsed.frames = _encapsulated_frames(fp, value_offset, size, ds, ts)
        else:
            if value_offset + length > size:
                raise DicomFileError("file is truncated inside the pixel data")
            parsed.pixel_length = length
            parsed.frames = _native_frames(ds, value_offset, length)
        return parsed


def _native_frames(ds: Dataset, value_offset: int, length: int) -> list[list[Fragment]]:
    rows = _int_attr(ds, "Rows")
    cols = _int_attr(ds, "Columns")
    bits = _int_attr(ds, "BitsAllocated")
    spp = _int_attr(ds, "SamplesPerPixel", 1)
    n = _int_attr(ds, "NumberOfFrames", 1) or 1
    if not rows or not cols or not bits:
        raise DicomFileError("pixel data without Rows, Columns or Bits Allocated")
    if bits % 8:
        return []  # bit-packed frames are not byte addressable; served by decoding
    frame_len = rows * cols * spp * (bits // 8)
    if str(ds.get("PhotometricInterpretation", "")).startswith("YBR_FULL_422"):
        frame_len = frame_len * 2 // 3
    if frame_len * n > length:
        raise DicomFileError(
            f"pixel data holds {length} bytes, {n} frames of {rows}x{cols} need {frame_len * n}"
        )
    return [[Fragment(value_offset + i * frame_len, frame_len)] for i in range(n)]


def _encapsulated_frames(
    fp: BinaryIO, value_offset: int, size: int, ds: Dataset, ts: UID
) -> list[list[Fragment]]:
    fp.seek(value_offset)
    items: list[Fragment] = []
    bot: bytes | None = None
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise DicomFileError("file is truncated inside the encapsulated pixel data")
        tag, length = struct.unpack("<II", head)
        pos = fp.tell()
        if tag == SEQ_DELIM:
            break
        if tag != ITEM or length == 0xFFFFFFFF:
            raise DicomFileError("malformed encapsulated pixel data (bad item header)")
        if pos + length > size:
            raise DicomFileError("file is truncated inside the encapsulated pixel data")
        if bot is None:
            bot = _read_exact(fp, length) if length else b""
        else:
            items.append(Fragment(pos, length))
            fp.seek(length, 1)
    n = _int_attr(ds, "NumberOfFrames", 1) or 1
    if not items:
        raise DicomFileError("encapsulated pixel data holds no fragments")
    if len(items) == n:
        return [[f] for f in items]
    if n == 1:
        return [items]
    offsets = _offset_table(ds, bot, n)
    if offsets is not None:
        return _split_by_offsets(items, offsets, value_offset, bot)
    return _split_by_markers(fp, items, n, ts)


def _offset_table(ds: Dataset, bot: bytes | None, n: int) -> list[int] | None:
    eot = ds.get("ExtendedOffsetTable")
    if eot is not None and len(eot) == 8 * n:
        return list(struct.unpack(f"<{n}Q", bytes(eot)))
    if bot and len(bot) == 4 * n:
        return list(struct.unpack(f"<{n}I", bot))
    return None


def _split_by_offsets(
    items: list[Fragment], offsets: list[int], value_offset: int, bot: bytes | None
) -> list[list[Fragment]]:
    # Offsets count from the first byte of the first fragment's item header.
    first_item = items[0].offset - 8
    starts = {o: i for i, o in enumerate(offsets)}
    frames: list[list[Fragment]] = [[] for _ in offsets]
    current = -1
    for frag in items:
        rel = frag.offset - 8 - first_item
        if rel in starts:
            current = starts[rel]
        if current < 0:
            raise DicomFileError("offset table does not point at the first fragment")
        frames[current].append(frag)
    if any(not f for f in frames):
        raise DicomFileError("offset table does not match the fragments")
    return frames


_FRAME_START = {
    b"\xff\xd8": "jpeg",
    b"\xff\x4f": "j2k",
    b"\x00\x00": "jp2",
    b"\xff\x0a": "jxl",
}


def _split_by_markers(fp: BinaryIO, items: list[Fragment], n: int, ts: UID) -> list[list[Fragment]]:
    """No usable offset table: a new frame starts at each fragment opening with a codestream marker."""
    frames: list[list[Fragment]] = []
    for frag in items:
        fp.seek(frag.offset)
        start = fp.read(2)
        if start in _FRAME_START or not frames:
            frames.append([frag])
        else:
            frames[-1].append(frag)
    if len(frames) != n:
        raise DicomFileError(
            f"cannot map {len(items)} fragments to {n} frames (no offset table, no frame markers)"
        )
    return frames
