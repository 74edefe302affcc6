"""The frame table: where each frame of an instance lies in its blob, and its CRC32C.

Written once at ingest (archive.dicomfile finds the fragments), read on every frame request
straight from the index's memory map: only the header and the slots asked for are decoded.

Format (the value of one instance's entry), a JSON header line + "\\n" + body:
  header {"n": frames, "single": one fragment per frame, "v": version[, "damaged": reason]}
  v 1 (schema <= 2): the header also held blob, tier, ts; single -> n x <QQ (offset, length);
                     else JSON [[[offset, length], ...], ...]
  v 2 (schema 3):    as v 1, and single -> n x <QQI (offset, length, crc32c);
                     else JSON {"f": frames, "c": crcs}
  v 3 (schema 4):    no JSON: a 12-byte header b"FT3" + <B flags (1 single, 2 checked) + <I n
                     + <I damaged length, the damaged reason (UTF-8), then the body as in v 2; the
                     instance's location is recorded once, beside its record
"damaged" marks a v 1 table whose blob failed its sha256 when checksums were added: its frames
are refused, never served unchecked.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Iterable, NamedTuple, Sequence

_QQ = struct.Struct("<QQ")
_QQI = struct.Struct("<QQI")
VERSION = 3

Fragments = list[tuple[int, int]]


class TableHead(NamedTuple):
    """(A NamedTuple: one is made per frame request, a tuple is the cheapest record.)"""

    n: int
    checked: bool  # frames carry CRC32C
    damaged: str | None
    legacy: dict[str, Any]  # blob/tier/ts of a v1/v2 table (migration only)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_V3 = struct.Struct("<3sBII")
MAGIC = b"FT3"


def pack(frames: Sequence[Sequence[tuple[int, int]]], crcs: Sequence[int] | None,
         damaged: str | None = None) -> bytes:
    """A v3 table for `frames` (fragments per frame) with their CRCs (None: not known)."""
    single = all(len(f) == 1 for f in frames)
    reason = (damaged or "").encode()
    head = _V3.pack(MAGIC, (1 if single else 0) | (2 if crcs is not None else 0), len(frames), len(reason)) + reason
    if crcs is None:
        body = b"".join(_QQ.pack(f[0][0], f[0][1]) for f in frames) if single else _dumps(
            [[list(x) for x in f] for f in frames])
    elif single:
        body = b"".join(_QQI.pack(f[0][0], f[0][1], c) for f, c in zip(frames, crcs))
    else:
        body = _dumps({"f": [[list(x) for x in f] for f in frames], "c": list(crcs)})
    return head + body


def _split(buf) -> tuple[dict[str, Any], int]:
    """(header fields, offset of the body) of a table of any version."""
    if bytes(buf[:3]) == MAGIC:
        _, flags, n, dlen = _V3.unpack_from(buf, 0)
        h: dict[str, Any] = {"n": n, "single": bool(flags & 1), "v": 3 if flags & 2 else 1}
        if dlen:
            h["damaged"] = bytes(buf[_V3.size:_V3.size + dlen]).decode()
        return h, _V3.size + dlen
    head_end = bytes(buf[:512]).find(b"\n")
    if head_end < 0:
        head_end = bytes(buf).index(b"\n")
    return json.loads(bytes(buf[:head_end])), head_end + 1


def head(buf) -> TableHead:
    h, _ = _split(buf)
    legacy = {k: h[k] for k in ("blob", "tier", "ts") if k in h}
    return TableHead(h["n"], h.get("v", 1) >= 2, h.get("damaged"), legacy)


def _single_checked(buf, base: int, n: int, numbers: Sequence[int]
                    ) -> tuple[list[Fragments | None], list[int | None]]:
    """One (offset, length, CRC32C) slot of 20 bytes per frame from `base`: v3 and v2 alike."""
    out: list[Fragments | None] = []
    crcs: list[int | None] = []
    for k in numbers:
        if 1 <= k <= n:
            off, length, crc = _QQI.unpack_from(buf, base + 20 * (k - 1))
            out.append([(off, length)])
            crcs.append(crc)
        else:
            out.append(None)
            crcs.append(None)
    return out, crcs


def read(buf, numbers: Iterable[int]) -> tuple[TableHead, list[Fragments | None], list[int | None]]:
    """The header, the fragments of each 1-based frame in `numbers` (None when out of range)
    and their CRC32C (None when the table predates checksums). `buf` may be an LMDB buffer."""
    if bytes(buf[:3]) == MAGIC:
        _, flags, n, dlen = _V3.unpack_from(buf, 0)
        if flags == 3 and not dlen:  # the frame path: one fragment per frame, with CRCs
            out, crcs = _single_checked(buf, _V3.size, n, numbers)
            return TableHead(n, True, None, _NO_LEGACY), out, crcs
    h, base = _split(buf)
    checked = h.get("v", 1) >= 2
    th = TableHead(h["n"], checked, h.get("damaged"), {k: h[k] for k in ("blob", "tier", "ts") if k in h})
    n = h["n"]
    out = []
    crcs = []
    if h["single"] and checked:
        out, crcs = _single_checked(buf, base, n, numbers)
    elif h["single"]:
        for k in numbers:
            out.append([_QQ.unpack_from(buf, base + 16 * (k - 1))] if 1 <= k <= n else None)
            crcs.append(None)
    else:
        body = json.loads(bytes(buf[base:]))
        frames, all_crcs = (body["f"], body["c"]) if checked else (body, None)
        for k in numbers:
            ok = 1 <= k <= n
            out.append([tuple(x) for x in frames[k - 1]] if ok else None)  # type: ignore[misc]
            crcs.append(all_crcs[k - 1] if ok and all_crcs is not None else None)
    return th, out, crcs


_NO_LEGACY: dict[str, Any] = {}


def read_all(buf) -> tuple[TableHead, list[Fragments], list[int | None]]:
    h, _ = _split(buf)
    th, frags, crcs = read(buf, range(1, h["n"] + 1))
    return th, [f for f in frags if f is not None], crcs
