"""Annotations in the viewer (viewer/annotations.js): stored Microscopy Bulk Simple Annotations
of the study drawn as overlays, toggled per group, and marks drawn in chromium saved by STOW-RS.

Real chromium against `pathpacs serve`; the ANN objects are made by highdicom (the test's own
peer) and stored through our STOW-RS with dicomweb-client; the screen is compared before and
after toggling a group.
"""
from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
from dicomweb_client.api import DICOMwebClient
from pydicom.sr.codedict import codes

from conftest import run_cli
from test_viewer import Page, _serve, slides  # noqa: F401  (slides: the fixture)

DCIODVFY = shutil.which("dciodvfy")

# a rectangle outline in base-level pixels (column, row) of slide A (2048 x 1536)
POLYGON = np.array([[300.0, 250.0], [1500.0, 250.0], [1500.0, 1100.0], [300.0, 1100.0]])


def _densify(corners: np.ndarray, per_side: int) -> np.ndarray:
    """The same outline through per_side points a side: 400 vertices are 6400 bytes of
    coordinates, above the archive's inline limit, so the viewer must fetch them as bulk data."""
    t = np.linspace(0, 1, per_side, endpoint=False)[:, None]
    return np.concatenate([a + t * (b - a) for a, b in zip(corners, np.roll(corners, -1, axis=0))])


def stored_ann(base_path, label: str = "tumour") -> pydicom.Dataset:
    src = pydicom.dcmread(base_path)
    group = hd.ann.AnnotationGroup(
        number=1, uid=hd.UID(), label=label,
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Neoplasm, graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[_densify(POLYGON, 100)], algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.MANUAL)
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[src], annotation_coordinate_type="2D", annotation_groups=[group],
        series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="pathpacs-tests", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1")


def _screen_points(p: Page, pts: np.ndarray) -> np.ndarray:
    """Base-pixel (column, row) -> page pixel (the map's unit is a base pixel, y pointing up)."""
    box = p.page.locator("#viewport").bounding_box()
    xy = p.page.evaluate("(pts) => pts.map(([c, r]) => window.viewer.getMap().getPixelFromCoordinate([c, -r]))",
                         pts.tolist())
    return np.array(xy) + [box["x"], box["y"]]


def _near_outline(shape: tuple[int, int], corners: np.ndarray, within: float) -> np.ndarray:
    """Mask of the screen pixels within `within` px of the closed outline through `corners`."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    mask = np.zeros(shape, bool)
    for a, b in zip(corners, np.roll(corners, -1, axis=0)):
        d = b - a
        t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / (d @ d), 0, 1)
        mask |= np.hypot(xx - a[0] - t * d[0], yy - a[1] - t * d[1]) <= within
    return mask


def test_stored_annotation_group_is_drawn_and_toggled(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    ann = stored_ann(slides["a"][0])
    DICOMwebClient(server.dicomweb_url).store_instances([ann])
    p = Page(browser, server, tmp_path)
    p.open(f"study={slides['study']}&series={slides['series_a']}")
    p.wait_rendered()
    p.page.wait_for_function("() => window.ppViewer.annotationStatus === 'shown'")
    st = p.state()
    uid = ann.AnnotationGroupSequence[0].AnnotationGroupUID
    assert [(g["uid"], g["label"], g["count"]) for g in st["annotationGroups"]] == [(uid, "tumour", 1)], p.debug()
    assert p.page.locator("#annotation-groups li").all_inner_texts() == ["tumour (1)"]
    # the point coordinates are bulk data: fetched by their BulkDataURI from our server
    p.settle()
    assert any(a.startswith("200") and ann.SOPInstanceUID in a and "/bulkdata/" in a for a in p.answers), "\n".join(p.answers)
    p.settle()
    box = f"#annotation-groups input[data-group='{uid}']"
    p.page.evaluate("() => { window.ppPostrenders = 0; window.viewer.getMap().on('postrender', () => window.ppPostrenders++) }")
    # shown, then hidden: the outline is what changes. WebGL on SwiftShader draws late on a busy
    # machine, so the pair is taken again (up to 6 times, 0.5 s more each) until the outline shows.
    tries = []
    for attempt in range(6):
        p.page.wait_for_timeout(500 * (attempt + 1))
        shown = p.shot("ann-on")
        renders = p.page.evaluate("() => window.ppPostrenders")
        p.page.uncheck(box)
        p.page.wait_for_timeout(800)
        hidden = p.shot("ann-off")
        assert p.page.evaluate(f"() => window.viewer.isAnnotationGroupVisible({uid!r})") is False
        # within the slide's viewport (the side panel may scroll to the checkbox)
        vp = p.page.locator("#viewport").bounding_box()
        view = (slice(int(vp["y"]) + 2, int(vp["y"] + vp["height"]) - 2), slice(int(vp["x"]) + 2, int(vp["x"] + vp["width"]) - 2))
        drawn, stray, length = _outline_change(shown, hidden, _screen_points(p, POLYGON), view)
        tries.append(f"{drawn:.2f} of the outline changed; the map drew "
                     f"{p.page.evaluate('() => window.ppPostrenders') - renders} times after the uncheck")
        if drawn > 0.9:
            break
        p.page.check(box)
    # the outline is drawn all along its length...
    assert length > 2000 and drawn > 0.9, (tries, p.page.evaluate("() => window.viewer.getMap().getLayers().getLength()"),
                                          [c for c in p.console if c.startswith(("warn", "error"))][-10:], p.errors)
    assert stray < 50, stray  # ...and nothing else moved
    p.page.check(box)
    p.page.wait_for_timeout(800)
    again = p.shot("ann-on-again")
    assert (np.abs(again - shown).max(axis=2) > 40)[view].sum() < 50
    p.clean()


def _outline_change(shown: np.ndarray, hidden: np.ndarray, corners: np.ndarray, view) -> tuple[float, int, int]:
    """Of the outline's own pixels (within 1 px of it), the share with a changed pixel within 3 px, so
    the line's width and smoothing do not matter; the pixels changed away from it; its length in px."""
    changed = (np.abs(shown - hidden).max(axis=2) > 40)
    near = np.zeros_like(changed)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            if dx * dx + dy * dy <= 9:
                near |= np.roll(changed, (dy, dx), axis=(0, 1))
    line = _near_outline(changed.shape, corners, 1)[view]
    band = _near_outline(changed.shape, corners, 3)[view]
    return float(near[view][line].mean()), int(changed[view][~band].sum()), int(line.sum())


def _image_pixels(p: Page, screen) -> np.ndarray:
    """The base-level pixel (column, row) the viewer shows at these viewport pixels: map x is the
    column, map y is -1 - row (how level_scores in test_viewer.py reads the screen)."""
    xy = np.array(p.page.evaluate("(pts) => pts.map((pt) => window.viewer.getMap().getCoordinateFromPixel(pt))",
                                  [list(s) for s in screen]))
    return np.column_stack([xy[:, 0], -1 - xy[:, 1]])


def _to_pixels(base_path):
    """Slide coordinates (mm) -> the base image's (column, row), unrounded: highdicom's transformer."""
    base = pydicom.dcmread(base_path, stop_before_pixels=True)
    origin = base.TotalPixelMatrixOriginSequence[0]
    return hd.spatial.ReferenceToPixelTransformer(
        image_position=[float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem), 0.0],
        image_orientation=[float(v) for v in base.ImageOrientationSlide],
        pixel_spacing=[float(v) for v in base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing],
        round_output=False)


def dciodvfy_report(path) -> list[str]:
    assert DCIODVFY, "dciodvfy (Debian dicom3tools) is required for these tests"
    p = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True)
    out = (p.stdout + p.stderr).splitlines()
    # the validator must have recognised the IOD, or an empty report would prove nothing
    assert any("MicroscopyBulkSimpleAnnotations" in line for line in out), out[:5]
    return out


def test_marks_are_saved_as_ann_and_come_back(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    query = f"study={slides['study']}&series={slides['series_a']}"
    p = Page(browser, server, tmp_path)
    p.open(query)
    p.wait_rendered()
    p.page.click("[data-mag='40']")  # one base pixel per screen pixel
    p.settle()
    box = p.page.locator("#viewport").bounding_box()
    cx, cy = round(box["x"] + box["width"] / 2), round(box["y"] + box["height"] / 2)
    corners = [(cx - 150, cy - 100), (cx + 170, cy - 90), (cx + 40, cy + 120)]
    p.page.fill("#mark-label", "gland")
    p.page.click("[data-mark=polygon]")
    assert "active" in p.page.get_attribute("[data-mark=polygon]", "class")
    for x, y in corners + corners[:1]:  # clicking the first corner again closes the polygon
        p.page.mouse.click(x, y)
        p.page.wait_for_timeout(300)
    p.page.wait_for_function("() => window.ppViewer.marks.length === 1")
    drawn = _image_pixels(p, [(x - box["x"], y - box["y"]) for x, y in corners])
    p.page.fill("#mark-label", "nucleus")
    p.page.click("[data-mark=point]")
    p.page.mouse.click(cx + 200, cy + 150)
    p.page.wait_for_function("() => window.ppViewer.marks.length === 2")
    [point] = _image_pixels(p, [(cx + 200 - box["x"], cy + 150 - box["y"])])
    assert p.page.locator("#mark-list li").all_inner_texts() == ["gland — Polygon", "nucleus — Point"]
    assert p.state()["measurements"] == []  # marks are not measurements
    p.page.click("#save-marks")
    p.page.wait_for_function("() => ['saved', 'error'].includes(window.ppViewer.saveStatus)", timeout=30000)
    st = p.state()
    assert st["saveStatus"] == "saved", p.debug()
    assert sorted(g["label"] for g in st["annotationGroups"]) == ["gland", "nucleus"], p.debug()
    assert any(a.startswith("200 /dicomweb/studies") and "/series" not in a.split("?")[0][-60:]
               for a in p.answers), p.answers
    p.clean()

    # a fresh page finds the saved instance by QIDO and draws it
    q = Page(browser, server, tmp_path)
    q.open(query)
    q.wait_rendered()
    q.page.wait_for_function("() => window.ppViewer.annotationStatus === 'shown'")
    groups = q.state()["annotationGroups"]
    assert sorted((g["label"], g["count"]) for g in groups) == [("gland", 1), ("nucleus", 1)], q.debug()
    assert {g["sop"] for g in groups} == set(st["saved"])
    q.clean()

    # the stored object, read back over DICOMweb and by highdicom
    client = DICOMwebClient(server.dicomweb_url)
    found = client.search_for_series(slides["study"], search_filters={"Modality": "ANN"})
    assert len(found) == 1
    series = found[0]["0020000E"]["Value"][0]
    ds = client.retrieve_instance(slides["study"], series, st["saved"][0])
    path = tmp_path / "saved-ann.dcm"
    ds.save_as(path, enforce_file_format=True)
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(path))
    assert ann.Modality == "ANN" and ann.AnnotationCoordinateType == "3D"
    assert ann.FrameOfReferenceUID == pydicom.dcmread(slides["a"][0], stop_before_pixels=True).FrameOfReferenceUID
    base = pydicom.dcmread(slides["a"][0], stop_before_pixels=True)
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == base.SOPInstanceUID
    to_pixels = _to_pixels(slides["a"][0])
    by_label = {g.label: g for g in ann.get_annotation_groups()}
    gland, nucleus = by_label["gland"], by_label["nucleus"]
    assert gland.graphic_type == hd.ann.GraphicTypeValues.POLYGON and nucleus.graphic_type == hd.ann.GraphicTypeValues.POINT
    [polygon] = gland.get_graphic_data(coordinate_type="3D")
    assert polygon.shape == (3, 3)
    assert np.abs(to_pixels(polygon)[:, :2] - drawn).max() <= 1.0, (to_pixels(polygon), drawn)
    [dot] = nucleus.get_graphic_data(coordinate_type="3D")
    assert np.abs(to_pixels(np.atleast_2d(dot))[0, :2] - point).max() <= 1.0, (dot, point)
    report = dciodvfy_report(path)
    assert [line for line in report if line.startswith("Error")] == [], report


def test_saving_needs_a_right_to_store(make_server, browser, slides, tmp_path):
    """Token mode: the viewer role may read but not store (403 shown, the marks kept); the ai role
    (store derived: annotations, never images) saves with the login page's token."""
    server = _serve(make_server, tmp_path, slides, config_text='[auth]\nmode = "token"\n')
    query = f"study={slides['study']}&series={slides['series_a']}"
    for role, expected in (("viewer", "error"), ("ai", "saved")):
        secret = run_cli("token", "create", "--role", role, data=server.data_dir, check=True).stdout.strip()
        p = Page(browser, server, tmp_path, token=secret)
        p.open(query)
        p.wait_rendered()
        box = p.page.locator("#viewport").bounding_box()
        p.page.click("[data-mark=point]")
        p.page.mouse.click(round(box["x"] + box["width"] / 2), round(box["y"] + box["height"] / 2))
        p.page.wait_for_function("() => window.ppViewer.marks.length === 1")
        with p.page.expect_request(lambda r: r.method == "POST") as posted:
            p.page.click("#save-marks")
        assert posted.value.headers.get("authorization") == f"Bearer {secret}"
        p.page.wait_for_function("() => ['saved', 'error'].includes(window.ppViewer.saveStatus)", timeout=30000)
        st = p.state()
        assert st["saveStatus"] == expected, (role, p.debug())
        if role == "viewer":
            assert [a for a in p.answers if not a.startswith("200")] == [f"403 /dicomweb/studies/{slides['study']}"]
            assert p.page.inner_text("#status") == "Saving failed: the archive answered 403"
            assert len(st["marks"]) == 1 and st["saved"] == []
        else:
            assert st["marks"] == [] and len(st["saved"]) == 1
            assert [g["label"] for g in st["annotationGroups"]] == ["mark"]
            p.clean()


def test_rectangle_and_free_hand_marks(make_server, browser, slides, tmp_path):
    """A rectangle (two clicks: opposite corners) is stored as RECTANGLE, four corners; a free-hand
    outline (drag) as a POLYGON through the dragged path."""
    server = _serve(make_server, tmp_path, slides)
    p = Page(browser, server, tmp_path)
    p.open(f"study={slides['study']}&series={slides['series_a']}")
    p.wait_rendered()
    p.page.click("[data-mag='40']")
    p.settle()
    box = p.page.locator("#viewport").bounding_box()
    cx, cy = round(box["x"] + box["width"] / 2), round(box["y"] + box["height"] / 2)
    p.page.fill("#mark-label", "region")
    p.page.click("[data-mark=box]")
    for x, y in ((cx - 100, cy - 80), (cx + 60, cy + 40)):
        p.page.mouse.click(x, y)
        p.page.wait_for_timeout(300)
    p.page.wait_for_function("() => window.ppViewer.marks.length === 1")
    p.page.fill("#mark-label", "outline")
    p.page.click("[data-mark=freehandpolygon]")
    path = [(cx + 100 + 60 * np.cos(a), cy + 60 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 40)]
    p.page.mouse.move(*path[0])
    p.page.mouse.down()
    for x, y in path[1:]:
        p.page.mouse.move(x, y)
    p.page.mouse.up()
    p.page.wait_for_function("() => window.ppViewer.marks.length === 2")
    assert p.page.locator("#mark-list li").all_inner_texts() == ["region — Rectangle", "outline — Free hand"]
    p.page.click("#save-marks")
    p.page.wait_for_function("() => ['saved', 'error'].includes(window.ppViewer.saveStatus)", timeout=30000)
    st = p.state()
    assert st["saveStatus"] == "saved", p.debug()
    client = DICOMwebClient(server.dicomweb_url)
    [series] = client.search_for_series(slides["study"], search_filters={"Modality": "ANN"})
    ds = client.retrieve_instance(slides["study"], series["0020000E"]["Value"][0], st["saved"][0])
    out = tmp_path / "saved.dcm"
    ds.save_as(out, enforce_file_format=True)
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(out))
    groups = {g.label: g for g in ann.get_annotation_groups()}
    assert groups["region"].graphic_type == hd.ann.GraphicTypeValues.RECTANGLE
    [rect] = groups["region"].get_graphic_data(coordinate_type="3D")
    corners = _image_pixels(p, [(x - box["x"], y - box["y"]) for x, y in
                                ((cx - 100, cy - 80), (cx + 60, cy - 80), (cx + 60, cy + 40), (cx - 100, cy + 40))])
    pixels = _to_pixels(slides["a"][0])(rect)[:, :2]
    assert rect.shape == (4, 3)
    # the same four corners, in the library's order around the outline
    assert np.abs(np.sort(pixels, axis=0) - np.sort(corners, axis=0)).max() <= 1.0, (pixels, corners)
    assert all(np.abs(pixels - c).max(axis=1).min() <= 1.0 for c in corners), (pixels, corners)
    assert groups["outline"].graphic_type == hd.ann.GraphicTypeValues.POLYGON
    [free] = groups["outline"].get_graphic_data(coordinate_type="3D")
    drawn = _image_pixels(p, [(x - box["x"], y - box["y"]) for x, y in path])
    got = _to_pixels(slides["a"][0])(free)[:, :2]
    assert len(got) >= 10
    # every stored vertex lies on the dragged circle (radius 60 screen = 60 base pixels at 40x)
    centre = drawn.mean(axis=0)
    assert np.abs(np.hypot(*(got - centre).T) - 60).max() <= 2.0, got
    assert [line for line in dciodvfy_report(out) if line.startswith("Error")] == []
    p.clean()


def test_escape_stops_marking(make_server, browser, slides, tmp_path):
    server = _serve(make_server, tmp_path, slides)
    p = Page(browser, server, tmp_path)
    p.open(f"study={slides['study']}&series={slides['series_a']}")
    p.wait_rendered()
    p.page.click("[data-mark=polygon]")
    assert p.page.evaluate("() => window.ppAnnotations.marking()") == "polygon"
    p.page.click("#ruler")  # the ruler takes the draw interaction over
    assert p.page.evaluate("() => window.ppAnnotations.marking()") is None
    assert "active" not in (p.page.get_attribute("[data-mark=polygon]", "class") or "")
    p.page.click("[data-mark=point]")
    p.page.locator("#viewport").focus()
    p.page.keyboard.press("Escape")
    assert p.page.evaluate("() => window.ppAnnotations.marking()") is None
    box = p.page.locator("#viewport").bounding_box()
    p.page.mouse.click(box["x"] + 200, box["y"] + 200)
    p.page.wait_for_timeout(500)
    assert p.state()["marks"] == [] and p.page.evaluate("() => window.viewer.getAllROIs().length") == 0
    assert p.page.is_disabled("#save-marks")
    p.clean()
