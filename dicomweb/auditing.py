"""Who is asking over HTTP, for the audit trail: the request's principal (dicomweb.auth),
the client's address (X-Forwarded-For only from `http.trusted_proxies`) and the audit session."""
from __future__ import annotations

from aiohttp import web

from archive.access import Principal

from .auth import principal_of
from .common import client_address  # noqa: F401  (re-exported)


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
