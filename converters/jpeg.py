"""Small, allocation-light helpers on JPEG and JPEG 2000 byte streams.

Only marker-segment bookkeeping lives here (no entropy decoding): merging TIFF
``JPEGTables`` into abbreviated tile streams, adding the Adobe APP14 marker
that tells a decoder "these components are RGB, do not colour-transform", and
reading the frame header to pick the DICOM Photometric Interpretation.
"""

from __future__ import annotations

from dataclasses import dataclass

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# Adobe APP14, version 100, flags0 0, flags1 0, transform 0 (= RGB/CMYK, no transform)
ADOBE_APP14_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

# Markers without a length field
_STANDALONE = {0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class JpegError(ValueError):
    pass


def iter_header_segments(data: bytes):
    """Yield (marker, start, end) for the segments before the first SOS (inclusive)."""
    if data[:2] != SOI:
        raise JpegError("not a JPEG stream (no SOI)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise JpegError(f"bad JPEG marker at offset {i}")
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in _STANDALONE:
            yield m, i, i + 2
            i += 2
            if m == 0xD9:
                return
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        yield m, i, i + 2 + length
        if m == 0xDA:
            return
        i += 2 + length
    raise JpegError("truncated JPEG header")


@dataclass(frozen=True)
class JpegInfo:
    width: int
    height: int
    components: int
    component_ids: tuple[int, ...]
    sampling: tuple[tuple[int, int], ...]
    precision: int
    sof: int
    has_app14: bool
    app14_transform: int | None
    has_jfif: bool

    @property
    def baseline(self) -> bool:
        return self.sof == 0xC0 and self.precision == 8

    @property
    def subsampled(self) -> bool:
        return len(set(self.sampling)) > 1


def jpeg_info(data: bytes) -> JpegInfo:
    sof = None
    app14 = None
    jfif = False
    for m, s, e in iter_header_segments(data):
        if m in _SOF:
            seg = data[s + 4:e]
            precision = seg[0]
            height = int.from_bytes(seg[1:3], "big")
            width = int.from_bytes(seg[3:5], "big")
            nc = seg[5]
            ids, samp = [], []
            for k in range(nc):
                cid, hv = seg[6 + 3 * k], seg[7 + 3 * k]
                ids.append(cid)
                samp.append((hv >> 4, hv & 15))
            sof = (m, precision, height, width, nc, tuple(ids), tuple(samp))
        elif m == 0xEE and data[s + 4:s + 9] == b"Adobe":
            app14 = data[s + 15] if e - s >= 16 else 0
        elif m == 0xE0 and data[s + 4:s + 8] == b"JFIF":
            jfif = True
    if sof is None:
        raise JpegError("JPEG stream without a frame header (SOF)")
    m, precision, height, width, nc, ids, samp = sof
    return JpegInfo(width, height, nc, ids, samp, precision, m, app14 is not None, app14, jfif)


def merge_tables(tables: bytes | None, tile: bytes) -> bytes:
    """Abbreviated tile + JPEGTables -> full interchange JPEG (no re-encode).

    The tables (everything between the SOI and EOI of ``tables``) are inserted
    right after the tile's SOI; tables the tile defines itself come later and
    so still take precedence, as they would in the TIFF decoder.
    """
    if not tables or len(tables) <= 4:
        return tile
    if tile[:2] != SOI:
        raise JpegError("tile is not a JPEG stream")
    body = tables[2:-2] if tables[-2:] == EOI else tables[2:]
    return b"".join((SOI, body, tile[2:]))


def insert_app14_rgb(data: bytes) -> bytes:
    return b"".join((SOI, ADOBE_APP14_RGB, data[2:]))


def fix_tile(tables: bytes | None, tile: bytes, add_app14: bool) -> bytes:
    """Merge tables and (for RGB-coded tiles) add the Adobe no-transform marker."""
    if tables and len(tables) > 4:
        body = tables[2:-2] if tables[-2:] == EOI else tables[2:]
    else:
        body = b""
    if add_app14:
        return b"".join((SOI, ADOBE_APP14_RGB, body, tile[2:]))
    if body:
        return b"".join((SOI, body, tile[2:]))
    return tile


def strip_app_markers(data: bytes, markers=(0xE0, 0xEE)) -> bytes:
    """Remove the given APPn segments from the header of a JPEG stream."""
    out = [SOI]
    last = 2
    for m, s, e in iter_header_segments(data):
        if m == 0xD8:
            continue
        if m in markers:
            out.append(data[last:s])
            last = e
    out.append(data[last:])
    return b"".join(out)


def split_tables(data: bytes) -> tuple[bytes, bytes]:
    """Full JPEG -> (tables-only stream, abbreviated image stream), as TIFF stores them."""
    tables = [SOI]
    image = [SOI]
    last = 2
    for m, s, e in iter_header_segments(data):
        if m == 0xD8:
            continue
        if m in (0xDB, 0xC4):
            image.append(data[last:s])
            tables.append(data[s:e])
            last = e
    image.append(data[last:])
    tables.append(EOI)
    return b"".join(tables), b"".join(image)


# --- JPEG 2000 -----------------------------------------------------------------

@dataclass(frozen=True)
class J2kInfo:
    width: int
    height: int
    components: int
    reversible: bool
    mct: bool


def j2k_info(data: bytes) -> J2kInfo:
    """Read SIZ and COD of a raw JPEG 2000 codestream (or a JP2 file's jp2c box)."""
    start = data.find(b"\xff\x4f\xff\x51")
    if start < 0:
        raise JpegError("not a JPEG 2000 codestream")
    i = start + 2
    width = height = comps = None
    reversible = mct = None
    n = len(data)
    while i + 4 <= n:
        marker = int.from_bytes(data[i:i + 2], "big")
        length = int.from_bytes(data[i + 2:i + 4], "big")
        seg = data[i + 4:i + 2 + length]
        if marker == 0xFF51:  # SIZ
            xsiz, ysiz, xo, yo = (int.from_bytes(seg[2 + 4 * k:6 + 4 * k], "big") for k in range(4))
            width, height = xsiz - xo, ysiz - yo
            comps = int.from_bytes(seg[34:36], "big")
        elif marker == 0xFF52:  # COD
            mct = seg[4] == 1
            reversible = seg[9] == 1
        elif marker == 0xFF90:  # SOT: end of main header
            break
        i += 2 + length
    if width is None or reversible is None:
        raise JpegError("JPEG 2000 codestream without SIZ/COD")
    return J2kInfo(width, height, comps, reversible, bool(mct))
