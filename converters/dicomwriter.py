"""Streaming writer for encapsulated multi-frame DICOM files.

The header (everything before Pixel Data) is written by pydicom; the pixel
data is then appended frame by frame as one fragment per frame, so a slide
never sits in memory. Space for the Basic Offset Table (4-byte offsets) or,
for instances that may pass 4 GiB, the Extended Offset Table (8-byte offsets
and lengths) is reserved up front and filled in when the last frame is in.
The file is written under a temporary name, fsync'd and renamed by the
caller (see ``convert.Conversion``) once every instance is complete.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import io

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID

from .errors import ConversionError

_ITEM = b"\xfe\xff\x00\xe0"
_SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PIXEL_DATA_UNDEFINED = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
BOT_LIMIT = 2**32 - 1


class FrameWriter:
    """Write ``ds`` + ``n_frames`` encapsulated frames to ``path``."""

    def __init__(self, path: Path, ds: Dataset, n_frames: int, transfer_syntax: str, *,
                 extended_offsets: bool = False, buffer_size: int = 1 << 20):
        self.path = Path(path)
        self.n_frames = n_frames
        self.extended = extended_offsets
        self.count = 0
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self._ratio_pos = -1
        self._pos = 0  # offset of the next item, relative to the first frame item
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = UID(transfer_syntax)
        meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1434.1")
        meta.ImplementationVersionName = "PATHPACS_01"
        ds.file_meta = meta
        try:
            self.f = open(self.path, "xb", buffering=buffer_size)
        except OSError as exc:
            raise ConversionError(f"cannot write {self.path.parent}: {exc.strerror}") from None
        self.uncompressed_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * n_frames
        try:
            header = io.BytesIO()
            dcmwrite(header, ds, enforce_file_format=True)
            header = header.getvalue()
            # LossyImageCompressionRatio placeholder (see metadata.RATIO_PLACEHOLDER)
            self._ratio_pos = header.find(b"99999999.999")
            self.f.write(header)
            if self.extended:
                # (7FE0,0001) Extended Offset Table, (7FE0,0002) Extended Offset Table Lengths, OV
                nbytes = 8 * n_frames
                self.f.write(b"\xe0\x7f\x01\x00OV\x00\x00" + struct.pack("<I", nbytes))
                self._eot_pos = self.f.tell()
                self.f.write(bytes(nbytes))
                self.f.write(b"\xe0\x7f\x02\x00OV\x00\x00" + struct.pack("<I", nbytes))
                self._eotl_pos = self.f.tell()
                self.f.write(bytes(nbytes))
            self.f.write(_PIXEL_DATA_UNDEFINED)
            if self.extended:
                self.f.write(_ITEM + b"\x00\x00\x00\x00")  # empty Basic Offset Table
            else:
                self.f.write(_ITEM + struct.pack("<I", 4 * n_frames))
                self._bot_pos = self.f.tell()
                self.f.write(bytes(4 * n_frames))
        except OSError as exc:
            self.abort()
            raise ConversionError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        except Exception:
            self.abort()
            raise

    def add(self, frame: bytes) -> None:
        n = len(frame)
        pad = n & 1
        self.offsets.append(self._pos)
        self.lengths.append(n + pad)
        f = self.f
        f.write(_ITEM + struct.pack("<I", n + pad))
        f.write(frame)
        if pad:
            f.write(b"\x00")
        self._pos += 8 + n + pad
        self.count += 1

    def finish(self) -> None:
        if self.count != self.n_frames:
            raise RuntimeError(f"{self.path.name}: wrote {self.count} of {self.n_frames} frames")
        f = self.f
        f.write(_SEQ_DELIM)
        if self.extended:
            f.seek(self._eot_pos)
            f.write(struct.pack(f"<{self.n_frames}Q", *self.offsets))
            f.seek(self._eotl_pos)
            f.write(struct.pack(f"<{self.n_frames}Q", *self.lengths))
        else:
            if self.offsets and self.offsets[-1] > BOT_LIMIT:
                raise RuntimeError("basic offset table overflow; extended offsets were needed")
            f.seek(self._bot_pos)
            f.write(struct.pack(f"<{self.n_frames}I", *self.offsets))
        if self._ratio_pos >= 0:
            compressed = max(1, sum(self.lengths))
            ratio = f"{self.uncompressed_bytes / compressed:12.3f}"
            f.seek(self._ratio_pos)
            f.write(ratio.encode()[:12])
        f.flush()
        os.fsync(f.fileno())
        f.close()

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
