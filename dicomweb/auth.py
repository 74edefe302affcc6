"""Who is asking, and may they: the HTTP side of `archive.access` and `archive.authn`.

One middleware authenticates every request (a cached lookup; a miss that may fetch OIDC keys
runs on a thread) and checks the right each route needs, from one table: GET/HEAD under
/dicomweb read, POST stores (per-object rights are checked by STOW), DELETE administers,
/api/tokens is the security administrator's, /api/audit the auditor's. A study in the path
outside a scoped principal's studies is 404, as if it did not exist. The pages' shell and
static files need no credential: they hold no patient data and are where one logs in.
401 answers carry `WWW-Authenticate: Bearer`; 403 says which right is missing.
"""
from __future__ import annotations

import re
import time

from aiohttp import web

from archive.access import ANONYMOUS, Forbidden, Principal, Right, Unauthenticated

from .common import client_address, error

PRINCIPAL = "pathpacs.principal"  # request key holding the caller's Principal
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = frozenset({"/", "/favicon.ico", "/api/login-config", "/viewer"})  # /viewer: a static shell too
PUBLIC_PATHS = PUBLIC_PATHS | {"/share"}  # the share link's page: a shell that keeps the link's token (dicomweb/share.py)
PUBLIC_PATHS = PUBLIC_PATHS | {"/healthz"}  # the load balancer's health check: a node name, nothing else
# Whole instances, series or studies as application/dicom: Right.DOWNLOAD, which a read-only
# share link lacks (it views: metadata, frames, rendered, thumbnails, bulk data of metadata).
_WHOLE = re.compile(r"^/dicomweb/studies/[^/]+(/series/[^/]+(/instances/[^/]+)?)?/?$")


def principal_of(request: web.Request) -> Principal:
    """The authenticated caller of this request (set by the auth middleware)."""
    return request.get(PRINCIPAL, ANONYMOUS)


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization")
    if not value:
        return None
    scheme, _, cred = value.partition(" ")
    if scheme.lower() != "bearer" or not cred.strip():
        return ""  # present but not a bearer credential: invalid, not missing
    return cred.strip()


def _right_for(method: str, path: str) -> tuple[Right, ...] | None:
    """The rights of which one is needed (None: public)."""
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return None
    if path == "/api/whoami":
        return ()  # any authenticated caller
    if path.startswith("/api/tokens"):
        return (Right.SECURITY,)
    if path.startswith("/api/audit"):
        return (Right.AUDIT,)
    if path.startswith("/api/consult/inbox"):  # the consultant's inbox (dicomweb/inbox.py)
        return (Right.READ,) if method in ("GET", "HEAD") else (Right.STORE, Right.STORE_DERIVED)
    if path.startswith(("/api/consult/send", "/api/consult/jobs", "/api/consult/partners")):
        return (Right.READ,)  # send a visible study for consultation (dicomweb/consult.py)
    if path.startswith("/api/"):
        return (Right.ADMIN,)
    if method in ("GET", "HEAD"):
        return (Right.DOWNLOAD,) if _WHOLE.match(path) else (Right.READ,)
    if method == "POST":
        return (Right.STORE, Right.STORE_DERIVED, Right.ADMIN)  # ADMIN: rejection notes only
    if method == "DELETE":
        return (Right.ADMIN,)
    return (Right.READ,)


def _unauthorized(reason: str, invalid: bool) -> web.Response:
    """401, with the challenge of RFC 6750 (error="invalid_token" when a credential was sent)."""
    resp = error(401, reason)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="pathpacs", error="invalid_token"' if invalid \
        else 'Bearer realm="pathpacs"'
    return resp


class _Throttle:
    """At most one audit record per key (client address) and kind every `seconds`: a flood of
    bad credentials is recorded, but cannot make the audit trail the bottleneck."""

    def __init__(self, seconds: float = 10.0, size: int = 4096) -> None:
        self.seconds, self.size = seconds, size
        self._last: dict[tuple[str, str], float] = {}

    def allow(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.seconds:
            return False
        if len(self._last) >= self.size:
            self._last.clear()
        self._last[key] = now
        return True


def auth_middleware(authn, run_in_thread, audit):
    """`authn`: archive.authn.Authenticator; `run_in_thread(fn, *args)`: an awaitable runner;
    `audit`: the archive's audit recorder (logins on first use of a credential in a cache
    window, failures and refusals throttled per client address)."""
    required = authn.required
    throttle = _Throttle()
    sessions = _Throttle(seconds=3600.0, size=65536)  # one login record per user and address an hour

    def refused(request: web.Request, who, kind: str, reason: str) -> None:
        address = client_address(request)
        if throttle.allow((address, kind)):
            if kind == "login":
                audit.login(who or "unknown", address, False, "bearer", reason)
            else:
                audit.security("forbidden", who, {"request": f"{request.method} {request.path[:200]}",
                                                  "reason": reason}, address=address, outcome="minor failure")

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.method == "OPTIONS":
            return await handler(request)
        if not required:
            if request.method == "GET" and request.path.startswith("/dicomweb/"):
                return await handler(request)  # ANONYMOUS reads everything: the frame path stays bare
            principal = ANONYMOUS
        rights = _right_for(request.method, request.path)
        if required:
            bearer = _bearer(request)
            principal = authn.cached(bearer) if bearer else None
            if principal is None:
                if rights is None and not bearer:
                    return await handler(request)
                if bearer == "":
                    refused(request, None, "login", "not a Bearer credential")
                    return _unauthorized("only Authorization: Bearer <token> credentials are accepted", True)
                try:
                    if bearer and authn.needs_io(bearer):
                        principal = await run_in_thread(authn.authenticate, bearer)
                    else:
                        principal = authn.authenticate(bearer)
                except Unauthenticated as exc:
                    if bearer:
                        refused(request, None, "login", exc.reason)
                    return _unauthorized(exc.reason, bearer is not None)
                except Forbidden as exc:
                    refused(request, None, "login", exc.reason)
                    return error(403, exc.reason)
                address = client_address(request)
                if sessions.allow((address, principal.id)):
                    audit.login(principal, address, True, principal.via)
        request[PRINCIPAL] = principal
        if rights is not None:
            if rights and not any(r in principal.rights for r in rights):
                what = {Right.READ: "read images", Right.STORE: "store objects", Right.ADMIN: "administer the archive",
                        Right.SECURITY: "manage tokens", Right.AUDIT: "read the audit trail",
                        Right.DOWNLOAD: "download whole instances" if Right.READ in principal.rights
                        else "read images"}.get(rights[0], "do this")
                refused(request, principal, "forbidden", f"may not {what}")
                return error(403, f"{principal.name} ({', '.join(sorted(principal.roles)) or 'no role'}) "
                                  f"may not {what}")
            if principal.studies is not None:
                study = request.match_info.get("study")
                if study is not None and study not in principal.studies:
                    return error(404, f"study {study} not found")
        return await handler(request)

    return auth
