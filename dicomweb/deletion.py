"""DELETE on a study, series or instance: an IOCM reject (never an erasure), for administrators.

`?reason=` is a PS3.16 CID 7011 code or its short name (default 113001, quality). Answers 204;
404 for an unknown resource; 403 without Right.ADMIN; 409 under legal hold (or for 113039
under retention). Erasure is `pathpacs purge`, after the configured delay.
"""
from __future__ import annotations

from aiohttp import web

from archive.access import Right
from archive.rejection_note import reason_code

from .auth import principal_of
from .common import HttpError, path_uids


def add_routes(app: web.Application, arc) -> None:
    """The three DELETE routes (before the /dicomweb catch-all)."""

    async def delete(request: web.Request) -> web.Response:
        who = principal_of(request)
        who.require(Right.ADMIN, "reject instances")
        study, series, sop = path_uids(request)
        try:
            code = reason_code(request.query.get("reason", "113001"))
        except ValueError as exc:
            raise HttpError(400, str(exc))
        if sop is not None:
            await arc.run(arc.sync.instance_in, study, series, sop, who)
            level, uid = "instance", sop
        elif series is not None:
            await arc.run(arc.sync.instances_under, study, series, who)
            level, uid = "series", series
        else:
            level, uid = "study", study
        await arc.run(arc.sync.reject, level, uid, code, who, study=study)
        return web.Response(status=204)

    S, R, I = "/dicomweb/studies/{study}", "/series/{series}", "/instances/{instance}"
    for path in (S, S + R, S + R + I):
        app.router.add_delete(path, delete)
