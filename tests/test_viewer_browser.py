"""The real dicom-microscopy-viewer (the library behind Slim) shows a slide served by `pathpacs serve`.

Headless Debian chromium (driven by playwright) opens tests/browser/viewer.html from a static
server on another port, so every DICOMweb request is cross-origin (CORS) as in a deployed Slim.
The page uses the npm packages pinned in tests/browser/package.json (installed by `make test`
with `npm ci` into tests/browser/node_modules): dicomweb-client fetches the series metadata and
dicom-microscopy-viewer's VolumeImageViewer requests, decodes (its WebAssembly libjpeg-turbo)
and draws the tiles with WebGL (SwiftShader).
"""
from __future__ import annotations

import functools
import io
import http.server
import struct
import threading
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence

import factory
from conftest import run_cli

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
BUNDLE = BROWSER_DIR / "node_modules" / "dicom-microscopy-viewer" / "dist" / "dicomMicroscopyViewer.bundle.min.js"
CLIENT = BROWSER_DIR / "node_modules" / "dicomweb-client" / "build" / "dicomweb-client.js"
LEVELS = ((2048, 1536), (1024, 768), (512, 384))
BASE_SPACING_MM = 0.00025  # factory's ImagedVolumeWidth is width * 0.00025 mm


def srgb_profile(size: int = 8192) -> bytes:
    """A valid sRGB ICC profile (LittleCMS's, via Pillow) grown to `size` bytes by a private
    tag, so that it is above pathpacs' inline limit (archive.metadata.BULK_THRESHOLD) and the
    viewer has to fetch it by its BulkDataURI, as with a scanner's profile."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    n = struct.unpack(">I", icc[128:132])[0]
    table = [struct.unpack(">4sII", icc[132 + 12 * i:144 + 12 * i]) for i in range(n)]
    body = icc[132 + 12 * n:]
    pad = (-len(icc) - 12) % 4
    tag = b"data" + bytes(4) + struct.pack(">I", 1)  # dataType, binary
    tag += b"pathpacs test".ljust(size - len(icc) - 12 - pad - len(tag), b"\0")
    table = [(sig, off + 12, length) for sig, off, length in table]  # the table grows by one entry
    table.append((b"pptt", 132 + 12 * (n + 1) + len(body) + pad, len(tag)))
    out = (icc[4:84] + bytes(16) + icc[100:128]  # header, profile ID zeroed (not computed)
           + struct.pack(">I", n + 1) + b"".join(struct.pack(">4sII", *t) for t in table) + body + bytes(pad) + tag)
    return struct.pack(">I", len(out) + 4) + out


def complete_wsi(paths: list[Path]) -> None:
    """Add the Type 1 attributes the factory's levels lack and the viewer reads, as a scanner
    writes them: Shared Functional Groups with Pixel Measures (PS3.3 A.32.8, every level's pixel
    spacing), the Optical Path Module's illumination codes (C.8.12.5), and a real sRGB ICC profile
    (the factory's is 4096 zero bytes; the viewer fetches it as bulk data and builds a colour
    transform from it in its worker)."""
    icc = srgb_profile()
    base_width = LEVELS[0][0]
    for path in paths:
        ds = pydicom.dcmread(path)
        spacing = BASE_SPACING_MM * base_width / ds.TotalPixelMatrixColumns
        measures = Dataset()
        measures.PixelSpacing = [spacing, spacing]
        measures.SliceThickness = ds.ImagedVolumeDepth
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        factory.viewer_attributes(ds, icc)
        ds.save_as(path, enforce_file_format=True)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".js": "text/javascript"}

    def log_message(self, *args):
        pass


@pytest.fixture
def page_server():
    """tests/browser/ over HTTP on a free port (an origin other than pathpacs')."""
    if not (BUNDLE.exists() and CLIENT.exists()):
        pytest.fail("tests/browser/node_modules is missing: run `npm ci --prefix tests/browser` "
                    "(make test does)")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(BROWSER_DIR)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _decoded_levels(paths: list[Path]) -> dict[int, np.ndarray]:
    """Each level's total pixel matrix (width -> RGB array), decoded with Pillow from the files."""
    out = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        tile, cols = ds.Columns, -(-ds.TotalPixelMatrixColumns // ds.Columns)
        rows = -(-ds.TotalPixelMatrixRows // ds.Rows)
        img = np.zeros((rows * tile, cols * tile, 3), np.uint8)
        for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames)):
            r, c = divmod(i, cols)
            img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = Image.open(io.BytesIO(frame)).convert("RGB")
        # without the last row's and column's padding, which is not the slide (the viewer leaves it blank)
        out[ds.TotalPixelMatrixColumns] = img[:ds.TotalPixelMatrixRows, :ds.TotalPixelMatrixColumns]
    return out


# Screen points (step 8 px) that show the slide (not a control such as the overview map or the
# scale bar), each with the slide coordinate the map puts there (OpenLayers, rotation included).
_SAMPLE_JS = """() => {
  const map = window.viewer.getMap();
  const box = map.getViewport().getBoundingClientRect();
  const out = [];
  for (let y = 4; y < box.height; y += 8) {
    for (let x = 4; x < box.width; x += 8) {
      const el = document.elementFromPoint(box.x + x, box.y + y);
      if (!el || el.tagName !== 'CANVAS' || el.closest('.ol-control, .ol-overviewmap')) continue;
      const c = map.getCoordinateFromPixel([x, y]);
      out.push([box.x + x, box.y + y, c[0], c[1]]);
    }
  }
  return out;
}"""


def test_dicom_microscopy_viewer_displays_slide(make_server, browser, page_server, tmp_path):
    # the viewer is served from another origin: the archive lists it (no foreign origin by default)
    server = make_server(config_text=f'[http]\ncors_origins = ["{page_server}"]\n')
    paths = factory.wsi_series(tmp_path / "slide", levels=LEVELS, tile=256)
    complete_wsi(paths)
    run_cli("import", "--quiet", str(tmp_path / "slide"), data=server.data_dir, check=True)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)

    page = browser.new_page(viewport={"width": 800, "height": 600})
    page_errors: list[str] = []
    console: list[str] = []
    bad: list[str] = []
    frames_ok: list[str] = []
    frame_accepts: set[str] = set()
    answered: list[str] = []  # "status path-after-/dicomweb" of every pathpacs answer
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))

    def on_response(resp):
        if not resp.url.startswith(server.http_url):
            return
        answered.append(f"{resp.status} {resp.request.method} {resp.url[len(server.dicomweb_url):]}")
        if resp.status >= 400:
            bad.append(f"{resp.status} {resp.request.method} {resp.url}")
        elif "/frames/" in resp.url and resp.status == 200:
            frames_ok.append(resp.url)
            frame_accepts.add(resp.request.headers.get("accept", ""))

    page.on("response", on_response)
    page.on("requestfailed", lambda r: bad.append(f"failed {r.method} {r.url}: {r.failure}")
            if r.url.startswith(server.http_url) else None)

    query = urlencode({"dicomweb": server.dicomweb_url, "study": ds.StudyInstanceUID,
                       "series": ds.SeriesInstanceUID})
    resp = page.goto(f"{page_server}/viewer.html?{query}")
    assert resp is not None and resp.status == 200

    def state():
        return page.evaluate("() => window.viewerTest")

    def debug():
        return f"state={state()}\npage errors={page_errors}\nbad={bad}\nconsole={console[-30:]}"

    page.wait_for_function("() => window.viewerTest && window.viewerTest.status !== 'loading'", timeout=30000)
    assert state()["status"] == "rendered", debug()
    # The viewer asks pathpacs for the tiles covering the viewport, decodes them (WebAssembly
    # libjpeg-turbo in its worker) and draws them (WebGL).
    # Done: every requested frame answered, then an OpenLayers rendercomplete (nothing loading).
    page.wait_for_function("() => { const s = window.viewerTest; return s.framesLoaded >= 4"
                           " && s.framesEnded === s.framesStarted && s.renderCompleteAt > s.lastStartAt; }",
                           timeout=60000)
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot))
    samples = page.evaluate(_SAMPLE_JS)
    st = state()
    (tmp_path / "debug.txt").write_text(debug() + "\n" + "\n".join(answered))

    assert st["levels"] == len(LEVELS), debug()
    assert st["frameErrors"] == 0 and st["errors"] == [], debug()
    assert page_errors == [], debug()
    # Worker messages come here too, e.g. "Unable to transform frame" when the ICC profile fails.
    assert not [m for m in console if m.startswith(("error", "warning"))], debug()
    assert bad == [], debug()
    assert len(frames_ok) >= 4, debug()
    assert all("transfer-syntax=*" in a for a in frame_accepts), frame_accepts
    # The ICC profile of each level, fetched by its BulkDataURI (OpticalPathSequence/ICCProfile).
    icc_fetched = [a for a in answered if a.startswith("200 GET") and "/bulkdata/" in a]
    assert len(icc_fetched) == len(LEVELS), answered

    levels = _decoded_levels(paths)
    by_sop = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    # Every frame the viewer decoded starts with the pixel Pillow decodes from the stored frame.
    for key, rgb in st["decoded"].items():
        sop, number = key.rsplit("/", 1)
        level = pydicom.dcmread(by_sop[sop], stop_before_pixels=True)
        cols = -(-level.TotalPixelMatrixColumns // level.Columns)
        r, c = divmod(int(number) - 1, cols)
        assert levels[level.TotalPixelMatrixColumns][r * level.Rows, c * level.Columns].tolist() == rgb, key

    # The screen shows the slide where the map says it is: the pixel at each sampled screen point
    # equals the displayed level's pixel at the slide coordinate under it. Levels are generated
    # independently (not downsampled), so a match also tells which level is on screen.
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert len(samples) > 2000, len(samples)
    base_width = LEVELS[0][0]
    scores = {}
    for width, level in levels.items():
        scale = width / base_width
        hits = total = 0
        for sx, sy, ox, oy in samples:
            col, row = ox * scale, (-1 - oy) * scale  # tile grid origin [0, -1], y down the rows
            block = 256 // 8  # factory tiles are 8x8 flat blocks: skip points near a block edge
            if not (0 <= col < width and 0 <= row < level.shape[0]):
                continue
            if not (6 <= col % block <= block - 6 and 6 <= row % block <= block - 6):
                continue
            total += 1
            hits += int(np.abs(img[int(sy), int(sx)] - level[int(row), int(col)].astype(np.int16)).max() <= 24)
        scores[width] = (hits, total)
    (tmp_path / "scores.txt").write_text(str(scores))
    best = max(scores, key=lambda w: scores[w][0] / max(scores[w][1], 1))
    hits, total = scores[best]
    assert total > 500 and hits / total > 0.95, f"screen does not show the slide: {scores}\n{debug()}"
    assert all(h / max(t, 1) < 0.2 for w, (h, t) in scores.items() if w != best), scores
