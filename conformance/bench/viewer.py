"""Whole-slide viewer benchmark: headless Debian chromium (playwright) on /viewer against a real
`pathpacs serve`, the slide on the hot tier and then on the cold tier (S3 on SeaweedFS).

The slide: 20,480 x 15,360 px, 256 px JPEG tiles (the bench tile pool of frames.py, 4,800
level-0 frames, levels 20480, 5120, 1280), with what the viewer reads that frames.py's header
lacks (illumination codes, orientation, origin, an sRGB ICC profile, 0.25 um pixels).

What is measured, in the page's own clock (performance.now(), 0 = navigation start), as viewer.js
records it in window.ppViewer:
- first tile: the first frame answered and decoded (dmv's frame_loading_ended with pixels)
  plus two animation frames (OpenLayers draws on the next one), or the full viewport if earlier;
- full viewport: once every requested frame has ended and nothing happened for 250 ms, the
  later of the last OpenLayers `rendercomplete` and the last frame's end (as the settle() of
  tests/test_viewer.py: dmv's last "ended" event can follow the rendercomplete that drew it);
- the pan: at level 0 (1 screen px = 1 slide px), N steps of half the map's width to the right, each
  a setCenter and a wait for the viewport to be fully drawn again; per step the time from the
  setCenter to that rendercomplete. The strip a step uncovers has no level-0 pixels until its
  tiles are drawn (OpenLayers may show a lower level there meanwhile), so that time is an upper
  bound of how long any tile was blank in the step: "longest blank" is its maximum.
- tiles per second: level-0 frames decoded during the pan / the sum of the steps' times.
- the frames' HTTP exchanges (Resource Timing, request to last byte) beside these: how much of
  each time is the server's; and how many frame requests asked for several frames (viewer/frames.js
  batches the library's one-frame calls) and how many of the pan's frames its prefetch had fetched.
Besides the two visits in fresh contexts, each tier is opened (first tile and full viewport only)
as a returning browser (the third open in one Playwright context) and, through `unwatched`, in a
Chromium no DevTools client is attached to while the page loads (empty profile, and a profile
started three times): what a user's browser does, since an attached client slows the library's
start-up (see `unwatched`).
Beside them, per tier, the floor (`bare`): the same first view fetched, decoded and drawn by a
page of a few lines with no viewer library (dicomweb-client only), which is what the browser and
server alone take.
Targets (issue 11): first tiles < 1 s, full viewport < 2 s, no blank tile > 200 ms panning (hot).
"""
from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conformance.bench.frames import make_slide  # noqa: E402
from conformance.bench.peers import free_port, start_pathpacs, start_seaweedfs, wait_http  # noqa: E402

WIDTH, HEIGHT = 20480, 15360
SPACING_MM = 0.00025
VIEWPORT = {"width": 1280, "height": 800}
BUCKET = "viewer-bench"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]  # as tests/conftest.py

# Installed before the page's scripts: room for every frame request of a visit in Resource Timing.
_INIT_JS = "performance.setResourceTimingBufferSize(100000);"

# The frames' HTTP exchanges (Resource Timing: request sent to last byte), ms, since `since`.
_FRAME_HTTP_JS = """(since) => performance.getEntriesByType('resource')
  .filter((e) => e.name.includes('/frames/') && e.startTime >= since)
  .sort((a, b) => a.startTime - b.startTime)
  .map((e) => [e.startTime, e.responseEnd - e.startTime, e.name.split('/frames/')[1]])"""

# The open as viewer.js records it on the page's clock (first frame asked, decoded, drawn two animation
# frames later; fully drawn), read once the page has been drawn. The first tile is drawn at the latest
# when the whole view is (its rendercomplete may come before the second animation frame).
_OPENED_JS = """() => {
  const s = window.ppViewer, nav = performance.getEntriesByType('navigation')[0];
  const frames = performance.getEntriesByType('resource').filter((e) => e.name.includes('/frames/'))
    .sort((a, b) => a.startTime - b.startTime);
  const done = Math.max(s.renderCompleteAt, s.lastFrameAt);
  return {status: s.status, settled: s.framesEnded === s.framesStarted && s.renderCompleteAt > s.lastFrameStartAt
            && performance.now() - done > 250,
          first_ms: Math.min(s.firstDrawnAt || done, done), first_frame_ms: s.firstFrameAt, full_ms: done,
          first_start_ms: s.firstFrameStartAt, dom_ms: nav.domContentLoadedEventStart,
          first_http_ms: frames.length ? frames[0].responseEnd - frames[0].startTime : NaN, frames: s.framesLoaded};
}"""

# Resolves when the view is fully drawn: every frame ended, a rendercomplete after `since`,
# then 250 ms of quiet. Returns the later of the last rendercomplete and the last frame's end
# (dmv's last "ended" event may come just after the rendercomplete that drew it, and then no
# other rendercomplete follows).
_SETTLED_JS = """(since) => new Promise((resolve, reject) => {
  const t0 = performance.now();
  const tick = () => {
    const s = window.ppViewer;
    const now = performance.now();
    const done = Math.max(s.renderCompleteAt, s.lastFrameAt);
    if (s.framesEnded === s.framesStarted && s.renderCompleteAt > since && now - done > 250) {
      resolve(done); return;
    }
    if (now - t0 > 60000) { reject(new Error('not drawn in 60 s: ' + JSON.stringify(s))); return; }
    requestAnimationFrame(tick);
  };
  tick();
})"""

_STEP_JS = """async ([x, y, resolution]) => {
  const view = window.viewer.getMap().getView();
  const before = window.ppViewer.framesLoaded;
  const t0 = performance.now();
  if (resolution) view.setResolution(resolution);
  view.setCenter([x, y]);
  const done = await (%s)(t0);
  return {ms: done - t0, frames: window.ppViewer.framesLoaded - before};
}""" % _SETTLED_JS


# viewer/frames.js's counters: what the library asked of its client and how it was answered.
_STATS_JS = """() => { const s = window.ppViewer.frameRequests;
  return {asked: s.asked, cacheHits: s.cacheHits, joined: s.joined, requests: s.requests,
          framesRequested: s.framesRequested, prefetchRequests: s.prefetchRequests, prefetchedFrames: s.prefetchedFrames}; }"""


def _complete(files: list[Path]) -> None:
    """Add what the viewer reads and frames.py's header lacks (as tests/test_viewer_browser.py's
    complete_wsi does), and 0.25 um base pixels; pixel data are kept as they are."""
    import pydicom
    from PIL import ImageCms

    from conformance.synthetic import viewer_attributes

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for path in files:
        ds = pydicom.dcmread(path)
        spacing = SPACING_MM * WIDTH / ds.TotalPixelMatrixColumns
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = WIDTH * SPACING_MM, HEIGHT * SPACING_MM
        ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [spacing, spacing]
        viewer_attributes(ds, icc)
        ds.save_as(path, enforce_file_format=True)


def slide(outdir: Path) -> list[Path]:
    """The bench slide (kept between runs: the marker says it is complete)."""
    marker = outdir / "viewer-complete"
    files = make_slide(outdir, WIDTH, HEIGHT)
    if not marker.exists():
        _complete(files)
        marker.write_text("ok")
    return files


def _config(work: Path, weed) -> str:
    k = weed.store_kwargs()
    return f"""
[tiers.hot]
path = "{work}/hot"
[tiers.cold]
s3 = {{ endpoint = "{k['endpoint']}", bucket = "{BUCKET}", region = "{k['region']}", access_key = "{k['access_key']}", secret_key = "{k['secret_key']}" }}
[lifecycle]
background = false
"""


def _cli(cfg: Path, data: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "archive", *args, "--quiet", "--config", str(cfg), "--data", str(data)],
                   check=True, cwd=REPO, capture_output=True)


def _open_drawn(page, url: str) -> None:
    """Open the viewer on `page` and wait until its view is fully drawn."""
    page.goto(url)
    page.wait_for_function("() => window.ppViewer && window.ppViewer.status !== 'loading'", timeout=60000)
    st = page.evaluate("() => window.ppViewer")
    if st["status"] != "rendered":
        raise RuntimeError(f"viewer did not render: {st}")
    page.evaluate(_SETTLED_JS, 0)


def session(browser, url: str, steps: int, height: int = HEIGHT, returning: bool = False) -> dict:
    """One visit in a fresh context (empty browser cache): open, wait, zoom to level 0 at the
    left of the slide's middle row (`height`: its level-0 rows), pan `steps` half viewports right.
    `returning`: the page is opened and fully drawn twice first in that context, as a pathologist's
    browser that has shown slides before (Chromium keeps the scripts in its HTTP cache and their
    compiled code from the second load on), and the third open is measured.
    Times in ms of the page's clock; tests/test_viewer_bench.py checks them on a small slide."""
    ctx = browser.new_context(viewport=VIEWPORT)
    ctx.add_init_script(_INIT_JS)
    for _ in range(2 if returning else 0):
        before = ctx.new_page()
        _open_drawn(before, url)
        before.close()
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        _open_drawn(page, url)
        opened = page.evaluate(_OPENED_JS)
        http = page.evaluate(_FRAME_HTTP_JS, 0)
        # level 0 at 1:1, at the left of the slide's middle row; then pan right
        size = page.evaluate("() => window.viewer.getMap().getSize()")  # the map, without the panels
        y = -height / 2
        x = size[0]
        zoom = page.evaluate(_STEP_JS, [x, y, 1])
        per_step = []
        pan_from = page.evaluate("() => performance.now()")
        before = page.evaluate(_STATS_JS)
        for _ in range(steps):
            x += size[0] / 2
            per_step.append(page.evaluate(_STEP_JS, [x, y, 0]))
        pan_s = sum(s["ms"] for s in per_step) / 1000  # without the 250 ms of quiet after each step
        if errors or page.evaluate("() => window.ppViewer.frameErrors"):
            raise RuntimeError(f"page errors: {errors} frame errors: {page.evaluate('() => window.ppViewer.frameErrors')}")
        pan_http = page.evaluate(_FRAME_HTTP_JS, pan_from)
        after = page.evaluate(_STATS_JS)
        multi = sum(1 for _, _, n in http + pan_http if "," in n)
        return {**opened, "map_size": size, "zoom": zoom, "steps": per_step, "pan_s": pan_s,
                "pan_http": sorted(ms for _, ms, _ in pan_http), "multi": multi, "requests": len(http) + len(pan_http),
                "pan": {k: after[k] - before[k] for k in after}}
    finally:
        ctx.close()


# The floor under the viewer's open: a page of a few lines at the server's origin with no viewer
# library, only the dicomweb-client the viewer also loads, that asks WADO-RS for the first view's
# frames as the viewer does (the first one alone, then the rest in one request), has the browser
# decode each JPEG (createImageBitmap) and draws it on a 2D canvas; times on the page's clock after
# the next animation frame. No ICC profile is applied and nothing can be panned: what is left of the
# viewer's times above this is the library's and WebGL's.
_BARE_HTML = """<!doctype html><canvas id=c width=1000 height=745></canvas>
<script src="/static/viewer/dwc/dicomweb-client.js"></script><script>
const where = %s, frames = %s, columns = %s;
const client = new DICOMwebClient.api.DICOMwebClient({ url: where.dicomweb });
const ctx = document.getElementById('c').getContext('2d');
const nextFrame = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
async function draw(numbers) {
  const bodies = await client.retrieveInstanceFrames({ studyInstanceUID: where.study, seriesInstanceUID: where.series,
    sopInstanceUID: where.sop, frameNumbers: numbers, mediaTypes: [{ mediaType: 'image/jpeg' }] })
    .catch((e) => { throw new Error('frames answered ' + e.status) });
  if (bodies.length !== numbers.length) throw new Error(bodies.length + ' parts for ' + numbers.length + ' frames');
  const images = await Promise.all(bodies.map((x) => createImageBitmap(new Blob([x], { type: 'image/jpeg' }))));
  images.forEach((im, i) => { const n = numbers[i] - 1; ctx.drawImage(im, (n %% columns) * 256, Math.floor(n / columns) * 256) });
  await nextFrame();
  return performance.now();
}
window.bare = (async () => {
  const first = await draw([frames[0]]);
  const full = await draw(frames.slice(1));
  return { first_ms: first, full_ms: full, dom_ms: performance.getEntriesByType('navigation')[0].domContentLoadedEventStart };
})();
</script>"""


def bare(browser, server_url: str, study: str, series: str, sop: str, frames: int, columns: int) -> dict:
    """The floor (above) in a fresh Playwright context: the level's first `frames` frames."""
    import json

    where = {"dicomweb": f"{server_url}/dicomweb", "study": study, "series": series, "sop": sop}
    html = _BARE_HTML % (json.dumps(where), json.dumps(list(range(1, frames + 1))), columns)
    ctx = browser.new_context(viewport=VIEWPORT)
    try:
        ctx.route(f"{server_url}/bench-bare", lambda route: route.fulfill(status=200, content_type="text/html", body=html))
        page = ctx.new_page()
        page.goto(f"{server_url}/bench-bare")
        return page.evaluate("() => window.bare")
    finally:
        ctx.close()


def unwatched(url: str, profile: Path, starts: int = 1, wait_s: float = 10.0, chromium=None) -> dict:
    """Open /viewer in a Chromium that no DevTools client watches while the page loads, as a
    user's browser: with a client attached (Playwright, above) V8 records where in the source
    every Error the library constructs at start-up comes from, and for its 2.6 MB bundle that is a
    re-parse (a trace of a one-function build of it showed 0.55 s of V8.CollectSourcePositions). Chromium
    is started `starts` times on the same profile, each time opening the page and waiting
    `wait_s` s, then stopped (a returning browser: its HTTP cache and the scripts' compiled code
    stay on disk); only after the last open has been drawn is a client attached, to read the
    page's own clock (viewer.js keeps the first frame's times). Opened from a data: page after 3 s,
    so the browser's own start-up is not in the time. `chromium`: the BrowserType of a running
    Playwright (`browser.browser_type`) to read with, else one is started for the reading."""
    from playwright.sync_api import sync_playwright

    if starts < 1:
        raise ValueError("starts must be >= 1")
    launcher = "data:text/html," + urllib.parse.quote(f"<script>setTimeout(() => {{ location.href = {url!r} }}, 3000)</script>")

    def start() -> tuple[int, subprocess.Popen]:
        port = free_port()
        return port, subprocess.Popen([shutil.which("chromium"), *CHROMIUM_ARGS, f"--remote-debugging-port={port}",
                                       f"--user-data-dir={profile}", f"--window-size={VIEWPORT['width']},{VIEWPORT['height']}",
                                       launcher], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)  # a clean exit writes the caches to the profile
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    for _ in range(starts - 1):  # the earlier starts of a returning browser
        _, proc = start()
        try:
            time.sleep(3 + wait_s)
        finally:
            stop(proc)
    port, proc = start()
    try:
        time.sleep(3 + wait_s)
        wait_http(f"http://127.0.0.1:{port}/json/version", proc)
        if chromium is None:
            with sync_playwright() as own:
                r = _read_unwatched(own.chromium, port)
        else:
            r = _read_unwatched(chromium, port)
    finally:
        stop(proc)
    if r["status"] != "rendered" or not r["settled"]:
        raise RuntimeError(f"the viewer was not fully drawn after {wait_s} s: {r}")
    return r


def _read_unwatched(chromium, port: int) -> dict:
    browser = chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
    try:
        pages = [p for c in browser.contexts for p in c.pages if "/viewer?" in p.url]
        if not pages:
            raise RuntimeError("the viewer page did not open")
        return pages[0].evaluate(_OPENED_JS)
    finally:
        browser.close()


def _rows(tier: str, visit: int | str, r: dict) -> list[dict]:
    """The rows of one visit (`visit`: its number, or what kind of open it was); the pan's rows
    only when it panned."""
    ms = sorted(s["ms"] for s in r.get("steps", []))
    frames = sum(s["frames"] for s in r.get("steps", []))
    hot = tier == "hot"
    pan = r.get("pan")
    http = (f", answered p50 {statistics.median(r['pan_http']):.0f} ms, max {r['pan_http'][-1]:.0f} ms"
            if r.get("pan_http") else "")
    who = f"pathpacs {tier} tier, " + (f"visit {visit}" if isinstance(visit, int) else visit)
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    opened = [
        {"benchmark": "viewer: open /viewer to first tile drawn", "system": who, "value": f"{r['first_ms']:.0f} ms",
         "note": f"page parsed at {r['dom_ms']:.0f} ms, first frame asked at {r['first_start_ms']:.0f} ms, "
         f"its HTTP answer took {r['first_http_ms']:.0f} ms, decoded at {r['first_frame_ms']:.0f} ms; "
         f"target < 1000 ms: {met(r['first_ms'] < 1000)}"},
        {"benchmark": "viewer: open /viewer to full viewport (rendercomplete)", "system": who,
         "value": f"{r['full_ms']:.0f} ms",
         "note": f"{r['frames']} frames decoded; target < 2000 ms: {met(r['full_ms'] < 2000)}"},
    ]
    if not ms:
        return opened
    return opened + [
        {"benchmark": "viewer: zoom to level 0 (1:1), fully drawn", "system": who, "value": f"{r['zoom']['ms']:.0f} ms",
         "note": f"{r['zoom']['frames']} frames"},
        {"benchmark": f"viewer: pan level 0, {len(ms)} steps of half the {r['map_size'][0]}x{r['map_size'][1]} px map",
         "system": who, "value": f"{statistics.median(ms):.0f} ms p50 per step",
         "note": f"max {ms[-1]:.0f} ms; {frames / r['pan_s']:.0f} tiles/s ({frames} frames in {r['pan_s']:.1f} s); "
                 f"of the {pan['asked']} frames the library asked for, {pan['cacheHits'] + pan['joined']} were "
                 f"prefetched (viewer/frames.js; {pan['prefetchedFrames']} frames prefetched in "
                 f"{pan['prefetchRequests']} requests); {len(r['pan_http'])} frame requests in the pan{http}; "
                 f"{r['multi']} of the visit's {r['requests']} frame requests were for several frames"},
        {"benchmark": "viewer: pan level 0, longest blank tile (upper bound: step start to its rendercomplete)",
         "system": who, "value": f"{ms[-1]:.0f} ms",
         "note": ("target < 200 ms: " + met(ms[-1] < 200)) if hot else "no target on cold"},
    ]


def _floor_rows(tier: str, opens: list[dict], frames: int) -> list[dict]:
    first = sorted(o["first_ms"] for o in opens)
    full = sorted(o["full_ms"] for o in opens)
    parsed = sorted(o["dom_ms"] for o in opens)
    who = f"browser alone (bare page, no viewer library), {tier} tier"
    return [
        {"benchmark": "viewer floor: open to first frame drawn", "system": who, "value": f"{statistics.median(first):.0f} ms p50",
         "note": f"{len(opens)} opens in fresh contexts, {first[0]:.0f}-{first[-1]:.0f} ms; page parsed at "
                 f"{parsed[0]:.0f}-{parsed[-1]:.0f} ms; the frame fetched by WADO-RS, decoded by the browser, drawn on a 2D canvas"},
        {"benchmark": "viewer floor: open to the first view's frames drawn", "system": who,
         "value": f"{statistics.median(full):.0f} ms p50",
         "note": f"{full[0]:.0f}-{full[-1]:.0f} ms; the other {frames - 1} frames of the coarsest level in one request"},
    ]


def run(workdir: Path, quick: bool = False) -> list[dict]:
    from playwright.sync_api import sync_playwright

    import pydicom

    exe = shutil.which("chromium")
    if exe is None:
        return [{"benchmark": "viewer", "system": "-", "value": "SKIPPED", "note": "Debian chromium not installed"}]
    if not (REPO / "viewer" / "node_modules" / "dicom-microscopy-viewer" / "dist").is_dir():
        return [{"benchmark": "viewer", "system": "-", "value": "FAILED",
                 "note": "viewer/node_modules is missing: npm ci --prefix viewer (make bench does)"}]
    files = slide(REPO / "bench-work" / "viewer" / "slide")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    top = pydicom.dcmread(files[-1], stop_before_pixels=True)  # the coarsest level: the first view's
    top_frames, top_columns = int(top.NumberOfFrames), -(-int(top.TotalPixelMatrixColumns) // int(top.Columns))
    steps = 8 if quick else 24
    run_dir = REPO / "bench-work" / "viewer" / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    rows: list[dict] = []
    weed = start_seaweedfs(run_dir / "weed")
    try:
        weed.create_bucket(BUCKET)
        cfg = run_dir / "data.toml"  # start_pathpacs writes the same text there
        cfg.write_text(_config(run_dir, weed))
        data = run_dir / "data"
        _cli(cfg, data, "import", *map(str, files))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
            try:
                for tier in ("hot", "cold"):
                    if tier == "cold":
                        _cli(cfg, data, "tier", "move", "--study", ds.StudyInstanceUID, "--to", "cold")
                    srv = start_pathpacs(data, config_text=cfg.read_text(), quiet=True)
                    try:
                        url = f"{srv.http_url}/viewer?study={ds.StudyInstanceUID}&series={ds.SeriesInstanceUID}"
                        for visit in (1, 2):
                            rows += _rows(tier, visit, session(browser, url, steps))
                        rows += _rows(tier, "returning browser (third open in one context: HTTP and code cache warm)",
                                      session(browser, url, 0, returning=True))
                        for label, starts in (("no DevTools client while loading, empty cache", 1),
                                              ("no DevTools client while loading, returning browser (third start on one profile)", 3)):
                            profile = run_dir / f"chromium-{tier}-{starts}"
                            shutil.rmtree(profile, ignore_errors=True)
                            rows += _rows(tier, label, unwatched(url, profile, starts, chromium=pw.chromium))
                        floor = [bare(browser, srv.http_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, top.SOPInstanceUID,
                                      top_frames, top_columns) for _ in range(3)]
                        rows += _floor_rows(tier, floor, top_frames)
                    finally:
                        srv.stop(timeout=30)
            finally:
                browser.close()
    finally:
        weed.kill()
    return rows


if __name__ == "__main__":
    for r in run(Path("/tmp"), quick="--quick" in sys.argv):
        print(r)
