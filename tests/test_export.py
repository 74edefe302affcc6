"""`pathpacs export` (issue 12): Part 10 files and a DICOMDIR, as stored or de-identified.

The DICOMDIR is read back by pydicom's FileSet and validated by dciodvfy (the Basic Directory
IOD); each file is the stored instance (sha256) or its de-identified copy (frames equal, no
identifier in its header); bad input is one line and exit 2, and leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

import factory
from conftest import run_cli

PID, NAME, ACC, CONTAINER = "EXP-4411", "Nowak^Ewa", "ACC-EXP-9", "SLIDE-EXP-1"


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory):
    """An archive with one study: two VOLUME levels and a LABEL (burned-in annotation)."""
    root = tmp_path_factory.mktemp("export")
    study, series = generate_uid(), generate_uid()
    kw = dict(patient_id=PID, patient_name=NAME, accession=ACC, container=CONTAINER, study_id="S7")
    files = {}
    for i, (w, kind) in enumerate(((1024, "VOLUME"), (512, "VOLUME"), (256, "LABEL"))):
        ds = factory.wsi_instance(study, series, w, w, seed=i, image_type=kind, instance_number=i + 1, **kw)
        if kind == "LABEL":
            ds.BurnedInAnnotation = "YES"
        p = root / "in" / f"{i}.dcm"
        p.parent.mkdir(exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
        files[ds.SOPInstanceUID] = p
    other = factory.wsi_series(root / "other", patient_id="OTHER-1", levels=((256, 256),))
    data = root / "data"
    run_cli("import", "--quiet", str(root / "in"), str(root / "other"), data=data, check=True)
    return {"data": data, "study": study, "files": files, "root": root,
            "other": pydicom.dcmread(other[0], stop_before_pixels=True).StudyInstanceUID}


def _files(fs: FileSet) -> list[pydicom.Dataset]:
    return [inst.load() for inst in fs]


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy (dicom3tools) is required")
def test_export_as_stored_writes_a_valid_dicomdir(archive_dir, tmp_path):
    out = tmp_path / "media"
    r = run_cli("export", "--study", archive_dir["study"], "-o", str(out), "--quiet", data=archive_dir["data"])
    assert r.returncode == 0, r.stderr
    assert "exported 3 instances" in r.stderr
    fs = FileSet(out / "DICOMDIR")
    assert len(fs) == 3
    # every file is the stored instance, byte for byte
    stored = {hashlib.sha256(p.read_bytes()).hexdigest() for p in archive_dir["files"].values()}
    assert {hashlib.sha256(Path(inst.path).read_bytes()).hexdigest() for inst in fs} == stored
    assert {inst.SOPInstanceUID for inst in fs} == set(archive_dir["files"])
    p = subprocess.run(["dciodvfy", "-new", str(out / "DICOMDIR")], capture_output=True, text=True)
    lines = (p.stdout + p.stderr).splitlines()
    assert any("BasicDirectory" in line for line in lines), lines[:5]
    assert [line for line in lines if "Error" in line] == []
    assert not (out / ".pathpacs-export").exists()


def test_export_deidentified(archive_dir, tmp_path):
    out = tmp_path / "deid"
    r = run_cli("export", "--query", f"PatientID={PID}", "--deidentify", "-o", str(out), "--quiet",
                data=archive_dir["data"])
    assert r.returncode == 0, r.stderr
    assert "exported 2 instances de-identified" in r.stderr and "1 left out (LABEL image)" in r.stderr
    fs = FileSet(out / "DICOMDIR")
    assert len(fs) == 2
    records = (out / "DICOMDIR").read_bytes()
    for ident in (PID, "Nowak", ACC, CONTAINER):
        assert ident.encode() not in records
    originals = {pydicom.dcmread(p).InstanceNumber: pydicom.dcmread(p) for p in archive_dir["files"].values()}
    studies = set()
    for ds in _files(fs):
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID != PID
        assert ds.SOPInstanceUID not in archive_dir["files"]
        head = Path(fs.find(SOPInstanceUID=ds.SOPInstanceUID)[0].path).read_bytes()
        head = head[:head.find(b"\xe0\x7f\x10\x00")]
        for ident in (PID, "Nowak", ACC, CONTAINER):
            assert ident.encode() not in head, ident
        orig = originals[ds.InstanceNumber]
        n = int(ds.NumberOfFrames)
        assert list(generate_frames(ds.PixelData, number_of_frames=n)) == \
            list(generate_frames(orig.PixelData, number_of_frames=n))
        studies.add(ds.StudyInstanceUID)
    assert len(studies) == 1 and studies != {archive_dir["study"]}
    # the DICOMDIR's records are those of the de-identified files
    assert {r.PatientID for r in fs.find(PatientID=ds.PatientID)} == {ds.PatientID}


def test_export_refuses_bad_input_in_one_line(archive_dir, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    cases = [
        (["--study", archive_dir["study"], "-o", str(full)], "is not an empty directory"),
        (["--study", "1.2.3.4", "-o", str(tmp_path / "a")], "study 1.2.3.4 not found"),
        (["--query", "NoSuchKey=1", "-o", str(tmp_path / "b")], "unknown attribute"),
        (["--query", "PatientID", "-o", str(tmp_path / "c")], "give KEY=VALUE"),
        (["--query", "PatientID=NOBODY", "-o", str(tmp_path / "d")], "no study matches"),
        (["-o", str(tmp_path / "e")], "give --study UID or --query"),
    ]
    for args, message in cases:
        r = run_cli("export", *args, data=archive_dir["data"])
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert [p.name for p in full.iterdir()] == ["x"]
    for name in "abcde":
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())


def test_export_fails_whole_when_one_instance_cannot_be_deidentified(archive_dir, tmp_path):
    out = tmp_path / "label"
    r = run_cli("export", "--study", archive_dir["study"], "--deidentify", "--keep-label", "-o", str(out),
                data=archive_dir["data"])
    assert r.returncode == 2 and "burned-in annotation" in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())
