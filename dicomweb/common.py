"""Helpers shared by the DICOMweb handlers: errors, base URL, multipart framing, input bounds."""
from __future__ import annotations

import ipaddress
import os
import re

from aiohttp import web

from archive.metadata import BASE_TOKEN

BASE_TOKEN_B = BASE_TOKEN.encode()
TRUSTED_PROXIES_KEY = web.AppKey("trusted_proxies", list)
# Headers we parse: their values must be printable ASCII (RFC 9110 field values we understand).
PARSED_HEADERS = ("Accept", "Content-Type", "Accept-Encoding", "If-None-Match", "Origin",
                  "Access-Control-Request-Headers", "X-Forwarded-Proto", "X-Forwarded-Host",
                  "X-Forwarded-Prefix")
_PRINTABLE = re.compile(r"^[\t\x20-\x7e]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-_:\[\]]{1,255}$")
_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~\-]+)*$")
UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*\Z")  # \Z: "$" would let a trailing "\n" through


def error(status: int, reason: str, headers: dict | None = None) -> web.Response:
    """An HTTP error answer with the reason as plain text (also in a Warning header).
    The reason may quote client input: anything not encodable is replaced, never raised."""
    h = {"Warning": f'299 pathpacs "{_header_safe(reason)}"'}
    if headers:
        h.update(headers)
    body = (reason + "\n").encode("utf-8", "replace")
    return web.Response(status=status, body=body, content_type="text/plain", charset="utf-8", headers=h)


def check_headers(request: web.Request) -> None:
    """400 for a parsed header that is not printable ASCII (a non-UTF-8 byte arrives as a
    lone surrogate and would break every later encode)."""
    headers = request.headers
    for name in PARSED_HEADERS:
        value = headers.get(name)
        if value is not None and not (value.isascii() and (value.isprintable() or _PRINTABLE.match(value))):
            raise HttpError(400, f"the {name} header holds characters that are not printable ASCII")


class HttpError(Exception):
    """Raise inside a handler to answer `status` with `reason`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def log_safe(s: str, limit: int = 2000) -> str:
    """Client text for a log line: control characters (CR, LF, ESC...) escaped, so a request
    cannot forge log lines or send terminal escapes to whoever reads the log."""
    s = s[:limit]
    return s if s.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _header_safe(s: str) -> str:
    s = s.replace('"', "'").replace("\\", "/")
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in s)[:300]


def from_trusted_proxy(request: web.Request) -> bool:
    """True when the peer is one of `http.trusted_proxies`: only then are X-Forwarded-* used."""
    networks = request.app.get(TRUSTED_PROXIES_KEY) or []
    if not networks or not request.remote:
        return False
    try:
        addr = ipaddress.ip_address(request.remote)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def base_url(request: web.Request) -> str:
    """Absolute DICOMweb root for this request. X-Forwarded-{Proto,Host,Prefix} are honoured
    only from a configured proxy (`http.trusted_proxies`): any client could send them."""
    h = request.headers if from_trusted_proxy(request) else {}
    proto = h.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    if proto not in ("http", "https"):
        proto = request.scheme if request.scheme in ("http", "https") else "http"
    host = h.get("X-Forwarded-Host", "").split(",")[0].strip()
    if not host or not _HOST_RE.match(host):
        host = request.host if _HOST_RE.match(request.host or "") else "localhost"
        # Some clients (dicomweb-client) send Host without the port. Without a proxy
        # header to say otherwise, the port we were reached on is the right one.
        if not host.endswith("]") and ":" not in host.rsplit("]", 1)[-1]:
            sock = request.transport.get_extra_info("sockname") if request.transport else None
            if sock and len(sock) >= 2 and sock[1] not in (80, 443):
                host = f"{host}:{sock[1]}"
    prefix = h.get("X-Forwarded-Prefix", "").split(",")[0].strip().rstrip("/")
    if not _PREFIX_RE.match(prefix):
        prefix = ""
    return f"{proto}://{host}{prefix}/dicomweb"


def check_uid(value: str, what: str) -> str:
    if not value or len(value) > 64 or not UID_RE.match(value):
        raise HttpError(400, f"invalid {what} {value[:80]!r}")
    return value


_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")


def check_boundary(value: str) -> str:
    """A multipart boundary as RFC 2046 5.1.1 defines it: 1-70 characters from a fixed set.
    A leading space is legal there but the multipart parser (aiohttp) strips it, so every
    part would fail: refused up front with that reason instead."""
    if not _BOUNDARY.match(value):
        raise HttpError(400, "the multipart boundary must be 1-70 characters (RFC 2046 bchars), "
                             f"got {len(value)} characters")
    if value.startswith(" "):
        raise HttpError(400, "a multipart boundary starting with a space is not supported")
    return value


def boundary() -> str:
    return os.urandom(12).hex()


def part_head(bnd: str, content_type: str, extra: str = "") -> bytes:
    return f"--{bnd}\r\nContent-Type: {content_type}\r\n{extra}\r\n".encode()


def multipart_body(bnd: str, parts: list[tuple[str, bytes]]) -> bytes:
    """One multipart/related body from (content type, bytes) parts."""
    chunks: list[bytes] = []
    for ct, data in parts:
        chunks.append(f"--{bnd}\r\nContent-Type: {ct}\r\n\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{bnd}--\r\n".encode())
    return b"".join(chunks)


def client_address(request: web.Request) -> str:
    """The client's address: the first X-Forwarded-For hop when a trusted proxy sent it."""
    if from_trusted_proxy(request):
        fwd = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if fwd and len(fwd) <= 64 and all(c.isalnum() or c in ".:[]" for c in fwd):
            return fwd
    return request.remote or ""


def path_uids(request) -> tuple[str | None, str | None, str | None]:
    """The study, series and instance UIDs of a resource path, each checked (400 when one is
    not a UID), None where the path has none."""
    mi = request.match_info
    out = []
    for key, name in (("study", "Study Instance UID"), ("series", "Series Instance UID"),
                      ("instance", "SOP Instance UID")):
        value = mi.get(key)
        if value is not None:
            check_uid(value, name)
        out.append(value)
    return out[0], out[1], out[2]
