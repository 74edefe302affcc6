"""The built-in whole-slide viewer at /viewer (dicomweb/viewer.py, viewer/viewer.js).

Real Debian chromium (playwright) against `pathpacs serve` with generated slides: the page is
served by pathpacs itself (same origin, relative URLs), dicom-microscopy-viewer (installed by
`npm ci --prefix viewer`, make run/test) asks our DICOMweb for the frames and draws them. The
screen is compared with the slide's own pixels (the pattern of tests/test_viewer_browser.py).
"""
from __future__ import annotations

import asyncio
import io
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import factory
from conftest import run_cli
from dicomweb.viewer_text import choose_language
from test_viewer_browser import _SAMPLE_JS, _decoded_levels, complete_wsi

ROOT = Path(__file__).resolve().parent.parent
LEVELS = ((2048, 1536), (1024, 768), (512, 384))
OTHER_LEVELS = ((1024, 768), (512, 384))  # the second slide of the study: two levels
BASE_UM = 0.25  # complete_wsi: 0.00025 mm per base pixel
FRAME_RE = re.compile(r"/instances/([0-9.]+)/frames/([0-9,]+)$")

if not (ROOT / "viewer" / "node_modules" / "dicom-microscopy-viewer" / "dist").is_dir():
    pytest.fail("viewer/node_modules is missing: run `npm ci --prefix viewer` (make test does)",
                pytrace=False)


def _single(outdir: Path, study: str, series: str, kind: str, width: int, height: int, seed: int) -> Path:
    ds = factory.wsi_instance(study, series, width, height, 256, image_type=kind, seed=seed, instance_number=9)
    path = outdir / f"{kind.lower()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def describe_specimen(path: Path) -> None:
    """What a scanner writes about the slide: an H&E specimen (PS3.3 C.8.12.2.1, the staining
    step's "Using substance" items, TID 8004), the scanner model and the objective."""
    ds = pydicom.dcmread(path)
    steps = []
    for code in (_code("12710003", "SCT", "hematoxylin stain"), _code("36879007", "SCT", "water soluble eosin stain")):
        item = Dataset()
        item.ValueType = "CODE"
        item.ConceptNameCodeSequence = Sequence([_code("424361007", "SCT", "Using substance")])
        item.ConceptCodeSequence = Sequence([code])
        steps.append(item)
    method = Dataset()
    method.ValueType = "CODE"
    method.ConceptNameCodeSequence = Sequence([_code("111701", "DCM", "Processing type")])
    method.ConceptCodeSequence = Sequence([_code("127790008", "SCT", "Staining")])
    prep = Dataset()
    prep.SpecimenPreparationStepContentItemSequence = Sequence([method] + steps)
    spec = Dataset()
    spec.SpecimenIdentifier = "S26-0042 A1"
    spec.SpecimenUID = pydicom.uid.generate_uid()
    spec.SpecimenShortDescription = "Gastric biopsy"
    spec.SpecimenPreparationSequence = Sequence([prep])
    ds.SpecimenDescriptionSequence = Sequence([spec])
    ds.ManufacturerModelName = "Model 7"
    ds.OpticalPathSequence[0].ObjectiveLensPower = 20
    ds.OpticalPathSequence[0].ObjectiveLensNumericalAperture = 0.75
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def slides(tmp_path):
    """One study, two slides: A (3 levels, a label and an overview), B (2 levels)."""
    a = factory.wsi_series(tmp_path / "a", levels=LEVELS, tile=256, series_number=1)
    ds = pydicom.dcmread(a[0], stop_before_pixels=True)
    study = ds.StudyInstanceUID
    extra = [_single(tmp_path / "a", study, ds.SeriesInstanceUID, "LABEL", 256, 256, 7),
             _single(tmp_path / "a", study, ds.SeriesInstanceUID, "OVERVIEW", 512, 256, 8)]
    b, series_b, frame_ref = [], pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    (tmp_path / "b").mkdir()
    for i, (w, h) in enumerate(OTHER_LEVELS):  # seeds of its own: no tile of B is a tile of A
        level = factory.wsi_instance(study, series_b, w, h, 256, seed=10 + i, frame_of_reference=frame_ref,
                                     instance_number=i + 1, series_number=2)
        b.append(tmp_path / "b" / f"{i}.dcm")
        level.save_as(b[-1], enforce_file_format=True)
    complete_wsi(a + extra + b)
    for path in a:
        describe_specimen(path)
    return {"study": study, "a": a, "b": b, "extra": extra, "series_a": ds.SeriesInstanceUID,
            "series_b": pydicom.dcmread(b[0], stop_before_pixels=True).SeriesInstanceUID}


def _serve(make_server, tmp_path, slides, config_text=None):
    server = make_server(config_text=config_text)
    for folder in ("a", "b"):
        run_cli("import", "--quiet", str(tmp_path / folder), data=server.data_dir, check=True)
    return server


class Page:
    """A chromium page on /viewer, with what it asked of pathpacs."""

    def __init__(self, browser, server, tmp_path, *, headers=None, token=None, base=None, width=1100):
        self.context = browser.new_context(viewport={"width": width, "height": 700}, extra_http_headers=headers or {})
        if token:  # what the login page at / leaves behind
            self.context.add_init_script(f"sessionStorage.setItem('pathpacs.token', {token!r})")
        # the frames the library asks its client for (viewer/frames.js answers some from its prefetch)
        self.context.add_init_script("""window.ppAsked = [];
document.addEventListener('dicommicroscopyviewer_frame_loading_started', (e) => {
  const f = e.detail && e.detail.payload; if (f) window.ppAsked.push([f.sopInstanceUID, f.frameNumber]); });""")
        self.page = self.context.new_page()
        self.base = base or server.http_url
        self.tmp = tmp_path
        self.frames: list[tuple[str, list[int], dict]] = []  # (sop, numbers, request headers)
        self.answers: list[str] = []
        self.errors: list[str] = []
        self.console: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("response", self._response)

    def _response(self, resp):
        if not resp.url.startswith(self.base):
            return
        self.answers.append(f"{resp.status} {resp.url[len(self.base):]}")
        m = FRAME_RE.search(resp.url.split("?")[0])
        if m and resp.status == 200:
            self.frames.append((m.group(1), [int(n) for n in m.group(2).split(",")], resp.request.headers))

    def open(self, query: str):
        resp = self.page.goto(f"{self.base}/viewer?{query}")
        assert resp is not None
        return resp

    def asked(self, clear: bool = False) -> list[tuple[str, int]]:
        """The frames the library asked for since the last clear."""
        out = [tuple(a) for a in self.page.evaluate("() => window.ppAsked")]
        if clear:
            self.page.evaluate("() => { window.ppAsked = [] }")
        return out

    def split_frames(self) -> tuple[list, list]:
        """p.frames split into what a view waited for and what viewer/frames.js prefetched."""
        ahead = set(self.page.evaluate("() => window.ppViewer.frameRequests.prefetchUrls"))
        demand, pre = [], []
        for f in self.frames:
            (pre if f"{f[0]}/frames/{','.join(map(str, f[1]))}" in ahead else demand).append(f)
        return demand, pre

    def state(self):
        return self.page.evaluate("() => window.ppViewer")

    def debug(self) -> str:
        return (f"state={self.state()}\nerrors={self.errors}\nconsole={self.console[-20:]}\n"
                f"answers={self.answers[-30:]}")

    def wait_rendered(self):
        self.page.wait_for_function("() => window.ppViewer && window.ppViewer.status !== 'loading'", timeout=30000)
        assert self.state()["status"] == "rendered", self.debug()
        self.settle()

    def settle(self):
        """Every requested frame answered and drawn: an OpenLayers rendercomplete after the last."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.page.wait_for_timeout(300)
        try:
            self.page.wait_for_function(
                # the last frame's "ended" event may come just after the rendercomplete it was in
                "() => { const s = window.ppViewer; return s.framesEnded === s.framesStarted"
                " && s.renderCompleteAt > s.lastFrameStartAt"
                " && performance.now() - Math.max(s.renderCompleteAt, s.lastFrameAt) > 250; }",
                timeout=60000)
        except PlaywrightTimeout:
            raise AssertionError(f"the view was not drawn in 60 s\n{self.debug()}") from None

    def shot(self, name: str) -> np.ndarray:
        path = self.tmp / f"{name}.png"
        self.page.screenshot(path=str(path))
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    def clean(self):
        assert self.errors == [], self.debug()
        assert not [a for a in self.answers if not a.startswith(("200", "204", "304"))], self.debug()
        assert not [m for m in self.console if m.startswith("error")], self.debug()


def level_scores(img: np.ndarray, samples, levels: dict[int, np.ndarray]) -> dict[int, tuple[int, int]]:
    """For each level: of the sampled screen points inside the slide (away from the factory's
    8x8 block edges), how many show that level's pixel at the slide coordinate the map puts there."""
    base_width = max(levels)
    scores = {}
    for width, level in levels.items():
        scale = width / base_width
        hits = total = 0
        block = 256 // 8
        for sx, sy, ox, oy in samples:
            col, row = ox * scale, (-1 - oy) * scale
            if not (0 <= col < level.shape[1] and 0 <= row < level.shape[0]):
                continue
            if not (6 <= col % block <= block - 6 and 6 <= row % block <= block - 6):
                continue
            total += 1
            hits += int(np.abs(img[int(sy), int(sx)] - level[int(row), int(col)].astype(np.int16)).max() <= 24)
        scores[width] = (hits, total)
    return scores


def assert_shows(p: Page, name: str, levels: dict[int, np.ndarray], width: int | None = None) -> None:
    """The screen shows level `width` (None: whichever level the view chose) of these levels."""
    img = p.shot(name)
    samples = p.page.evaluate(_SAMPLE_JS)
    scores = level_scores(img, samples, levels)
    (p.tmp / f"{name}.scores.txt").write_text(str(scores))
    if width is None:
        width = max(scores, key=lambda w: scores[w][0] / max(scores[w][1], 1))
    hits, total = scores[width]
    assert total > 500 and hits / total > 0.95, f"{name}: screen is not level {width}: {scores}\n{p.debug()}"
    assert all(h / max(t, 1) < 0.2 for w, (h, t) in scores.items() if w != width), scores


def widths_of(paths) -> dict[str, int]:
    out = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[ds.SOPInstanceUID] = ds.TotalPixelMatrixColumns
    return out


def test_viewer_shows_slide_zoom_presets_and_metadata(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    # 500 px of slide in the window: the whole slide fits at 4.1 base px per screen px (~10x)
    p = Page(browser, server, tmp_path, headers={"Accept-Language": "en-GB,en;q=0.8"}, width=760)
    resp = p.open(f"study={slides['study']}&series={slides['series_a']}")
    assert resp.status == 200 and resp.headers["content-language"] == "en"
    p.wait_rendered()
    st = p.state()
    assert st["levels"] == 3 and st["baseSpacingUm"] == pytest.approx(BASE_UM), p.debug()
    assert st["labelShown"] and st["overviewShown"], p.debug()
    widths = widths_of(slides["a"])
    assert p.frames and all(sop in widths for sop, _, _ in p.frames), p.debug()
    # each frame of the first view is asked for once: the in-map overview that dicom-microscopy-viewer
    # adds to a map asked for no controls (a second WebGL map with its own tile cache, on the same
    # tiles) is hidden (viewer.css), so it neither loads nor decodes them a second time
    first = p.asked()  # what the library asked for (viewer/frames.js would join a second ask of one frame)
    assert first and len(first) == len(set(first)), first
    assert not p.page.locator("#viewport .ol-overviewmap").is_visible()
    # the ICC profile of each level is fetched as bulk data (colour management in the library)
    assert len([a for a in p.answers if a.startswith("200") and "/bulkdata/" in a]) >= 3, p.answers
    # ... asked for by boot.js as soon as the metadata named them, and handed to the library
    assert st["frameRequests"]["earlyBulk"] >= 3, st["frameRequests"]
    # start-up: the decoder worker is started (boot.js) and the slide's metadata asked for before the
    # bundle has run, the worker handed to the library (no second start of it before the first frame)
    starts = p.page.evaluate("""() => performance.getEntriesByType('resource').map(e => [e.name, e.startTime, e.responseEnd])""")
    bundle_end = p.page.evaluate("() => performance.getEntriesByType('navigation')[0].domInteractive")
    worker = [t for name, t, _ in starts if name.endswith("/dynamic-import/dataLoader.worker.min.js")]
    metadata = [t for name, t, _ in starts if name.endswith(f"/series/{slides['series_a']}/metadata")]
    first_frame = min(t for name, t, _ in starts if "/frames/" in name)
    assert worker and worker[0] < bundle_end and metadata and metadata[0] < bundle_end, starts
    assert len([t for t in worker if t < first_frame]) == 1, starts
    assert "dcmjs" not in " ".join(name for name, _, _ in starts)  # loaded on a first save only
    levels = _decoded_levels(slides["a"])

    first_view = p.page.evaluate("() => window.viewer.getMap().getView().getResolution()")
    assert first_view > 4  # the whole slide
    # frames come several per request (viewer/frames.js batches the library's one-frame calls)
    assert max(len(n) for _, n, _ in p.frames) > 1, p.frames
    for mag, width, finer in ((20, 1024, 2048), (40, 2048, None), (10, 512, 1024)):
        p.frames.clear()
        p.asked(clear=True)
        hits = p.state()["frameRequests"]["cacheHits"]
        p.page.click(f"[data-mag='{mag}']")
        p.settle()
        res = p.page.evaluate("() => window.viewer.getMap().getView().getResolution()")
        assert res == pytest.approx(10 / mag / BASE_UM), mag
        demand, ahead = p.split_frames()
        if mag != 10:  # 10x: the level of the first (whole-slide) view, its tiles already here
            asked = p.asked()
            assert asked and {widths[s] for s, _ in asked} == {width}, (mag, asked)
        # what the view waited for is of its own level; what came ahead, of it (around the view) or the next finer
        assert {widths[s] for s, _, _ in demand} <= {width}, (mag, demand)
        assert {widths[s] for s, _, _ in ahead} <= {width, finer}, (mag, ahead)
        if mag == 20:  # the first view prefetched the level under it: the zoom asked the server for nothing
            assert demand == [] and p.state()["frameRequests"]["cacheHits"] > hits, (p.frames, p.state())
        assert_shows(p, f"zoom{mag}", levels, width)
    # below 10x this small slide fits the window: 5x stops at the whole slide, not beyond
    p.page.click("[data-mag='5']")
    res = p.page.evaluate("() => window.viewer.getMap().getView().getResolution()")
    assert res == pytest.approx(first_view, rel=0.05) and res < 10 / 5 / BASE_UM

    meta = dict(zip(p.page.locator("#meta dt").all_inner_texts(), p.page.locator("#meta dd").all_inner_texts()))
    assert meta["Patient"] == "Doe, Jane" and meta["Patient ID"] == "P1" and meta["Accession"] == "ACC1"
    assert meta["Pixel spacing"] == "0.250 × 0.250 µm" and meta["Size"] == "2048 × 1536 px"
    assert meta["Levels"] == "3" and meta["Scanner"] == "pathpacs-tests Model 7"
    assert meta["Specimen"] == "S26-0042 A1 — Gastric biopsy" and meta["Objective"] == "20x NA 0.75"
    assert meta["Stain"] == "hematoxylin stain, water soluble eosin stain"
    # OpenLayers' scale line (the library names its classes "" and "-inner")
    scale = p.page.evaluate("() => (document.querySelector('#viewport .-inner') || {}).textContent")
    assert re.fullmatch(r"\d+ (μm|mm)", scale or ""), scale
    assert p.page.inner_text("#ruler") == "Ruler"
    p.clean()


def _viewport_box(p: Page) -> dict:
    return p.page.locator("#viewport").bounding_box()


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b).max(axis=2) <= 24).mean())


def test_rotation_ruler_and_area(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    p = Page(browser, server, tmp_path)
    p.open(f"study={slides['study']}&series={slides['series_a']}")
    p.wait_rendered()
    p.page.click("[data-mag='40']")
    p.settle()
    box = _viewport_box(p)
    w, h = int(box["width"]), int(box["height"])
    side = min(w, h) - 120
    x0, y0 = (w - side) // 2, (h - side) // 2

    def crop(name):
        path = tmp_path / f"{name}.png"
        p.page.locator("#viewport").screenshot(path=str(path))
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        return img[y0:y0 + side, x0:x0 + side]

    before = crop("rot0")
    p.page.click("#rotr")
    p.settle()
    after = crop("rot90")
    assert p.state()["rotation"] == 90 and p.page.inner_text("#angle") == "90°"
    # a quarter turn clockwise about the centre of the view (np.rot90 with k=-1 is clockwise)
    clockwise, counter = _agreement(after, np.rot90(before, k=-1)), _agreement(after, np.rot90(before, k=1))
    assert clockwise > 0.9 and counter < 0.3 and _agreement(after, before) < 0.3, (clockwise, counter)
    assert_shows(p, "rot90-level", _decoded_levels(slides["a"]), 2048)
    p.page.keyboard.press("]")  # keys: ] turns 15° more
    assert p.page.inner_text("#angle") == "105°"
    p.page.keyboard.press("[")
    assert p.page.inner_text("#angle") == "90°"

    # The ruler across 400 screen pixels at 40x (one base pixel each, 0.25 µm): 100 µm, rotated
    # or not. Then a right triangle of 400 x 300 screen pixels: 100 µm x 75 µm / 2 = 3750 µm².
    cx, cy = box["x"] + w / 2, box["y"] + h / 2
    p.page.click("#ruler")
    assert "active" in p.page.get_attribute("#ruler", "class")
    for x in (cx - 200, cx + 200):
        p.page.mouse.click(x, cy)
        p.page.wait_for_timeout(400)
    p.page.wait_for_function("() => window.ppViewer.measurements.length === 1")
    m = p.state()["measurements"][0]
    assert m["kind"] == "length" and m["um"] == pytest.approx(100.0, abs=0.3), m
    assert p.page.locator("#measurements li").all_inner_texts() == ["Length: 100.0 µm"]
    p.page.click("#area")
    for x, y in ((cx - 200, cy - 150), (cx + 200, cy - 150), (cx - 200, cy + 150), (cx - 200, cy - 150)):
        p.page.mouse.click(x, y)
        p.page.wait_for_timeout(400)
    p.page.wait_for_function("() => window.ppViewer.measurements.length === 2")
    m = p.state()["measurements"][1]
    assert m["kind"] == "area" and m["um2"] == pytest.approx(3750.0, rel=0.01), m
    assert p.page.locator("#measurements li").all_inner_texts()[1] == f"Area: {m['um2']:.1f} µm²"
    p.page.keyboard.press("Escape")
    assert "active" not in (p.page.get_attribute("#area", "class") or "")
    p.page.click("#clear")
    assert p.page.locator("#measurements li").count() == 0
    assert p.page.evaluate("() => window.viewer.getAllROIs().length") == 0
    p.clean()


def test_switcher_changes_slide_and_default_series(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    p = Page(browser, server, tmp_path)
    p.open(f"study={slides['study']}")  # no series: the study's first VOLUME series (number 1)
    p.wait_rendered()
    st = p.state()
    assert st["series"] == slides["series_a"] and st["levels"] == 3, p.debug()
    assert st["seriesList"] == [slides["series_a"], slides["series_b"]]
    assert p.page.locator("#series option").count() == 2
    p.frames.clear()
    p.page.select_option("#series", slides["series_b"])
    p.page.wait_for_function(f"() => window.ppViewer.series === {slides['series_b']!r}"
                             " && window.ppViewer.status === 'rendered'")
    p.settle()
    st = p.state()
    assert st["levels"] == 2 and not st["labelShown"] and not st["overviewShown"], p.debug()
    widths_b = widths_of(slides["b"])
    assert p.frames and all(sop in widths_b for sop, _, _ in p.frames), p.frames
    assert f"series={slides['series_b']}" in p.page.url  # a reload or a shared link shows B
    assert p.page.inner_text("#meta dd[data-key='Levels']") == "2"
    assert_shows(p, "slide-b", _decoded_levels(slides["b"]))  # B's own pixels: no tile of A is in B
    p.clean()


def _as_jpeg2000(path: Path) -> None:
    """Re-encode a level's JPEG tiles as lossless JPEG 2000 (what `pathpacs convert --codec
    jpeg2000 --quality 100` writes): the same pixels in another transfer syntax."""
    import imagecodecs
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(path)
    tiles = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB"))
             for f in generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames)]
    ds.PixelData = encapsulate([imagecodecs.jpeg2k_encode(t, level=0, codecformat="j2k", mct=False) for t in tiles],
                               has_bot=True)
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "RGB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)


def test_jpeg2000_slide_is_decoded_and_shown(make_server, browser, tmp_path):
    """A slide whose tiles are JPEG 2000 (our converter writes them) goes through the library's
    JPEG 2000 codec in its decoder worker and shows its own pixels."""
    paths = factory.wsi_series(tmp_path / "j2k", levels=OTHER_LEVELS, tile=256, series_number=1)
    complete_wsi(paths)
    levels = _decoded_levels(paths)  # the JPEG tiles' pixels, which the lossless re-encoding keeps
    for path in paths:
        _as_jpeg2000(path)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    server = make_server()
    run_cli("import", "--quiet", str(tmp_path / "j2k"), data=server.data_dir, check=True)
    p = Page(browser, server, tmp_path)
    p.open(f"study={ds.StudyInstanceUID}&series={ds.SeriesInstanceUID}")
    p.wait_rendered()
    assert p.frames and p.state()["framesLoaded"] > 0, p.debug()
    assert_shows(p, "jpeg2000", levels)
    p.clean()


def test_chinese_ui_from_accept_language_and_switch(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    p = Page(browser, server, tmp_path, headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"})
    resp = p.open(f"study={slides['study']}&series={slides['series_a']}")
    assert resp.headers["content-language"] == "zh-CN"
    p.wait_rendered()
    assert p.page.get_attribute("html", "lang") == "zh-CN"
    assert p.page.inner_text("#ruler") == "标尺" and p.page.inner_text("#status") == "就绪"
    assert p.page.locator("#meta dt").all_inner_texts()[0] == "患者"
    p.page.screenshot(path=str(tmp_path / "zh-CN.png"))
    p.page.click("a[hreflang=en]")  # the switch: the same slide, in English
    p.wait_rendered()
    assert p.page.get_attribute("html", "lang") == "en" and p.page.inner_text("#ruler") == "Ruler"
    assert p.state()["series"] == slides["series_a"]
    p.clean()


def test_choose_language():
    assert choose_language(None, "") == "en"
    assert choose_language(None, "zh-CN,zh;q=0.9") == "zh-CN"
    assert choose_language(None, "zh") == "zh-CN"
    assert choose_language(None, "zh-TW,en;q=0.5") == "en"  # Traditional: not our Simplified text
    assert choose_language(None, "en;q=0.4, zh-CN;q=0.8") == "zh-CN"
    assert choose_language(None, "fr-FR,de") == "en"
    assert choose_language("en", "zh-CN") == "en" and choose_language("xx", "zh-CN") == "zh-CN"


def test_token_mode_uses_the_login_pages_token(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides, config_text='[auth]\nmode = "token"\n')
    secret = run_cli("token", "create", "--role", "viewer", data=server.data_dir, check=True).stdout.strip()
    query = f"study={slides['study']}&series={slides['series_a']}"
    # no token: the page loads (a static shell), the archive refuses, the page says to log in
    anon = Page(browser, server, tmp_path)
    assert anon.open(query).status == 200
    anon.page.wait_for_function("() => window.ppViewer.status === 'error'", timeout=30000)
    assert anon.page.inner_text("#status") == "Log in on the study list first."
    assert anon.frames == [] and any(a.startswith("401") for a in anon.answers), anon.answers
    p = Page(browser, server, tmp_path, token=secret)
    p.open(query)
    p.wait_rendered()
    assert p.frames and all(h.get("authorization") == f"Bearer {secret}" for _, _, h in p.frames)
    assert_shows(p, "token", _decoded_levels(slides["a"]))
    p.clean()


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_static_files_and_their_types(server):
    base = server.http_url + "/static/viewer"
    status, headers, body = _get(base + "/dmv/dynamic-import/libjpegturbowasm_decode.wasm")
    assert status == 200 and headers["Content-Type"] == "application/wasm" and body[:4] == b"\0asm"
    wasm = ROOT / "viewer/node_modules/dicom-microscopy-viewer/dist/dynamic-import/libjpegturbowasm_decode.wasm"
    assert body == wasm.read_bytes()
    status, headers, body = _get(base + "/dmv/dicomMicroscopyViewer.bundle.min.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    status, headers, _ = _get(base + "/app/viewer.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    for bad in ("/app/package.json", "/dmv/../../dicomweb-client/package.json", "/dmv/%2e%2e/%2e%2e/package.json",
                "/nope/x.js", "/dmv/dynamic-import/missing.js"):
        status, _, body = _get(base + bad)
        assert status == 404, (bad, status, body)
    status, headers, body = _get(server.http_url + "/viewer")
    assert status == 200 and "script-src 'self' 'wasm-unsafe-eval'" in headers["Content-Security-Policy"]


def test_scripts_are_gzipped_versioned_and_revalidated(server):
    """The 2.6 MB bundle goes out gzip-compressed with a strong ETag; a revalidation is a 304; the
    page names each script with its version, and that URL may be cached for a year."""
    import gzip
    import re

    import requests

    base = server.http_url + "/static/viewer"
    bundle = ROOT / "viewer/node_modules/dicom-microscopy-viewer/dist/dicomMicroscopyViewer.bundle.min.js"
    r = requests.get(base + "/dmv/dicomMicroscopyViewer.bundle.min.js", headers={"Accept-Encoding": "gzip"},
                     stream=True, timeout=30)
    body = r.raw.read()
    assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in r.headers["Vary"]
    assert gzip.decompress(body) == bundle.read_bytes() and len(body) < bundle.stat().st_size / 2
    etag = r.headers["ETag"]
    assert r.headers["Cache-Control"] == "public, max-age=86400" and etag.endswith('-gz"')
    r = requests.get(base + "/dmv/dicomMicroscopyViewer.bundle.min.js",
                     headers={"Accept-Encoding": "gzip", "If-None-Match": etag}, timeout=30)
    assert r.status_code == 304 and r.content == b"" and r.headers["ETag"] == etag
    r = requests.get(base + "/dmv/dicomMicroscopyViewer.bundle.min.js",
                     headers={"Accept-Encoding": "identity", "If-None-Match": etag}, timeout=30)
    assert r.status_code == 200 and r.content == bundle.read_bytes() and "Content-Encoding" not in r.headers
    r = requests.get(base + "/app/viewer.js", headers={"Accept-Encoding": "gzip"}, timeout=30)
    assert r.headers["Cache-Control"] == "no-cache" and r.content == (ROOT / "viewer/viewer.js").read_bytes()
    page = requests.get(server.http_url + "/viewer?study=1.2.3", timeout=30).text
    versioned = dict(re.findall(r'"static/viewer/([^"?]+)\?v=([0-9a-f]{20})"', page))
    assert set(versioned) == {"app/viewer.css", "app/boot.js", "dwc/dicomweb-client.js",
                              "dmv/dicomMicroscopyViewer.bundle.min.js", "app/frames.js", "app/annotations.js",
                              "app/viewer.js", "app/consult.js"}
    assert "dcmjs.js" not in page  # loaded on the first save only
    for url, version in versioned.items():
        r = requests.get(f"{base}/{url}?v={version}", timeout=30)
        assert r.status_code == 200 and r.headers["Cache-Control"] == "public, max-age=31536000, immutable", url
        assert r.headers["ETag"].strip('"').split("-")[0] == version
    r = requests.get(f"{base}/app/viewer.js?v=0123456789abcdef0123", timeout=30)  # not its version
    assert r.headers["Cache-Control"] == "no-cache"


def test_viewer_answers_503_when_packages_are_missing(tmp_path):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from dicomweb import viewer

    (tmp_path / "viewer.js").write_text("// ours, but no node_modules beside it")

    async def run():
        app = web.Application()
        viewer.add_routes(app, root=tmp_path)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            r = await client.get("/viewer?study=1.2.3")
            assert r.status == 503 and (await r.text()).strip() == viewer.MISSING
            r = await client.get("/static/viewer/dmv/dicomMicroscopyViewer.bundle.min.js")
            assert r.status == 503
    asyncio.run(run())


class PrefixProxy:
    """A reverse proxy (aiohttp, on its own thread and loop) that puts pathpacs under /pfx/ on
    another port. It sends no X-Forwarded-* headers, so the BulkDataURIs of the metadata name
    pathpacs' own address: the page must still reach everything through the proxy."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}  # bodies pass as sent

    def __init__(self, upstream: str):
        from aiohttp import ClientSession, web

        self.upstream = upstream
        self.seen: list[str] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def forward(request: web.Request) -> web.Response:
            self.seen.append(request.path_qs)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
            async with self.session.request(request.method, f"{self.upstream}/{request.match_info['tail']}",
                                            params=request.query, headers=headers, data=await request.read(),
                                            allow_redirects=False) as r:
                body = await r.read()
                out = {k: v for k, v in r.headers.items() if k.lower() not in self.HOP}
                return web.Response(status=r.status, body=body, headers=out)

        async def start():
            self.session = ClientSession(auto_decompress=False)
            app = web.Application(client_max_size=1 << 26)
            app.router.add_route("*", "/pfx/{tail:.*}", forward)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/pfx"

    def close(self):
        async def stop():
            await self.session.close()
            await self.runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_viewer_behind_a_path_prefix(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    proxy = PrefixProxy(server.http_url)
    try:
        p = Page(browser, server, tmp_path, base=proxy.url)
        direct: list[str] = []
        p.page.on("request", lambda r: direct.append(r.url) if r.url.startswith(server.http_url) else None)
        assert p.open(f"study={slides['study']}&series={slides['series_a']}").status == 200
        p.wait_rendered()
        assert direct == [], direct  # nothing bypasses the proxy, the ICC bulk data included
        assert p.frames and any("/pfx/dicomweb/" in s and "/bulkdata/" in s for s in proxy.seen), proxy.seen
        assert any(s.startswith("/pfx/static/viewer/dmv/dynamic-import/") for s in proxy.seen)
        assert_shows(p, "prefix", _decoded_levels(slides["a"]))
        assert p.page.get_attribute("#home", "href") == "./"
        p.clean()
    finally:
        proxy.close()


def test_side_by_side_views_move_together(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    p = Page(browser, server, tmp_path, width=1300)
    p.open(f"study={slides['study']}&series={slides['series_a']}&compare={slides['series_b']}")
    p.wait_rendered()
    p.page.wait_for_function("() => ['rendered', 'error'].includes(window.ppViewer.compareStatus)"
                             " || window.ppViewer.status === 'error'", timeout=30000)
    assert p.state()["compareStatus"] == "rendered", p.debug()
    p.page.click("[data-mag='40']")
    p.settle()
    views = """() => [window.viewer, window.viewer2].map(v => { const w = v.getMap().getView();
        return [w.getCenter()[0], w.getCenter()[1], w.getResolution(), w.getRotation()]; })"""
    (x1, y1, r1, rot1), (x2, y2, r2, rot2) = p.page.evaluate(views)
    # B's base pixels are 0.5 µm, A's 0.25 µm: the same place and magnification in µm
    assert r1 == pytest.approx(1.0) and r2 == pytest.approx(0.5)
    assert (x2 * 0.5, y2 * 0.5) == (pytest.approx(x1 * 0.25, abs=0.5), pytest.approx(y1 * 0.25, abs=0.5))  # OL: whole pixels
    p.page.click("#rotr")
    p.page.focus("#viewport")
    p.page.keyboard.press("ArrowRight")
    p.page.keyboard.press("ArrowDown")
    p.settle()
    (x1, y1, r1, rot1b), (x2, y2, r2, rot2b) = p.page.evaluate(views)
    assert rot2b - rot2 == pytest.approx(rot1b - rot1) == pytest.approx(np.pi / 2)
    assert (x2 * 0.5, y2 * 0.5) == (pytest.approx(x1 * 0.25, abs=0.5), pytest.approx(y1 * 0.25, abs=0.5))  # OL: whole pixels
    assert_shows(p, "side-a", _decoded_levels(slides["a"]), 2048)
    img = p.shot("side-b")
    samples = p.page.evaluate(_SAMPLE_JS.replace("window.viewer.", "window.viewer2."))
    scores = level_scores(img, samples, _decoded_levels(slides["b"]))
    hits, total = scores[1024]  # 0.5 base pixels of B per screen pixel: its base level
    assert total > 500 and hits / total > 0.95, scores
    # unlinked, B stays; linked again, it keeps the offset it was given
    p.page.click("#link")
    p.page.keyboard.press("ArrowLeft")
    (x1u, y1u, *_), (x2u, y2u, *_) = p.page.evaluate(views)
    assert (x2u, y2u) == (pytest.approx(x2), pytest.approx(y2)) and np.hypot(x1u - x1, y1u - y1) > 50  # rotated: left is along y
    p.page.click("#link")
    offset = p.state()["offsetUm"]
    assert np.hypot(*offset) > 10, offset  # 100 screen px at 40x: 25 µm
    p.page.focus("#viewport")
    p.page.keyboard.press("ArrowUp")
    (x1, y1, *_), (x2, y2, *_) = p.page.evaluate(views)
    assert (x2 * 0.5 - x1 * 0.25, y2 * 0.5 - y1 * 0.25) == (pytest.approx(offset[0], abs=0.5), pytest.approx(offset[1], abs=0.5))
    assert f"compare={slides['series_b']}" in p.page.url
    p.clean()
