"""STOW-RS (PS3.18 10.5): multipart/related; type="application/dicom" uploads.

Each part is streamed to a file in the archive's scratch directory (never held in memory),
then handed to the one ingest function with take_ownership=True (a rename, no copy).
A part that does not end with its boundary (a truncated upload) is discarded, never
ingested. Every part gets its own answer: ReferencedSOPSequence or FailedSOPSequence.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import uuid

from aiohttp import BodyPartReader, MultipartReader, web

from archive.ingest import CANNOT_UNDERSTAND, ingest

from . import dicomxml
from .common import HttpError, _header_safe, base_url, check_uid
from .media import parse_accept, parse_content_type

log = logging.getLogger("pathpacs.dicomweb.stow")
CHUNK = 1 << 20
PROCESSING_FAILURE = 0x0110


def _failed(reason: str, status: int, sop: str | None = None, sop_class: str | None = None) -> dict:
    item: dict = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop:
        item["00081155"] = {"vr": "UI", "Value": [sop]}
    item["00081197"] = {"vr": "US", "Value": [status]}
    item["00000902"] = {"vr": "LO", "Value": [reason[:64]]}
    return item


async def _spool(part: BodyPartReader, path: str) -> tuple[int, str | None]:
    """Write one part to `path`; (bytes, None) when complete, else (bytes, why not)."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            chunk = await part.read_chunk(CHUNK)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                w = os.write(fd, view)
                view = view[w:]
            n += len(chunk)
    except (asyncio.IncompleteReadError, ValueError, ConnectionError, AssertionError) as exc:
        return n, f"upload ended inside this part ({type(exc).__name__})"
    except Exception as exc:  # aiohttp payload errors on a dropped connection
        return n, f"upload ended inside this part ({type(exc).__name__}: {exc})"
    finally:
        os.close(fd)
    if not part.at_eof():
        return n, "upload ended inside this part"
    return n, None


async def stow(arc, request: web.Request) -> web.Response:
    study = request.match_info.get("study")
    if study is not None:
        check_uid(study, "Study Instance UID")
    ctype, cparams = parse_content_type(request.headers.get("Content-Type"))
    if ctype != "multipart/related":
        raise HttpError(415, f"STOW-RS takes multipart/related; type=\"application/dicom\", not {ctype or 'no content type'}")
    ptype = cparams.get("type", "application/dicom").lower()
    if ptype != "application/dicom":
        raise HttpError(415, f"only application/dicom parts are accepted (got type={ptype})")
    if not cparams.get("boundary"):
        raise HttpError(400, "multipart/related request without a boundary parameter")
    xml = False
    ranges = parse_accept(request.headers.get("Accept"))
    if ranges:
        for r in ranges:
            t = r.part_type if r.multipart else r.type
            if t == "application/dicom+xml":
                xml = True
                break
            if t in ("application/dicom+json", "application/json", "*/*", "application/*", None):
                break
        else:
            raise HttpError(406, "the store response is application/dicom+json or application/dicom+xml")

    loop = asyncio.get_running_loop()
    reader = MultipartReader(request.headers, request.content)
    referenced: list[dict] = []
    failed: list[dict] = []
    reasons: list[str] = []
    studies: set[str] = set()
    base = base_url(request)
    n_parts = 0
    stream_error: str | None = None
    while True:
        try:
            part = await reader.next()
        except Exception as exc:
            stream_error = f"malformed or truncated multipart body: {type(exc).__name__}: {exc}"
            break
        if part is None:
            break
        n_parts += 1
        if isinstance(part, MultipartReader):
            failed.append(_failed("nested multipart is not supported", CANNOT_UNDERSTAND))
            reasons.append(f"part {n_parts}: nested multipart is not supported")
            try:
                await part.release()
            except Exception:
                pass
            continue
        pct, _ = parse_content_type(part.headers.get("Content-Type", "application/dicom"))
        if pct not in ("application/dicom", ""):
            failed.append(_failed(f"part type {pct} is not application/dicom", CANNOT_UNDERSTAND))
            reasons.append(f"part {n_parts}: part type {pct} is not application/dicom")
            try:
                await part.release()
            except Exception:
                stream_error = "upload ended inside a part"
                break
            continue
        path = os.path.join(arc.tmp_dir, f"stow-{uuid.uuid4().hex}.part")
        try:
            size, problem = await _spool(part, path)
        except OSError as exc:
            size, problem = 0, f"cannot receive data: {exc.strerror}"
        if problem is not None:
            _unlink(path)
            failed.append(_failed(problem, 0xA700 if "receive" in problem else CANNOT_UNDERSTAND))
            reasons.append(f"part {n_parts}: {problem}")
            stream_error = problem
            break
        result = await loop.run_in_executor(None, functools.partial(
            ingest, arc, path, take_ownership=True, expected_study=study, origin="stow"))
        _unlink(path)  # normally renamed away by ingest; gone either way
        if result.ok:
            studies.add(result.study_uid)
            url = f"{base}/studies/{result.study_uid}/series/{result.series_uid}/instances/{result.sop_instance_uid}"
            referenced.append({
                "00081150": {"vr": "UI", "Value": [result.sop_class_uid]},
                "00081155": {"vr": "UI", "Value": [result.sop_instance_uid]},
                "00081190": {"vr": "UR", "Value": [url]},
            })
        else:
            reason = result.reason or "rejected"
            failed.append(_failed(reason, result.dimse_status or PROCESSING_FAILURE))
            reasons.append(f"part {n_parts}: {reason}")
    if n_parts == 0:
        raise HttpError(400, stream_error or "the request holds no parts")
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
    else:
        status = 409
    headers = {}
    if reasons:
        headers["Warning"] = ", ".join(
            f'299 pathpacs "{_header_safe(r)[:200]}"' for r in reasons[:20])
    if xml:
        return web.Response(status=status, body=dicomxml.to_xml(doc),
                            headers={**headers, "Content-Type": "application/dicom+xml"})
    import json
    return web.Response(status=status, body=json.dumps(doc).encode(),
                        headers={**headers, "Content-Type": "application/dicom+json"})


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
