"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered, thumbnails.

Frame path (the hot one): URL -> AsyncArchive.frames (the frame table slots of the requested
frames, 20 bytes each, and the instance's location from the index's memory map; the parents
checked from a cache keyed by blob; one ranged read per fragment, inline when the tier's reads
are local; each frame's CRC32C checked) -> response. No JSON of the instance, no pydicom.
Stored bytes pass through unless the client asks for another transfer syntax.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from collections import OrderedDict

from aiohttp import web

from archive.access import ANONYMOUS
from archive.metadata import BASE_TOKEN
from archive.records import WSI_SOP_CLASS, InstanceRecord
from archive.status import ArchiveError

from . import auditing, dicomxml
from .auth import principal_of
from .common import BASE_TOKEN_B, HttpError, base_url, boundary, check_uid, multipart_body
from .media import (EXPLICIT_LE, JPEG_BASELINE, NotAcceptable, negotiate_bulk, negotiate_frames,
                    negotiate_instances, negotiate_metadata, negotiate_rendered)
from .pixels import (PixelInfoCache, encode_image, apply_viewport, assemble, decode_frame, jpeg_frame,
                     native_frame, parse_render_params, save_image, to_pil)

log = logging.getLogger("pathpacs.dicomweb")


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


class Wado:
    """WADO-RS handlers over the archive API (archive.service.AsyncArchive)."""

    def __init__(self, arc) -> None:
        self.arc = arc  # AsyncArchive
        self.pixels = PixelInfoCache(arc.sync)
        self._gz: OrderedDict[str, bytes] = OrderedDict()
        self._gz_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumb_bytes = 0
        # Decoding work (rendered, thumbnails, transcoding) holds memory proportional to its
        # output: at most this many at once, whatever the number of clients.
        # Their own few threads, too: each thread keeps its own malloc arena, and a decoded
        # 4096x4096 image left in eight of them is hundreds of MB of resident memory.
        n = max(1, min(4, os.cpu_count() or 1))
        self.heavy = asyncio.Semaphore(n)
        self._heavy_pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="render")

    async def _decode(self, fn, *args):
        """Decoding work (rendered, thumbnails, transcoding), at most `heavy` at once."""
        async with self.heavy:
            return await asyncio.get_running_loop().run_in_executor(self._heavy_pool, partial(fn, *args))

    def close(self) -> None:
        self._heavy_pool.shutdown(wait=False, cancel_futures=True)

    # -- frames -------------------------------------------------------------------------
    async def frames(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        sop = mi["instance"]
        nums = parse_frame_list(mi["frames"])
        table, datas = await self.arc.frames(sop, nums, study=mi["study"], series=mi["series"],
                                             who=principal_of(request))
        auditing.retrieved(request, self.arc.sync.audit, mi["study"], n_frames=len(nums), sop=sop)
        mode, media, ts, multipart = negotiate_frames(request.headers.get("Accept"), table.ts, len(nums))
        if mode != "stored":
            datas = await self._decode(self._transcode, sop, mode, datas)
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
        arc = self.arc.sync
        await self.arc.run(arc.instance_in, mi["study"], mi["series"], sop, principal_of(request))
        table = await self.arc.run(arc.frame_table, sop)
        mode, media, ts, multipart = negotiate_frames(request.headers.get("Accept"), table.ts, table.n)
        if not multipart:
            raise NotAcceptable("all frames are served as multipart/related")
        batches = arc.all_frames(sop)

        def next_batch() -> list[bytes] | None:
            datas = next(batches, None)
            if datas is None or mode == "stored":
                return datas
            return self._transcode(sop, mode, datas)

        first = await self.arc.run(next_batch)  # damage found here is a clean 500
        auditing.retrieved(request, arc.audit, mi["study"], n_frames=table.n, sop=sop)
        bnd = boundary()
        resp = web.StreamResponse(headers={"Content-Type": f'multipart/related; type="{media}"; boundary={bnd}'})
        await resp.prepare(request)
        head = f"--{bnd}\r\nContent-Type: {media}; transfer-syntax={ts}\r\n\r\n".encode()
        try:
            datas = first
            while datas is not None:
                for d in datas:
                    await resp.write(head)
                    await resp.write(d)
                    await resp.write(b"\r\n")
                try:
                    datas = await self.arc.run(next_batch)
                except (ArchiveError, HttpError) as exc:
                    abort_stream(request, resp, f"frames of {sop}: {exc}")
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
        xml = negotiate_metadata(request.headers.get("Accept"))
        base = base_url(request).encode()
        gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "")
        inm = request.headers.get("If-None-Match")
        who = principal_of(request)
        if not xml and await self.arc.small(study, series, sop):
            # a few instances (an instance, a WSI series): memory-mapped reads and a few KB of
            # hashing, cheaper than a thread hop; anything bigger (a study, XML) goes to a thread
            status, body, headers = self._metadata_answer(study, series, sop, base, xml, gzip_ok, inm, who)
        else:
            status, body, headers = await self.arc.run(self._metadata_answer, study, series, sop, base, xml,
                                                       gzip_ok, inm, who)
        auditing.retrieved(request, self.arc.sync.audit, study, sop=sop)
        return web.Response(status=status, body=body, headers=headers)

    def _metadata_answer(self, study, series, sop, base: bytes, xml: bool, gzip_ok: bool,
                         inm: str | None, who=ANONYMOUS) -> tuple[int, bytes | None, dict]:
        """The whole answer, built off the event loop: reading, hashing, XML and gzip all
        grow with the study."""
        metas = self.arc.sync.metadata(study, series, sop, who)
        if xml:
            bnd = boundary()
            body = multipart_body(bnd, [("application/dicom+xml",
                                         dicomxml.to_xml(json.loads(m)).replace(BASE_TOKEN_B, base)) for m in metas])
            return 200, body, {"Content-Type": f'multipart/related; type="application/dicom+xml"; boundary={bnd}'}
        h = hashlib.blake2b(base, digest_size=16)
        for m in metas:
            h.update(m)
        etag = f'"{h.hexdigest()}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": "Accept, Accept-Encoding"}
        if inm and (inm.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in inm.split(",")]):
            return 304, None, headers
        if gzip_ok and sum(map(len, metas)) > 1400:
            with self._gz_lock:
                body = self._gz.get(etag)
            if body is None:
                plain = b"[" + b",".join(metas).replace(BASE_TOKEN_B, base) + b"]"
                body = gzip.compress(plain, compresslevel=4)
                with self._gz_lock:
                    self._gz[etag] = body
                    while len(self._gz) > 64:
                        self._gz.popitem(last=False)
            headers["Content-Encoding"] = "gzip"
        else:
            body = b"[" + b",".join(metas).replace(BASE_TOKEN_B, base) + b"]"
        headers["Content-Type"] = "application/dicom+json"
        return 200, body, headers

    # -- bulk data ----------------------------------------------------------------------
    async def bulkdata(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        path = mi["path"].strip("/")
        multipart = negotiate_bulk(request.headers.get("Accept"))
        value = await self.arc.run(self.arc.sync.bulk, mi["study"], mi["series"], mi["instance"], path,
                                   principal_of(request))
        auditing.retrieved(request, self.arc.sync.audit, mi["study"], sop=mi["instance"])
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
        arc = self.arc.sync
        who = principal_of(request)
        if sop is not None:
            recs = [await self.arc.run(arc.instance_in, study, series, sop, who)]
        else:
            recs = await self.arc.run(arc.instances_under, study, series, who)
        if not recs:
            raise HttpError(404, "no instances")
        plan: list[tuple[InstanceRecord, str | None]] = []
        for rec in recs:
            if want_ts is None or want_ts == rec.ts:
                plan.append((rec, None))
            elif want_ts == EXPLICIT_LE:
                plan.append((rec, EXPLICIT_LE))
            elif want_ts == JPEG_BASELINE and rec.jpeg_baseline_possible:
                plan.append((rec, JPEG_BASELINE))
            else:
                raise NotAcceptable(f"instance {rec.sop} is stored as {rec.ts}; it can be served "
                                    f"as stored (transfer-syntax=*), as {EXPLICIT_LE}"
                                    + (f" or as {JPEG_BASELINE}" if rec.jpeg_baseline_possible else ""))
        for rec, ts in plan:
            if ts is not None and rec.decoded_size > MAX_TRANSCODE_BYTES:
                raise NotAcceptable(f"instance {rec.sop} is too large to decompress; request transfer-syntax=*")
        # Before the first byte goes out: every blob present with its recorded size (a clean
        # 500 naming the damage), and transcodings done (a clean 406).
        plan = [(await self.arc.run(arc.check_blob, rec), ts) for rec, ts in plan]
        transcoded: dict[str, bytes] = {}
        for rec, ts in plan:
            if ts is not None:
                transcoded[rec.sop] = await self._decode(self._transcode_instance, rec, ts, who)
        for rec, _ts in plan:
            auditing.retrieved(request, arc.audit, rec.study, n_instances=1, sop=rec.sop, sop_class=rec.sop_class)
        bnd = boundary()
        resp = web.StreamResponse(headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={bnd}'})
        await resp.prepare(request)
        base = base_url(request)
        try:
            for rec, ts in plan:
                loc = f"{base}/studies/{rec.study}/series/{rec.series}/instances/{rec.sop}"
                if ts is None:
                    length = "" if who.deidentified else f"Content-Length: {rec.size}\r\n"  # de-identified: streamed
                    head = (f"--{bnd}\r\nContent-Type: application/dicom; transfer-syntax={rec.ts}\r\n"
                            f"{length}Content-Location: {loc}\r\n\r\n")
                    await resp.write(head.encode())
                    await self._stream_blob(request, resp, rec, who)
                else:
                    data = transcoded.pop(rec.sop)
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

    async def _stream_blob(self, request: web.Request, resp: web.StreamResponse, rec: InstanceRecord,
                           who=ANONYMOUS) -> None:
        """Send one stored blob as the archive hands it out, hashed on the way: if its bytes
        are not the ones received at ingest, the connection is cut before the part ends."""
        chunks = self.arc.sync.instance_chunks(rec, who=who)
        try:
            while True:
                chunk = await self.arc.run(next, chunks, None)
                if chunk is None:
                    return
                await resp.write(chunk)
        except ArchiveError as exc:
            abort_stream(request, resp, f"instance {rec.sop}: {exc.reason}")
        finally:
            chunks.close()

    def _transcode_instance(self, rec: InstanceRecord, ts: str, who=ANONYMOUS) -> bytes:
        import pydicom
        from pydicom.uid import UID

        problem = self.arc.sync.check(rec)  # decode only bytes proven to be the stored ones
        if problem is not None:
            raise self.arc.sync.damage(rec.sop, rec.blob, problem, "transcode")
        with self.arc.sync.open_instance(rec) as fh:
            ds = pydicom.dcmread(fh)
        view = self.arc.sync.view(who)
        if view is not None:  # a research view: the transcoded copy is de-identified too
            ds = view.dataset(ds)
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
            log.info("cannot transcode %s to %s: %s", rec.sop, ts, exc)
            raise HttpError(406, f"cannot transcode instance {rec.sop} to {ts}")
        return out.getvalue()

    # -- rendered -----------------------------------------------------------------------
    async def rendered(self, request: web.Request) -> web.StreamResponse:
        mi = request.match_info
        sop = mi["instance"]
        media = negotiate_rendered(request.headers.get("Accept"))
        params = parse_render_params(request.query, media)
        frames = parse_frame_list(mi["frames"]) if "frames" in mi else None
        if frames is not None and len(frames) != 1:
            raise HttpError(400, "rendered frames: ask for one frame at a time")
        await self.arc.run(self.arc.sync.instance_in, mi["study"], mi["series"], sop, principal_of(request))
        body = await self._decode(self._render_instance, sop, frames[0] if frames else None, params)
        auditing.retrieved(request, self.arc.sync.audit, mi["study"], n_frames=1 if frames else 0,
                           n_instances=0 if frames else 1, sop=sop)
        return web.Response(body=body, headers={"Content-Type": params.media})

    def _instance_image(self, sop: str, frame: int | None):
        info = self.pixels.get(sop)
        if info is None:
            raise HttpError(404, f"instance {sop} not found")
        if info.rows == 0 or info.n_frames == 0:
            raise HttpError(400, f"instance {sop} has no image to render")
        frames = self.arc.sync.frames
        if frame is not None:
            data = frames(sop, [frame])[1][0]
            return info, to_pil(info, decode_frame(info, data))
        tiled = (info.total_rows, info.total_cols) != (info.rows, info.cols)
        if not tiled:
            return info, to_pil(info, decode_frame(info, frames(sop, [1])[1][0]))
        per_plane = (-(-info.total_cols // info.cols)) * (-(-info.total_rows // info.rows))
        count = info.n_frames if info.positions is not None else min(per_plane, info.n_frames)
        if info.total_rows * info.total_cols > 40_000_000:
            raise HttpError(400, f"instance is {info.total_cols}x{info.total_rows} pixels, too large to "
                                 "render whole; render a frame or the series thumbnail")
        return info, assemble(info, frames(sop, list(range(1, count + 1)))[1])

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
        media = negotiate_rendered(request.headers.get("Accept"))
        params = parse_render_params(request.query, media)
        arc = self.arc.sync
        who = principal_of(request)
        if sop is not None:
            rec = await self.arc.run(arc.instance_in, study, series, sop, who)
        else:
            rec = pick_thumbnail_instance(await self.arc.run(arc.instances_under, study, series, who))
            if rec is None:
                raise HttpError(404, "no image to make a thumbnail from")
        key = (rec.sop, rec.blob.key, params.media, params.quality, params.viewport, params.icc)
        body = self._thumbs.get(key)
        if body is None:
            body = await self._decode(self._render_instance, rec.sop, None, params, (256, 256))
            # Bounded by bytes as well as entries: a thumbnail asked with viewport=4096,4096 is
            # up to ~30 MB, and each distinct viewport/quality is a new key.
            if len(body) <= THUMB_CACHE_MAX_ENTRY and key not in self._thumbs:
                self._thumbs[key] = body
                self._thumb_bytes += len(body)
                while len(self._thumbs) > 256 or self._thumb_bytes > THUMB_CACHE_BYTES:
                    _, old = self._thumbs.popitem(last=False)
                    self._thumb_bytes -= len(old)
        auditing.retrieved(request, arc.audit, study, sop=rec.sop, sop_class=rec.sop_class)
        return web.Response(body=body, headers={"Content-Type": params.media,
                                                "Cache-Control": "max-age=300"})


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


def pick_thumbnail_instance(recs: list[InstanceRecord]) -> InstanceRecord | None:
    """WSI: the THUMBNAIL image, else the smallest VOLUME level; others: the middle image."""
    images = [r for r in recs if r.n_frames > 0]
    if not images:
        return None
    wsi = [r for r in images if r.sop_class == WSI_SOP_CLASS]
    if wsi:
        thumbs = [r for r in wsi if "THUMBNAIL" in r.image_type]
        if thumbs:
            return thumbs[0]
        vols = [r for r in wsi if "VOLUME" in r.image_type] or [
            r for r in wsi if not {"LABEL", "OVERVIEW"} & set(r.image_type)] or wsi
        return min(vols, key=lambda r: r.total_pixels)
    images.sort(key=lambda r: r.int_value("00200013"))
    return images[len(images) // 2]


__all__ = ["Wado", "BASE_TOKEN"]
