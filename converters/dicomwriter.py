"""Streaming writer for encapsulated multi-frame DICOM files.

The header (everything before Pixel Data) is encoded by converters.dcmenc; the pixel
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

import threading

from .dcmenc import Dataset, encode_file

from .errors import ConversionError

_ITEM = b"\xfe\xff\x00\xe0"
_SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_PIXEL_DATA_UNDEFINED = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
BOT_LIMIT = 2**32 - 1
IMPLEMENTATION_CLASS_UID = "2.25.196159532212183542326366305470468545375"  # pathpacs converters
SYNC_EVERY = 64 << 20  # start write-back every 64 MiB


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
        self._synced = 0
        self._sync_thread: threading.Thread | None = None
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._pos = 0  # offset of the next item, relative to the first frame item
        meta = Dataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = "PATHPACS_01"
        try:
            self.f = open(self.path, "xb", buffering=buffer_size)
        except OSError as exc:
            raise ConversionError(f"cannot write {self.path.parent}: {exc.strerror}") from None
        self.uncompressed_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * n_frames
        self._fd = self.f.fileno()
        try:
            header = encode_file(ds, meta)
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
        if self._pos - self._synced >= SYNC_EVERY:
            self._background_sync()

    def add_from_file(self, prefix: bytes, src_fd: int, offset: int, count: int) -> None:
        """Append a frame made of ``prefix`` + ``count`` bytes at ``offset`` of ``src_fd``.

        The body is copied by the kernel (``copy_file_range``): tile bytes never pass
        through Python. Falls back to pread + write where the kernel will not.
        """
        n = len(prefix) + count
        pad = n & 1
        self.offsets.append(self._pos)
        self.lengths.append(n + pad)
        f = self.f
        f.write(_ITEM + struct.pack("<I", n + pad))
        if prefix:
            f.write(prefix)
        f.flush()
        fd = self._fd
        done = 0
        if self._kernel_copy:
            try:
                while done < count:
                    k = os.copy_file_range(src_fd, fd, count - done, offset + done)
                    if k <= 0:
                        break
                    done += k
            except OSError:
                self._kernel_copy = False
        if done < count:
            data = os.pread(src_fd, count - done, offset + done)
            if len(data) != count - done:
                raise ConversionError("truncated file: tile data runs past the end of the file")
            f.write(data)
            f.flush()
        if pad:
            f.write(b"\x00")
        self._pos += 8 + n + pad
        self.count += 1
        if self._pos - self._synced >= SYNC_EVERY:
            self._background_sync()

    def add_ranges(self, ranges: list, src_fd: int, pool=None, parts: int = 1) -> None:
        """Append many frames given as ``(prefix, offset, count)`` file ranges (or bytes).

        Every frame's position is known from the lengths up front, so ``parts``
        threads copy disjoint stretches with positioned writes and
        ``copy_file_range`` (both release the GIL).
        """
        self.f.flush()
        start = self.f.tell()
        jobs = []
        pos = start
        for r in ranges:
            if isinstance(r, (bytes, bytearray)):
                n = len(r)
            else:
                n = len(r[0]) + r[2]
            pad = n & 1
            self.offsets.append(self._pos + (pos - start))
            self.lengths.append(n + pad)
            jobs.append((pos, r, n + pad))
            pos += 8 + n + pad
        fd = self._fd

        def run(chunk):
            for at, r, length in chunk:
                head = _ITEM + struct.pack("<I", length)
                if isinstance(r, (bytes, bytearray)):
                    os.pwrite(fd, head + bytes(r) + b"\x00" * (length - len(r)), at)
                    continue
                prefix, off, count = r
                os.pwrite(fd, head + prefix, at)
                dst = at + 8 + len(prefix)
                done = 0
                while done < count:
                    k = 0
                    if self._kernel_copy:
                        try:
                            k = os.copy_file_range(src_fd, fd, count - done, off + done, dst + done)
                        except OSError:
                            self._kernel_copy = False
                    if k <= 0:
                        data = os.pread(src_fd, count - done, off + done)
                        if not data:
                            raise ConversionError("truncated file: tile data runs past the end of the file")
                        k = os.pwrite(fd, data, dst + done)
                    done += k
                if length > len(prefix) + count:
                    os.pwrite(fd, b"\x00", dst + count)

        if pool is None or parts <= 1 or len(jobs) < 64:
            run(jobs)
        else:
            step = -(-len(jobs) // parts)
            futures = [pool.submit(run, jobs[i:i + step]) for i in range(0, len(jobs), step)]
            for fu in futures:
                fu.result()
        self.f.seek(pos)
        self._pos += pos - start
        self.count += len(jobs)

    def _background_sync(self) -> None:
        """Start writing back what is written so far while we go on (fsync at the end is then short)."""
        t = self._sync_thread
        if t is not None and t.is_alive():
            return
        self._synced = self._pos
        self.f.flush()
        fd = self._fd

        def sync():
            try:
                os.fdatasync(fd)
            except OSError:
                pass

        self._sync_thread = threading.Thread(target=sync, daemon=True)
        self._sync_thread.start()

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
        if self._sync_thread is not None:
            self._sync_thread.join()
        os.fsync(f.fileno())
        f.close()

    def abort(self) -> None:
        if self._sync_thread is not None:
            self._sync_thread.join()
        try:
            self.f.close()
        except Exception:
            pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
