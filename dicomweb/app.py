"""The HTTP application: DICOMweb under /dicomweb, a small study list at /.

`make_app(arc, config)` is what `pathpacs serve` runs. Routes (PS3.18):
  QIDO   GET  /studies /series /instances /studies/{s}/series /studies/{s}/instances
              /studies/{s}/series/{r}/instances
  WADO   GET  /studies/{s}[/series/{r}[/instances/{i}]]            (application/dicom)
              .../metadata, .../frames/{list}, .../bulkdata/{path}
              .../rendered, .../frames/{list}/rendered, .../thumbnail
  STOW   POST /studies, /studies/{s}
Errors answer 4xx with the reason as text (and in a Warning header); CORS per config.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
from functools import partial

from aiohttp import web, web_response
from aiohttp.http_exceptions import HttpProcessingError

from archive.service import AsyncArchive
from archive.status import HTTP_STATUS_OF, ArchiveError, Damaged

from . import admin, auditing, deletion as deletion_routes, pages, qido
from . import viewer as viewer_routes
from . import inbox as inbox_routes
from . import consult as consult_routes
from . import share as share_routes
from .auth import auth_middleware, principal_of
from .accesslog import AccessLogger, flush_all as flush_access_log  # noqa: F401  (AccessLogger: cli)
from .common import (TRUSTED_PROXIES_KEY, HttpError, base_url, boundary, check_headers, error,
                     log_safe, multipart_body, path_uids)
from .media import NotAcceptable, negotiate_search
from .stow import stow
from .wado import StreamAborted, Wado

log = logging.getLogger("pathpacs.dicomweb")
SERVER_NAME = "pathpacs"


ALLOW_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
EXPOSE_HEADERS = "Content-Type, Content-Length, Content-Encoding, ETag, Warning, Content-Location, Location"
DEFAULT_ALLOW_HEADERS = "Accept, Accept-Encoding, Authorization, Content-Type, If-None-Match, Cache-Control"


def _origin_allowed(origins: list[str], origin: str) -> str | None:
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def cors_middleware(origins: list[str]):
    @web.middleware
    async def cors(request: web.Request, handler):
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
            allowed = _origin_allowed(origins, origin)
            if allowed is None:
                return error(403, f"origin {origin} is not allowed (http.cors_origins)")
            req_headers = request.headers.get("Access-Control-Request-Headers", "")
            # "*" does not cover Authorization: name the requested headers explicitly.
            allow_headers = req_headers if req_headers.strip() else DEFAULT_ALLOW_HEADERS
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin if allowed != "*" else "*",
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": allow_headers,
                "Access-Control-Max-Age": "600",
                "Vary": "Origin, Access-Control-Request-Headers",
            })
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            resp = exc
            if origin:
                _cors_headers(resp, origins, origin)
            raise
        if origin and not resp.prepared:
            _cors_headers(resp, origins, origin)
        return resp

    return cors


def _cors_headers(resp: web.StreamResponse, origins: list[str], origin: str) -> None:
    allowed = _origin_allowed(origins, origin)
    if allowed is None:
        return
    resp.headers["Access-Control-Allow-Origin"] = allowed
    resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if allowed != "*":
        resp.headers["Vary"] = (resp.headers.get("Vary", "") + ", Origin").lstrip(", ")


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure becomes a status with a reason that names the problem, never an
    internal key or an exception text (those go to the log, under an id the answer quotes)."""
    try:
        check_headers(request)
        return await handler(request)
    except HttpError as exc:
        return error(exc.status, exc.reason)
    except NotAcceptable as exc:
        return error(406, str(exc))
    except Damaged as exc:
        return error(500, f"instance {exc.sop} is damaged on storage ({exc.what}); it is not served. "
                          "The archive logged a fixity event.")
    except ArchiveError as exc:  # one table: archive error kind -> HTTP status
        return error(HTTP_STATUS_OF[exc.kind], exc.reason)
    except StreamAborted as exc:
        # already logged; aiohttp finds the connection cut and ends the request quietly
        return exc.response
    except web.HTTPException:
        raise
    except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
        raise
    except Exception:
        ref = uuid.uuid4().hex[:12]
        log.exception("error %s answering %s %s", ref, request.method, log_safe(request.path))
        return error(500, f"internal error (logged as {ref})")


class _ClientFaultFilter(logging.Filter):
    """aiohttp logs a malformed request (bad request line, header too long, bad
    Content-Length) and a client gone mid-response as ERROR with a traceback: any client
    could fill the log with them. They become one INFO line naming the client's fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            what = f"malformed request ({exc.code} {exc.message})"
        elif isinstance(exc, ConnectionError):
            what = "client connection lost during the response"
        else:
            return True
        record.msg, record.args = log_safe(" ".join(f"{record.getMessage()}: {what}".split()), 500), ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _quiet_client_faults() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaultFilter) for f in server_log.filters):
        server_log.addFilter(_ClientFaultFilter())


def _streamed_cors(origins: list[str]):
    """StreamResponses are prepared inside handlers; add CORS headers before headers go out."""
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and "Access-Control-Allow-Origin" not in response.headers:
            _cors_headers(response, origins, origin)
    return on_prepare


class Handlers:
    def __init__(self, arc: AsyncArchive, config) -> None:
        self.arc = arc
        self.config = config
        self.wado = Wado(arc)

    async def qido(self, request: web.Request, level: str) -> web.Response:
        study, series, _ = path_uids(request)
        xml = negotiate_search(request.headers.get("Accept"))
        base = base_url(request)
        params = list(request.query.items())
        who = principal_of(request)

        def run() -> tuple[bytes | list[bytes], bool, int | None, int]:
            docs, more, clamped = qido.search(self.arc.sync, level, params, study=study, series=series,
                                              retrieve_aet=getattr(self.config, "aet", None),
                                              max_results=getattr(self.config, "max_results", 10000), who=who)
            encoded = qido.encode_xml_parts(docs, base) if xml else qido.encode_json(docs, base)
            return encoded, more, clamped, len(docs)

        who, address, _ = auditing.caller(request)
        audit = self.arc.sync.audit
        named = [v for k, v in params if k in ("StudyInstanceUID", "0020000D")]
        about = study
        if about is None and len(named) == 1 and "," not in named[0] and "\\" not in named[0]:
            about = named[0][:64]  # the query names one study: its record is found by --study
        try:  # on the archive's search threads: a slow search delays neither frames nor other clients
            encoded, more, clamped, n = await self.arc.search_run(run)
        except Exception as exc:
            audit.queried(who, level, request.query_string, address, "", 0, study=about, via="QIDO-RS",
                          outcome="minor failure", reason=str(exc)[:200])
            raise
        audit.queried(who, level, request.query_string, address, "", n, study=about, via="QIDO-RS")
        warnings = []
        if clamped is not None:
            warnings.append(f'299 pathpacs "limit reduced to http.max_results ({clamped})"')
        if more:
            warnings.append('299 pathpacs "There are additional results that can be requested"')
        headers = {"Warning": ", ".join(warnings)} if warnings else {}
        if xml:
            if not encoded:
                return web.Response(status=204, headers=headers)
            bnd = boundary()
            body = multipart_body(bnd, [("application/dicom+xml", p) for p in encoded])
            headers["Content-Type"] = f'multipart/related; type="application/dicom+xml"; boundary={bnd}'
            return web.Response(body=body, headers=headers)
        headers["Content-Type"] = "application/dicom+json"
        return web.Response(body=encoded, headers=headers)

    async def stow(self, request: web.Request) -> web.Response:
        return await stow(self.arc, request, self.config)

    async def healthz(self, request: web.Request) -> web.Response:
        """GET /healthz (public): 200 and this node's name while the index answers, 503 with
        the reason while it does not; HAProxy's `option httpchk` takes a 503 node out."""
        node = await self.arc.run(self.arc.sync.health)
        return web.Response(text=node + "\n")

    async def not_found(self, request: web.Request) -> web.Response:
        return error(404, f"no DICOMweb resource at {request.path}")


def make_app(archive, config) -> web.Application:
    """The application over an Archive (archive.service); handlers get its async wrapper."""
    arc = AsyncArchive(archive)
    # The Server header of every answer, aiohttp's own (a malformed request's 400) included:
    # its default names Python and aiohttp versions.
    web_response.SERVER_SOFTWARE = SERVER_NAME
    _quiet_client_faults()
    origins = list(getattr(config, "cors_origins", []) or [])
    authn = archive.authn
    app = web.Application(middlewares=[cors_middleware(origins), error_middleware,
                                       auth_middleware(authn, arc.run, archive.audit)],
                          client_max_size=1 << 20)  # request.read() is never used: STOW streams
    app[TRUSTED_PROXIES_KEY] = [ipaddress.ip_network(n, strict=False)
                                for n in getattr(config, "trusted_proxies", []) or []]
    app.on_response_prepare.append(_streamed_cors(origins))
    h = Handlers(arc, config)

    async def close_pools(_app) -> None:
        flush_access_log()
        h.wado.close()
        arc.close()

    app.on_cleanup.append(close_pools)
    w = h.wado
    S, R, I = "/dicomweb/studies/{study}", "/series/{series}", "/instances/{instance}"
    r = app.router
    # frames first: the hot path
    r.add_get(S + R + I + "/frames/{frames}", w.frames)
    r.add_get(S + R + I + "/frames/{frames}/rendered", w.rendered)
    r.add_get(S + R + I + "/frames", w.all_frames)
    r.add_get(S + R + I + "/metadata", w.metadata)
    r.add_get(S + R + "/metadata", w.metadata)
    r.add_get(S + "/metadata", w.metadata)
    r.add_get(S + R + I + "/bulkdata/{path:.+}", w.bulkdata)
    r.add_get(S + R + I + "/rendered", w.rendered)
    r.add_get(S + R + I + "/thumbnail", w.thumbnail)
    r.add_get(S + R + "/thumbnail", w.thumbnail)
    r.add_get(S + "/thumbnail", w.thumbnail)
    r.add_get(S + R + I, w.retrieve)
    r.add_get(S + R, w.retrieve)
    r.add_get(S, w.retrieve)
    r.add_get("/dicomweb/studies", partial(h.qido, level="STUDY"))
    r.add_get("/dicomweb/series", partial(h.qido, level="SERIES"))
    r.add_get("/dicomweb/instances", partial(h.qido, level="IMAGE"))
    r.add_get(S + "/series", partial(h.qido, level="SERIES"))
    r.add_get(S + "/instances", partial(h.qido, level="IMAGE"))
    r.add_get(S + R + "/instances", partial(h.qido, level="IMAGE"))
    r.add_post("/dicomweb/studies", h.stow)
    r.add_post(S, h.stow)
    deletion_routes.add_routes(app, arc)  # DELETE study/series/instance: reject, administrators only
    pages.add_routes(app, arc)
    viewer_routes.add_routes(app)  # /viewer and /static/viewer/...: the whole-slide viewer
    share_routes.add_routes(app)  # /share#<token>: a share link opens the viewer (archive.shares)
    admin.add_routes(app, arc)
    inbox_routes.add_routes(app, arc)  # /api/consult/inbox: received consultations, accept/decline/answer
    consult_routes.add_routes(app, arc)  # /api/consult/send, jobs, partners: sending for consultation
    r.add_get("/healthz", h.healthz)  # the load balancer's check (docs/deployment.md)
    r.add_route("*", "/dicomweb/{tail:.*}", h.not_found)
    return app
