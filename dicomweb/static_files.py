"""Static files served from memory, gzip-compressed once, with strong ETags: the viewer's scripts.

The viewer page loads 2.6 MB of dicom-microscopy-viewer bundle plus its worker and WebAssembly
codecs; over a real network their size is the page's first-tile time. Each file is read and
gzip-compressed once (on a thread, never on the event loop) and kept while its mtime and size stay
the same; answers carry an ETag per representation (a sha256 of the bytes, "-gz" for the
compressed one), so a revalidation is a 304 with no body, and `Vary: Accept-Encoding`. A URL that
names the file's current version (`?v=<etag>`, as the page writes them) may be cached for a year.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

COMPRESSIBLE = {".js", ".css", ".wasm", ".txt", ".json", ".map"}
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Cached:
    key: tuple[int, int]  # (mtime_ns, size) the bytes were read at
    version: str  # sha256 of the bytes, 20 hex digits: the ETag and the ?v= of the page's URLs
    raw: bytes
    gz: bytes | None  # None: not worth compressing


class StaticFiles:
    """The cache of one server's static files (bounded by the files it may serve)."""

    def __init__(self) -> None:
        self._files: dict[Path, Cached] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> Cached:
        """The file's current bytes (blocking: read and compress when new or changed)."""
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        found = self._files.get(path)
        if found is not None and found.key == key:
            return found
        with self._lock:  # one thread compresses a file; the others wait for its result
            found = self._files.get(path)
            if found is not None and found.key == key:
                return found
            raw = path.read_bytes()
            gz = gzip.compress(raw, 6, mtime=0) if path.suffix in COMPRESSIBLE else None
            if gz is not None and len(gz) > len(raw) * 0.9:
                gz = None
            found = self._files[path] = Cached(key, hashlib.sha256(raw).hexdigest()[:20], raw, gz)
            return found

    async def aget(self, path: Path) -> Cached:
        return await asyncio.get_running_loop().run_in_executor(None, self.get, path)

    async def respond(self, request: web.Request, path: Path, content_type: str, cache_control: str) -> web.Response:
        """200 (gzip when the client accepts it) or 304 for a matching If-None-Match."""
        f = await self.aget(path)
        gzip_ok = f.gz is not None and "gzip" in request.headers.get("Accept-Encoding", "").lower()
        etag = f'"{f.version}-gz"' if gzip_ok else f'"{f.version}"'
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE if request.query.get("v") == f.version else cache_control,
                   "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff"}
        asked = request.headers.get("If-None-Match", "")
        if asked and (asked.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in asked.split(",")]):
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = content_type
        if gzip_ok:
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=f.gz, headers=headers)
        return web.Response(body=f.raw, headers=headers)
