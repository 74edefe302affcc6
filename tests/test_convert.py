"""pathpacs convert: scanner files -> DICOM WSI, validated by dciodvfy, wsidicom and pixel comparison."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile

from converters.convert import ConvertOptions, convert
from converters.errors import ConversionError
from converters.jpeg import ADOBE_APP14_RGB

from slide_fixtures import make_image, write_generic, write_ome, write_photo, write_svs

REPO = Path(__file__).resolve().parents[1]
DCIODVFY = shutil.which("dciodvfy")
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converters", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=120)


def dciodvfy_errors(path: Path) -> list[str]:
    assert DCIODVFY, "dciodvfy (Debian dicom3tools) is required for these tests"
    p = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True)
    out = (p.stdout + p.stderr).splitlines()
    # the validator must have recognised the IOD, or an empty report would prove nothing
    assert any("VLWholeSlideMicroscopyImage" in line for line in out), out[:5]
    return [line for line in out if "Error" in line]


def dcm_files(outdir: Path) -> list[Path]:
    return sorted(outdir.glob("*.dcm"))


def by_type(files: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.setdefault(ds.ImageType[2], []).append(ds)
    for v in out.values():
        v.sort(key=lambda d: -int(d.TotalPixelMatrixColumns))
    return out


def wsidicom_level(wsi, width: int):
    for lv in wsi.levels:
        if lv.size.width == width:
            return lv
    raise AssertionError(f"no level of width {width} in {[lv.size.width for lv in wsi.levels]}")


def read_level(wsi, lv) -> np.ndarray:
    return np.asarray(wsi.read_region((0, 0), lv.level, (lv.size.width, lv.size.height)).convert("RGB"))


@pytest.fixture(scope="module")
def svs(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("svs")
    path = d / "CMU-synth.svs"
    info = write_svs(path)
    return path, info


@pytest.fixture(scope="module")
def svs_out(svs, tmp_path_factory):
    out = tmp_path_factory.mktemp("svs-out")
    md = tmp_path_factory.mktemp("md") / "meta.json"
    md.write_text(json.dumps({
        "patient": {"id": "PAT-001", "name": "Doe^Jane", "sex": "F", "birth_date": "19700101"},
        "study": {"accession_number": "ACC42", "id": "S1", "description": "Biopsy"},
        "slide": {"container_id": "SLIDE-0001", "specimen_id": "BLOCK-A1", "specimen_description": "H&E"},
    }))
    r = run_cli("convert", svs[0], "-o", out, "--metadata", md, "--quiet")
    assert r.returncode == 0, r.stderr
    return out


# --- Aperio SVS: lossless copy ----------------------------------------------------------

def test_svs_instances_and_levels(svs, svs_out):
    files = dcm_files(svs_out)
    kinds = by_type(files)
    assert sorted(kinds) == ["LABEL", "OVERVIEW", "THUMBNAIL", "VOLUME"]
    vol = kinds["VOLUME"]
    # source levels 2048 and 512 copied; 256 generated (fits one 256 tile)
    assert [int(d.TotalPixelMatrixColumns) for d in vol] == [2048, 512, 256]
    assert [int(d.TotalPixelMatrixRows) for d in vol] == [1536, 384, 192]
    assert list(vol[0].ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    assert list(vol[1].ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    assert vol[0].NumberOfFrames == 8 * 6
    for d in vol:
        assert d.DimensionOrganizationType == "TILED_FULL"
        assert d.Rows == d.Columns == 256
    # one study, one series, one frame of reference for everything
    all_ds = [d for v in kinds.values() for d in v]
    assert all(d.SOPClassUID == WSI_SOP_CLASS for d in all_ds)
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({getattr(d, attr) for d in all_ds}) == 1, attr
    assert len({d.SOPInstanceUID for d in all_ds}) == len(all_ds)
    assert kinds["LABEL"][0].BurnedInAnnotation == "YES"
    assert kinds["OVERVIEW"][0].BurnedInAnnotation == "YES"
    assert vol[0].BurnedInAnnotation == "NO"


def test_svs_metadata(svs_out):
    kinds = by_type(dcm_files(svs_out))
    base = kinds["VOLUME"][0]
    assert base.PatientID == "PAT-001" and str(base.PatientName) == "Doe^Jane"
    assert base.AccessionNumber == "ACC42" and base.StudyID == "S1"
    assert base.ContainerIdentifier == "SLIDE-0001"
    spec = base.SpecimenDescriptionSequence[0]
    assert spec.SpecimenIdentifier == "BLOCK-A1" and spec.SpecimenUID
    # scanner metadata from the Aperio ImageDescription
    assert base.AcquisitionDateTime.startswith("20211123101112")
    assert base.DeviceSerialNumber == "SS1234"
    assert "Aperio Image Library v12.0.15" in list(base.SoftwareVersions)
    assert float(base.OpticalPathSequence[0].ObjectiveLensPower) == 20
    assert base.OpticalPathSequence[0].ICCProfile  # sRGB when the source has none
    ps = [float(x) for x in base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert ps == pytest.approx([0.000499, 0.000499])
    lvl1 = kinds["VOLUME"][1]
    ps1 = [float(x) for x in lvl1.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert ps1 == pytest.approx([0.000499 * 1536 / 384, 0.000499 * 2048 / 512])
    origin = base.TotalPixelMatrixOriginSequence[0]
    assert float(origin.XOffsetInSlideCoordinateSystem) == 25.0
    assert float(origin.YOffsetInSlideCoordinateSystem) == 18.5
    assert base.ImagedVolumeWidth == pytest.approx(2048 * 0.000499)


def test_svs_dciodvfy_clean(svs_out):
    files = dcm_files(svs_out)
    assert len(files) == 6
    for f in files:
        assert dciodvfy_errors(f) == [], f.name


def test_svs_base_pixels_identical(svs, svs_out):
    """Copied tiles decode to exactly the source tiles (tables merged, APP14 added, no re-encode)."""
    from wsidicom import WsiDicom

    with tifffile.TiffFile(svs[0]) as tif:
        src = [lv.asarray() for lv in tif.series[0].levels]
    with WsiDicom.open(svs_out) as wsi:
        assert [lv.size.width for lv in wsi.levels] == [2048, 512, 256]
        for arr in src:
            got = read_level(wsi, wsidicom_level(wsi, arr.shape[1]))
            assert got.shape == arr.shape
            assert np.array_equal(got, arr)
        # and the decoded pixels are the picture we wrote, not just self-consistent
        assert np.abs(read_level(wsi, wsi.levels[0]).astype(int) - svs[1]["levels"][0]).mean() < 8
        assert wsi.labels and wsi.overviews


def test_svs_frames_are_source_bytes(svs, svs_out):
    """Frame bytes = SOI + APP14 + JPEGTables + tile body: a byte copy, not a re-encode."""
    base = [f for f in dcm_files(svs_out) if f.name.endswith("level-0.dcm")][0]
    ds = pydicom.dcmread(base)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert ds.PhotometricInterpretation == "RGB"
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    with tifffile.TiffFile(svs[0]) as tif:
        page = tif.pages[0]
        tables = page.jpegtables
        fh = tif.filehandle
        for i in (0, 7, 47):
            fh.seek(page.dataoffsets[i])
            tile = fh.read(page.databytecounts[i])
            expected = b"\xff\xd8" + ADOBE_APP14_RGB + tables[2:-2] + tile[2:]
            padding = len(expected) & 1  # fragments are padded to even length
            assert frames[i] == expected + b"\x00" * padding


def test_svs_ycbcr_copy(tmp_path):
    src = tmp_path / "ycbcr.svs"
    write_svs(src, rgb=False, with_label=False, with_macro=False)
    out = tmp_path / "out"
    convert(src, out)
    kinds = by_type(dcm_files(out))
    assert sorted(kinds) == ["THUMBNAIL", "VOLUME"]
    assert kinds["VOLUME"][0].PhotometricInterpretation == "YBR_FULL_422"
    from wsidicom import WsiDicom

    with tifffile.TiffFile(src) as tif:
        base = tif.series[0].levels[0].asarray()
    with WsiDicom.open(out) as wsi:
        assert np.array_equal(read_level(wsi, wsi.levels[0]), base)
    for f in dcm_files(out):
        assert dciodvfy_errors(f) == []


def test_no_label_no_overview_levels(svs, tmp_path):
    r = run_cli("convert", svs[0], "-o", tmp_path, "--no-label", "--no-overview", "--levels", "2", "-q")
    assert r.returncode == 0, r.stderr
    kinds = by_type(dcm_files(tmp_path))
    assert sorted(kinds) == ["THUMBNAIL", "VOLUME"]
    assert len(kinds["VOLUME"]) == 2


# --- OME-TIFF with SubIFDs ---------------------------------------------------------------

def test_ome_tiff_subifds(tmp_path):
    from wsidicom import WsiDicom

    src = tmp_path / "slide.ome.tif"
    write_ome(src, mpp=0.5)
    out = tmp_path / "out"
    result = convert(src, out)
    assert result.format == "ome-tiff"
    kinds = by_type(dcm_files(out))
    vol = kinds["VOLUME"]
    assert [int(d.TotalPixelMatrixColumns) for d in vol] == [2048, 1024, 512, 256]
    assert [i.mode for i in result.instances] == ["copy", "copy", "copy", "generate"]
    ps = vol[0].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(x) for x in ps] == pytest.approx([0.0005, 0.0005])
    with tifffile.TiffFile(src) as tif:
        levels = [lv.asarray() for lv in tif.series[0].levels]
    with WsiDicom.open(out) as wsi:
        for arr in levels:
            assert np.array_equal(read_level(wsi, wsidicom_level(wsi, arr.shape[1])), arr)
        # the generated level is a 2x box filter of the one above, within JPEG error
        gen = read_level(wsi, wsidicom_level(wsi, 256)).astype(float)
        ref = levels[-1].reshape(192, 2, 256, 2, 3).mean((1, 3))
        assert np.abs(gen - ref).mean() < 4
    for f in dcm_files(out):
        assert dciodvfy_errors(f) == []


# --- generic TIFF: re-encode + generated pyramid -------------------------------------------

@pytest.mark.parametrize("compression", ["zlib", None])
def test_generic_tiff_reencoded(tmp_path, compression):
    from wsidicom import WsiDicom

    src = tmp_path / "plain.tif"
    info = write_generic(src, compression=compression)
    out = tmp_path / "out"
    result = convert(src, out, ConvertOptions(workers=2, quality=95))
    vol = by_type(dcm_files(out))["VOLUME"]
    assert [int(d.TotalPixelMatrixColumns) for d in vol] == [2048, 1024, 512, 256]
    assert [int(d.TotalPixelMatrixRows) for d in vol] == [1536, 768, 384, 192]
    assert result.instances[0].mode == "reencode"
    assert vol[0].LossyImageCompression == "01"
    ratio = float(vol[0].LossyImageCompressionRatio)
    assert 2 < ratio < 200
    ps = vol[0].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(x) for x in ps] == pytest.approx([0.00025, 0.00025])  # from the TIFF resolution tags
    with WsiDicom.open(out) as wsi:
        base = read_level(wsi, wsi.levels[0]).astype(int)
        assert np.abs(base - info["levels"][0]).mean() < 5  # JPEG q95 (4:2:2) of a noisy source
        small = read_level(wsi, wsidicom_level(wsi, 512)).astype(float)
        ref = info["levels"][0].reshape(384, 4, 512, 4, 3).mean((1, 3))
        assert np.abs(small - ref).mean() < 4
    for f in dcm_files(out):
        assert dciodvfy_errors(f) == []


def test_tile_size_forces_reencode(svs, tmp_path):
    result = convert(svs[0], tmp_path, ConvertOptions(tile_size=512, label=False, overview=False, thumbnail=False))
    vol = by_type(dcm_files(tmp_path))["VOLUME"]
    assert all(d.Rows == d.Columns == 512 for d in vol)
    assert [i.mode for i in result.instances] == ["reencode", "reencode"]
    assert [int(d.TotalPixelMatrixColumns) for d in vol] == [2048, 512]


@pytest.mark.parametrize("codec,quality,ts", [
    ("jpeg2000", 100, "1.2.840.10008.1.2.4.90"),
    ("jpeg2000", 80, "1.2.840.10008.1.2.4.91"),
    ("htj2k", 100, "1.2.840.10008.1.2.4.201"),
])
def test_codecs(tmp_path, codec, quality, ts):
    src = tmp_path / "plain.tif"
    info = write_generic(src, width=600, height=500, compression="zlib")
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(codec=codec, quality=quality))
    files = dcm_files(out)
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == ts
    import imagecodecs

    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    tile = imagecodecs.imread(frame) if codec != "htj2k" else imagecodecs.htj2k_decode(frame)
    diff = np.abs(tile[:256, :256].astype(int) - info["levels"][0][:256, :256])
    if quality == 100:
        assert diff.max() == 0
        assert ds.LossyImageCompression == "00"
    else:
        assert diff.mean() < 4
    if ts != "1.2.840.10008.1.2.4.201":  # this dciodvfy build predates HTJ2K
        for f in files:
            assert dciodvfy_errors(f) == []


# --- photos ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["photo.jpg", "photo.png"])
def test_photo(tmp_path, name):
    from wsidicom import WsiDicom

    src = tmp_path / name
    info = write_photo(src)
    out = tmp_path / "out"
    r = run_cli("convert", src, "-o", out, "--patient-id", "P9", "--mpp", "2.5")
    assert r.returncode == 0, r.stderr
    assert "instances" in r.stdout  # the one-line summary
    vol = by_type(dcm_files(out))["VOLUME"]
    assert [int(d.TotalPixelMatrixColumns) for d in vol] == [1200, 600, 300, 150]
    ps = vol[0].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(x) for x in ps] == pytest.approx([0.0025, 0.0025])
    assert vol[0].PatientID == "P9"
    with WsiDicom.open(out) as wsi:
        base = read_level(wsi, wsi.levels[0]).astype(int)
    tol = 6 if name.endswith("png") else 8  # one (png) or two (jpg) rounds of JPEG
    assert np.abs(base - info["levels"][0]).mean() < tol
    for f in dcm_files(out):
        assert dciodvfy_errors(f) == []


# --- streaming details ------------------------------------------------------------------------

def test_offset_tables(svs, tmp_path):
    """Basic Offset Table entries point at each frame's item."""
    convert(svs[0], tmp_path, ConvertOptions(label=False, overview=False, thumbnail=False))
    base = [f for f in dcm_files(tmp_path) if f.name.endswith("level-0.dcm")][0]
    ds = pydicom.dcmread(base)
    offsets = pydicom.encaps.parse_basic_offsets(pydicom.filebase.DicomBytesIO(ds.PixelData))
    assert len(offsets) == ds.NumberOfFrames and offsets[0] == 0
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    expected = np.cumsum([0] + [8 + len(f) for f in frames[:-1]])
    assert list(offsets) == list(expected)


def test_extended_offset_table_writer(tmp_path):
    from converters.dcmenc import Dataset
    from converters.dicomwriter import FrameWriter

    ds = Dataset()
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    frames = [bytes([i]) * (10 + i) for i in range(5)]
    w = FrameWriter(tmp_path / "x.dcm", ds, len(frames), "1.2.840.10008.1.2.4.50", extended_offsets=True)
    for f in frames:
        w.add(f)
    w.finish()
    back = pydicom.dcmread(tmp_path / "x.dcm")
    eot = np.frombuffer(back.ExtendedOffsetTable, "<u8")
    lengths = np.frombuffer(back.ExtendedOffsetTableLengths, "<u8")
    assert list(lengths) == [len(f) + (len(f) & 1) for f in frames]
    got = list(pydicom.encaps.generate_frames(back.PixelData, number_of_frames=5))
    assert [g[: len(f)] for g, f in zip(got, frames)] == frames
    assert list(eot) == list(np.cumsum([0] + [8 + int(n) for n in lengths[:-1]]))


# --- bad input ---------------------------------------------------------------------------------

def _assert_clean(outdir: Path):
    if outdir.exists():
        assert list(outdir.iterdir()) == [], list(outdir.iterdir())


def test_unsupported_file(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("this is not a slide, just some text\n" * 10)
    out = tmp_path / "out"
    r = run_cli("convert", src, "-o", out)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "unsupported file format" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_missing_input(tmp_path):
    r = run_cli("convert", tmp_path / "nope.svs", "-o", tmp_path / "out")
    assert r.returncode != 0 and "no such file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_svs(svs, tmp_path):
    data = svs[0].read_bytes()
    src = tmp_path / "cut.svs"
    src.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("convert", src, "-o", out)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathpacs: error: cut.svs:"), r.stderr
    assert "Traceback" not in r.stderr
    _assert_clean(out)


def test_corrupt_tiles_reencode_path(tmp_path):
    """Garbage inside the tile data of a deflate TIFF: fails mid-way, leaves nothing."""
    src = tmp_path / "bad.tif"
    write_generic(src, compression="zlib")
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        off, n = page.dataoffsets[30], page.databytecounts[30]
    raw = bytearray(src.read_bytes())
    raw[off:off + n] = b"\x00garbage!" * (n // 9) + b"\x00" * (n % 9)
    src.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("other files are left alone")
    r = run_cli("convert", src, "-o", out)
    assert r.returncode != 0, r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "corrupt" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_truncated_jpeg_photo(tmp_path):
    src = tmp_path / "p.jpg"
    write_photo(src)
    src.write_bytes(src.read_bytes()[:5000])
    r = run_cli("convert", src, "-o", tmp_path / "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unwritable_output(svs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        r = run_cli("convert", svs[0], "-o", out)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert "director" in r.stderr  # "not a directory" / "cannot create output directory"
    assert blocker.read_text() == "x"


def test_bad_metadata(svs, tmp_path):
    md = tmp_path / "m.json"
    md.write_text(json.dumps({"patient": {"idd": "x"}}))
    r = run_cli("convert", svs[0], "-o", tmp_path / "out", "--metadata", md)
    assert r.returncode != 0 and "unknown key patient.idd" in r.stderr
    md.write_text("{not json")
    r = run_cli("convert", svs[0], "-o", tmp_path / "out", "--metadata", md)
    assert r.returncode != 0 and "invalid JSON" in r.stderr
    assert not (tmp_path / "out").exists()


def test_conversion_error_api(tmp_path):
    with pytest.raises(ConversionError):
        convert(tmp_path / "missing.svs", tmp_path / "out")
