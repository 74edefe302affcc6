"""Synthetic scanner files for the converter tests, written with tifffile.

Nothing is downloaded. The images carry texture and colour (not flat fills)
so that a wrong colour transform, a shifted tile or a dropped table shows up
as a pixel difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from converters.jpeg import split_tables, strip_app_markers


def make_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Tissue-ish RGB: smooth colour gradients, blobs and fine noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 200 + 40 * np.sin(xx / 97.0) * np.cos(yy / 71.0)
    img[..., 1] = 150 + 60 * np.sin((xx + yy) / 143.0)
    img[..., 2] = 190 + 50 * np.cos(xx / 53.0 - yy / 89.0)
    for _ in range(12):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(40, 220)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[m] *= rng.uniform(0.4, 0.8, size=3)
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = img.shape[0] // factor * factor, img.shape[1] // factor * factor
    v = img[:h, :w].reshape(h // factor, factor, w // factor, factor, -1).mean((1, 3))
    return np.round(v).astype(np.uint8)


def iter_tiles(img: np.ndarray, tile: int):
    h, w = img.shape[:2]
    for ty in range(math.ceil(h / tile)):
        for tx in range(math.ceil(w / tile)):
            t = np.zeros((tile, tile, img.shape[2]), np.uint8)
            part = img[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]
            t[:part.shape[0], :part.shape[1]] = part
            yield t


def _renumber_components(jpeg: bytes) -> bytes:
    """Give RGB-coded components the ids 1, 2, 3 (libjpeg writes 'R', 'G', 'B').

    Then nothing inside the stream says "RGB": a decoder that is not told
    (by an Adobe APP14 marker) assumes YCbCr and gets the colours wrong.
    """
    i = jpeg.index(b"\xff\xc0")
    b = bytearray(jpeg)
    for k in range(3):
        b[i + 10 + 3 * k] = k + 1
    j = jpeg.index(b"\xff\xda")
    for k in range(3):
        b[j + 5 + 2 * k] = k + 1
    return bytes(b)


def aperio_jpeg_tiles(img: np.ndarray, tile: int, quality: int = 80, rgb: bool = True):
    """Encode tiles the way Aperio does: abbreviated streams + one JPEGTables.

    With ``rgb`` the components are RGB (no colour transform) and, like real
    Aperio files, carry no Adobe APP14 marker: only the TIFF Photometric tag
    says they are RGB.
    """
    tables = None
    tiles = []
    for t in iter_tiles(img, tile):
        if rgb:
            full = imagecodecs.jpeg8_encode(t, level=quality, colorspace="rgb", outcolorspace="rgb")
        else:
            full = imagecodecs.jpeg8_encode(t, level=quality, subsampling="422")
        full = strip_app_markers(full)
        if rgb:
            full = _renumber_components(full)
        tab, abbrev = split_tables(full)
        if tables is None:
            tables = tab
        assert tab == tables, "all tiles must share their tables"
        tiles.append(abbrev)
    return tables, tiles


def write_svs(path: Path, width: int = 2048, height: int = 1536, tile: int = 256, seed: int = 1,
              rgb: bool = True, with_label: bool = True, with_macro: bool = True,
              with_thumbnail: bool = True, mpp: float = 0.499, icc: bytes | None = None) -> dict:
    """An Aperio-like SVS: JPEG tiled base + 4x level, stripped thumbnail, LZW label, JPEG macro."""
    base = make_image(height, width, seed)
    levels = [base, downsample(base, 4)]
    comp = "RGB" if rgb else "YCbCr"
    head = "Aperio Image Library v12.0.15 \r\n"
    desc0 = (f"{head}{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/{comp} Q=80"
             f"|AppMag = 20|StripeWidth = 2040|ScanScope ID = SS1234|Filename = synth|Date = 11/23/21"
             f"|Time = 10:11:12|Time Zone = GMT+0100|MPP = {mpp}|Left = 25.0|Top = 18.5|ImageID = 42")
    photometric = "rgb" if rgb else "ycbcr"
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, lv in enumerate(levels):
            tables, tiles = aperio_jpeg_tiles(lv, tile, rgb=rgb)
            if i == 0:
                d = desc0
            else:
                d = f"{head}{width}x{height} -> {lv.shape[1]}x{lv.shape[0]} - ({tile}x{tile}) JPEG/{comp} Q=80"
            if rgb:
                extra = {"subsampling": (1, 1), "compressionargs": {"outcolorspace": "RGB"}}
            else:
                extra = {"subsampling": (2, 1)}
            tw.write(iter(tiles), shape=lv.shape, dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     photometric=photometric, jpegtables=tables, description=d, subfiletype=0,
                     metadata=None, iccprofile=icc if i == 0 else None, **extra)
            if i == 0 and with_thumbnail:
                thumb = downsample(base, 8)
                tw.write(thumb, compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                         description=f"{head}{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - |AppMag = 20",
                         subfiletype=0, rowsperstrip=16, metadata=None)
        if with_label:
            label = np.full((300, 320, 3), 250, np.uint8)
            label[100:200, 40:280] = (20, 30, 200)
            tw.write(label, compression="lzw", photometric="rgb",
                     description=f"{head}label 320x300", subfiletype=1, metadata=None)
        if with_macro:
            macro = downsample(base, 4)[::2, ::2].copy()
            tw.write(macro, compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                     description=f"{head}macro {macro.shape[1]}x{macro.shape[0]}", subfiletype=9, metadata=None)
    return {"levels": levels, "tile": tile}


def write_generic(path: Path, width: int = 2048, height: int = 1536, tile: int = 256, seed: int = 2,
                  compression: str | None = "zlib", pyramid: bool = False) -> dict:
    """A plain tiled TIFF (no vendor metadata) with a resolution tag; optionally with reduced pages."""
    base = make_image(height, width, seed)
    levels = [base]
    if pyramid:
        levels.append(downsample(base, 2))
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            tw.write(lv, tile=(tile, tile), compression=compression, photometric="rgb",
                     resolution=(1e4 / 0.25 / (lv.shape[1] / width), 1e4 / 0.25 / (lv.shape[0] / height)),
                     resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1, metadata=None)
    return {"levels": levels, "tile": tile, "mpp": 0.25}


def write_ome(path: Path, width: int = 2048, height: int = 1536, tile: int = 256, seed: int = 3,
              compression: str = "jpeg", mpp: float = 0.5) -> dict:
    """OME-TIFF with the pyramid in SubIFDs (2x steps), as bioformats writes them."""
    base = make_image(height, width, seed)
    levels = [base, downsample(base, 2), downsample(base, 4)]
    meta = {
        "axes": "YXS",
        "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
        "Name": "ome-synth",
    }
    opts = dict(tile=(tile, tile), photometric="rgb", compression=compression)
    if compression == "jpeg":
        opts["compressionargs"] = {"level": 85}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(base, subifds=len(levels) - 1, metadata=meta, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, metadata=None, **opts)
    return {"levels": levels, "tile": tile, "mpp": mpp}


def write_photo(path: Path, width: int = 1200, height: int = 900, seed: int = 4) -> dict:
    img = make_image(height, width, seed)
    if str(path).lower().endswith(".png"):
        path.write_bytes(imagecodecs.png_encode(img))
    else:
        path.write_bytes(imagecodecs.jpeg8_encode(img, level=92))
    return {"levels": [img]}
