"""Accept-header parsing and the transfer syntax <-> media type table (PS3.18 8.7).

Negotiation here decides, for each retrieve, which bytes go out: the stored bytes
(the default and the fast path) or a transcoding (explicit VR little endian, JPEG
baseline), or 406 when nothing acceptable can be produced.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
NATIVE = {EXPLICIT_LE, IMPLICIT_LE}  # little endian, byte-identical pixel data

# transfer syntax -> the image media type its frames are served as (PS3.18 Table 8.7.3-2)
TS_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# default transfer syntax when a client names only the image media type
MEDIA_DEFAULT_TS = {
    "image/jpeg": JPEG_BASELINE,
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/jxl": "1.2.840.10008.1.2.4.110",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/x-dicom-rle": "1.2.840.10008.1.2.5",
    "image/x-jls": "1.2.840.10008.1.2.4.80",
}


def media_of_ts(ts: str) -> str:
    return TS_MEDIA.get(ts, "application/octet-stream")


class NotAcceptable(Exception):
    """Nothing the client accepts can be produced (HTTP 406)."""


@dataclass
class MediaRange:
    type: str  # e.g. "multipart/related", "application/dicom+json", "*/*"
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def multipart(self) -> bool:
        return self.type == "multipart/related"

    @property
    def part_type(self) -> str | None:
        """For multipart/related: the type parameter (lower case), else the type itself."""
        if self.multipart:
            t = self.params.get("type")
            return t.lower() if t else None
        return self.type

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split_outside_quotes(s: str, sep: str) -> list[str]:
    out, cur, quoted = [], [], False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


MAX_MEDIA_RANGES = 64
_Q = re.compile(r"^(0(\.[0-9]{0,3})?|1(\.0{0,3})?)$")  # RFC 9110 12.4.2 qvalue


_ACCEPT_CACHE: dict[str, list["MediaRange"]] = {}


def parse_accept(header: str | None) -> list[MediaRange]:
    """See _parse_accept; remembered per header text (clients send the same one on every
    request, and the frame path is hot). Callers must not change the list."""
    if header is None:
        return []
    got = _ACCEPT_CACHE.get(header)
    if got is None:
        got = _parse_accept(header)
        if len(_ACCEPT_CACHE) >= 256:
            _ACCEPT_CACHE.clear()
        _ACCEPT_CACHE[header] = got
    return got


def _parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges in preference order (q descending, then as written). No header -> [].

    A range with q=0 is "not acceptable", and so is one whose q is not a valid qvalue
    (`q=-1`, `q=abc`); a header that leaves nothing acceptable is NotAcceptable (406),
    never "no preference"."""
    if header is None or not header.strip():
        return []
    items = _split_outside_quotes(header, ",")
    if len(items) > MAX_MEDIA_RANGES:
        raise NotAcceptable(f"the Accept header lists more than {MAX_MEDIA_RANGES} media ranges")
    ranges: list[tuple[float, int, MediaRange]] = []
    for i, item in enumerate(items):
        item = item.strip()
        if not item:
            continue
        parts = _split_outside_quotes(item, ";")
        mtype = parts[0].strip().lower()
        params: dict[str, str] = {}
        q = 1.0
        for p in parts[1:]:
            k, _, v = p.partition("=")
            k = k.strip().lower()
            v = v.strip().strip('"')
            if k == "q":
                q = float(v) if _Q.match(v) else 0.0
            elif k:
                params[k] = v
        if q <= 0:
            continue
        ranges.append((q, i, MediaRange(mtype, params, q)))
    if not ranges:
        raise NotAcceptable(f"the Accept header {header[:200]!r} accepts nothing (every range has q=0 or an invalid q)")
    ranges.sort(key=lambda t: (-t[0], t[1]))
    return [r for _, _, r in ranges]


def parse_content_type(header: str | None) -> tuple[str, dict[str, str]]:
    if not header:
        return "", {}
    parts = _split_outside_quotes(header, ";")
    params = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k.strip():
            params[k.strip().lower()] = v.strip().strip('"')
    return parts[0].strip().lower(), params


def wants(ranges: list[MediaRange], *candidates: str) -> str | None:
    """The first of `candidates` (single-part media types) acceptable to `ranges`.
    No Accept header means the first candidate."""
    if not ranges:
        return candidates[0]
    for r in ranges:
        t = r.part_type if r.multipart else r.type
        for c in candidates:
            if t == c or t in ("*/*", None) or (t.endswith("/*") and c.startswith(t[:-1])):
                return c
    return None


# -- what each resource answers (one place for every Accept decision) --------------------------

def negotiate_frames(accept: str | None, stored_ts: str, n_frames: int) -> tuple[str, str, str, bool]:
    """-> (mode, media type, transfer syntax, multipart); mode: stored | native | jpeg."""
    stored_media = media_of_ts(stored_ts)
    ranges = parse_accept(accept)
    if not ranges:
        return "stored", stored_media, stored_ts, True
    for r in ranges:
        multipart = r.multipart
        t = (r.part_type or "*/*") if multipart else r.type
        ts = r.transfer_syntax
        if not multipart and n_frames != 1:
            if r.type != "*/*":
                continue  # single-part answers carry one frame only
            multipart = True  # */* covers multipart/related too
        if t in ("*/*", "*", "application/*", "image/*"):
            if ts in (None, "*", stored_ts) and (t != "image/*" or stored_media.startswith("image/")):
                return "stored", stored_media, stored_ts, multipart
            if ts == EXPLICIT_LE and t != "image/*":
                return ("stored" if stored_ts in NATIVE else "native"), "application/octet-stream", EXPLICIT_LE, multipart
            continue
        if t == "application/octet-stream":
            if ts == "*" or ts == stored_ts:
                return "stored", t, stored_ts, multipart
            if ts in (None, EXPLICIT_LE):
                return ("stored" if stored_ts in NATIVE else "native"), t, EXPLICIT_LE, multipart
            continue
        if t.startswith("image/"):
            if t == "image/x-jls":
                t = "image/jls"
            want = stored_ts if ts == "*" and t == stored_media else (ts or MEDIA_DEFAULT_TS.get(t))
            if t == stored_media and want == stored_ts:
                return "stored", t, stored_ts, multipart
            if t == "image/jpeg" and want == JPEG_BASELINE:
                return "jpeg", t, JPEG_BASELINE, multipart
    raise NotAcceptable(f"cannot serve frames stored as {stored_ts} in any of the accepted media types "
                        f"({accept}); stored bytes are available as {stored_media} or "
                        f"application/octet-stream with transfer-syntax=*")


def negotiate_instances(accept: str | None) -> str | None:
    """-> None for the stored transfer syntax, else the requested one."""
    ranges = parse_accept(accept)
    if not ranges:
        return None
    for r in ranges:
        t = (r.part_type or "application/dicom") if r.multipart else r.type
        if not r.multipart and t != "*/*":
            continue
        if t not in ("application/dicom", "*/*", "application/*"):
            continue
        ts = r.transfer_syntax
        return None if ts in (None, "*") else ts
    raise NotAcceptable('instances are served as multipart/related; type="application/dicom"')


def negotiate_search(accept: str | None) -> bool:
    """QIDO-RS: True for multipart/related; type=application/dicom+xml; 406 when nothing fits."""
    ranges = parse_accept(accept)
    if not ranges:
        return False
    for r in ranges:
        if r.multipart:
            if r.part_type in ("application/dicom+xml", None):
                return True
            continue
        if r.type in ("application/dicom+json", "application/json", "*/*", "application/*"):
            return False
    raise NotAcceptable("QIDO-RS answers application/dicom+json or multipart/related; "
                         "type=\"application/dicom+xml\"")


def negotiate_metadata(accept: str | None) -> bool:
    """WADO-RS metadata: False for application/dicom+json (the default), True for
    multipart/related; type="application/dicom+xml"; 406 when neither is acceptable."""
    ranges = parse_accept(accept)
    for r in ranges:
        if r.multipart and r.part_type == "application/dicom+xml":
            return True
        if r.type in ("application/dicom+json", "application/json", "*/*", "application/*"):
            return False
    if not ranges:
        return False
    raise NotAcceptable("metadata is served as application/dicom+json or "
                        "multipart/related; type=\"application/dicom+xml\"")


def negotiate_bulk(accept: str | None) -> bool:
    """Bulk data: True for multipart/related (the default), False for a single part."""
    ranges = parse_accept(accept)
    if not ranges:
        return True
    for r in ranges:
        t = (r.part_type or "application/octet-stream") if r.multipart else r.type
        if t in ("application/octet-stream", "*/*", "application/*"):
            return r.multipart or t != "application/octet-stream"
    raise NotAcceptable("bulk data is served as application/octet-stream")


def negotiate_rendered(accept: str | None) -> str:
    """Rendered resources and thumbnails: the image media type to encode."""
    ranges = parse_accept(accept)
    if not ranges:
        return "image/jpeg"
    for r in ranges:
        t = r.type
        if t in ("image/jpeg", "image/png", "image/gif"):
            return t
        if t in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptable("rendered images are available as image/jpeg, image/png or image/gif")


def negotiate_store_response(accept: str | None) -> bool:
    """STOW-RS response: False for application/dicom+json (the default), True for XML."""
    for r in parse_accept(accept):
        t = r.part_type if r.multipart else r.type
        if t == "application/dicom+xml":
            return True
        if t in ("application/dicom+json", "application/json", "*/*", "application/*", None):
            return False
    if not accept or not accept.strip():
        return False
    raise NotAcceptable("the store response is application/dicom+json or application/dicom+xml")
