"""Who is asking over HTTP, for the audit trail: the request's principal (dicomweb.auth),
the client's address (X-Forwarded-For only from `http.trusted_proxies`) and the audit session."""
from __future__ import annotations

from aiohttp import web

from archive.access import Principal

from .auth import principal_of
from .common import from_trusted_proxy


def client_address(request: web.Request) -> str:
    """The client's address: the first X-Forwarded-For hop when a trusted proxy sent it."""
    if from_trusted_proxy(request):
        fwd = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        if fwd and len(fwd) <= 64 and all(c.isalnum() or c in ".:[]" for c in fwd):
            return fwd
    return request.remote or ""


def caller(request: web.Request) -> tuple[Principal, str, str]:
    """(principal, address, session): one audit session per user and client address."""
    address = client_address(request)
    return principal_of(request), address, f"http {address}"


def retrieved(request: web.Request, audit, study: str, *, n_instances: int = 0, n_frames: int = 0,
              sop: str | None = None, sop_class: str = "") -> None:
    """Count a WADO-RS read into this user's aggregated record for the study (cheap: the frame
    path calls it once per request)."""
    who, address, session = caller(request)
    audit.retrieved(who, study, None, n_instances, n_frames, address, "", session, sop=sop, sop_class=sop_class)
