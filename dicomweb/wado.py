"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered, thumbnails.

Frame path (the hot one): URL -> (study, series) check from a small cache -> the frame
table slots of the requested frames (archive.web_support.locate_frames, 16 bytes each,
no JSON of the instance, no pydicom) -> one pread per fragment -> response. Stored bytes
pass through unless the client asks for another transfer syntax.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import logging
import os
import re
from collections import OrderedDict

from aiohttp import web

from archive import web_support as ws
from archive.fixity import DamagedData
from storage_tiers.base import BlobNotFound
from archive.metadata import BASE_TOKEN

from . import dicomxml
from .common import BASE_TOKEN_B, HttpError, base_url, boundary, check_uid, multipart_body
from .media import (EXPLICIT_LE, JPEG_BASELINE, MEDIA_DEFAULT_TS, NATIVE, NotAcceptable,
                    media_of_ts, parse_accept)
from .pixels import (PixelInfoCache, encode_image, apply_viewport, assemble, decode_frame, jpeg_frame,
                     native_frame, parse_render_params, save_image, to_pil)

log = logging.getLogger("pathpacs.dicomweb")


def _read_hashed(fh, h) -> bytes:
    chunk = fh.read(CHUNK)
    h.update(chunk)
    return chunk


class StreamAborted(Exception):
    """Raised by abort_stream; the error middleware hands `response` (already prepared, its
    connection cut) back to aiohttp, which then ends the request quietly with an access line."""

    def __init__(self, response: web.StreamResponse, why: str) -> None:
        super().__init__(why)
        self.response = response


def abort_stream(request: web.Request, response: web.StreamResponse, why: str):
    """A response already under way cannot change its status: cut the connection so the
    client sees a broken transfer, never a complete one. Raises StreamAborted."""
    log.error("aborting response to %s %s: %s", request.method, request.path, why)
    if request.transport is not None:
        request.transport.abort()
    raise StreamAborted(response, why)


def client_gone(request: web.Request, response: web.StreamResponse) -> StreamAborted:
    """The client left while a streamed response was being written: one log line, and the
    request still ends through aiohttp's normal path (so it gets its access line)."""
    log.info("client %s left during %s %s", request.remote, request.method, request.path)
    return StreamAborted(response, "client connection lost")


CHUNK = 1 << 20
MAX_TRANSCODE_BYTES = 1 << 30
THUMB_CACHE_BYTES = 32 << 20  # all cached thumbnails together
THUMB_CACHE_MAX_ENTRY = 1 << 20  # larger answers (big viewports) are not cached


MAX_FRAMES_PER_REQUEST = 1024
# ASCII digits only: no "1_0", no "١"; \Z, not $ (which also matches before a final "\n")
_FRAME_LIST = re.compile(r"[0-9]{1,10}(,[0-9]{1,10})*\Z")


def parse_frame_list(text: str) -> list[int]:
    if len(text) > 11 * MAX_FRAMES_PER_REQUEST or not _FRAME_LIST.match(text):
        raise HttpError(400, f"invalid frame list {text[:80]!r}: expected numbers like 1 or 1,2,3")
    nums = [int(x) for x in text.split(",")]
    if len(nums) > MAX_FRAMES_PER_REQUEST:
        raise HttpError(400, f"at most {MAX_FRAMES_PER_REQUEST} frames per request, not {len(nums)}")
    if any(n < 1 for n in nums):
        raise HttpError(400, f"invalid frame list {text[:80]!r}: frame numbers start at 1")
    return nums


# -- negotiation -----------------------------------------------------------------------

def negotiate_frames(accept: str | None, stored_ts: str, n_frames: int) -> tuple[str, str, str, bool]:
    """-> (mode, media type, transfer syntax, multipart); mode: stored | native | jpeg."""
    stored_media = media_of_ts(stored_ts)
    ranges = parse_accept(accept)
    if not ranges:
        return "stored", stored_media, stored_ts, True
    for r in ranges:
        multipart = r.multipart
        t = (r.part_type or "*/*") if multipart else r.type
        ts = r.transfer_syntax
        if not multipart and n_frames != 1:
            continue  # single-part answers carry one frame only
        if t in ("*/*", "*", "application/*", "image/*"):
            if ts in (None, "*", stored_ts) and (t != "image/*" or stored_media.startswith("image/")):
                return "stored", stored_media, stored_ts, multipart
            if ts == EXPLICIT_LE and t != "image/*":
                return ("stored" if stored_ts in NATIVE else "native"), "application/octet-stream", EXPLICIT_LE, multipart
            continue
        if t == "application/octet-stream":
            if ts == "*" or ts == stored_ts:
                return "stored", t, stored_ts, multipart
            if ts in (None, EXPLICIT_LE):
                return ("stored" if stored_ts in NATIVE else "native"), t, EXPLICIT_LE, multipart
            continue
        if t.startswith("image/"):
            if t == "image/x-jls":
                t = "image/jls"
            want = stored_ts if ts == "*" and t == stored_media else (ts or MEDIA_DEFAULT_TS.get(t))
            if t == stored_media and want == stored_ts:
                return "stored", t, stored_ts, multipart
            if t == "image/jpeg" and want == JPEG_BASELINE:
                return "jpeg", t, JPEG_BASELINE, multipart
    raise NotAcceptable(f"cannot serve frames stored as {stored_ts} in any of the accepted media types "
                        f"({accept}); stored bytes are available as {stored_media} or "
                        f"application/octet-stream with transfer-syntax=*")


def negotiate_instances(accept: str | None) -> str | None:
    """-> None for the stored transfer syntax, else the requested one."""
    ranges = parse_accept(accept)
    if not ranges:
        return None
    for r in ranges:
        t = (r.part_type or "application/dicom") if r.multipart else r.type
        if not r.multipart and t != "*/*":
            continue
        if t not in ("application/dicom", "*/*", "application/*"):
            continue
        ts = r.transfer_syntax
        return None if ts in (None, "*") else ts
    raise NotAcceptable('instances are served as multipart/related; type="application/dicom"')


class Wado:
    def __init__(self, arc) -> None:
        self.arc = arc
        self.index = arc.index
        self._parents: dict[str, tuple[str, str]] = {}
        self.pixels = PixelInfoCache(arc)
        self._gz: OrderedDict[str, bytes] = OrderedDict()
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumb_bytes = 0
        # Decoding work (rendered, thumbnails, transcoding) holds memory proportional to its
        # output: at most this many at once, whatever the number of clients.
        self.heavy = asyncio.Semaphore(max(1, min(4, os.cpu_count() or 1)))

    # -- helpers ----------------------------------------------------------------------
    def parents(self, sop: str) -> tuple[str, str] | None:
        p = self._parents.get(sop)
        if p is None:
            rec = self.index.instance(sop)
            if rec is None:
                return None
            p = (rec["study"], rec["series"])
            if len(self._parents) > 50_000:
                self._parents.clear()
            self._parents[sop] = p
        return p

    def check_instance(self, study: str, series: str, sop: str) -> None:
        p = self.parents(sop)
        if p is not None and p != (study, series):
            self._parents.pop(sop, None)  # re-read: the instance may have been replaced
            p = self.parents(sop)
        if p is None or p != (study, series):
            raise HttpError(404, f"instance {sop} not found in series {series} of study {study}")

    # -- frames -------------------------------------------------------------------------
    async def frames(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        sop = mi["instance"]
        nums = parse_frame_list(mi["frames"])
        p = self._parents.get(sop)
        if p is None or p[0] != mi["study"] or p[1] != mi["series"]:
            self.check_instance(mi["study"], mi["series"], sop)
        located = ws.locate_frames(self.index, sop, nums)
        if located is None:
            raise HttpError(404, f"instance {sop} has no frames")
        table, frags, crcs = located
        for k, f in zip(nums, frags):
            if f is None:
                raise HttpError(404, f"frame {k} is out of range: instance {sop} has {table.n} frames")
        mode, media, ts, multipart = negotiate_frames(request.headers.get("Accept"), table.ts, len(nums))
        try:
            datas = self.arc.read_frames(sop, table, frags, crcs)
        except DamagedData:
            # the blob may have moved (tier migration, replacement) between lookup and read
            located = ws.locate_frames(self.index, sop, nums)
            if located is None:
                raise HttpError(404, f"instance {sop} has no frames")
            if located[0].blob == table.blob and located[0].tier == table.tier:
                raise
            table, frags, crcs = located
            datas = self.arc.read_frames(sop, table, frags, crcs)
        if mode != "stored":
            datas = await asyncio.get_running_loop().run_in_executor(None, self._transcode, sop, mode, datas)
        part_ct = f"{media}; transfer-syntax={ts}"
        if not multipart:
            return web.Response(body=datas[0], headers={"Content-Type": part_ct})
        bnd = boundary()
        return web.Response(
            body=multipart_body(bnd, [(part_ct, d) for d in datas]),
            headers={"Content-Type": f'multipart/related; type="{media}"; boundary={bnd}'})

    async def all_frames(self, request: web.Request) -> web.StreamResponse:
        """The Pixel Data BulkDataURI (.../frames without a list): every frame, streamed, each
        checked against its CRC32C; a damaged frame aborts the stream (never a clean end)."""
        mi = request.match_info
        sop = mi["instance"]
        self.check_instance(mi["study"], mi["series"], sop)
        table_raw = ws.locate_frames(self.index, sop, [])
        if table_raw is None:
            raise HttpError(404, f"instance {sop} has no frames")
        table = table_raw[0]
        mode, media, ts, multipart = negotiate_frames(request.headers.get("Accept"), table.ts, table.n)
        if not multipart:
            raise NotAcceptable("all frames are served as multipart/related")
        loop = asyncio.get_running_loop()
        step = 256

        def batch(start: int) -> list[bytes]:
            nums = list(range(start, min(table.n, start + step - 1) + 1))
            located = ws.locate_frames(self.index, sop, nums)
            if located is None:
                raise HttpError(404, f"instance {sop} has no frames")
            t, frags, crcs = located
            datas = self.arc.read_frames(sop, t, frags, crcs)
            return datas if mode == "stored" else self._transcode(sop, mode, datas)

        first = await loop.run_in_executor(None, batch, 1)  # damage found here is a clean 500
        bnd = boundary()
        resp = web.StreamResponse(headers={"Content-Type": f'multipart/related; type="{media}"; boundary={bnd}'})
        await resp.prepare(request)
        head = f"--{bnd}\r\nContent-Type: {media}; transfer-syntax={ts}\r\n\r\n".encode()
        try:
            for start in range(1, table.n + 1, step):
                try:
                    datas = first if start == 1 else await loop.run_in_executor(None, batch, start)
                except (DamagedData, HttpError) as exc:
                    abort_stream(request, resp, f"frames of {sop}: {exc}")
                for d in datas:
                    await resp.write(head)
                    await resp.write(d)
                    await resp.write(b"\r\n")
            await resp.write(f"--{bnd}--\r\n".encode())
            await resp.write_eof()
        except ConnectionError:
            raise client_gone(request, resp)
        return resp

    def _transcode(self, sop: str, mode: str, datas: list[bytes]) -> list[bytes]:
        info = self.pixels.get(sop)
        if info is None:
            raise HttpError(404, f"instance {sop} not found")
        if mode == "native":
            return [native_frame(info, d) for d in datas]
        return [jpeg_frame(info, d) for d in datas]

    # -- metadata -----------------------------------------------------------------------
    async def metadata(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        study = check_uid(mi["study"], "Study Instance UID")
        series = mi.get("series")
        sop = mi.get("instance")
        if sop is not None:
            self.check_instance(study, series, sop)
            raw = self.index.metadata(sop)
            if raw is None:
                raise HttpError(404, f"instance {sop} not found")
            metas = [raw]
        elif series is not None:
            got = ws.series_metadata(self.index, series, study)
            if got is None:
                raise HttpError(404, f"series {series} not found in study {study}")
            metas = got[1]
        else:
            got = ws.study_metadata(self.index, study)
            if got is None:
                raise HttpError(404, f"study {study} not found")
            metas = got[1]
        base = base_url(request).encode()
        ranges = parse_accept(request.headers.get("Accept"))
        xml = False
        if ranges:
            for r in ranges:
                if r.multipart and r.part_type == "application/dicom+xml":
                    xml = True
                    break
                if r.type in ("application/dicom+json", "application/json", "*/*", "application/*"):
                    break
            else:
                raise NotAcceptable("metadata is served as application/dicom+json or "
                                    "multipart/related; type=\"application/dicom+xml\"")
        if xml:
            import json as _json
            bnd = boundary()
            body = multipart_body(bnd, [("application/dicom+xml", dicomxml.to_xml(_json.loads(m)).replace(BASE_TOKEN_B, base))
                                        for m in metas])
            return web.Response(body=body, headers={
                "Content-Type": f'multipart/related; type="application/dicom+xml"; boundary={bnd}'})
        h = hashlib.blake2b(base, digest_size=16)
        for m in metas:
            h.update(m)
        etag = f'"{h.hexdigest()}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": "Accept, Accept-Encoding"}
        inm = request.headers.get("If-None-Match")
        if inm and (inm.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in inm.split(",")]):
            return web.Response(status=304, headers=headers)
        gz = "gzip" in request.headers.get("Accept-Encoding", "") and sum(map(len, metas)) > 1400
        if gz:
            body = self._gz.get(etag)
            if body is None:
                plain = b"[" + b",".join(metas).replace(BASE_TOKEN_B, base) + b"]"
                body = gzip.compress(plain, compresslevel=4)
                self._gz[etag] = body
                while len(self._gz) > 64:
                    self._gz.popitem(last=False)
            headers["Content-Encoding"] = "gzip"
        else:
            body = b"[" + b",".join(metas).replace(BASE_TOKEN_B, base) + b"]"
        headers["Content-Type"] = "application/dicom+json"
        return web.Response(body=body, headers=headers)

    # -- bulk data ----------------------------------------------------------------------
    async def bulkdata(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        sop = mi["instance"]
        self.check_instance(mi["study"], mi["series"], sop)
        path = mi["path"].strip("/")
        value = self.index.bulk(sop, path)
        if value is None:
            raise HttpError(404, f"no bulk data {path!r} in instance {sop}")
        ranges = parse_accept(request.headers.get("Accept"))
        multipart = True
        if ranges:
            for r in ranges:
                t = (r.part_type or "application/octet-stream") if r.multipart else r.type
                if t in ("application/octet-stream", "*/*", "application/*"):
                    multipart = r.multipart or t != "application/octet-stream"
                    break
            else:
                raise NotAcceptable("bulk data is served as application/octet-stream")
        if not multipart:
            return web.Response(body=value, headers={"Content-Type": "application/octet-stream"})
        bnd = boundary()
        return web.Response(body=multipart_body(bnd, [("application/octet-stream", value)]), headers={
            "Content-Type": f'multipart/related; type="application/octet-stream"; boundary={bnd}'})

    # -- instances ----------------------------------------------------------------------
    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        study = check_uid(mi["study"], "Study Instance UID")
        series = mi.get("series")
        sop = mi.get("instance")
        want_ts = negotiate_instances(request.headers.get("Accept"))
        if sop is not None:
            self.check_instance(study, series, sop)
            rec = self.index.instance(sop)
            recs = [rec] if rec else []
        else:
            recs = ws.instances_under(self.index, study, series)
            if recs is None:
                what = f"series {series} of study {study}" if series else f"study {study}"
                raise HttpError(404, f"{what} not found")
        if not recs:
            raise HttpError(404, "no instances")
        plan = []
        for rec in recs:
            if want_ts is None or want_ts == rec["ts"]:
                plan.append((rec, None))
            elif want_ts == EXPLICIT_LE:
                plan.append((rec, EXPLICIT_LE))
            elif want_ts == JPEG_BASELINE and _jpeg_baseline_possible(rec):
                plan.append((rec, JPEG_BASELINE))
            else:
                raise NotAcceptable(f"instance {rec['sop']} is stored as {rec['ts']}; it can be served "
                                    f"as stored (transfer-syntax=*), as {EXPLICIT_LE}"
                                    + (f" or as {JPEG_BASELINE}" if _jpeg_baseline_possible(rec) else ""))
        for rec, ts in plan:
            if ts is not None and _decoded_size(rec) > MAX_TRANSCODE_BYTES:
                raise NotAcceptable(f"instance {rec['sop']} is too large to decompress; "
                                    "request transfer-syntax=*")
        loop = asyncio.get_running_loop()
        # Before the first byte goes out: every blob present with its recorded size (a clean
        # 500 naming the damage), and transcodings done (a clean 406).
        for rec, ts in plan:
            await loop.run_in_executor(None, self._check_blob_size, rec)
        transcoded: dict[str, bytes] = {}
        for rec, ts in plan:
            if ts is not None:
                async with self.heavy:
                    transcoded[rec["sop"]] = await loop.run_in_executor(None, self._transcode_instance, rec, ts)
        bnd = boundary()
        resp = web.StreamResponse(headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={bnd}'})
        await resp.prepare(request)
        base = base_url(request)
        try:
            for rec, ts in plan:
                loc = f"{base}/studies/{rec['study']}/series/{rec['series']}/instances/{rec['sop']}"
                if ts is None:
                    head = (f"--{bnd}\r\nContent-Type: application/dicom; transfer-syntax={rec['ts']}\r\n"
                            f"Content-Length: {rec['size']}\r\nContent-Location: {loc}\r\n\r\n")
                    await resp.write(head.encode())
                    await self._stream_blob(request, resp, rec)
                else:
                    data = transcoded.pop(rec["sop"])
                    head = (f"--{bnd}\r\nContent-Type: application/dicom; transfer-syntax={ts}\r\n"
                            f"Content-Length: {len(data)}\r\nContent-Location: {loc}\r\n\r\n")
                    await resp.write(head.encode())
                    await resp.write(data)
                await resp.write(b"\r\n")
            await resp.write(f"--{bnd}--\r\n".encode())
            await resp.write_eof()
        except ConnectionError:
            raise client_gone(request, resp)
        return resp

    def _check_blob_size(self, rec: dict) -> None:
        try:
            size = self.arc.tier(rec["tier"]).stat(rec["blob"]).size
        except BlobNotFound:
            raise self.arc.damage(rec["sop"], rec["blob"], rec["tier"], "blob missing", "instance retrieve")
        if size != rec["size"]:
            raise self.arc.damage(rec["sop"], rec["blob"], rec["tier"],
                                  f"blob is {size} bytes, {rec['size']} recorded", "instance retrieve")

    async def _stream_blob(self, request: web.Request, resp: web.StreamResponse, rec: dict) -> None:
        """Send one stored blob, hashing it on the way: if its bytes are not the ones received
        at ingest (sha256, size), the connection is cut before the part ends."""
        loop = asyncio.get_running_loop()
        h = hashlib.sha256()
        sent = 0
        try:
            fh = await loop.run_in_executor(None, self.arc.tier(rec["tier"]).open, rec["blob"])
        except BlobNotFound:
            self.arc.damage(rec["sop"], rec["blob"], rec["tier"], "blob missing", "instance retrieve")
            abort_stream(request, resp, f"instance {rec['sop']}: blob missing")
        try:
            while True:
                chunk = await loop.run_in_executor(None, _read_hashed, fh, h)
                if not chunk:
                    break
                sent += len(chunk)
                if sent > rec["size"]:
                    break
                await resp.write(chunk)
        finally:
            fh.close()
        if sent != rec["size"] or h.hexdigest() != rec["sha256"]:
            what = "sha256 mismatch" if sent == rec["size"] else f"blob is {sent}+ bytes, {rec['size']} recorded"
            self.arc.damage(rec["sop"], rec["blob"], rec["tier"], what, "instance retrieve")
            abort_stream(request, resp, f"instance {rec['sop']}: {what}")

    def _transcode_instance(self, rec: dict, ts: str) -> bytes:
        import pydicom
        from pydicom.uid import UID

        problem = self.arc.check_instance(rec)  # decode only bytes proven to be the stored ones
        if problem is not None:
            raise self.arc.damage(rec["sop"], rec["blob"], rec["tier"], problem, "transcode")
        with self.arc.open_instance(rec["sop"]) as fh:
            ds = pydicom.dcmread(fh)
        try:
            if ts == JPEG_BASELINE:
                _to_jpeg_baseline(ds)
            else:
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.decompress(generate_instance_uid=False)
                ds.file_meta.TransferSyntaxUID = UID(ts)
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
        except Exception as exc:
            raise HttpError(406, f"cannot transcode instance {rec['sop']} to {ts}: {exc}")
        return out.getvalue()

    # -- rendered -----------------------------------------------------------------------
    def _render_media(self, request: web.Request) -> str:
        ranges = parse_accept(request.headers.get("Accept"))
        if not ranges:
            return "image/jpeg"
        for r in ranges:
            t = r.type
            if t in ("image/jpeg", "image/png", "image/gif"):
                return t
            if t in ("*/*", "image/*"):
                return "image/jpeg"
        raise NotAcceptable("rendered images are available as image/jpeg, image/png or image/gif")

    async def rendered(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        sop = mi["instance"]
        self.check_instance(mi["study"], mi["series"], sop)
        media = self._render_media(request)
        params = parse_render_params(request.query, media)
        frames = parse_frame_list(mi["frames"]) if "frames" in mi else None
        if frames is not None and len(frames) != 1:
            raise HttpError(400, "rendered frames: ask for one frame at a time")
        async with self.heavy:
            body = await asyncio.get_running_loop().run_in_executor(
                None, self._render_instance, sop, frames[0] if frames else None, params)
        return web.Response(body=body, headers={"Content-Type": params.media})

    def _frame_bytes(self, sop: str, numbers: list[int]) -> list[bytes]:
        located = ws.locate_frames(self.index, sop, numbers)
        if located is None:
            raise HttpError(404, f"instance {sop} has no pixel data")
        table, frags, crcs = located
        for k, f in zip(numbers, frags):
            if f is None:
                raise HttpError(404, f"frame {k} is out of range: instance {sop} has {table.n} frames")
        return self.arc.read_frames(sop, table, frags, crcs)

    def _instance_image(self, sop: str, frame: int | None):
        info = self.pixels.get(sop)
        if info is None:
            raise HttpError(404, f"instance {sop} not found")
        if info.rows == 0 or info.n_frames == 0:
            raise HttpError(400, f"instance {sop} has no image to render")
        if frame is not None:
            data = self._frame_bytes(sop, [frame])[0]
            return info, to_pil(info, decode_frame(info, data))
        tiled = (info.total_rows, info.total_cols) != (info.rows, info.cols)
        if not tiled:
            data = self._frame_bytes(sop, [1])[0]
            return info, to_pil(info, decode_frame(info, data))
        per_plane = (-(-info.total_cols // info.cols)) * (-(-info.total_rows // info.rows))
        count = info.n_frames if info.positions is not None else min(per_plane, info.n_frames)
        if info.total_rows * info.total_cols > 40_000_000:
            raise HttpError(400, f"instance is {info.total_cols}x{info.total_rows} pixels, too large to "
                                 "render whole; render a frame or the series thumbnail")
        return info, assemble(info, self._frame_bytes(sop, list(range(1, count + 1))))

    def _render_instance(self, sop: str, frame: int | None, params, default_viewport=None) -> bytes:
        info, img = self._instance_image(sop, frame)
        img = apply_viewport(img, params.viewport or default_viewport, upscale=params.viewport is not None)
        icc = self.pixels.icc_profile(info) if params.icc else None
        return save_image(img, params.media, params.quality, icc)

    # -- thumbnails ---------------------------------------------------------------------
    async def thumbnail(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        study = check_uid(mi["study"], "Study Instance UID")
        series = mi.get("series")
        sop = mi.get("instance")
        media = self._render_media(request)
        params = parse_render_params(request.query, media)
        if sop is not None:
            self.check_instance(study, series, sop)
        else:
            recs = ws.instances_under(self.index, study, series)
            if recs is None:
                what = f"series {series} of study {study}" if series else f"study {study}"
                raise HttpError(404, f"{what} not found")
            sop = pick_thumbnail_instance(recs)
            if sop is None:
                raise HttpError(404, "no image to make a thumbnail from")
        rec = self.index.instance(sop)
        key = (sop, rec["blob"] if rec else "", params.media, params.quality, params.viewport, params.icc)
        body = self._thumbs.get(key)
        if body is None:
            async with self.heavy:
                body = await asyncio.get_running_loop().run_in_executor(
                    None, self._render_instance, sop, None, params, (256, 256))
            # Bounded by bytes as well as entries: a thumbnail asked with viewport=4096,4096 is
            # up to ~30 MB, and each distinct viewport/quality is a new key.
            if len(body) <= THUMB_CACHE_MAX_ENTRY and key not in self._thumbs:
                self._thumbs[key] = body
                self._thumb_bytes += len(body)
                while len(self._thumbs) > 256 or self._thumb_bytes > THUMB_CACHE_BYTES:
                    _, old = self._thumbs.popitem(last=False)
                    self._thumb_bytes -= len(old)
        return web.Response(body=body, headers={"Content-Type": params.media,
                                                "Cache-Control": "max-age=300"})


def _jpeg_baseline_possible(rec: dict) -> bool:
    """JPEG baseline holds 8-bit greyscale or colour pixels only."""
    attrs = rec.get("attrs", {})
    bits = (attrs.get("00280100") or {}).get("Value", [None])[0]
    spp = (attrs.get("00280002") or {}).get("Value", [None])[0]
    return rec.get("n_frames", 0) > 0 and bits == 8 and spp in (1, 3)


def _to_jpeg_baseline(ds) -> None:
    """Re-encode every frame as JPEG baseline (lossy, quality 90), in place. Only on request:
    stored bytes are served as stored otherwise."""
    import numpy as np
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    arr = ds.pixel_array  # colour comes back as RGB
    n = int(ds.get("NumberOfFrames", 1) or 1)
    frames = arr.reshape((n, *arr.shape[-3:])) if int(ds.SamplesPerPixel) == 3 else arr.reshape((n, *arr.shape[-2:]))
    encoded = [encode_image(np.ascontiguousarray(f), "image/jpeg", 90) for f in frames]
    ds.PixelData = encapsulate(encoded, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if int(ds.SamplesPerPixel) == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = UID(JPEG_BASELINE)


def _image_type(rec: dict) -> list[str]:
    el = rec.get("attrs", {}).get("00080008") or {}
    return [str(v).upper() for v in el.get("Value") or []]


def _total_pixels(rec: dict) -> int:
    a = rec.get("attrs", {})

    def v(tag: str) -> int:
        el = a.get(tag) or {}
        vals = el.get("Value") or [0]
        try:
            return int(vals[0])
        except (TypeError, ValueError):
            return 0
    return (v("00480006") or v("00280011")) * (v("00480007") or v("00280010"))


def pick_thumbnail_instance(recs: list[dict]) -> str | None:
    """WSI: the THUMBNAIL image, else the smallest VOLUME level; others: the middle image."""
    images = [r for r in recs if r.get("n_frames", 0) > 0]
    if not images:
        return None
    wsi = [r for r in images if r["sop_class"] == "1.2.840.10008.5.1.4.1.1.77.1.6"]
    if wsi:
        thumbs = [r for r in wsi if "THUMBNAIL" in _image_type(r)]
        if thumbs:
            return thumbs[0]["sop"]
        vols = [r for r in wsi if "VOLUME" in _image_type(r)] or [
            r for r in wsi if not {"LABEL", "OVERVIEW"} & set(_image_type(r))] or wsi
        return min(vols, key=_total_pixels)["sop"]
    images.sort(key=lambda r: int(((r["attrs"].get("00200013") or {}).get("Value") or [0])[0] or 0))
    return images[len(images) // 2]["sop"]


def _decoded_size(rec: dict) -> int:
    a = rec.get("attrs", {})

    def v(tag: str, d: int) -> int:
        el = a.get(tag) or {}
        vals = el.get("Value") or [d]
        try:
            return int(vals[0])
        except (TypeError, ValueError):
            return d
    return v("00280010", 0) * v("00280011", 0) * v("00280002", 1) * max(1, v("00280100", 8) // 8) * max(1, rec.get("n_frames", 1))


__all__ = ["Wado", "BASE_TOKEN"]
