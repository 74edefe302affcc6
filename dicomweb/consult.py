"""Sending for consultation from the pages: `POST /api/consult/send`, `GET /api/consult/jobs`,
`GET /api/consult/jobs/{id}` (with its instances' states) and `GET /api/consult/partners` (names and experts, never
credentials). The right (READ: whoever may see a study may ask a colleague about it) comes
from the route table of dicomweb/auth.py; the study must be visible to the caller, and every
other check is the one `Consultations.send` makes for the CLI too.
"""
from __future__ import annotations

import json

from aiohttp import web

from .auth import principal_of
from .common import HttpError

MAX_BODY = 64 << 10
FIELDS = ("study", "partner", "expert", "deidentify", "question", "physician", "priority")


def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if k != "lease"}


def add_routes(app: web.Application, arc) -> None:
    archive = arc.sync

    async def send(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise HttpError(413, "consultation request too large")
        try:
            body = json.loads(await request.content.read(MAX_BODY) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            unknown = sorted(set(body) - set(FIELDS))
            if unknown:
                raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
            for key in ("study", "partner"):
                if not isinstance(body.get(key), str) or not body[key]:
                    raise ValueError(f"give {key}")
            for key in ("expert", "question", "physician", "priority"):
                if body.get(key) is not None and not isinstance(body[key], str):
                    raise ValueError(f"{key} must be a string")
            if not isinstance(body.get("deidentify", False), bool):
                raise ValueError("deidentify must be true or false")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise HttpError(400, f"bad consultation request: {exc}")
        who = principal_of(request)
        job_id = await arc.run(lambda: archive.consultations.send(
            body["study"], body["partner"], expert=body.get("expert") or None,
            deidentify=bool(body.get("deidentify", False)), question=body.get("question") or "",
            priority=body.get("priority") or "routine", physician=body.get("physician") or "", who=who))
        job = await arc.run(archive.consultations.job, job_id)
        return web.json_response(_public(job), status=201)

    async def jobs(request: web.Request) -> web.Response:
        who = principal_of(request)
        found = await arc.run(archive.consultations.jobs, who)
        return web.json_response([_public(j) for j in found], headers={"Cache-Control": "no-store"})

    async def job(request: web.Request) -> web.Response:
        who = principal_of(request)
        found = await arc.run(archive.consultations.job, request.match_info["id"])
        if not who.sees(found.get("study")):
            raise HttpError(404, f"no consultation job {request.match_info['id']!r}")
        items = await arc.run(archive.consultations.items, found["id"])
        return web.json_response({**_public(found), "items": [i for _, i in items]},
                                 headers={"Cache-Control": "no-store"})

    async def partners(request: web.Request) -> web.Response:
        cfg = archive.config
        out = [{"name": name, "route": "dicomweb" if p.dicomweb else "dimse",
                "experts": [{"id": e.id, "name": e.name, "specialties": list(e.specialties)} for e in p.experts]}
               for name, p in sorted(cfg.partners.items())]
        return web.json_response(out, headers={"Cache-Control": "no-store"})

    r = app.router
    r.add_post("/api/consult/send", send)
    r.add_get("/api/consult/jobs", jobs)
    r.add_get("/api/consult/jobs/{id}", job)
    r.add_get("/api/consult/partners", partners)
