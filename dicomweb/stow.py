"""STOW-RS (PS3.18 10.5): multipart/related; type="application/dicom" uploads.

Each part is streamed to a file in the archive's scratch directory (never held in memory),
then handed to the one ingest function with take_ownership=True (a rename, no copy).
A part that does not end with its boundary (a truncated upload) is discarded, never
ingested. Every part gets its own answer: ReferencedSOPSequence or FailedSOPSequence, and
so does a part that could not even be read (bad part headers, a stalled or oversized body):
a request never answers 200 while dropping something it was sent.

Bounds (README, [http]): the whole body at most `max_stow_mb`, at most `max_stow_parts`
parts, each read waits at most `read_timeout` seconds, part header lines at most 8 KiB
(aiohttp), a boundary of 1-70 characters (RFC 2046).
"""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from archive.access import Right
from archive.status import DimseStatus, ErrorKind, out_of_space
from storage_tiers import Spool, Spooled

from . import auditing, dicomxml
from .auth import principal_of
from .common import HttpError, _header_safe, base_url, check_boundary, check_uid, log_safe
from .media import negotiate_store_response, parse_content_type

log = logging.getLogger("pathpacs.dicomweb.stow")
CHUNK = 1 << 20


def _failed(reason: str, status: int, sop: str | None = None, sop_class: str | None = None) -> dict:
    item: dict = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop:
        item["00081155"] = {"vr": "UI", "Value": [sop]}
    item["00081197"] = {"vr": "US", "Value": [status]}
    item["00000902"] = {"vr": "LO", "Value": [reason[:64]]}
    return item


class PartProblem(Exception):
    """This part could not be received; `status` is its FailureReason, `fatal` ends the request."""

    def __init__(self, reason: str, status: int = DimseStatus.CANNOT_UNDERSTAND, fatal: bool = True,
                 resync: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.status, self.fatal = reason, status, fatal
        self.resync = resync  # the part's headers were bad but the framing holds: skip to the next boundary


class Budget:
    """What is left of the request's byte allowance (http.max_stow_mb)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise PartProblem(f"the request exceeds http.max_stow_mb ({self.limit >> 20} MB)", DimseStatus.OUT_OF_RESOURCES)


WRITE_BATCH = 4 << 20


def _write_all(spool: Spool, chunks: list[bytes]) -> None:
    for c in chunks:
        spool.write(c)


async def _spool(arc, part: BodyPartReader, spool: Spool, budget: Budget, timeout: float) -> Spooled:
    """Receive one part into `spool` (hashed while written, on the archive's threads, the
    next chunk read from the network meanwhile); PartProblem when it cannot be completed
    (the caller discards the spool)."""
    writing: asyncio.Future | None = None
    pending: list[bytes] = []  # chunks gathered until WRITE_BATCH: one thread hop per batch
    pending_size = 0
    while True:
        try:
            async with asyncio.timeout(timeout):  # no task per chunk, unlike wait_for
                chunk = await part.read_chunk(CHUNK)
        except asyncio.TimeoutError:
            raise PartProblem(f"upload stalled: nothing received for {timeout:g} s")
        except Exception as exc:  # a dropped connection, aiohttp payload errors
            log.info("STOW part read failed: %s: %s", type(exc).__name__, exc)
            raise PartProblem("upload ended inside this part")
        finally:
            if writing is not None:
                await writing
                writing = None
        if spool.error is not None:
            what = "out of disk space" if out_of_space(spool.error) else f"cannot store data: {spool.error.strerror}"
            raise PartProblem(what, DimseStatus.OUT_OF_RESOURCES, fatal=False)
        if not chunk:
            break
        budget.take(len(chunk))
        pending.append(chunk)
        pending_size += len(chunk)
        if pending_size >= WRITE_BATCH:
            writing = asyncio.ensure_future(arc.run(_write_all, spool, pending))
            pending, pending_size = [], 0
    if pending:
        await arc.run(_write_all, spool, pending)
    if spool.error is not None:
        what = "out of disk space" if out_of_space(spool.error) else f"cannot store data: {spool.error.strerror}"
        raise PartProblem(what, DimseStatus.OUT_OF_RESOURCES, fatal=False)
    done = await arc.run(spool.finish)
    if done.error is not None:
        raise PartProblem("out of disk space" if out_of_space(done.error) else "cannot store data",
                          DimseStatus.OUT_OF_RESOURCES, fatal=False)
    if not part.at_eof():
        raise PartProblem("upload ended inside this part")
    return done


async def _next_part(reader: MultipartReader, timeout: float):
    try:
        async with asyncio.timeout(timeout):
            return await reader.next()
    except asyncio.TimeoutError:
        raise PartProblem(f"upload stalled: nothing received for {timeout:g} s")
    except LineTooLong:
        raise PartProblem("malformed multipart body: a part header line is too long")
    except BadHttpMessage as exc:  # bad part headers (duplicate Content-Type, bad characters)
        log.info("STOW part headers refused: %s", " ".join(str(exc).split())[:200])
        raise PartProblem("malformed part headers (duplicate or invalid header)", resync=True)
    except Exception as exc:  # bad part headers (Content-Length: -5), bad boundary, dropped connection
        log.info("STOW multipart parse failed: %s: %s", type(exc).__name__, exc)
        raise PartProblem("malformed multipart body: invalid part headers or boundary line")


async def _discard(part, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await part.release()
    except asyncio.TimeoutError:
        raise PartProblem(f"upload stalled: nothing received for {timeout:g} s")
    except Exception as exc:
        log.info("STOW part discard failed: %s: %s", type(exc).__name__, exc)
        raise PartProblem("upload ended inside a part")


async def stow(arc, request: web.Request, config=None) -> web.Response:
    study = request.match_info.get("study")
    if study is not None:
        check_uid(study, "Study Instance UID")
    who = principal_of(request)  # an administrator's rejection notes are honoured
    max_bytes = getattr(config, "max_stow_mb", 16384) << 20
    max_parts = getattr(config, "max_stow_parts", 10000)
    timeout = float(getattr(config, "read_timeout", 60.0))
    ctype, cparams = parse_content_type(request.headers.get("Content-Type"))
    if ctype != "multipart/related":
        raise HttpError(415, f"STOW-RS takes multipart/related; type=\"application/dicom\", not {ctype[:100] or 'no content type'}")
    ptype = cparams.get("type", "application/dicom").lower()
    if ptype != "application/dicom":
        raise HttpError(415, f"only application/dicom parts are accepted (got type={ptype[:100]})")
    if not cparams.get("boundary"):
        raise HttpError(400, "multipart/related request without a boundary parameter")
    check_boundary(cparams["boundary"])
    if request.content_length is not None and request.content_length > max_bytes:
        raise HttpError(413, f"the request body ({request.content_length >> 20} MB) exceeds "
                             f"http.max_stow_mb ({max_bytes >> 20} MB)")
    xml = negotiate_store_response(request.headers.get("Accept"))

    try:
        reader = MultipartReader(request.headers, request.content)
    except Exception as exc:
        log.info("STOW multipart request refused: %s: %s", type(exc).__name__, exc)
        raise HttpError(400, "malformed multipart/related request")
    budget = Budget(max_bytes)
    referenced: list[dict] = []
    failed: list[dict] = []
    reasons: list[str] = []
    studies: set[str] = set()
    base = base_url(request)
    n_parts = 0
    no_space = too_big = False
    forbidden = 0  # parts refused because the caller may not store them

    def fail(reason: str, status: int) -> None:
        failed.append(_failed(reason, status))
        reasons.append(f"part {n_parts}: {reason}")

    while True:
        try:
            part = await _next_part(reader, timeout)
        except PartProblem as exc:
            n_parts += 1
            fail(exc.reason, exc.status)
            if exc.resync:
                # the body of the refused part is now a preamble to a fresh reader, which skips
                # it up to the next boundary line: the later parts get their own answers
                reader = MultipartReader(request.headers, request.content)
                continue
            break
        if part is None:
            break
        n_parts += 1
        try:
            if n_parts > max_parts:
                raise PartProblem(f"more than http.max_stow_parts ({max_parts}) parts", DimseStatus.OUT_OF_RESOURCES)
            if isinstance(part, MultipartReader):
                await _discard(part, timeout)
                fail("nested multipart is not supported", DimseStatus.CANNOT_UNDERSTAND)
                continue
            pct, _ = parse_content_type(part.headers.get("Content-Type", "application/dicom"))
            if pct not in ("application/dicom", ""):
                await _discard(part, timeout)
                fail(f"part type {_header_safe(pct[:60])} is not application/dicom", DimseStatus.CANNOT_UNDERSTAND)
                continue
            if no_space:  # the disk filled on an earlier part: answer every later part too
                await _discard(part, timeout)
                fail("not stored: out of disk space", DimseStatus.OUT_OF_RESOURCES)
                continue
            spool = arc.sync.spool(".stow")
            try:
                done = await _spool(arc, part, spool, budget, timeout)
            except BaseException:
                spool.discard()
                raise
        except PartProblem as exc:
            fail(exc.reason, exc.status)
            if exc.status == DimseStatus.OUT_OF_RESOURCES and "out of disk space" in exc.reason:
                no_space = True
            too_big = too_big or "max_stow" in exc.reason
            if exc.fatal:
                break
            try:
                await _discard(part, timeout)
            except PartProblem:
                break
            continue
        except OSError as exc:  # creating the spool file
            fail("out of disk space" if out_of_space(exc) else f"cannot store data: {exc.strerror}",
                 DimseStatus.OUT_OF_RESOURCES)
            no_space = no_space or out_of_space(exc)
            try:
                await _discard(part, timeout)
            except PartProblem:
                break
            continue
        result = await arc.run(arc.sync.ingest, done.path, take_ownership=True, sha256=done.sha256,
                               expected_study=study, origin="stow", may_reject=who.can(Right.ADMIN), who=who)
        who, address, session = auditing.caller(request)
        arc.sync.audit.stored(who, result.study_uid, None, result.sop_class_uid or "", result.sop_instance_uid or "",
                              address, "", "success" if result.ok else "minor failure", session=session,
                              reason=result.reason or "")
        if result.ok:
            studies.add(result.study_uid)
            url = f"{base}/studies/{result.study_uid}/series/{result.series_uid}/instances/{result.sop_instance_uid}"
            referenced.append({
                "00081150": {"vr": "UI", "Value": [result.sop_class_uid]},
                "00081155": {"vr": "UI", "Value": [result.sop_instance_uid]},
                "00081190": {"vr": "UR", "Value": [url]},
            })
        else:
            fail(result.reason or "rejected", result.dimse_status)
            no_space = no_space or result.kind is ErrorKind.OUT_OF_SPACE
            forbidden += result.kind is ErrorKind.FORBIDDEN
    if n_parts == 0:
        raise HttpError(400, "the request holds no parts")
    doc: dict = {}
    url_study = study or (next(iter(studies)) if len(studies) == 1 else None)
    if url_study:
        doc["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{url_study}"]}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        doc["00081199"] = {"vr": "SQ", "Value": referenced}
    if not failed:
        status = 200
    elif referenced:
        status = 202
    elif no_space:
        status = 507
    elif too_big:
        status = 413
    elif forbidden == len(failed):
        status = 403
    else:
        status = 409
    log.info("STOW from %s: %d stored, %d failed%s", request.remote, len(referenced), len(failed),
             f" ({log_safe(reasons[0], 300)})" if reasons else "")
    headers = {}
    if reasons:
        headers["Warning"] = ", ".join(
            f'299 pathpacs "{_header_safe(r)[:200]}"' for r in reasons[:20])
    if xml:
        return web.Response(status=status, body=dicomxml.to_xml(doc),
                            headers={**headers, "Content-Type": "application/dicom+xml"})
    return web.Response(status=status, body=json.dumps(doc).encode(),
                        headers={**headers, "Content-Type": "application/dicom+json"})
