"""The viewer benchmark's measurements (conformance/bench/viewer.py) on a small slide: what it
reports is in order and consistent with what the page asked of pathpacs; frames go several per
WADO-RS request and the pan is served by viewer/frames.js's prefetch."""
from __future__ import annotations

import re

import pydicom
import pytest
from playwright.sync_api import Error as PlaywrightError

import factory
from conftest import run_cli
from conformance.bench import viewer as bench
from test_http_hardening import wait_log
from test_viewer_browser import complete_wsi

LEVELS = ((2048, 1536), (1024, 768), (512, 384))


def _served_slide(make_server, tmp_path):
    """A server holding a small generated slide, and the viewer URL of that slide."""
    paths = factory.wsi_series(tmp_path / "slide", levels=LEVELS, tile=256)
    complete_wsi(paths)
    server = make_server()
    run_cli("import", "--quiet", str(tmp_path / "slide"), data=server.data_dir, check=True)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return server, f"{server.http_url}/viewer?study={ds.StudyInstanceUID}&series={ds.SeriesInstanceUID}"


def test_viewer_bench_session_measures_open_and_level0_pan(make_server, browser, tmp_path):
    _, url = _served_slide(make_server, tmp_path)

    r = bench.session(browser, url, steps=1, height=LEVELS[0][1])

    # the order of events on the page's clock
    # (the page may still be parsing when the first frame is asked for: boot.js fetched the metadata early)
    assert 0 < r["dom_ms"] and 0 < r["first_start_ms"] < r["first_frame_ms"] < r["first_ms"] <= r["full_ms"], r
    assert 0 < r["first_http_ms"] < r["first_frame_ms"] - r["first_start_ms"] + 1, r
    assert r["frames"] > 0
    # level 0 at 1:1, the map's left edge at the slide's: the tiles in view, then those the step
    # of half the map's width uncovers (the slide ends at 2048 px: 8 x 6 tiles of 256)
    w, h = r["map_size"]
    cols = lambda x0, x1: set(range(max(0, x0 // 256), min(8, -(-x1 // 256))))  # noqa: E731
    rows = len(range(max(0, (768 - h // 2) // 256), min(6, -(-(768 + h // 2) // 256))))
    assert r["zoom"]["frames"] == len(cols(w // 2, w + w // 2)) * rows, (r["zoom"], w, h)
    uncovered = cols(w, 2 * w) - cols(w // 2, w + w // 2)
    assert [s["frames"] for s in r["steps"]] == [len(uncovered) * rows], (r["steps"], w, h)
    # each frame of the step came from viewer/frames.js's prefetch (the ring around the view, fetched
    # once the zoom was drawn) or from a request made then; the open sent several frames per request
    pan = r["pan"]
    assert pan["asked"] == len(uncovered) * rows > 0, (pan, r)
    assert pan["cacheHits"] + pan["joined"] > 0, pan
    assert pan["cacheHits"] + pan["joined"] + (pan["framesRequested"] - pan["prefetchedFrames"]) >= pan["asked"], pan
    assert all(ms > 0 for ms in r["pan_http"]), r
    assert 0 < r["multi"] <= r["requests"], r
    rows = bench._rows("hot", 1, r)
    assert [row["system"] for row in rows] == ["pathpacs hot tier, visit 1"] * 5
    assert rows[4]["value"] == f"{r['steps'][0]['ms']:.0f} ms"


def test_viewer_bench_open_with_no_devtools_client(make_server, browser, tmp_path):
    """The bench's user's-browser measurement: Chromium started on its own (no client attached
    while the page loads), read afterwards from viewer.js's own clock; a returning start reuses
    the profile (the scripts come from its cache: no request for them reaches pathpacs)."""
    server, url = _served_slide(make_server, tmp_path)

    r = bench.unwatched(url, tmp_path / "profile", starts=2, wait_s=6, chromium=browser.browser_type)

    assert r["status"] == "rendered" and r["settled"] and r["frames"] > 0, r
    assert 0 < r["dom_ms"] and 0 < r["first_start_ms"] < r["first_frame_ms"] <= r["first_ms"] <= r["full_ms"], r
    assert 0 < r["first_http_ms"] < r["first_frame_ms"] - r["first_start_ms"] + 1, r
    log = server.log()
    assert log.count("/static/viewer/dmv/dicomMicroscopyViewer.bundle.min.js") == 1, "the second start fetched the library again"
    rows = bench._rows("hot", "no DevTools client", r)
    assert [row["system"] for row in rows] == ["pathpacs hot tier, no DevTools client"] * 2


def test_viewer_bench_floor_draws_the_first_view_without_the_library(make_server, browser, tmp_path):
    """The bench's floor: the coarsest level's frames asked by WADO-RS (the first alone, then the
    rest in one request), every part decoded and drawn, on the page's clock."""
    server, _ = _served_slide(make_server, tmp_path)
    top = next(ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "slide").glob("*.dcm"))
               if ds.ImageType[2] == "VOLUME" and ds.TotalPixelMatrixColumns == LEVELS[-1][0])
    assert int(top.NumberOfFrames) == 4

    r = bench.bare(browser, server.http_url, top.StudyInstanceUID, top.SeriesInstanceUID, top.SOPInstanceUID, 4, 2)

    assert 0 < r["dom_ms"] < r["first_ms"] < r["full_ms"], r
    wait_log(server, re.escape(f"{top.SOPInstanceUID}/frames/1\" 200"))  # the access log line is written after the answer
    wait_log(server, re.escape(f"{top.SOPInstanceUID}/frames/2,3,4\" 200"))
    rows = bench._floor_rows("hot", [r], 4)
    assert [row["benchmark"] for row in rows] == ["viewer floor: open to first frame drawn",
                                                  "viewer floor: open to the first view's frames drawn"]
    # a frame list it cannot have: the page fails, not a time
    with pytest.raises(PlaywrightError, match="frames answered 4"):
        bench.bare(browser, server.http_url, top.StudyInstanceUID, top.SeriesInstanceUID, top.SOPInstanceUID, 9, 2)
