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


# --- Hamamatsu NDPI ------------------------------------------------------------------------
#
# What an NDPI file is, as tifffile (TiffFile.is_ndpi, _series_ndpi, ndpi_jpeg_tile) and
# opentile (NdpiTiler, NdpiStripedImage) read it:
#
# * a little-endian *classic* TIFF (version 42) whose name ends in ``.ndpi``, but with 64-bit
#   IFD offsets: the header's first-IFD offset and each IFD's next-IFD offset are 8 bytes, and
#   each IFD is followed by one 4-byte "high bits" word per entry (zero below 4 GiB);
# * every page carries ``Make`` (271) and the Hamamatsu private tags from 65420 on:
#   FileFormat 65420, SourceLens/Magnification 65421 (FLOAT; -1 for the macro), X/Y/Z offsets
#   from the slide centre 65422-65424 (nm), McuStarts 65426, SlideLabel 65427, serial 65442 ...;
# * each pyramid level is ONE JPEG stream in one strip (RowsPerStrip = height), YCbCr 4:4:4
#   with restart markers (DRI); McuStarts lists, relative to the strip, where the entropy-coded
#   data of each restart interval begins. One restart interval = one "stripe" of one MCU row
#   (8 px) by DRI MCUs, which tifffile exposes as tiles and opentile concatenates and crops
#   (losslessly, turbojpeg) into square tiles;
# * levels are separate pages 4x apart, pixel size in XResolution/YResolution (pixels per cm,
#   denominator 1: opentile reads only the numerator);
# * the macro is a plain baseline JPEG page (no DRI, no McuStarts) with SourceLens -1.

def _restart_jpeg(img: np.ndarray, restart_mcus: int | None, quality: int = 85) -> bytes:
    """Baseline YCbCr 4:4:4 JPEG (libjpeg via Pillow), with a restart marker every `restart_mcus` MCUs."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    opts = {"restart_marker_blocks": restart_mcus} if restart_mcus else {}
    Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=0, **opts)
    return buf.getvalue()


def _mcu_starts(jpeg: bytes) -> list[int]:
    """Offsets of each restart interval's entropy-coded data (what NDPI tag 65426 stores)."""
    from converters.jpeg import iter_header_segments

    sos_end = [e for m, s, e in iter_header_segments(jpeg) if m == 0xDA][0]
    starts = [sos_end]
    i = jpeg.find(b"\xff", sos_end)
    while 0 <= i < len(jpeg) - 1:
        m = jpeg[i + 1]
        if 0xD0 <= m <= 0xD7:  # RSTn (0xFF in entropy data is always stuffed with 0x00)
            starts.append(i + 2)
        i = jpeg.find(b"\xff", i + 2)
    return starts


def _classic_to_ndpi(data: bytes) -> bytes:
    """Re-lay a classic little-endian TIFF out as NDPI: 8-byte IFD offsets + per-entry high words.

    Tag entries (and so all values and data offsets, < 4 GiB) are kept as tifffile wrote them;
    only the IFDs are rewritten, appended at the end of the file and chained with 8-byte offsets.
    """
    import struct

    assert data[:4] == b"II*\x00"
    first = struct.unpack_from("<I", data, 4)[0]
    assert first == 8, "tifffile writes the first IFD right after the header"
    ifds = []
    off = first
    while off:
        n = struct.unpack_from("<H", data, off)[0]
        ifds.append(data[off + 2:off + 2 + 12 * n])
        off = struct.unpack_from("<I", data, off + 2 + 12 * n)[0]
    out = bytearray(data)
    out += b"\x00" * (len(out) & 1)
    positions = []
    for entries in ifds:
        positions.append(len(out))
        n = len(entries) // 12
        out += struct.pack("<H", n) + entries + b"\x00" * 8 + b"\x00" * (4 * n)
    for k, pos in enumerate(positions[:-1]):
        n = len(ifds[k]) // 12
        struct.pack_into("<Q", out, pos + 2 + 12 * n, positions[k + 1])
    # header: 8-byte offset of the first IFD (the old first IFD at 8 is dead space now)
    struct.pack_into("<Q", out, 4, positions[0])
    return bytes(out)


def write_ndpi(path: Path, width: int = 2048, height: int = 1536, seed: int = 5, mpp: float = 0.25,
               magnification: float = 20.0, stripe_widths=(512, 256, 128), with_macro: bool = True,
               focal_planes_nm: tuple[int, ...] = (0,)) -> dict:
    """A NanoZoomer-like NDPI: 3 levels 4x apart (restart-interval stripes), plus a macro page.

    With several `focal_planes_nm` each level is stored once per plane (ZOffsetFromSlideCenter),
    as a z-stack scan; planes other than 0 get different pixels. Returned levels are plane 0's.
    """
    assert str(path).endswith(".ndpi"), "tifffile only reads the NDPI layout from *.ndpi files"
    base = make_image(height, width, seed)
    levels = [base, downsample(base, 4), downsample(base, 16)]
    common = [
        (271, "s", 0, "Hamamatsu", True),
        (272, "s", 0, "C13210", True),
        (65420, "I", 1, 1, True),  # FileFormat
        (65422, "i", 1, -1234567, True),  # XOffsetFromSlideCenter, nm
        (65423, "i", 1, 765432, True),  # YOffsetFromSlideCenter, nm
        (65427, "s", 0, "SYNTH-NDPI-1", True),  # SlideLabel
        (65442, "s", 0, "NZ-000123", True),  # ScannerSerialNumber
        (65444, "I", 1, 85, True),  # JpegQuality
        (65449, "s", 0, "[NanoZoomer]\r\nscanner=synthetic\r\n", True),  # Comments
    ]
    with tifffile.TiffWriter(path.with_suffix(".classic.tif"), bigtiff=False) as tw:
        for (lv0, stripe_w), z in ((ls, z) for ls in zip(levels, stripe_widths) for z in focal_planes_nm):
            lv = lv0 if z == 0 else np.ascontiguousarray(255 - lv0)
            h, w = lv.shape[:2]
            assert w % stripe_w == 0 and h % 8 == 0
            jpeg = _restart_jpeg(lv, stripe_w // 8)
            starts = _mcu_starts(jpeg)
            assert len(starts) == (h // 8) * (w // stripe_w)
            res = round(1e4 / (mpp * width / w))  # pixels per cm
            tw.write(iter([jpeg]), shape=lv.shape, dtype=np.uint8, compression="jpeg", photometric="ycbcr",
                     subsampling=(1, 1), rowsperstrip=h, resolution=((res, 1), (res, 1)),
                     resolutionunit="CENTIMETER", software="NDP.scan 3.3.0", datetime="2023:05:17 14:21:09",
                     metadata=None, extratags=common + [
                         (65421, "f", 1, magnification, True),  # SourceLens
                         (65424, "i", 1, z, True),  # ZOffsetFromSlideCenter (focal plane), nm
                         (65426, "I", len(starts), starts, True),  # McuStarts
                     ])
        if with_macro:
            macro = np.full((224, 640, 3), 235, np.uint8)
            macro[:, 200:] = downsample(base, 4)[:224, :440]
            macro[40:180, 20:180] = (30, 30, 160)  # the label end of the slide
            jpeg = _restart_jpeg(macro, None, quality=90)
            tw.write(iter([jpeg]), shape=macro.shape, dtype=np.uint8, compression="jpeg", photometric="ycbcr",
                     subsampling=(1, 1), rowsperstrip=macro.shape[0], resolution=((1164, 1), (1164, 1)),
                     resolutionunit="CENTIMETER", software="NDP.scan 3.3.0", datetime="2023:05:17 14:21:09",
                     metadata=None, extratags=common + [(65421, "f", 1, -1.0, True), (65424, "i", 1, 0, True)])
    classic = path.with_suffix(".classic.tif")
    path.write_bytes(_classic_to_ndpi(classic.read_bytes()))
    classic.unlink()
    return {"levels": levels, "mpp": mpp, "magnification": magnification}


# --- Philips TIFF ----------------------------------------------------------------------------
#
# What tifffile (TiffFile.is_philips, _series_philips) and opentile (PhilipsTiffTiler) need:
#
# * Software starts with "Philips DP" and the first page's ImageDescription is the scanner's
#   XML, ending in "</DataObject>": a DPUfsImport DataObject with DICOM_* / PIM_DP_* attributes
#   and, inside the WSI DPScannedImage, a PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE with one
#   PixelDataRepresentation (DICOM_PIXEL_SPACING, mm, "row" "column") per pyramid level;
# * the first DICOM_PIXEL_SPACING in document order is the base level's (opentile's mpp);
# * levels are separate tiled pages (2x apart), JPEG tiles with shared JPEGTables, YCbCr 4:2:0;
#   every level's ImageWidth/ImageLength is padded up to whole tiles (the XML spacing says how
#   large the level really is; tifffile trims it);
# * tiles outside the scanned area are sparse: TileOffsets and TileByteCounts 0 (opentile
#   serves a white tile made from the first real one);
# * label and macro are strip JPEG pages whose ImageDescription is "Label" / "Macro".

def _philips_xml(width: int, height: int, spacings_mm: list[float], level_sizes: list[tuple[int, int]]) -> str:
    def attr(name, group, element, vr, value):
        return (f'<Attribute Name="{name}" Group="0x{group:04X}" Element="0x{element:04X}" '
                f'PMSVR="{vr}">{value}</Attribute>')

    q = "&quot;"
    reps = "".join(
        '<DataObject ObjectType="PixelDataRepresentation">'
        + attr("DICOM_PIXEL_SPACING", 0x0028, 0x0030, "IDoubleArray", f"{q}{s:g}{q} {q}{s:g}{q}")
        + attr("PIIM_DP_PIXEL_DATA_REPRESENTATION_POSITION", 0x101D, 0x100B, "IDoubleArray",
               f"{q}0{q} {q}0{q} {q}0{q}")
        + attr("PIIM_PIXEL_DATA_REPRESENTATION_COLUMNS", 0x2001, 0x115E, "IUInt32", w)
        + attr("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", 0x2001, 0x0082, "IUInt32", i)
        + attr("PIIM_PIXEL_DATA_REPRESENTATION_ROWS", 0x2001, 0x115D, "IUInt32", h)
        + "</DataObject>"
        for i, (s, (w, h)) in enumerate(zip(spacings_mm, level_sizes)))
    wsi = ('<DataObject ObjectType="DPScannedImage">'
           + attr("DICOM_DERIVATION_DESCRIPTION", 0x0008, 0x2111, "IString",
                  "tiff-useBigTIFF=1-useRgb=0-levels=10003,10002,10000,10001-processing=0-q80")
           + attr("DICOM_LOSSY_IMAGE_COMPRESSION", 0x0028, 0x2110, "IString", "01")
           + attr("DICOM_LOSSY_IMAGE_COMPRESSION_METHOD", 0x0028, 0x2114, "IStringArray", f"{q}PHILIPS_DP_1_0{q}")
           + attr("DICOM_LOSSY_IMAGE_COMPRESSION_RATIO", 0x0028, 0x2112, "IDoubleArray", f"{q}3{q}")
           + attr("DICOM_BITS_ALLOCATED", 0x0028, 0x0100, "IUInt16", 8)
           + attr("DICOM_BITS_STORED", 0x0028, 0x0101, "IUInt16", 8)
           + attr("DICOM_HIGH_BIT", 0x0028, 0x0102, "IUInt16", 7)
           + attr("DICOM_PHOTOMETRIC_INTERPRETATION", 0x0028, 0x0004, "IString", "RGB")
           + attr("DICOM_PIXEL_REPRESENTATION", 0x0028, 0x0103, "IUInt16", 0)
           + attr("DICOM_PIXEL_SPACING", 0x0028, 0x0030, "IDoubleArray",
                  f"{q}{spacings_mm[0]:g}{q} {q}{spacings_mm[0]:g}{q}")
           + attr("DICOM_PLANAR_CONFIGURATION", 0x0028, 0x0006, "IUInt16", 0)
           + attr("DICOM_SAMPLES_PER_PIXEL", 0x0028, 0x0002, "IUInt16", 3)
           + attr("PIM_DP_IMAGE_COLUMNS", 0x101D, 0x1007, "IUInt32", width)
           + attr("PIM_DP_IMAGE_ROWS", 0x101D, 0x1008, "IUInt32", height)
           + attr("PIM_DP_IMAGE_TYPE", 0x101D, 0x1004, "IString", "WSI")
           + attr("PIM_DP_SOURCE_FILE", 0x8B01, 0x1000, "IString", "%FILENAME%")
           + '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" '
             'PMSVR="IDataObjectArray"><Array>' + reps + "</Array></Attribute>"
           + "</DataObject>")
    assoc = "".join(
        '<DataObject ObjectType="DPScannedImage">'
        + attr("PIM_DP_IMAGE_TYPE", 0x101D, 0x1004, "IString", kind)
        + "</DataObject>"
        for kind in ("LABELIMAGE", "MACROIMAGE"))
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
        + attr("DICOM_ACQUISITION_DATETIME", 0x0008, 0x002A, "IString", "20220314103015.000000")
        + attr("DICOM_DATE_OF_LAST_CALIBRATION", 0x0018, 0x1200, "IStringArray", f"{q}20220301{q}")
        + attr("DICOM_DEVICE_SERIAL_NUMBER", 0x0018, 0x1000, "IString", "FMT0042")
        + attr("DICOM_MANUFACTURER", 0x0008, 0x0070, "IString", "PHILIPS")
        + attr("DICOM_SOFTWARE_VERSIONS", 0x0018, 0x1020, "IStringArray", f"{q}1.6.6186{q} {q}20180906_R51{q}")
        + attr("DICOM_TIME_OF_LAST_CALIBRATION", 0x0018, 0x1201, "IStringArray", f"{q}101500{q}")
        + attr("PIM_DP_UFS_INTERFACE_VERSION", 0x301D, 0x1001, "IString", "5.0")
        + attr("PIM_DP_UFS_BARCODE", 0x301D, 0x1002, "IString", "U1lOVEgtUEhJTElQUy0x")
        + '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray">'
          "<Array>" + wsi + assoc + "</Array></Attribute>"
        + "</DataObject>\n")


def _jpeg_tiles_with_tables(img: np.ndarray, tile: int, sparse: set[int], quality: int = 80,
                            subsampling: str = "420"):
    """Abbreviated YCbCr JPEG tiles + one JPEGTables; tiles whose index is in `sparse` are b""."""
    tables = None
    tiles = []
    for i, t in enumerate(iter_tiles(img, tile)):
        if i in sparse:
            tiles.append(b"")
            continue
        full = strip_app_markers(imagecodecs.jpeg8_encode(t, level=quality, subsampling=subsampling))
        tab, abbrev = split_tables(full)
        tables = tables or tab
        assert tab == tables
        tiles.append(abbrev)
    return tables, tiles


def write_philips(path: Path, width: int = 2048, height: int = 1536, tile: int = 512, seed: int = 6,
                  mpp: float = 0.25, n_levels: int = 4, sparse: tuple[int, ...] = (2, 3, 6, 7),
                  with_label: bool = True, with_macro: bool = True) -> dict:
    """A Philips UFS-export-like TIFF: 2x pyramid of padded tiled pages, sparse tiles, Label/Macro pages.

    `sparse` are tile indices of the base level (and of level 1 at the same place, halved) left
    empty, as the scanner leaves tiles outside the tissue.
    """
    assert width % tile == 0 and height % tile == 0, "Philips base levels are whole tiles"
    base = make_image(height, width, seed)
    nx = width // tile
    for i in sparse:  # the scanner never saw these: white in the picture we compare against
        ty, tx = divmod(i, nx)
        base[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile] = 255
    levels = [base] + [downsample(base, 2 ** k) for k in range(1, n_levels)]
    spacings = [mpp / 1000 * 2 ** k for k in range(n_levels)]
    sizes = [(lv.shape[1], lv.shape[0]) for lv in levels]
    xml = _philips_xml(width, height, spacings, sizes)
    sparse_by_level = []
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, lv in enumerate(levels):
            h, w = lv.shape[:2]
            ph, pw = -(-h // tile) * tile, -(-w // tile) * tile  # padded to whole tiles
            padded = np.zeros((ph, pw, 3), np.uint8)
            padded[:h, :w] = lv
            lnx = pw // tile
            sp = set()
            if k < 2:
                for i in sparse:
                    ty, tx = divmod(i, nx)
                    if k == 0:
                        sp.add(i)
                    elif ty % 2 == 0 and tx % 2 == 0 and {i + 1, i + nx, i + nx + 1} <= set(sparse):
                        sp.add((ty // 2) * lnx + tx // 2)
            sparse_by_level.append(sp)
            tables, tiles = _jpeg_tiles_with_tables(padded, tile, sp)
            tw.write(iter(tiles), shape=padded.shape, dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     photometric="ycbcr", subsampling=(2, 2), jpegtables=tables,
                     description=xml if k == 0 else None, software="Philips DP v1.0",
                     subfiletype=0 if k == 0 else 1, metadata=None)
        if with_label:
            label = np.full((400, 480, 3), 245, np.uint8)
            label[120:280, 60:420] = (25, 25, 25)
            tw.write(label, compression="jpeg", compressionargs={"level": 90}, photometric="ycbcr",
                     rowsperstrip=label.shape[0], description="Label", software="Philips DP v1.0",
                     subfiletype=1, metadata=None)
        if with_macro:
            macro = np.full((300, 860, 3), 230, np.uint8)
            macro[:, 300:812] = downsample(base, 4)[:300, :512]
            tw.write(macro, compression="jpeg", compressionargs={"level": 90}, photometric="ycbcr",
                     rowsperstrip=macro.shape[0], description="Macro", software="Philips DP v1.0",
                     subfiletype=1, metadata=None)
    return {"levels": levels, "tile": tile, "mpp": mpp, "sparse": sparse_by_level}
