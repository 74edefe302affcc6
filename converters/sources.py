"""Scanner files as a uniform pyramid of levels (source -> level), read-only.

A ``Level`` knows its size and tile grid and offers two ways to its pixels:

* ``raw_frame(i)``: the stored compressed tile, made self-contained (JPEG tables
  merged, Adobe APP14 added for RGB-coded JPEG), for levels whose ``copy``
  describes how to store it in DICOM unchanged; and
* ``decode_tile(tx, ty)``: decoded RGB ``uint8`` pixels, for re-encoding and
  for building the missing pyramid levels.

TIFF-family files (Aperio SVS, OME-TIFF, generic tiled TIFF) are read with
tifffile for structure and ``os.pread`` on the TileOffsets/TileByteCounts for
the tile bytes (thread-safe, no seek lock, no copy of the slide in memory).
Hamamatsu NDPI and Philips TIFF go through opentile, which knows their
quirks (NDPI stripes -> tiles, Philips sparse tiles); everything else that
OpenSlide reads (MRXS, ...) through openslide-python, decoded.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConversionError
from .jpeg import JpegError, fix_tile, iter_header_segments, j2k_info, jpeg_info

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG2000 = "1.2.840.10008.1.2.4.91"


@dataclass(frozen=True)
class CopyInfo:
    """How a level's stored tiles go into DICOM as they are."""

    transfer_syntax: str
    photometric: str
    lossy_method: str | None  # "ISO_10918_1", "ISO_15444_1" or None (lossless)
    samples: int = 3


class Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    copy: CopyInfo | None = None
    samples: int = 3

    @property
    def tiles_x(self) -> int:
        return math.ceil(self.width / self.tile_w)

    @property
    def tiles_y(self) -> int:
        return math.ceil(self.height / self.tile_h)

    @property
    def n_tiles(self) -> int:
        return self.tiles_x * self.tiles_y

    def raw_frame(self, index: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def raw_size_estimate(self) -> int:
        return self.width * self.height * 3

    def decode_tile(self, tx: int, ty: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def _to_rgb(a: np.ndarray) -> np.ndarray:
    """Any decoded tile -> (h, w, 3) uint8."""
    if a.dtype != np.uint8:
        if a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
        elif a.dtype == bool:
            a = a.astype(np.uint8) * 255
        else:
            raise ConversionError(f"unsupported sample type {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    elif a.shape[2] != 3:
        raise ConversionError(f"unsupported number of samples {a.shape[2]}")
    return a


class ArrayLevel(Level):
    """An in-memory image (photos, associated images, small levels)."""

    def __init__(self, array: np.ndarray):
        self.array = _to_rgb(array)
        self.height, self.width = self.array.shape[:2]
        self.tile_h, self.tile_w = self.height, self.width

    def decode_tile(self, tx: int, ty: int) -> np.ndarray:
        return self.array


class TiffLevel(Level):
    """One TIFF page (tiled or stripped), read with pread."""

    def __init__(self, page, fd: int, allow_copy: bool = True):
        self.page = page
        self.fd = fd
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        if page.imagedepth > 1:
            raise ConversionError("3-D (tiled depth) TIFF pages are not supported")
        if page.planarconfig != 1 and page.samplesperpixel > 1:
            raise ConversionError("planar (separate) TIFF sample layout is not supported")
        if page.is_tiled:
            self.tile_w = int(page.tilewidth)
            self.tile_h = int(page.tilelength)
        else:
            self.tile_w = self.width
            self.tile_h = min(int(page.rowsperstrip or self.height), self.height)
        self.offsets = [int(x) for x in page.dataoffsets]
        self.counts = [int(x) for x in page.databytecounts]
        if len(self.offsets) < self.n_tiles:
            raise ConversionError("corrupt TIFF: fewer tiles than the image size needs")
        file_size = os.fstat(fd).st_size
        for off, cnt in zip(self.offsets[: self.n_tiles], self.counts[: self.n_tiles]):
            if cnt and off + cnt > file_size:
                raise ConversionError("truncated file: tile data runs past the end of the file")
        self.jpegtables = page.jpegtables
        self._decode = page.decode
        self.samples = int(page.samplesperpixel)
        self._blank_frame: bytes | None = None
        self._prefix: bytes | None = None
        self._is_jpeg = int(page.compression) == 7
        self.copy = self._copy_info() if (allow_copy and page.is_tiled) else None

    def _first_tile(self) -> bytes | None:
        for i, c in enumerate(self.counts):
            if c > 0:
                return self.read(i)
        return None

    def read(self, index: int) -> bytes:
        count = self.counts[index]
        if count == 0:
            return b""
        data = os.pread(self.fd, count, self.offsets[index])
        if len(data) != count:
            raise ConversionError("truncated file: tile data runs past the end of the file")
        return data

    def _copy_info(self) -> CopyInfo | None:
        page = self.page
        if page.bitspersample != 8 or self.samples not in (1, 3):
            return None
        comp = int(page.compression)
        first = self._first_tile()
        if first is None:
            return None
        if comp == 7:  # JPEG
            try:
                info = jpeg_info(fix_tile(self.jpegtables, first, False))
            except JpegError:
                return None
            if not info.baseline or info.components != self.samples:
                return None
            if info.width != self.tile_w or info.height != self.tile_h:
                return None
            if self.samples == 1:
                self._app14 = False
                return CopyInfo(JPEG_BASELINE, "MONOCHROME2", "ISO_10918_1", 1)
            tiff_rgb = int(page.photometric) == 2
            if info.has_app14:
                rgb = info.app14_transform == 0
                self._app14 = False
            elif info.has_jfif:
                rgb = False
                self._app14 = False
            elif tiff_rgb and not info.subsampled:
                # Aperio "JPEG/RGB": RGB-coded components, only the TIFF tag says so.
                rgb = True
                self._app14 = True
            else:
                rgb = info.component_ids == (82, 71, 66)
                self._app14 = False
            # YCbCr JPEG is YBR_FULL_422 whatever its chroma subsampling: the WSI IOD does not
            # allow YBR_FULL, and PS3.3 C.7.6.3.1.2 lets YBR_FULL_422 describe any JPEG stream.
            photometric = "RGB" if rgb else "YBR_FULL_422"
            return CopyInfo(JPEG_BASELINE, photometric, "ISO_10918_1", 3)
        if comp in (33003, 33005, 34712):  # JPEG 2000 (Aperio YCbCr / RGB, generic)
            if first[:4] != b"\xff\x4f\xff\x51":
                return None  # JP2 boxes, not a bare codestream
            try:
                info = j2k_info(first)
            except JpegError:
                return None
            if info.width != self.tile_w or info.height != self.tile_h or info.components != self.samples:
                return None
            self._app14 = False
            if self.samples == 1:
                photometric = "MONOCHROME2"
            elif info.mct:
                photometric = "YBR_RCT" if info.reversible else "YBR_ICT"
            elif comp == 33003:
                return None  # components are YCbCr without MCT: DICOM has no name for that
            else:
                photometric = "RGB"
            ts = JPEG2000_LOSSLESS if info.reversible else JPEG2000
            return CopyInfo(ts, photometric, None if info.reversible else "ISO_15444_1", self.samples)
        return None

    def raw_size_estimate(self) -> int:
        return sum(self.counts[: self.n_tiles]) + len(self.jpegtables or b"") * self.n_tiles + 64 * self.n_tiles

    def raw_frame(self, index: int) -> bytes:
        data = self.read(index)
        if not data:
            return self.blank_frame()
        if int(self.page.compression) == 7:
            return fix_tile(self.jpegtables, data, self._app14)
        return data

    def frame_source(self, index: int) -> tuple[bytes, int, int] | None:
        """(prefix, file offset, length): the frame is prefix + that byte range of the file.

        Lets the writer copy tile bodies file-to-file in the kernel. None for sparse tiles.
        """
        count = self.counts[index]
        if count == 0:
            return None
        if self._prefix is None:
            self._prefix = fix_tile(self.jpegtables, b"\xff\xd8", self._app14) if self._is_jpeg else b""
        if self._is_jpeg:
            off = self.offsets[index]
            if os.pread(self.fd, 2, off) != b"\xff\xd8":
                raise ConversionError(f"corrupt tile data (tile {index} is not a JPEG stream)")
            return self._prefix, off + 2, count - 2  # the tile's own SOI is replaced
        return b"", self.offsets[index], count

    def blank_frame(self) -> bytes:
        """A white tile in the level's own coding, for sparse (zero-length) tiles."""
        if self._blank_frame is None:
            import imagecodecs

            white = np.full((self.tile_h, self.tile_w, self.samples), 255, np.uint8)
            c = self.copy
            if c.transfer_syntax == JPEG_BASELINE:
                if c.photometric == "RGB":
                    b = imagecodecs.jpeg8_encode(white, level=95, colorspace="rgb", outcolorspace="rgb")
                elif c.photometric == "YBR_FULL":
                    b = imagecodecs.jpeg8_encode(white, level=95, subsampling="444")
                elif c.photometric == "MONOCHROME2":
                    b = imagecodecs.jpeg8_encode(white[..., 0], level=95)
                else:
                    b = imagecodecs.jpeg8_encode(white, level=95, subsampling="422")
            else:
                b = imagecodecs.jpeg2k_encode(white, level=0, codecformat="j2k",
                                              reversible=True, mct=c.photometric.startswith("YBR"))
            self._blank_frame = b
        return self._blank_frame

    def decode_tile(self, tx: int, ty: int) -> np.ndarray:
        index = ty * self.tiles_x + tx
        data = self.read(index)
        if not data:
            return np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        try:
            arr, _, shape = self._decode(data, index, jpegtables=self.jpegtables)
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"corrupt tile data ({type(exc).__name__}: {exc})") from None
        if arr is None:
            raise ConversionError("corrupt tile data")
        arr = arr.reshape(arr.shape[-3:])
        if arr.shape[0] != self.tile_h or arr.shape[1] != self.tile_w:
            # stripped pages: the last strip is short
            full = np.full((self.tile_h, self.tile_w, arr.shape[2]), 255, arr.dtype)
            full[: arr.shape[0], : arr.shape[1]] = arr
            arr = full
        return _to_rgb(arr)


@dataclass
class Associated:
    """A label, overview (macro) or thumbnail image, read only when wanted."""

    kind: str  # "LABEL", "OVERVIEW", "THUMBNAIL"
    read: Callable[[], np.ndarray]
    mpp: tuple[float, float] | None = None  # µm per pixel, when known


@dataclass
class Slide:
    path: Path
    format: str
    levels: list[Level]
    associated: list[Associated] = field(default_factory=list)
    mpp: tuple[float, float] | None = None  # µm per pixel of the base level (x, y)
    icc_profile: bytes | None = None
    magnification: float | None = None
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    software: str | None = None
    acquired: _dt.datetime | None = None
    barcode: str | None = None
    description: str | None = None
    origin_mm: tuple[float, float] | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for c in self._closers:
            try:
                c()
            except Exception:
                pass
        self._closers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- format detection -----------------------------------------------------------

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(path: Path) -> Slide:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.is_dir():
        return _open_openslide(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ConversionError(f"{path.name}: cannot read ({exc.strerror})") from None
    if len(head) < 8:
        raise ConversionError(f"{path.name}: empty or truncated file")
    if head[:4] in TIFF_MAGICS:
        return _open_tiff(path)
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n":
        return _open_photo(path)
    if path.suffix.lower() in (".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"):
        return _open_openslide(path)
    raise ConversionError(f"{path.name}: unsupported file format")


def _open_photo(path: Path) -> Slide:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            icc = im.info.get("icc_profile")
            if im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            arr = np.asarray(im)
            dpi = im.info.get("dpi")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ConversionError(f"{path.name}: corrupt or truncated image ({exc})") from None
    mpp = None
    if dpi and dpi[0] and dpi[0] > 2000:  # only microscope-like resolutions are believable
        mpp = (25400.0 / dpi[0], 25400.0 / dpi[1])
    level = ArrayLevel(arr)
    return Slide(path, "photo", [level], mpp=mpp, icc_profile=icc or None)


def _tiff_mpp(page) -> tuple[float, float] | None:
    try:
        unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
        xr = page.tags["XResolution"].value
        yr = page.tags["YResolution"].value
        xres = xr[0] / xr[1] if isinstance(xr, tuple) else float(xr)
        yres = yr[0] / yr[1] if isinstance(yr, tuple) else float(yr)
    except (KeyError, ZeroDivisionError, TypeError, IndexError):
        return None
    if xres <= 0 or yres <= 0:
        return None
    per = {2: 25400.0, 3: 10000.0}.get(unit)
    if per is None:
        return None
    mx, my = per / xres, per / yres
    if not (0.01 <= mx <= 100 and 0.01 <= my <= 100):
        return None  # 72 dpi & co.: a display resolution, not a microscope's
    return (mx, my)


def _parse_svs(desc: str) -> dict[str, str]:
    parts = desc.split("|")
    out = {"_header": parts[0]}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _open_tiff(path: Path) -> Slide:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise ConversionError(f"{path.name}: corrupt or unreadable TIFF ({exc})") from None
    try:
        if tif.is_ndpi or tif.is_philips:
            tif.close()
            return _open_opentile(path)
        fd = os.open(path, os.O_RDONLY)
    except ConversionError:
        raise
    except Exception as exc:
        tif.close()
        raise ConversionError(f"{path.name}: corrupt or unreadable TIFF ({exc})") from None
    slide = Slide(path, "tiff", [])
    slide._closers += [tif.close, lambda: os.close(fd)]
    try:
        _fill_tiff(slide, tif, fd)
    except ConversionError:
        slide.close()
        raise
    except Exception as exc:
        slide.close()
        raise ConversionError(f"{path.name}: corrupt or unsupported TIFF ({type(exc).__name__}: {exc})") from None
    return slide


def _series_reader(series) -> Callable[[], np.ndarray]:
    return lambda: _to_rgb(series.asarray())


def _fill_tiff(slide: Slide, tif, fd: int) -> None:
    series = tif.series
    if not series:
        raise ConversionError(f"{slide.path.name}: TIFF without images")
    main = series[0]
    pages = [lv.keyframe for lv in main.levels]
    base = pages[0]
    slide.icc_profile = base.iccprofile
    if tif.is_svs:
        slide.format = "aperio-svs"
        meta = _parse_svs(base.description)
        head = meta["_header"].splitlines()
        slide.software = head[0].strip() if head else None
        slide.manufacturer = "Leica Biosystems (Aperio)"
        slide.model = meta.get("ScanScope ID") and "ScanScope" or None
        slide.serial = meta.get("ScanScope ID")
        mpp = _float(meta.get("MPP"))
        if mpp:
            slide.mpp = (mpp, mpp)
        slide.magnification = _float(meta.get("AppMag"))
        slide.barcode = meta.get("Barcode") or None
        date, time = meta.get("Date"), meta.get("Time")
        if date:
            for fmt in ("%m/%d/%y %H:%M:%S", "%m/%d/%Y %H:%M:%S"):
                try:
                    slide.acquired = _dt.datetime.strptime(f"{date} {time or '00:00:00'}", fmt)
                    break
                except ValueError:
                    pass
        left, top = _float(meta.get("Left")), _float(meta.get("Top"))
        if left is not None and top is not None:
            slide.origin_mm = (left, top)
        for s in series[1:]:
            kind = {"label": "LABEL", "macro": "OVERVIEW", "thumbnail": "THUMBNAIL"}.get(s.name.lower())
            if kind:
                slide.associated.append(Associated(kind, _series_reader(s)))
    elif tif.is_ome:
        slide.format = "ome-tiff"
        _ome_metadata(slide, tif.ome_metadata)
        for s in series[1:]:
            name = (s.name or "").lower()
            kind = "LABEL" if "label" in name else "OVERVIEW" if ("macro" in name or "overview" in name) else None
            if kind:
                slide.associated.append(Associated(kind, _series_reader(s)))
    else:
        slide.format = "tiff"
        # generic pyramids stored as consecutive pages rather than one series
        if len(pages) == 1:
            aspect = base.imagewidth / base.imagelength
            for s in series[1:]:
                p = s.keyframe
                if (p.is_tiled and p.imagewidth < pages[-1].imagewidth and p.samplesperpixel == base.samplesperpixel
                        and abs(p.imagewidth / p.imagelength - aspect) / aspect < 0.02):
                    pages.append(p)
        if base.software and str(base.software).strip():
            slide.software = str(base.software).strip()[:64]
        make = base.tags.get("Make")
        model = base.tags.get("Model")
        slide.manufacturer = str(make.value).strip() if make else None
        slide.model = str(model.value).strip() if model else None
    if slide.mpp is None:
        slide.mpp = _tiff_mpp(base)
    if base.imagewidth < 1 or base.imagelength < 1:
        raise ConversionError(f"{slide.path.name}: empty image")
    seen = set()
    for p in pages:
        key = (p.imagewidth, p.imagelength)
        if key in seen:
            continue
        seen.add(key)
        slide.levels.append(TiffLevel(p, fd))
    slide.levels.sort(key=lambda lv: -lv.width)
    # a stripped (non-tiled) base page must not be huge to decode as strips: checked by the planner


def _ome_metadata(slide: Slide, xml: str | None) -> None:
    if not xml:
        return
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return
    ns = {"o": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {"o": ""}
    q = (lambda t: f"{{{ns['o']}}}{t}") if ns["o"] else (lambda t: t)
    image = root.find(q("Image"))
    if image is None:
        return
    pixels = image.find(q("Pixels"))
    if pixels is not None:
        sx, sy = _float(pixels.get("PhysicalSizeX")), _float(pixels.get("PhysicalSizeY"))
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
        ux = scale.get(pixels.get("PhysicalSizeXUnit", "µm"))
        uy = scale.get(pixels.get("PhysicalSizeYUnit", "µm"))
        if sx and sy and ux and uy:
            slide.mpp = (sx * ux, sy * uy)
    ad = image.find(q("AcquisitionDate"))
    if ad is not None and ad.text:
        try:
            slide.acquired = _dt.datetime.fromisoformat(ad.text.strip().replace("Z", "+00:00")).replace(tzinfo=None)
        except ValueError:
            pass
    desc = image.find(q("Description"))
    if desc is not None and desc.text:
        slide.description = desc.text.strip()[:1024]
    inst = root.find(q("Instrument"))
    if inst is not None:
        mic = inst.find(q("Microscope"))
        if mic is not None:
            slide.manufacturer = mic.get("Manufacturer") or slide.manufacturer
            slide.model = mic.get("Model") or slide.model
            slide.serial = mic.get("SerialNumber") or slide.serial
        obj = inst.find(q("Objective"))
        if obj is not None:
            slide.magnification = _float(obj.get("NominalMagnification"))


# --- opentile (NDPI, Philips) --------------------------------------------------------

class OpenTileLevel(Level):
    def __init__(self, level, lock: threading.Lock):
        self.level = level
        self.width, self.height = level.image_size.width, level.image_size.height
        self.tile_w, self.tile_h = level.tile_size.width, level.tile_size.height
        self._lock = lock
        self.copy = self._copy_info()

    def _copy_info(self) -> CopyInfo | None:
        # tifffile's COMPRESSION/PHOTOMETRIC are IntEnums: str() is "7"/"6" on Python >= 3.11,
        # so compare values. opentile hands out baseline JPEG tiles for NDPI and Philips.
        if int(self.level.compression) != 7:
            return None
        try:
            with self._lock:
                info = jpeg_info(self.level.get_tile((0, 0)))
        except (JpegError, ValueError):
            return None
        if not info.baseline or (info.width, info.height) != (self.tile_w, self.tile_h):
            return None
        photometric = int(self.level.photometric_interpretation)
        if info.components == 1 and photometric in (0, 1):
            return CopyInfo(JPEG_BASELINE, "MONOCHROME2", "ISO_10918_1", 1)
        if info.components != 3:
            return None
        if photometric == 6:  # YCbCr (NDPI is 4:4:4): YBR_FULL_422 all the same, see TiffLevel
            return CopyInfo(JPEG_BASELINE, "YBR_FULL_422", "ISO_10918_1")
        if photometric == 2 and info.app14_transform == 0:  # RGB, and the stream says so
            return CopyInfo(JPEG_BASELINE, "RGB", "ISO_10918_1")
        return None

    def raw_frame(self, index: int) -> bytes:
        tx, ty = index % self.tiles_x, index // self.tiles_x
        with self._lock:
            data = self.level.get_tile((tx, ty))
        return data if _one_frame_header(data) else self._blank_tile()

    def _blank_tile(self) -> bytes:
        """A white tile for a sparse (absent) one. opentile 0.23-0.24 hand out blank Philips
        tiles with two frame headers (undecodable); we write our own instead."""
        if getattr(self, "_blank", None) is None:
            import imagecodecs

            shape = (self.tile_h, self.tile_w) if self.copy and self.copy.samples == 1 else (self.tile_h, self.tile_w, 3)
            self._blank = imagecodecs.jpeg8_encode(np.full(shape, 255, np.uint8), level=95)
        return self._blank

    def decode_tile(self, tx: int, ty: int) -> np.ndarray:
        with self._lock:
            data = self.level.get_tile((tx, ty))
        if not _one_frame_header(data):
            return np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        from PIL import Image

        return _to_rgb(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


_BAD_SCAN_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xd9\xff]")


def _one_frame_header(data: bytes) -> bool:
    """True for a well-formed single-frame JPEG: one SOF before the scan, and no marker other
    than RSTn/EOI inside the entropy-coded data (where 0xFF is always stuffed)."""
    try:
        sofs, scan_start = 0, None
        for m, _s, e in iter_header_segments(data):
            if m in (0xC0, 0xC1, 0xC2):
                sofs += 1
            if m == 0xDA:
                scan_start = e
    except (JpegError, ValueError, IndexError):
        return False
    return sofs == 1 and scan_start is not None and _BAD_SCAN_MARKER.search(data, scan_start) is None


def _open_opentile(path: Path) -> Slide:
    try:
        from opentile import OpenTile
    except ImportError:  # pragma: no cover
        raise ConversionError(f"{path.name}: NDPI/Philips TIFF needs the 'opentile' package") from None
    try:
        tiler = OpenTile.open(path, 1024)
    except Exception as exc:
        raise ConversionError(f"{path.name}: cannot open with opentile ({exc})") from None
    lock = threading.Lock()
    slide = Slide(path, "ndpi" if path.suffix.lower() == ".ndpi" else "philips-tiff", [])
    slide._closers.append(tiler.close)
    try:
        base = tiler.get_level(0)
        # z-stacks (NDPI focal planes) list each level once per plane: keep the plane nearest 0
        planes: dict[tuple[int, int], object] = {}
        for lv in tiler.levels:
            key = (lv.image_size.width, lv.image_size.height)
            if key not in planes or abs(lv.focal_plane) < abs(planes[key].focal_plane):
                planes[key] = lv
        slide.levels = [OpenTileLevel(lv, lock) for lv in planes.values()]
        slide.levels.sort(key=lambda lv: -lv.width)
        ps = base.pixel_spacing
        if ps is not None:
            slide.mpp = (ps.width * 1000.0, ps.height * 1000.0)
        slide.icc_profile = getattr(tiler, "icc_profile", None)
        md = tiler.metadata
        slide.manufacturer = getattr(md, "scanner_manufacturer", None)
        slide.model = getattr(md, "scanner_model", None)
        slide.serial = getattr(md, "scanner_serial_number", None)
        sw = getattr(md, "scanner_software_versions", None)
        slide.software = ", ".join(sw) if sw else None
        slide.magnification = getattr(md, "magnification", None)
        slide.acquired = getattr(md, "aquisition_datetime", None) or getattr(md, "acquisition_datetime", None)

        def reader(img):
            def read():
                from PIL import Image

                with lock:
                    tiles = {}
                    size = img.image_size
                    tw, th = img.tile_size.width, img.tile_size.height
                    out = np.full((size.height, size.width, 3), 255, np.uint8)
                    for ty in range(math.ceil(size.height / th)):
                        for tx in range(math.ceil(size.width / tw)):
                            tiles[(tx, ty)] = img.get_tile((tx, ty))
                for (tx, ty), data in tiles.items():
                    a = _to_rgb(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                    h = min(th, size.height - ty * th)
                    w = min(tw, size.width - tx * tw)
                    out[ty * th:ty * th + h, tx * tw:tx * tw + w] = a[:h, :w]
                return out
            return read

        for img in getattr(tiler, "labels", []):
            slide.associated.append(Associated("LABEL", reader(img)))
        for img in getattr(tiler, "overviews", []):
            slide.associated.append(Associated("OVERVIEW", reader(img)))
        for img in getattr(tiler, "thumbnails", []):
            slide.associated.append(Associated("THUMBNAIL", reader(img)))
    except ConversionError:
        slide.close()
        raise
    except Exception as exc:
        slide.close()
        raise ConversionError(f"{path.name}: corrupt or unsupported slide ({type(exc).__name__}: {exc})") from None
    return slide


# --- OpenSlide (MRXS and the rest), decoded only -----------------------------------------

class OpenSlideLevel(Level):
    def __init__(self, osr, index: int, tile: int):
        self.osr = osr
        self.index = index
        self.width, self.height = osr.level_dimensions[index]
        self.down = osr.level_downsamples[index]
        self.tile_w = self.tile_h = tile

    def decode_tile(self, tx: int, ty: int) -> np.ndarray:
        x0 = int(round(tx * self.tile_w * self.down))
        y0 = int(round(ty * self.tile_h * self.down))
        im = self.osr.read_region((x0, y0), self.index, (self.tile_w, self.tile_h))
        a = np.asarray(im)  # RGBA, premultiplied; transparent = outside scanned area
        rgb = a[..., :3].copy()
        rgb[a[..., 3] == 0] = 255
        return rgb


def _open_openslide(path: Path) -> Slide:
    try:
        import openslide
    except ImportError:
        raise ConversionError(f"{path.name}: unsupported file format (openslide-python is not installed)") from None
    try:
        osr = openslide.OpenSlide(str(path))
    except Exception as exc:
        raise ConversionError(f"{path.name}: unsupported file format ({exc})") from None
    props = osr.properties
    slide = Slide(path, f"openslide-{props.get('openslide.vendor', 'unknown')}", [])
    slide._closers.append(osr.close)
    slide.levels = [OpenSlideLevel(osr, i, 512) for i in range(osr.level_count)]
    mx, my = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    if mx and my:
        slide.mpp = (mx, my)
    slide.magnification = _float(props.get("openslide.objective-power"))
    slide.manufacturer = props.get("openslide.vendor")
    icc = getattr(osr, "color_profile", None)
    if icc is not None:
        try:
            slide.icc_profile = icc.tobytes()
        except Exception:
            pass
    for name, img in osr.associated_images.items():
        kind = {"label": "LABEL", "macro": "OVERVIEW", "thumbnail": "THUMBNAIL"}.get(name)
        if kind:
            slide.associated.append(Associated(kind, (lambda im=img: _to_rgb(np.asarray(im.convert("RGB"))))))
    return slide
