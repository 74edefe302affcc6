"""The OpenSlide reading path (used for MRXS and the other formats only OpenSlide reads).

No MRXS can be generated here, so the same code path is driven through OpenSlide's generic-tiff
reader: `converters.sources._open_openslide` opens the file with the real OpenSlide library, and the
conversion re-encodes what OpenSlide decodes. The routing of .mrxs/.vms/.scn/... to that reader is
a file-extension check (converters.sources.open_slide).
"""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from slide_fixtures import write_generic
from test_convert import by_type, dcm_files, dciodvfy_errors, wsidicom_level

openslide = pytest.importorskip("openslide", reason="pip install .[openslide] for the OpenSlide path")


def test_openslide_reader_converts_a_slide(tmp_path, monkeypatch):
    from converters import convert as convert_mod
    from converters.sources import _open_openslide
    from wsidicom import WsiDicom

    src = tmp_path / "slide.tiff"
    info = write_generic(src, width=1024, height=768, tile=256, compression="zlib", pyramid=True)
    assert openslide.OpenSlide(str(src)).properties["openslide.vendor"] == "generic-tiff"
    monkeypatch.setattr(convert_mod, "open_slide", _open_openslide)
    out = tmp_path / "out"
    convert_mod.convert(src, out, codec="jpeg2000", quality=100, workers=2)  # reversible: exact
    files = dcm_files(out)
    assert files
    for f in files:
        assert dciodvfy_errors(f) == []
    volumes = by_type(files)["VOLUME"]
    assert volumes[0].Manufacturer == "generic-tiff"  # it came through OpenSlide
    assert int(volumes[0].TotalPixelMatrixColumns) == 1024
    with WsiDicom.open(out) as wsi:
        lv = wsidicom_level(wsi, 1024)
        region = np.asarray(wsi.read_region((0, 0), lv.level, (1024, 768)).convert("RGB"))
    assert np.array_equal(region, info["levels"][0])  # OpenSlide's decode, losslessly re-encoded
    assert pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6"
