"""The whole-slide viewer at /viewer?study=UID[&series=UID], and its static files.

Like the study list at /, the page is a static shell that holds no patient data and needs no
credential: its script (viewer/viewer.js) reads the bearer token the login page at / keeps in
sessionStorage and talks standard DICOMweb to our own /dicomweb by relative URLs (so a path
prefix in front of us works) through dicomweb-client; dicom-microscopy-viewer (Slim's engine)
draws the pyramid, the label and the overview. Both are npm packages pinned by
viewer/package-lock.json and installed by `make run` / `make test` (`npm ci --prefix viewer`);
this module serves their built files, our own JS/CSS, and answers 503 with the reason when the
packages are not installed. The page's language (English or Simplified Chinese) is chosen here
from `?lang=` or Accept-Language, so the HTML arrives in it.
"""
from __future__ import annotations

import asyncio
import html
import json
from pathlib import Path

from aiohttp import web

from .common import error
from .static_files import StaticFiles
from .viewer_text import LANGUAGES, TEXT, choose_language

# The repository checkout's viewer/ folder (package.json, our JS/CSS, node_modules once installed).
VIEWER_DIR = Path(__file__).resolve().parent.parent / "viewer"
# An installed wheel has no viewer/ folder: `python -m dicomweb.viewer_dist` (make wheel) copies what
# the page serves into this package-data folder first, in the MOUNTS layout (git-ignored).
PACKAGED_DIR = Path(__file__).resolve().parent / "static" / "viewer-dist"
# URL prefix under /static/viewer/ -> folder below VIEWER_DIR: only these are served.
MOUNTS = {
    "app": "",  # our own viewer.js, viewer.css, boot.js
    "dmv": "node_modules/dicom-microscopy-viewer/dist",  # bundle, worker, WebAssembly codecs
    "dwc": "node_modules/dicomweb-client/build",
    "dcmjs": "node_modules/dcmjs/build",  # writes the annotation objects the viewer saves (a direct dependency in package.json)
}
PACKAGED_MOUNTS = {m: m for m in MOUNTS}  # below PACKAGED_DIR: app/, dmv/, dwc/, dcmjs/
REQUIRED = ("node_modules/dicom-microscopy-viewer/dist/dicomMicroscopyViewer.bundle.min.js",
            "node_modules/dicom-microscopy-viewer/dist/dynamic-import/dataLoader.worker.min.js",
            "node_modules/dicomweb-client/build/dicomweb-client.js",
            "node_modules/dcmjs/build/dcmjs.js")
OWN_FILES = frozenset({"viewer.js", "viewer.css", "boot.js", "frames.js", "annotations.js", "consult.js"})
# What the bundle's decoder worker loads once the first frame arrives (the JPEG and ICC codecs; the
# worker itself boot.js starts early): prefetched while the page parses, so they come from the cache.
PREFETCHED = ("dmv/dynamic-import/libjpegturbowasm_decode.wasm", "dmv/dynamic-import/dicomiccwasm.wasm")
WORKER = "dmv/dynamic-import/dataLoader.worker.min.js"
# The files the page names (their URLs carry ?v=<version>): below /static/viewer/.
PAGE_FILES = ("app/viewer.css", "app/boot.js", "dwc/dicomweb-client.js", "dmv/dicomMicroscopyViewer.bundle.min.js",
              "app/frames.js", "app/annotations.js", "app/viewer.js", "app/consult.js")
# What the page loads from each package (seen in the viewer tests' requests): the bundle loads its
# worker and the WebAssembly codecs (JPEG, JPEG 2000, JPEG-LS, ICC) from dist/dynamic-import/; no
# source maps. Globs below each mount, and each package's licence (copied as LICENSE.txt).
PACKAGE_FILES = {
    "dmv": ("dicomMicroscopyViewer.bundle.min.js", "dicomMicroscopyViewer.bundle.min.js.LICENSE.txt",
            "dynamic-import/dataLoader.worker.min.js", "dynamic-import/*.wasm"),
    "dwc": ("dicomweb-client.js",),
    "dcmjs": ("dcmjs.js",),
}
LICENCES = {"dmv": "node_modules/dicom-microscopy-viewer/LICENSE", "dwc": "node_modules/dicomweb-client/LICENSE",
            "dcmjs": "node_modules/dcmjs/License.txt"}
MIME = {".js": "text/javascript", ".css": "text/css", ".wasm": "application/wasm",
        ".map": "application/json", ".txt": "text/plain"}
MISSING = "the viewer's JavaScript packages are not installed: run make run / npm ci --prefix viewer"
# dicom-microscopy-viewer compiles WebAssembly codecs and runs a worker; nothing else is loaded
# from anywhere but here, and tiles arrive as blobs decoded in the page.
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
       "img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "frame-ancestors 'none'")

PAGE = """<!doctype html><html lang="{lang}"><head><meta charset=utf-8>
<title>{title}</title><meta name=viewport content="width=device-width, initial-scale=1">
<link rel=icon href="data:,"><link rel=stylesheet href="static/viewer/app/viewer.css">
<script type="application/json" id="pp-text">{text_json}</script>
<script src="static/viewer/app/boot.js"></script>
<script src="static/viewer/dwc/dicomweb-client.js"></script>
<script src="static/viewer/dmv/dicomMicroscopyViewer.bundle.min.js"></script>
{prefetch}
</head><body>
<header id=bar>
 <a href="./" id=home>{home}</a>
 <label>{t_slide} <select id=series></select></label>
 <span class=group><label>{t_compare} <select id=compare><option value="">{none}</option></select></label>
  <button id=link class=active title="{link_help}" hidden>{link}</button></span>
 <span class=group id=zooms>{zoom_buttons}</span>
 <span class=group><button id=rotl title="{rotate_left} ([)">&#8634;</button><button id=rotr title="{rotate_right} (])">&#8635;</button>
  <span id=angle>0&deg;</span></span>
 <span class=group><button id=ruler data-tool=line>{ruler}</button><button id=area data-tool=polygon>{area}</button>
  <button id=clear>{clear}</button></span>
 <span id=langs>{lang_links}</span>
</header>
<main><div id=viewport tabindex=0 aria-label="{slide}"></div><div id=viewport2 hidden></div>
<aside id=side><h2>{t_label}</h2><div id=label class=thumb></div>
<h2>{t_overview}</h2><div id=overview class=thumb></div>
<h2>{t_metadata}</h2><dl id=meta></dl>
<h2>{t_measurements}</h2><ol id=measurements></ol>
<h2>{t_annotations}</h2><ul id=annotation-groups></ul>
<div id=marks><input id=mark-label maxlength=64 placeholder="{mark_label}" aria-label="{mark_label}">
 <span class=group><button data-mark=point>{mark_point}</button><button data-mark=box>{mark_box}</button>
 <button data-mark=polygon>{mark_polygon}</button><button data-mark=freehandpolygon>{mark_freehandpolygon}</button></span>
 <ol id=mark-list></ol><button id=save-marks disabled>{save}</button></div>
<p id=help>{help}</p></aside></main>
<p id=status role=status>{loading}</p>
<script src="static/viewer/app/frames.js"></script>
<script src="static/viewer/app/annotations.js"></script>
<script src="static/viewer/app/viewer.js"></script>
<script src="static/viewer/app/consult.js"></script>
</body></html>
"""


def packages_installed(root: Path = VIEWER_DIR) -> bool:
    return all((root / rel).is_file() for rel in REQUIRED)


def packaged_complete(root: Path = PACKAGED_DIR) -> bool:
    """The wheel's copy holds our files and the packages' required ones."""
    need = [f"app/{f}" for f in OWN_FILES]
    for rel in REQUIRED:
        mount = next(m for m, d in MOUNTS.items() if d and rel.startswith(d + "/"))
        need.append(f"{mount}/{rel[len(MOUNTS[mount]) + 1:]}")
    return all((root / rel).is_file() for rel in need)


def served_files(root: Path = VIEWER_DIR) -> list[tuple[Path, str]]:
    """(source, path below PACKAGED_DIR) of every file the page serves from a checkout with the
    packages installed: what the wheel must carry. ValueError when something is missing."""
    if not packages_installed(root):
        raise ValueError(MISSING)
    out = [(root / f, f"app/{f}") for f in sorted(OWN_FILES)]
    for mount, globs in PACKAGE_FILES.items():
        base = root / MOUNTS[mount]
        for pattern in globs:
            found = sorted(base.glob(pattern))
            if not found:
                raise ValueError(f"{base / pattern}: not found (dicom-microscopy-viewer's layout changed?)")
            out += [(p, f"{mount}/{p.relative_to(base).as_posix()}") for p in found]
        out.append((root / LICENCES[mount], f"{mount}/LICENSE.txt"))
    return out


def _source(root: Path | None) -> tuple[Path, dict[str, str], bool]:
    """(folder, mounts, installed): the package data of a wheel first, else the checkout."""
    if root is not None:
        return root, MOUNTS, packages_installed(root)
    if packaged_complete():
        return PACKAGED_DIR, PACKAGED_MOUNTS, True
    return VIEWER_DIR, MOUNTS, packages_installed(VIEWER_DIR)


def render_page(lang: str, query: dict[str, str], versions: dict[str, str] | None = None) -> str:
    """The page; `versions` (file under static/viewer/ -> its version) makes each script and
    style URL name its version, so browsers may keep them for a year (static_files)."""
    t = TEXT[lang]
    esc = html.escape
    zooms = "".join(f'<button data-mag="{m}" title="{esc(t["zoom_to"])} {m}x">{m}x</button>'
                    for m in (1, 5, 10, 20, 40))
    links = []
    for code, name in LANGUAGES.items():
        q = "&".join(f"{k}={v}" for k, v in {**query, "lang": code}.items())
        cls = ' class=current aria-current="true"' if code == lang else ""
        links.append(f'<a href="viewer?{esc(q)}" hreflang="{code}"{cls}>{esc(name)}</a>')
    fields = {k: esc(v) for k, v in t.items()}
    # </script> cannot occur in the JSON: "<" is escaped
    text_json = json.dumps(t, ensure_ascii=False).replace("<", "\\u003c")
    prefetch = "\n".join(f'<link rel=prefetch href="static/viewer/{url}">' for url in PREFETCHED)
    page = PAGE.format(lang=lang, text_json=text_json, zoom_buttons=zooms, lang_links=" ".join(links),
                       prefetch=prefetch, **fields)
    for url, version in (versions or {}).items():
        page = page.replace(f'"static/viewer/{url}"', f'"static/viewer/{url}?v={version}"')
    return page


def add_routes(app: web.Application, root: Path | None = None) -> None:
    """/viewer (the page) and /static/viewer/{mount}/{path} (its files). Both are public, as
    the page at / is: every request for patient data goes through /dicomweb and its auth.
    Files come from `root` in the checkout layout when given, else from the wheel's package
    data (PACKAGED_DIR) when complete, else from the checkout's viewer/."""
    root, mounts, installed = _source(root)  # found at start; `npm ci` later needs a restart
    files = StaticFiles()

    def versions() -> dict[str, str]:
        """The current version of each file the page names, for its ?v= (blocking)."""
        out = {}
        for url in PAGE_FILES:
            mount, rel = url.split("/", 1)
            out[url] = files.get(root / mounts[mount] / rel).version
        return out

    async def page(request: web.Request) -> web.Response:
        if not installed:
            return error(503, MISSING)
        lang = choose_language(request.query.get("lang"), request.headers.get("Accept-Language", ""))
        query = {k: v for k, v in request.query.items()
                 if k in ("study", "series", "compare") and v.replace(".", "").isdigit()}
        v = await asyncio.get_running_loop().run_in_executor(None, versions)
        return web.Response(text=render_page(lang, query, v), content_type="text/html",
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Content-Security-Policy": CSP, "Content-Language": lang,
                                     "Vary": "Accept-Language"})

    async def static(request: web.Request) -> web.StreamResponse:
        mount, rel = request.match_info["mount"], request.match_info["path"]
        if mount not in MOUNTS:
            return error(404, f"no viewer file at {request.path}")
        if mount == "app" and rel not in OWN_FILES:
            return error(404, f"no viewer file at {request.path}")
        if not installed and mount != "app":
            return error(503, MISSING)
        base = (root / mounts[mount]).resolve()
        path = (base / rel).resolve()
        if not path.is_relative_to(base) or not path.is_file() or path.suffix not in MIME:
            return error(404, f"no viewer file at {request.path}")
        # our own files change with the checkout; the packages' only with the lockfile (both
        # for a year when the URL names their version, as the page's do: static_files)
        cache = "no-cache" if mount == "app" else "public, max-age=86400"
        return await files.respond(request, path, MIME[path.suffix], cache)

    def warm() -> None:
        """Read and compress what a first visit loads, so no first visitor waits for it."""
        for url in (*PAGE_FILES, *PREFETCHED, WORKER):
            mount, rel = url.split("/", 1)
            try:
                files.get(root / mounts[mount] / rel)
            except OSError:
                pass

    async def start_warming(_app) -> None:
        if installed:
            asyncio.get_running_loop().run_in_executor(None, warm)

    app.on_startup.append(start_warming)
    app.router.add_get("/viewer", page)
    app.router.add_get("/static/viewer/{mount}/{path:.+}", static)
