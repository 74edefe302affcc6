"""Annotations in the viewer (viewer/annotations.js): stored Microscopy Bulk Simple Annotations
of the study drawn as overlays, toggled per group, and marks drawn in chromium saved by STOW-RS.

Real chromium against `pathpacs serve`; the ANN objects are made by highdicom (the test's own
peer) and stored through our STOW-RS with dicomweb-client; the screen is compared before and
after toggling a group.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from dicomweb_client.api import DICOMwebClient
from pydicom.sr.codedict import codes

from test_viewer import Page, _serve, slides  # noqa: F401  (slides: the fixture)

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
    p.page.wait_for_timeout(500)
    shown = p.shot("ann-on")
    box = f"#annotation-groups input[data-group='{uid}']"
    p.page.uncheck(box)
    p.page.wait_for_timeout(800)
    hidden = p.shot("ann-off")
    assert p.page.evaluate(f"() => window.viewer.isAnnotationGroupVisible({uid!r})") is False
    # within the slide's viewport (the side panel may scroll to the checkbox)
    vp = p.page.locator("#viewport").bounding_box()
    view = (slice(int(vp["y"]) + 2, int(vp["y"] + vp["height"]) - 2), slice(int(vp["x"]) + 2, int(vp["x"] + vp["width"]) - 2))
    changed = (np.abs(shown - hidden).max(axis=2) > 40)
    outline = _near_outline(changed.shape, _screen_points(p, POLYGON), 3)
    changed, outline = changed[view], outline[view]
    assert outline.sum() > 4000 and changed[outline].mean() > 0.4, changed[outline].mean()  # the outline is drawn...
    assert changed[~outline].sum() < 50, changed[~outline].sum()  # ...and nothing else moved
    p.page.check(box)
    p.page.wait_for_timeout(800)
    again = p.shot("ann-on-again")
    assert (np.abs(again - shown).max(axis=2) > 40)[view].sum() < 50
    p.clean()
