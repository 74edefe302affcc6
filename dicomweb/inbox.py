"""`/api/consult/inbox`: the consultant's inbox for the pages and the viewer.

GET lists the cases the caller may see (`?study=UID`: that study's); POST `{id}/accept`,
`{id}/decline` (JSON `{"reason"}`) and `{id}/answer` (JSON `{"text", "regions": [{"sop_instance_uid",
"graphic_type", "points": [[x, y], ...], "label"}]}`, pixel coordinates of the slide). Reading
needs Right.READ, acting a right to store an SR in the case (dicomweb/auth.py); the handlers
call archive.consult.inbox.Inbox, which stores the answer and queues it back to the requester.
"""
from __future__ import annotations

import json

from aiohttp import web

from archive.consult.inbox import Inbox
from archive.consult.inbox_cli import regions_from

from .auth import principal_of
from .common import HttpError

MAX_BODY = 1 << 20


async def _body(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise HttpError(413, "request too large")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise HttpError(413, "request too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise HttpError(400, "the body is not JSON")
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    return body


def add_routes(app: web.Application, arc) -> None:
    inbox = Inbox(arc.sync)

    async def list_cases(request: web.Request) -> web.Response:
        who = principal_of(request)
        study = request.query.get("study")
        cases = await arc.run(inbox.for_study, study, who) if study else await arc.run(inbox.list, who)
        return web.json_response(cases)

    async def one(request: web.Request) -> web.Response:
        return web.json_response(await arc.run(inbox.get, request.match_info["id"], principal_of(request)))

    async def act(request: web.Request) -> web.Response:
        who = principal_of(request)
        case, action = request.match_info["id"], request.match_info["action"]
        body = await _body(request) if action != "accept" else {}
        try:
            if action == "accept":
                rec = await arc.run(inbox.accept, case, who)
            elif action == "decline":
                rec = await arc.run(inbox.decline, case, str(body.get("reason") or ""), who)
            else:
                regions = await arc.run(regions_from, body.get("regions"), inbox.pixel_points)
                rec = await arc.run(inbox.answer, case, str(body.get("text") or ""), regions, who,
                                    str(body.get("consultant") or "") or None)
        except ValueError as exc:
            raise HttpError(400, str(exc))
        return web.json_response(rec)

    r = app.router
    r.add_get("/api/consult/inbox", list_cases)
    r.add_get("/api/consult/inbox/{id}", one)
    r.add_post("/api/consult/inbox/{id}/{action:accept|decline|answer}", act)
