"""pathpacs convert on Hamamatsu NDPI and Philips TIFF, from files generated here (nothing downloaded).

The fixtures (tests/slide_fixtures.py: write_ndpi, write_philips) reproduce the structure that
tifffile and opentile key on for real scanner files; the first test of each format checks that
they are recognised as such (tifffile's format flags and series, opentile's tiler and its view
of stripes / sparse tiles) before the conversion is judged by dciodvfy, wsidicom and pixels.
"""

from __future__ import annotations

import io

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pydicom
import pytest
import tifffile

from converters.jpeg import jpeg_info

from slide_fixtures import write_ndpi, write_philips
from test_convert import by_type, dciodvfy_errors, dcm_files, read_level, wsidicom_level

REPO = Path(__file__).resolve().parents[1]
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def pathpacs_convert(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`pathpacs convert` (the archive's CLI entry point, archive.cli:main)."""
    return subprocess.run([sys.executable, "-m", "archive", "convert", str(src), "-o", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def frames_of(path: Path) -> tuple[pydicom.Dataset, list[bytes]]:
    ds = pydicom.dcmread(path)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    return ds, frames


def strip_pad(frame: bytes) -> bytes:
    """Fragments are padded to even length; a JPEG ends at its EOI."""
    return frame[:-1] if frame.endswith(b"\xff\xd9\x00") else frame


# --- Hamamatsu NDPI ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ndpi(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("ndpi") / "CMU-synth.ndpi"
    return path, write_ndpi(path)


@pytest.fixture(scope="module")
def ndpi_out(ndpi, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ndpi-out")
    r = pathpacs_convert(ndpi[0], out)
    assert r.returncode == 0, r.stderr
    assert "3 levels (3 copied losslessly)" in r.stdout, r.stdout
    return out


def test_ndpi_is_recognised_like_a_scanner_file(ndpi):
    from opentile import OpenTile
    from opentile.formats.ndpi.ndpi_image import NdpiOverviewImage, NdpiStripedImage
    from opentile.tiff_format import TiffFormat

    path, info = ndpi
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ndpi and tif.tiff.is_ndpi  # NDPI tags, and the 64-bit-offset layout
        assert tif.tiff.version == 42 and tif.tiff.offsetsize == 8
        assert [s.kind for s in tif.series] == ["ndpi", "ndpi"]
        assert tif.series[1].name == "Macro"
        levels = tif.series[0].levels
        assert [lv.shape[:2] for lv in levels] == [(1536, 2048), (384, 512), (96, 128)]
        page = levels[0].keyframe
        # one JPEG strip; McuStarts turns its restart intervals into 512x8 "tiles"
        tags = page.ndpi_tags
        assert tags["Magnification"] == 20.0 and tags["Make"] == "Hamamatsu"
        assert len(tags["McuStarts"]) == 192 * 4
        assert page.is_tiled and page.chunks == (8, 512, 3) and page.chunked[:2] == (192, 4)
        assert len(page.dataoffsets) == 192 * 4
        assert page.photometric == tifffile.PHOTOMETRIC.YCBCR
        assert tif.series[1].keyframe.ndpi_tags["Magnification"] == -1.0

    assert OpenTile.detect_format(path) == TiffFormat.NDPI
    with OpenTile.open(path, 1024) as tiler:
        assert type(tiler).__name__ == "NdpiTiler"
        assert all(isinstance(lv, NdpiStripedImage) for lv in tiler.levels)
        base = tiler.levels[0]
        assert (base.stripe_size.width, base.stripe_size.height) == (512, 8)
        assert (base.tile_size.width, base.tile_size.height) == (1024, 1024)  # 8 x smallest stripe (128)
        assert base.subsampling == (1, 1)  # NanoZoomer JPEG is 4:4:4
        assert base.pixel_spacing.width == pytest.approx(0.00025)
        assert tiler.metadata.magnification == 20.0
        assert tiler.metadata.scanner_serial_number == "NZ-000123"
        assert len(tiler.overviews) == 1 and isinstance(tiler.overviews[0], NdpiOverviewImage)


def _ndpi_label_from_opentile(path) -> bool:
    """NDPI has no label page; opentile >= 0.24 crops one from the macro, older ones give none.
    Whatever opentile gives, the conversion must carry over (and nothing more)."""
    from opentile import OpenTile

    with OpenTile.open(path, 1024) as tiler:
        return len(tiler.labels) > 0


def test_ndpi_instances(ndpi, ndpi_out):
    kinds = by_type(dcm_files(ndpi_out))
    has_label = _ndpi_label_from_opentile(ndpi[0])
    assert sorted(kinds) == (["LABEL"] if has_label else []) + ["OVERVIEW", "VOLUME"]
    vol = kinds["VOLUME"]
    assert [(int(d.TotalPixelMatrixColumns), int(d.TotalPixelMatrixRows)) for d in vol] == \
        [(2048, 1536), (512, 384), (128, 96)]
    assert [int(d.NumberOfFrames) for d in vol] == [4, 1, 1]
    base = vol[0]
    assert base.Rows == base.Columns == 1024
    assert base.file_meta.TransferSyntaxUID == JPEG_BASELINE
    assert base.PhotometricInterpretation == "YBR_FULL_422"  # YCbCr 4:4:4; the WSI IOD has no YBR_FULL
    assert base.Manufacturer == "Hamamatsu" and base.ManufacturerModelName == "C13210"
    assert base.DeviceSerialNumber == "NZ-000123"
    assert "NDP.scan 3.3.0" in list(base.SoftwareVersions)
    assert base.AcquisitionDateTime.startswith("20230517142109")
    assert float(base.OpticalPathSequence[0].ObjectiveLensPower) == 20
    ps = [float(x) for x in base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert ps == pytest.approx([0.00025, 0.00025])
    assert base.LossyImageCompression == "01" and "ISO_10918_1" in str(base.LossyImageCompressionMethod)


def test_ndpi_dciodvfy_clean(ndpi, ndpi_out):
    files = dcm_files(ndpi_out)
    assert len(files) == 4 + _ndpi_label_from_opentile(ndpi[0])
    for f in files:
        assert dciodvfy_errors(f) == [], f.name


def test_ndpi_frames_are_opentile_tiles(ndpi, ndpi_out):
    """Frames are opentile's lossless crops of the stripes, stored unchanged (no re-encode)."""
    from opentile import OpenTile

    for level_index in range(3):
        f = ndpi_out / f"CMU-synth_level-{level_index}.dcm"
        ds, frames = frames_of(f)
        assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
        with OpenTile.open(ndpi[0], 1024) as tiler:
            lv = tiler.levels[level_index]
            nx = lv.tiled_size.width
            for i, frame in enumerate(frames):
                assert strip_pad(frame) == lv.get_tile((i % nx, i // nx)), (level_index, i)
        info = jpeg_info(frames[0])
        assert (info.width, info.height) == (1024, 1024) and not info.subsampled


def test_ndpi_pixels_identical(ndpi, ndpi_out):
    """Every level decodes to exactly the pixels tifffile decodes from the NDPI stripes."""
    from wsidicom import WsiDicom

    with tifffile.TiffFile(ndpi[0]) as tif:
        src = [lv.asarray() for lv in tif.series[0].levels]
    with WsiDicom.open(ndpi_out) as wsi:
        assert [lv.size.width for lv in wsi.levels] == [2048, 512, 128]
        for arr in src:
            got = read_level(wsi, wsidicom_level(wsi, arr.shape[1]))
            assert got.shape == arr.shape
            assert np.array_equal(got, arr)
        # and it is the picture that was written, through one round of JPEG
        assert np.abs(read_level(wsi, wsi.levels[0]).astype(int) - ndpi[1]["levels"][0]).mean() < 8
        assert wsi.overviews is not None
        assert bool(wsi.labels) == _ndpi_label_from_opentile(ndpi[0])


# --- Philips TIFF -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def philips(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("philips") / "philips-synth.tiff"
    return path, write_philips(path)


@pytest.fixture(scope="module")
def philips_out(philips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("philips-out")
    r = pathpacs_convert(philips[0], out)
    assert r.returncode == 0, r.stderr
    assert "4 levels (4 copied losslessly)" in r.stdout, r.stdout
    return out


def test_philips_is_recognised_like_a_scanner_file(philips):
    from opentile import OpenTile
    from opentile.tiff_format import TiffFormat

    path, info = philips
    with tifffile.TiffFile(path) as tif:
        assert tif.is_philips and tif.philips_metadata.startswith("<?xml")
        assert [s.name for s in tif.series] == ["Baseline", "Label", "Macro"]
        levels = tif.series[0].levels
        # padded pages trimmed to the size the XML pixel spacing gives
        assert [lv.shape[:2] for lv in levels] == [(1536, 2048), (768, 1024), (384, 512), (192, 256)]
        assert [(lv.keyframe.tags["ImageWidth"].value, lv.keyframe.tags["ImageLength"].value)
                for lv in levels] == [(2048, 1536), (1024, 1024), (512, 512), (512, 512)]
        base = levels[0].keyframe
        assert base.jpegtables and base.subsampling == (2, 2)
        for k, sparse in enumerate(info["sparse"]):
            counts = levels[k].keyframe.databytecounts
            assert [i for i, c in enumerate(counts) if c == 0] == sorted(sparse)
        assert info["sparse"][0] and info["sparse"][1]  # sparse tiles on two levels

    assert OpenTile.detect_format(path) == TiffFormat.PHILIPS_TIFF
    with OpenTile.open(path) as tiler:
        assert type(tiler).__name__ == "PhilipsTiffTiler"
        assert [lv.image_size.width for lv in tiler.levels] == [2048, 1024, 512, 256]
        assert tiler.levels[0].pixel_spacing.width == pytest.approx(0.00025)
        assert tiler.metadata.scanner_manufacturer == "PHILIPS"
        assert tiler.metadata.scanner_serial_number == "FMT0042"
        assert len(tiler.labels) == 1 and len(tiler.overviews) == 1
        # a sparse tile comes back as a white tile opentile makes from a real one
        import imagecodecs

        assert (imagecodecs.jpeg8_decode(tiler.levels[0].get_tile((3, 0))) >= 250).all()


def test_philips_instances(philips_out):
    kinds = by_type(dcm_files(philips_out))
    assert sorted(kinds) == ["LABEL", "OVERVIEW", "VOLUME"]
    vol = kinds["VOLUME"]
    assert [(int(d.TotalPixelMatrixColumns), int(d.TotalPixelMatrixRows)) for d in vol] == \
        [(2048, 1536), (1024, 768), (512, 384), (256, 192)]
    assert [int(d.NumberOfFrames) for d in vol] == [12, 4, 1, 1]
    base = vol[0]
    assert base.Rows == base.Columns == 512
    assert base.PhotometricInterpretation == "YBR_FULL_422"
    assert base.Manufacturer == "PHILIPS" and base.DeviceSerialNumber == "FMT0042"
    assert base.AcquisitionDateTime.startswith("20220314103015")
    ps = [float(x) for x in base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert ps == pytest.approx([0.00025, 0.00025])
    ps3 = [float(x) for x in vol[3].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert ps3 == pytest.approx([0.002, 0.002])
    assert kinds["LABEL"][0].BurnedInAnnotation == "YES"


def test_philips_dciodvfy_clean(philips_out):
    files = dcm_files(philips_out)
    assert len(files) == 6
    for f in files:
        assert dciodvfy_errors(f) == [], f.name


def test_philips_frames_are_source_tiles(philips, philips_out):
    """Each frame is the stored tile with the JPEGTables merged in; sparse tiles are opentile's blank."""
    from opentile import OpenTile

    ds, frames = frames_of(philips_out / "philips-synth_level-0.dcm")
    assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
    with tifffile.TiffFile(philips[0]) as tif, OpenTile.open(philips[0]) as tiler:
        page = tif.series[0].levels[0].keyframe
        nx = tiler.levels[0].tiled_size.width
        fh = tif.filehandle
        for i, frame in enumerate(frames):
            if page.databytecounts[i] == 0:
                # sparse: a white JPEG of our own (opentile 0.23-0.24's blank tile is malformed)
                blank = np.asarray(Image.open(io.BytesIO(strip_pad(frame))).convert("RGB"))
                assert blank.shape == (512, 512, 3) and (blank >= 250).all(), i
                continue
            assert strip_pad(frame) == tiler.levels[0].get_tile((i % nx, i // nx)), i
            fh.seek(page.dataoffsets[i])
            body = fh.read(page.databytecounts[i])
            # the stored scan (SOS .. EOI) is in the frame byte for byte: copied, not re-encoded
            assert strip_pad(frame).endswith(body[body.index(b"\xff\xda"):]), i


def test_philips_pixels_identical(philips, philips_out):
    """Copied tiles decode to exactly tifffile's pixels; sparse tiles are white."""
    from wsidicom import WsiDicom

    tile = philips[1]["tile"]
    with tifffile.TiffFile(philips[0]) as tif:
        src = [lv.asarray() for lv in tif.series[0].levels]  # tifffile fills sparse tiles with 0
    with WsiDicom.open(philips_out) as wsi:
        assert [lv.size.width for lv in wsi.levels] == [2048, 1024, 512, 256]
        for k, arr in enumerate(src):
            got = read_level(wsi, wsidicom_level(wsi, arr.shape[1]))
            assert got.shape == arr.shape
            nx = -(-arr.shape[1] // tile)
            copied = np.ones(arr.shape[:2], bool)
            for i in philips[1]["sparse"][k]:
                ty, tx = divmod(i, nx)
                region = (slice(ty * tile, (ty + 1) * tile), slice(tx * tile, (tx + 1) * tile))
                copied[region] = False
                assert (got[region] >= 250).all(), (k, i)  # opentile's blank tile: white
            assert np.array_equal(got[copied], arr[copied]), k
        assert np.abs(read_level(wsi, wsi.levels[0]).astype(int) - philips[1]["levels"][0]).mean() < 8
        assert wsi.labels is not None and wsi.overviews is not None


# --- TIFF-family YCbCr 4:4:4 JPEG (the same photometric question as NDPI) --------------------------

def test_tiff_ycbcr_444_jpeg_copy(tmp_path):
    """Unsubsampled YCbCr JPEG tiles are copied and labelled YBR_FULL_422 (dciodvfy-clean)."""
    from wsidicom import WsiDicom

    from converters.convert import convert
    from slide_fixtures import make_image

    src = tmp_path / "ycc444.tif"
    img = make_image(768, 1024, seed=7)
    tifffile.imwrite(src, img, tile=(256, 256), compression="jpeg", compressionargs={"level": 85},
                     photometric="ycbcr", subsampling=(1, 1), resolution=(40000, 40000),
                     resolutionunit="CENTIMETER", metadata=None)
    out = tmp_path / "out"
    result = convert(src, out)
    assert result.instances[0].mode == "copy"
    ds, frames = frames_of(out / "ycc444_level-0.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert not jpeg_info(frames[0]).subsampled
    with tifffile.TiffFile(src) as tif:
        ref = tif.pages[0].asarray()
    with WsiDicom.open(out) as wsi:
        assert np.array_equal(read_level(wsi, wsi.levels[0]), ref)
    for f in dcm_files(out):
        assert dciodvfy_errors(f) == [], f.name


def test_ndpi_z_stack_keeps_the_focal_plane_at_zero(tmp_path):
    """A z-stack NDPI lists every level once per focal plane: one pyramid, the plane at 0."""
    from wsidicom import WsiDicom

    src = tmp_path / "zstack.ndpi"
    info = write_ndpi(src, focal_planes_nm=(-2000, 0, 2000))
    with tifffile.TiffFile(src) as tif:
        assert tif.series[0].axes == "ZYXS" and tif.series[0].shape[0] == 3
        plane0 = [lv.asarray()[1] for lv in tif.series[0].levels]
    out = tmp_path / "out"
    r = pathpacs_convert(src, out, "--no-overview")
    assert r.returncode == 0, r.stderr
    vol = by_type(dcm_files(out))["VOLUME"]
    assert [int(d.TotalPixelMatrixColumns) for d in vol] == [2048, 512, 128]
    with WsiDicom.open(out) as wsi:
        for arr in plane0:
            assert np.array_equal(read_level(wsi, wsidicom_level(wsi, arr.shape[1])), arr)
        assert np.abs(read_level(wsi, wsi.levels[0]).astype(int) - info["levels"][0]).mean() < 8
