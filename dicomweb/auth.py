"""Who is asking: the HTTP side of `archive.access` (credentials -> a Principal per request)."""
from __future__ import annotations

from aiohttp import web

from archive.access import ANONYMOUS, Principal

PRINCIPAL = "pathpacs.principal"  # request key holding the caller's Principal


def principal_of(request: web.Request) -> Principal:
    """The authenticated caller of this request (set by the auth middleware)."""
    return request.get(PRINCIPAL, ANONYMOUS)
