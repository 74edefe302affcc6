"""Administration over HTTP: `/api/tokens` (the `secadmin` role), `/api/audit` (the `auditor`
role: the audit trail, nothing else) and `/api/whoami`.

The auth middleware has checked the right before a handler here runs; the handlers only
call the archive's token store. Secrets are returned once, by the POST that creates them.
"""
from __future__ import annotations

import argparse
import json

from aiohttp import web

from archive.audit import trail_of
from archive.audit.commands import parse_time as audit_time, select as audit_select
from archive.oidc import OidcError
from archive.tokens import parse_expiry

from .auth import principal_of
from .common import HttpError, client_address

MAX_BODY = 64 << 10


def add_routes(app: web.Application, arc) -> None:
    tokens = arc.sync.tokens
    audit = arc.sync.audit

    async def whoami(request: web.Request) -> web.Response:
        p = principal_of(request)
        return web.json_response({"id": p.id, "name": p.name, "roles": sorted(p.roles), "via": p.via,
                                  "studies": sorted(p.studies) if p.studies is not None else None,
                                  "rights": sorted(r.value for r in p.rights),
                                  "deidentified": p.deidentified})

    async def list_tokens(request: web.Request) -> web.Response:
        return web.json_response([t.as_dict() for t in await arc.run(tokens.list)])

    async def create_token(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise HttpError(413, "token request too large")
        try:
            body = json.loads(await request.content.read(MAX_BODY))
            roles = body["roles"]
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ValueError("roles must be a list of role names")
            studies = body.get("studies")
            if studies is not None and (not isinstance(studies, list) or not all(isinstance(s, str) for s in studies)):
                raise ValueError("studies must be a list of Study Instance UIDs")
            expires = parse_expiry(body["expires"]) if body.get("expires") else None
            name = str(body.get("name", ""))[:200]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HttpError(400, f"bad token request: {exc if isinstance(exc, ValueError) else 'give roles'}")
        who = principal_of(request)
        try:
            secret, info = await arc.run(tokens.create, roles, studies=studies, expires=expires, name=name,
                                         created_by=who.name, deidentify=body.get("deidentify") is True)
        except ValueError as exc:
            raise HttpError(400, str(exc))
        audit.security("token created", who, info.detail(), address=client_address(request), subject=info.id)
        return web.json_response({**info.as_dict(), "secret": secret}, status=201)

    async def revoke_token(request: web.Request) -> web.Response:
        try:
            info = await arc.run(tokens.revoke, request.match_info["id"])
        except KeyError:
            raise HttpError(404, f"no token {request.match_info['id'][:40]}")
        audit.security("token revoked", principal_of(request), info.detail(), address=client_address(request),
                       subject=info.id)
        return web.json_response(info.as_dict())

    authn = arc.sync.authn

    async def login_config(request: web.Request) -> web.Response:
        """Public: how the pages log in (mode; the OIDC endpoints for authorization code + PKCE)."""
        oidc = None
        if authn.mode == "oidc" and authn.oidc is not None:
            try:
                oidc = await arc.run(authn.oidc.login_config)
            except OidcError as exc:
                raise HttpError(503, f"OIDC login unavailable: {exc}")
        return web.json_response({"mode": authn.mode, "oidc": oidc})

    async def audit_records(request: web.Request) -> web.Response:
        """The audit trail for the auditor role: `study`, `patient`, `user`, `event`, `since`,
        `until` (as `pathpacs audit`), `limit` (newest N, default 500, at most 10000)."""
        q = request.query
        try:
            limit = int(q.get("limit", "500"))
            if not 1 <= limit <= 10000:
                raise ValueError
        except ValueError:
            raise HttpError(400, "limit must be a number from 1 to 10000")
        filters = argparse.Namespace(**{k: q.get(k) for k in ("study", "patient", "user", "event", "since", "until")})
        for key in ("since", "until"):
            if q.get(key):
                try:
                    audit_time(q[key])
                except Exception as exc:  # the CLI's one-line error: its text is the reason
                    raise HttpError(400, f"{key}: {exc}")

        def run() -> list[dict]:
            trail = trail_of(arc.sync.config)
            if not trail.dir.is_dir():
                return []
            rows = [{"seq": rec.seq, "time": rec.time, "hash": rec.hash, **rec.event}
                    for rec, _e in audit_select(trail, filters)]
            return rows[-limit:]

        rows = await arc.search_run(run)
        who = principal_of(request)
        audit.audit_log_used(f"GET {request.path_qs[:300]}", who)
        return web.json_response(rows)

    app.router.add_get("/api/audit", audit_records)
    app.router.add_get("/api/login-config", login_config)
    app.router.add_get("/api/whoami", whoami)
    app.router.add_get("/api/tokens", list_tokens)
    app.router.add_post("/api/tokens", create_token)
    app.router.add_delete("/api/tokens/{id}", revoke_token)
