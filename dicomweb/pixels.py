"""Decoding and re-encoding pixels: the exception path (transcoding, rendered, thumbnails).

The frame fast path never comes here. Decoding uses pydicom's decoders (pylibjpeg,
pylibjpeg-openjpeg, pillow plugins); encoding of JPEG/PNG uses Pillow.
"""
from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from archive import metadata as md
from archive.status import NotFound

from .common import HttpError
from .media import EXPLICIT_LE, JPEG_BASELINE, NATIVE

MAX_RENDER_PIXELS = 40_000_000  # largest total pixel matrix assembled for /rendered
MAX_RENDER_SIDE = 4096  # largest viewport width/height: an answer is at most 4096x4096 pixels
_INT = re.compile(r"[0-9]{1,9}\Z")  # with .match: ASCII digits only, no trailing "\n"


@dataclass
class PixelInfo:
    sop: str
    study: str
    series: str
    ts: str
    rows: int
    cols: int
    spp: int
    bits_allocated: int
    bits_stored: int
    pixel_rep: int
    photometric: str
    planar: int
    n_frames: int
    total_rows: int
    total_cols: int
    image_type: list[str]
    organization: str
    positions: list[tuple[int, int]] | None = None  # TILED_SPARSE (col, row), 1-based
    icc_path: str | None = None
    icc_inline: bytes | None = None
    window: tuple[float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def _icc(doc: dict) -> tuple[str | None, bytes | None]:
    for holder in [doc] + md.sequence_items(doc, "00480105"):
        el = (holder or {}).get("00282000")
        if not el:
            continue
        if "BulkDataURI" in el:
            uri = el["BulkDataURI"]
            return uri.split("/bulkdata/", 1)[1] if "/bulkdata/" in uri else None, None
        if "InlineBinary" in el:
            return None, base64.b64decode(el["InlineBinary"])
    return None, None


class PixelInfoCache:
    """Pixel attributes per instance, read from its stored metadata. Keyed by SOP Instance UID
    and blob: an instance replaced (on_conflict = "replace") has a new blob, so its new rows,
    columns and syntax are read, never the old ones. Thread-safe (used from executor threads)."""

    def __init__(self, arc, size: int = 256) -> None:
        self.arc = arc  # archive.service.Archive
        self._cache: OrderedDict[tuple[str, str], PixelInfo] = OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def get(self, sop: str) -> PixelInfo | None:
        rec = self.arc.instance(sop)
        if rec is None:
            return None
        key = (sop, rec.blob.key)
        with self._lock:
            info = self._cache.get(key)
            if info is not None:
                self._cache.move_to_end(key)
                return info
        raw = self.arc.instance_metadata(rec)
        if raw is None:
            return None
        doc = json.loads(raw)
        rows = md.int_value(doc, "00280010")
        cols = md.int_value(doc, "00280011")
        positions = None
        org = str(md.first_value(doc, "00209311") or "")
        if org == "TILED_SPARSE":
            positions = []
            for item in md.sequence_items(doc, "52009230"):
                pp = (md.sequence_items(item, "0048021A") or [{}])[0]
                positions.append((md.int_value(pp, "0048021E", 1), md.int_value(pp, "0048021F", 1)))
            if len(positions) != rec.n_frames:
                positions = None
        icc_path, icc_inline = _icc(doc)
        wc, ww = md.float_value(doc, "00281050"), md.float_value(doc, "00281051")
        info = PixelInfo(
            sop=sop, study=rec.study, series=rec.series, ts=rec.ts, rows=rows, cols=cols,
            spp=md.int_value(doc, "00280002", 1) or 1, bits_allocated=md.int_value(doc, "00280100", 8) or 8,
            bits_stored=md.int_value(doc, "00280101") or md.int_value(doc, "00280100", 8) or 8,
            pixel_rep=md.int_value(doc, "00280103"),
            photometric=str(md.first_value(doc, "00280004") or "MONOCHROME2"),
            planar=md.int_value(doc, "00280006"), n_frames=rec.n_frames,
            total_rows=md.int_value(doc, "00480007") or rows, total_cols=md.int_value(doc, "00480006") or cols,
            image_type=md.string_values(doc.get("00080008")),
            organization=org, positions=positions, icc_path=icc_path, icc_inline=icc_inline,
            window=(wc, ww) if wc is not None and ww is not None else None,
        )
        with self._lock:
            self._cache[key] = info
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return info

    def icc_profile(self, info: PixelInfo) -> bytes | None:
        if info.icc_inline is not None:
            return info.icc_inline
        if info.icc_path:
            try:
                return self.arc.bulk(info.study, info.series, info.sop, info.icc_path)
            except NotFound:
                return None
        return None


def decode_frame(info: PixelInfo, data: bytes, as_rgb: bool = True) -> np.ndarray:
    """One frame's pixels as (rows, cols[, samples]) array; colour converted to RGB."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    opts = dict(rows=info.rows, columns=info.cols, samples_per_pixel=info.spp,
                bits_allocated=info.bits_allocated, bits_stored=info.bits_stored,
                pixel_representation=info.pixel_rep, photometric_interpretation=info.photometric,
                number_of_frames=1, planar_configuration=info.planar, pixel_keyword="PixelData")
    try:
        if info.ts in NATIVE:
            dec = get_decoder(EXPLICIT_LE)
            arr, _ = dec.as_array(data, as_rgb=as_rgb, **opts)
        else:
            dec = get_decoder(info.ts)
            arr, _ = dec.as_array(encapsulate([data]), as_rgb=as_rgb, **opts)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        raise HttpError(406, f"cannot decode transfer syntax {info.ts}: {exc}")
    return arr


def native_frame(info: PixelInfo, data: bytes) -> bytes:
    """Explicit VR little endian bytes of a frame (decoded if stored compressed)."""
    if info.ts in NATIVE:
        return data
    arr = decode_frame(info, data)
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def to_8bit(info: PixelInfo, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        out = arr
    else:
        a = arr.astype(np.float64)
        if info.window:
            c, w = info.window
            lo, hi = c - w / 2, c + w / 2
        else:
            lo, hi = float(a.min()), float(a.max())
        out = np.clip((a - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8)
    if info.photometric == "MONOCHROME1":
        out = 255 - out
    return out


def jpeg_frame(info: PixelInfo, data: bytes, quality: int = 90) -> bytes:
    """A JPEG baseline codestream of a stored frame (for image/jpeg of non-JPEG data)."""
    if info.ts == JPEG_BASELINE:
        return data
    if info.bits_allocated != 8 or info.spp not in (1, 3):
        raise HttpError(406, "JPEG baseline needs 8-bit greyscale or RGB pixels")
    arr = decode_frame(info, data)
    return encode_image(to_8bit(info, arr), "image/jpeg", quality)


def encode_image(arr: np.ndarray, media: str, quality: int = 90, icc: bytes | None = None) -> bytes:
    mode = "L" if arr.ndim == 2 or arr.shape[-1] == 1 else "RGB"
    img = Image.fromarray(arr.reshape(arr.shape[0], arr.shape[1]) if mode == "L" else arr, mode)
    return save_image(img, media, quality, icc)


def save_image(img: Image.Image, media: str, quality: int = 90, icc: bytes | None = None) -> bytes:
    out = io.BytesIO()
    kw: dict[str, Any] = {}
    if icc:
        kw["icc_profile"] = icc
    if media == "image/png":
        img.save(out, format="PNG", compress_level=3, **kw)
    elif media == "image/gif":
        img.save(out, format="GIF")
    else:
        img.save(out, format="JPEG", quality=quality, **kw)
    return out.getvalue()


# -- rendering ------------------------------------------------------------------------

@dataclass
class RenderParams:
    media: str = "image/jpeg"
    quality: int = 90
    viewport: tuple[int, ...] | None = None
    icc: bool = False


def parse_render_params(query, media: str, default_viewport: tuple[int, int] | None = None) -> RenderParams:
    p = RenderParams(media=media, viewport=default_viewport)
    for name, value in query.items():
        n = name.lower()
        if n == "quality":
            if not _INT.match(value) or not 1 <= int(value) <= 100:
                raise HttpError(400, f"quality must be an integer 1-100, not {value[:40]!r}")
            p.quality = int(value)
        elif n == "viewport":
            parts = value.split(",")
            if len(parts) not in (2, 6) or not all(_INT.match(x) for x in parts):
                raise HttpError(400, f"viewport must be vw,vh or vw,vh,sx,sy,sw,sh (non-negative integers), "
                                     f"not {value[:80]!r}")
            nums = tuple(int(x) for x in parts)
            if not (1 <= nums[0] <= MAX_RENDER_SIDE and 1 <= nums[1] <= MAX_RENDER_SIDE):
                raise HttpError(400, f"viewport width and height must be 1-{MAX_RENDER_SIDE} pixels, "
                                     f"not {nums[0]}x{nums[1]}")
            if len(nums) == 6 and (nums[4] == 0 or nums[5] == 0):
                raise HttpError(400, f"viewport source region is empty: {value[:80]!r}")
            p.viewport = nums
        elif n == "iccprofile":
            v = value.lower()
            if v not in ("yes", "no"):
                raise HttpError(400, f"iccprofile must be yes or no (others unsupported), not {value!r}")
            p.icc = v == "yes"
        elif n in ("window", "annotation", "charset"):
            continue  # accepted; windowing comes from the data set, no burned-in annotation
        else:
            raise HttpError(400, f"unknown rendering parameter {name!r}")
    return p


def apply_viewport(img: Image.Image, viewport: tuple[int, ...] | None, upscale: bool = True) -> Image.Image:
    if not viewport:
        return img
    if len(viewport) == 6:
        vw, vh, sx, sy, sw, sh = viewport
        if sx >= img.width or sy >= img.height:
            raise HttpError(400, f"viewport source region starts at {sx},{sy}, outside the "
                                 f"{img.width}x{img.height} image")
        img = img.crop((sx, sy, min(sx + sw, img.width), min(sy + sh, img.height)))
    vw, vh = viewport[0], viewport[1]
    scale = min(vw / img.width, vh / img.height)
    if not upscale:
        scale = min(scale, 1.0)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    return img


def to_pil(info: PixelInfo, arr: np.ndarray) -> Image.Image:
    a = to_8bit(info, arr)
    if a.ndim == 2 or a.shape[-1] == 1:
        return Image.fromarray(a.reshape(a.shape[0], a.shape[1]), "L")
    return Image.fromarray(a[..., :3], "RGB")


def assemble(info: PixelInfo, frames: list[bytes], max_side: int | None = None) -> Image.Image:
    """The total pixel matrix of a tiled instance (first focal plane / optical path)."""
    tr, tc = info.rows, info.cols
    H, W = info.total_rows, info.total_cols
    if H * W > MAX_RENDER_PIXELS:
        raise HttpError(400, f"instance is {W}x{H} pixels, too large to render whole; "
                             "render a frame or the series thumbnail")
    canvas = Image.new("RGB" if info.spp == 3 else "L", (W, H), "white" if info.spp == 3 else 255)
    per_row = -(-W // tc)
    for i, data in enumerate(frames):
        if info.positions is not None:
            x, y = info.positions[i][0] - 1, info.positions[i][1] - 1
        else:
            x, y = (i % per_row) * tc, (i // per_row) * tr
        if y >= H:
            break
        canvas.paste(to_pil(info, decode_frame(info, data)), (x, y))
    return canvas
