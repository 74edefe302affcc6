"""De-identification (archive.deid, issue 12): the PS3.15 Annex E profile on WSI instances.

Identifying values are planted in every attribute Table E.1-1 names (and in private tags,
specimen descriptions, LABEL/OVERVIEW images); the de-identified bytes must carry none of
them, each attribute must have had the profile's action, UIDs must be replaced consistently
across the study (references inside sequences too) and map back, dates shift by one interval,
and frames stay byte-identical. A converted slide de-identified must still pass dciodvfy.
Research views go through a real `pathpacs serve`.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tracemalloc
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import factory
from conftest import Server, free_port, run_cli
from slide_fixtures import write_svs

from archive.access import Principal
from archive.config import Config
from archive.deid import DeidError, Deidentifier, DeidOptions, UidMap
from archive.deid import profile
from archive.service import Archive

NAME, PID, ACC = "Kowalski^Zofia", "PID7781", "ACC99123"
CONTAINER, SPECIMEN, BIRTH = "SLIDE-4471-B", "BLOCK-77-A", "19591224"
PLANT_DATE = "20240315"
# what must not survive anywhere in a de-identified header (case-insensitive)
IDENTIFIERS = ["Kowalski", "Zofia", PID, ACC, CONTAINER, SPECIMEN, BIRTH, "PRIVATE-SECRET"]
SKIP_VRS = {"AT", "US or SS", "OB or OW", "US or OW", "US or SS or OW", "OW or OB", "SS or US"}


def _value(vr: str):
    """A planted value for one VR: identifiers wherever text can hold them."""
    return {
        "PN": NAME, "LO": f"{NAME} {PID} {ACC}", "LT": f"{NAME} {PID} {ACC} {CONTAINER}",
        "ST": f"{NAME} {PID} {ACC}", "UT": f"{NAME} {PID} {ACC}", "UC": f"{NAME} {PID}", "SH": PID,
        "CS": "PLANTED", "AE": "PLANTEDAE", "AS": "045Y", "DA": PLANT_DATE, "DT": PLANT_DATE + "101010",
        "TM": "101010", "DS": "1.5", "IS": "7", "UI": generate_uid(), "US": 7, "UL": 7, "SS": 7, "SL": 7,
        "FL": 1.5, "FD": 1.5, "SV": 7, "UV": 7, "OB": b"PLANTED\0", "OW": b"PLANTED\0", "UN": b"PLANTED\0",
        "OF": b"\0" * 8, "OD": b"\0" * 8, "OL": b"\0" * 8, "OV": b"\0" * 8, "UR": f"http://x.example/{PID}",
    }.get(vr)


def _item() -> Dataset:
    item = Dataset()
    item.CodeMeaning = f"{NAME} {PID}"
    item.ReferencedSOPInstanceUID = generate_uid()
    return item


def plant(ds: Dataset) -> dict[int, object]:
    """Every attribute of Table E.1-1 (exact tags) not already set, with identifying values."""
    planted = {}
    for tag in profile.BASIC:
        if tag in ds or tag >> 16 in (0x0000, 0x0002) or tag >= 0x7FE00000 or tag in profile.PSEUDONYM:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr in SKIP_VRS:
            continue
        if vr == "SQ":
            ds.add_new(tag, "SQ", Sequence([_item()]))
            planted[tag] = "SQ"
            continue
        value = _value(vr)
        if value is None:
            continue
        ds.add_new(tag, vr, value)
        planted[tag] = value
    block = ds.private_block(0x0009, "ACME PRIVATE", create=True)
    block.add_new(0x01, "LO", "PRIVATE-SECRET " + NAME)
    block.add_new(0x02, "OB", b"PRIVATE-SECRET" * 300)  # out of line in the stored metadata (bulk data)
    return planted


def specimen(ds: Dataset) -> None:
    """A specimen description as scanners write it, with the identifiers in its text."""
    step = Dataset()
    step.ValueType = "TEXT"
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = "121041", "DCM", "Specimen Identifier"
    step.ConceptNameCodeSequence = [c]
    step.TextValue = SPECIMEN
    stain = Dataset()
    stain.ValueType = "TEXT"
    c2 = Dataset()
    c2.CodeValue, c2.CodingSchemeDesignator, c2.CodeMeaning = "424361007", "SCT", "Using substance"
    stain.ConceptNameCodeSequence = [c2]
    stain.TextValue = "hematoxylin and eosin"
    prep = Dataset()
    prep.SpecimenPreparationStepContentItemSequence = [step, stain]
    desc = Dataset()
    desc.SpecimenIdentifier = SPECIMEN
    desc.SpecimenUID = generate_uid()
    desc.SpecimenShortDescription = f"Core biopsy of {NAME} ({ACC})"
    desc.SpecimenPreparationSequence = [prep]
    ds.SpecimenDescriptionSequence = [desc]
    ds.BarcodeValue = CONTAINER
    ds.LabelText = f"{NAME} {ACC}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A planted study: two VOLUME levels (the second references the first), a LABEL with
    burned-in annotation and an OVERVIEW, ingested into an archive."""
    root = tmp_path_factory.mktemp("deid")
    study, series, frame_ref = generate_uid(), generate_uid(), generate_uid()
    kw = dict(patient_id=PID, patient_name=NAME, accession=ACC, container=CONTAINER, birth_date=BIRTH,
              study_date=PLANT_DATE, study_id=PID, frame_of_reference=frame_ref)
    base = factory.wsi_instance(study, series, 1024, 768, seed=1, instance_number=1, **kw)
    level2 = factory.wsi_instance(study, series, 512, 384, seed=2, instance_number=2, **kw)
    label = factory.wsi_instance(study, series, 256, 256, seed=3, image_type="LABEL", instance_number=3, **kw)
    label.BurnedInAnnotation = "YES"
    overview = factory.wsi_instance(study, series, 256, 256, seed=4, image_type="OVERVIEW", instance_number=4, **kw)
    for ds in (base, level2, label, overview):
        specimen(ds)
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = 1024 * 0.00025, 768 * 0.00025
        pm = Dataset()  # Pixel Measures: what wsidicom (a DICOMweb client) builds levels from
        spacing = 1024 * 0.00025 / int(ds.TotalPixelMatrixColumns)
        pm.PixelSpacing, pm.SliceThickness = [spacing, spacing], 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [pm]
        ds.SharedFunctionalGroupsSequence = [shared]
        dim = Dataset()
        dim.DimensionOrganizationUID = "1.2.826.0.1.3680043.8.498.4471"  # shared by the levels
        ds.DimensionOrganizationSequence = [dim]
    src = Dataset()
    src.ReferencedSOPClassUID, src.ReferencedSOPInstanceUID = base.SOPClassUID, base.SOPInstanceUID
    level2.SourceImageSequence = [src]
    ref = Dataset()
    ref.SeriesInstanceUID = series
    ref_inst = Dataset()
    ref_inst.ReferencedSOPClassUID, ref_inst.ReferencedSOPInstanceUID = base.SOPClassUID, base.SOPInstanceUID
    ref.ReferencedInstanceSequence = [ref_inst]
    level2.ReferencedSeriesSequence = [ref]
    planted = plant(base)
    paths = []
    for name, ds in (("base", base), ("level2", level2), ("label", label), ("overview", overview)):
        p = root / "in" / f"{name}.dcm"
        p.parent.mkdir(exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    arc = Archive(Config(data_dir=root / "data"))
    for p in paths:
        assert arc.ingest_file(p).outcome.name == "STORED", p
    yield {"arc": arc, "study": study, "series": series, "frame_ref": frame_ref, "planted": planted,
           "sops": {n: ds.SOPInstanceUID for n, ds in (("base", base), ("level2", level2), ("label", label),
                                                       ("overview", overview))},
           "paths": dict(zip(("base", "level2", "label", "overview"), paths))}
    arc.close()


def deid_bytes(arc, deid: Deidentifier, sop: str) -> bytes:
    return b"".join(deid.instance_chunks(arc, arc.instance(sop)))


def header_text(data: bytes) -> str:
    """The header bytes (before Pixel Data) as text, for searching."""
    end = data.find(b"\xe0\x7f\x10\x00")
    return data[:end if end > 0 else len(data)].decode("latin-1")


def frames(ds: pydicom.Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def test_nothing_identifying_survives_and_every_named_attribute_has_its_action(corpus):
    arc = corpus["arc"]
    opts = DeidOptions()
    deid = Deidentifier(opts, UidMap(arc.index, "job-every-attribute"))
    data = deid_bytes(arc, deid, corpus["sops"]["base"])
    text = header_text(data).lower()
    for ident in IDENTIFIERS:
        assert ident.lower() not in text, ident
    out = pydicom.dcmread(io.BytesIO(data))
    orig = pydicom.dcmread(corpus["paths"]["base"])
    assert not any(e.tag.is_private for e in out.iterall()), "private tags survive"
    shift = deid.shift_days
    checked = 0
    for tag, planted in corpus["planted"].items():
        vr = dictionary_VR(tag)
        act = profile.action(tag, vr, opts)
        name = pydicom.datadict.keyword_for_tag(tag) or f"{tag:08X}"
        if act == "X":
            assert tag not in out, name
        elif act == "Z":
            assert tag in out and out[tag].value in (None, "", b"", []) or len(out[tag].value) == 0, name
        elif act == "U":
            new = str(out[tag].value)
            assert new != planted and new.startswith("2.25.") and deid.uids.original(new) == planted, name
        elif act == "S":
            expect = (date(2024, 3, 15) - timedelta(days=shift)).strftime("%Y%m%d")
            assert str(out[tag].value).startswith(expect), name
        elif act == "D":
            assert tag in out and out[tag].value != planted, name
        elif act in ("K", "C"):
            assert tag in out, name  # kept (its identifying text is checked above)
        checked += 1
    assert checked > 300  # the table really was planted and checked
    assert out.PatientID == deid.pseudonym(PID) and str(out.PatientName) == f"ANON^{deid.pseudonym(PID)}"
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113103", "113104", "113105", "113107", "113108", "113109"}
    assert all(i.CodingSchemeDesignator == "DCM" for i in out.DeidentificationMethodCodeSequence)
    assert out.ContainerIdentifier == deid.mapped_id(CONTAINER) != CONTAINER
    assert "PatientBirthDate" not in out or not out.PatientBirthDate
    # the specimen description is kept, cleaned: the stain stays, the identifiers do not
    desc = out.SpecimenDescriptionSequence[0]
    assert desc.SpecimenIdentifier == deid.mapped_id(SPECIMEN)
    steps = desc.SpecimenPreparationSequence[0].SpecimenPreparationStepContentItemSequence
    assert [s.TextValue for s in steps] == [deid.mapped_id(SPECIMEN), "hematoxylin and eosin"]
    assert "Kowalski" not in desc.SpecimenShortDescription and "Core biopsy of" in desc.SpecimenShortDescription
    # frames exactly as stored
    assert frames(out) == frames(orig)
    assert out.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


def test_uids_are_consistent_across_the_study_and_map_back(corpus):
    arc = corpus["arc"]
    deid = Deidentifier(DeidOptions(), UidMap(arc.index, "job-consistency"))
    a = pydicom.dcmread(io.BytesIO(deid_bytes(arc, deid, corpus["sops"]["base"])))
    b = pydicom.dcmread(io.BytesIO(deid_bytes(arc, deid, corpus["sops"]["level2"])))
    assert a.StudyInstanceUID == b.StudyInstanceUID != corpus["study"]
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != corpus["series"]
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID != corpus["frame_ref"]
    assert a.PatientID == b.PatientID and a.ContainerIdentifier == b.ContainerIdentifier
    # references inside sequences point at the new UIDs of what they referenced
    assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    ref = b.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == a.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPClassUID == a.SOPClassUID  # standard UIDs kept
    assert (a.DimensionOrganizationSequence[0].DimensionOrganizationUID
            == b.DimensionOrganizationSequence[0].DimensionOrganizationUID != "1.2.826.0.1.3680043.8.498.4471")
    # both directions, in the index: a fresh map of the same context (another process) agrees
    again = UidMap(arc.index, "job-consistency")
    assert again.original(a.StudyInstanceUID) == corpus["study"]
    assert again.original(b.SOPInstanceUID) == corpus["sops"]["level2"]
    assert again.new(corpus["sops"]["base"]) == a.SOPInstanceUID
    # dates move by one interval in a context
    assert a.StudyDate == b.StudyDate == a.ContentDate
    # another context: other UIDs, other pseudonym, no link between the two sends
    other = Deidentifier(DeidOptions(), UidMap(arc.index, "job-other"))
    c = pydicom.dcmread(io.BytesIO(deid_bytes(arc, other, corpus["sops"]["base"])))
    assert c.StudyInstanceUID != a.StudyInstanceUID and c.PatientID != a.PatientID
    assert UidMap(arc.index, "job-other").original(a.StudyInstanceUID) is None


def test_options_change_what_is_kept(corpus):
    arc = corpus["arc"]
    opts = DeidOptions(retain_dates=False, retain_uids=True, retain_device_identity=False,
                       retain_institution_identity=True, clean_descriptors=False)
    deid = Deidentifier(opts, UidMap(arc.index, "job-options"))
    out = pydicom.dcmread(io.BytesIO(deid_bytes(arc, deid, corpus["sops"]["base"])))
    assert out.StudyInstanceUID == corpus["study"] and out.SOPInstanceUID == corpus["sops"]["base"]
    assert out.StudyDate == "" and out.LongitudinalTemporalInformationModified == "REMOVED"
    assert out.AcquisitionDateTime == "19000101000000"  # X/D: a dummy (Type 1 in the WSI IOD)
    assert "StudyDescription" not in out  # no Clean Descriptors: removed
    # kept, with the identifiers found in the instance still cleaned out of its text
    assert "InstitutionName" in out and "Kowalski" not in out.InstitutionName
    head = pydicom.dcmread(corpus["paths"]["base"], stop_before_pixels=True)
    head.InstitutionName = "Inselspital Bern"
    assert deid.dataset(head).InstitutionName == "Inselspital Bern"
    assert "InstitutionName" not in Deidentifier(DeidOptions(), deid.uids).dataset(head) or \
        Deidentifier(DeidOptions(), deid.uids).dataset(head).InstitutionName in ("", "ANONYMIZED")
    assert out.DeviceSerialNumber != corpus["planted"].get(0x00181000, "x")
    codes = {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    assert "113110" in codes and "113112" in codes and "113107" not in codes and "113109" not in codes


def test_label_overview_excluded_and_burned_in_annotation_refused(corpus):
    arc = corpus["arc"]
    deid = Deidentifier(DeidOptions(), UidMap(arc.index, "job-label"))
    label, overview = arc.instance(corpus["sops"]["label"]), arc.instance(corpus["sops"]["overview"])
    assert deid.excluded(label) == "LABEL image" and deid.excluded(overview) == "OVERVIEW image"
    assert deid.excluded(arc.instance(corpus["sops"]["base"])) is None
    assert deid.excluded(json.loads(arc.instance_metadata(label))) == "LABEL image"  # DICOM JSON too
    keep = Deidentifier(DeidOptions(keep_label=True, keep_overview=True), UidMap(arc.index, "job-label"))
    assert keep.excluded(label) is None and keep.excluded(overview) is None
    with pytest.raises(DeidError, match="burned-in annotation"):
        b"".join(keep.instance_chunks(arc, label))
    ov = pydicom.dcmread(io.BytesIO(b"".join(keep.instance_chunks(arc, overview))))  # NO: allowed when kept
    assert ov.ImageType[2] == "OVERVIEW" and ov.PatientID == keep.pseudonym(PID)
    unknown = pydicom.dcmread(corpus["paths"]["base"], stop_before_pixels=True)
    unknown.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF: its document is opaque
    with pytest.raises(DeidError, match="no de-identification rules"):
        deid.dataset(unknown)
    sc = factory.secondary_capture(corpus["paths"]["base"].parent.parent / "sc" / "sc.dcm")
    with pytest.raises(DeidError, match="Burned In Annotation = NO"):
        deid.dataset(pydicom.dcmread(sc))


def test_streaming_is_bounded_and_frames_are_the_stored_bytes(tmp_path):
    """A 25 MB native instance streams through in a few MB (1 MB store chunks); the pixel
    element is byte-equal."""
    study, series = generate_uid(), generate_uid()
    ds = factory.wsi_instance(study, series, 4096, 2048, tile=256, transfer_syntax=ExplicitVRLittleEndian,
                              patient_id=PID, patient_name=NAME)
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    pixels = ds.PixelData
    del ds
    with Archive(Config(data_dir=tmp_path / "data")) as arc:
        arc.ingest_file(big)
        rec = next(iter(arc.instances()))
        assert rec.size > 24 << 20
        deid = Deidentifier(DeidOptions(), UidMap(arc.index, "job-big"))
        out = tmp_path / "out.dcm"
        tracemalloc.start()
        with open(out, "wb") as fh:
            for chunk in deid.instance_chunks(arc, rec):
                fh.write(chunk)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MB"
    got = pydicom.dcmread(out)
    assert got.PixelData == pixels and got.PatientID != PID
    assert NAME.split("^")[0].encode() not in out.read_bytes()[:-len(pixels)]


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy (dicom3tools) is required")
def test_deidentified_converted_slide_passes_dciodvfy(tmp_path):
    write_svs(tmp_path / "slide.svs")
    md = tmp_path / "meta.json"
    md.write_text(json.dumps({
        "patient": {"id": PID, "name": NAME, "sex": "F", "birth_date": BIRTH},
        "study": {"accession_number": ACC, "id": "S1", "description": f"Biopsy {NAME}"},
        "slide": {"container_id": CONTAINER, "specimen_id": SPECIMEN, "specimen_description": "H&E"}}))
    r = run_cli("convert", str(tmp_path / "slide.svs"), "-o", str(tmp_path / "conv"), "--metadata", str(md), "--quiet")
    assert r.returncode == 0, r.stderr
    with Archive(Config(data_dir=tmp_path / "data")) as arc:
        for p in sorted((tmp_path / "conv").glob("*.dcm")):
            arc.ingest_file(p)
        deid = Deidentifier(DeidOptions(), UidMap(arc.index, "job-dciodvfy"))
        volumes = 0
        for rec in arc.instances():
            if deid.excluded(rec):
                continue
            f = tmp_path / f"{rec.sop}.deid.dcm"
            f.write_bytes(b"".join(deid.instance_chunks(arc, rec)))
            p = subprocess.run(["dciodvfy", "-new", str(f)], capture_output=True, text=True)
            lines = (p.stdout + p.stderr).splitlines()
            assert any("VLWholeSlideMicroscopyImage" in line for line in lines), lines[:5]
            assert [line for line in lines if "Error" in line] == [], f.name
            assert not any(i.lower().encode() in header_text(f.read_bytes()).lower().encode() for i in IDENTIFIERS)
            volumes += rec.image_type[2] == "VOLUME"
    assert volumes >= 2


# -- research views through a real server --------------------------------------------------

@pytest.fixture(scope="module")
def research_srv(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("research")
    cfg = tmp / "config.toml"
    cfg.write_text('[auth]\nmode = "token"\n[http]\nworkers = 1\n')
    s = Server(tmp / "data", free_port(), free_port(), config=cfg).start()
    run_cli("import", "--quiet", str(corpus["paths"]["base"].parent), data=s.data_dir, check=True)
    toks = {}
    for name, args in (("research", ["--role", "research"]), ("viewer", ["--role", "viewer"]),
                       ("deid_viewer", ["--role", "viewer", "--deidentify"])):
        toks[name] = run_cli("token", "create", *args, data=s.data_dir, check=True).stdout.strip()
    yield s, toks
    s.stop()


def _get(srv, path: str, token: str, accept: str = "application/dicom+json", **kw) -> requests.Response:
    return requests.get(srv.dicomweb_url + path, headers={"Authorization": f"Bearer {token}", "Accept": accept},
                        timeout=30, **kw)


def _parts(resp: requests.Response) -> list[bytes]:
    bnd = re.search(r'boundary="?([^";]+)', resp.headers["Content-Type"]).group(1).encode()
    out = []
    for part in resp.content.split(b"--" + bnd)[1:-1]:
        out.append(part.split(b"\r\n\r\n", 1)[1][:-2])
    return out


@pytest.mark.parametrize("who", ["research", "deid_viewer"])
def test_research_token_reads_deidentified_views(research_srv, corpus, who):
    srv, toks = research_srv
    t = toks[who]
    st, se, sops = corpus["study"], corpus["series"], corpus["sops"]
    # QIDO: the study is there, under a pseudonym
    r = _get(srv, "/studies", t)
    assert r.status_code == 200, r.text
    docs = r.json()
    assert [d["0020000D"]["Value"][0] for d in docs] == [st]  # UIDs retained in research views
    assert not any(i.lower() in r.text.lower() for i in IDENTIFIERS), r.text
    assert docs[0]["00100020"]["Value"][0].startswith("PP")
    # instances listed without LABEL and OVERVIEW
    r = _get(srv, f"/studies/{st}/series/{se}/instances", t)
    listed = {d["00080018"]["Value"][0] for d in r.json()}
    assert listed == {sops["base"], sops["level2"]}
    # metadata de-identified, nothing identifying in the whole answer
    r = _get(srv, f"/studies/{st}/metadata", t)
    assert r.status_code == 200
    assert not any(i.lower() in r.text.lower() for i in IDENTIFIERS)
    metas = r.json()
    assert len(metas) == 2 and all(m["00120062"]["Value"] == ["YES"] for m in metas)
    # the instance: pydicom reads it, frames equal the stored ones
    r = _get(srv, f"/studies/{st}/series/{se}/instances/{sops['base']}", t,
              accept='multipart/related; type="application/dicom"; transfer-syntax=*')
    assert r.status_code == 200
    (part,) = _parts(r)
    ds = pydicom.dcmread(io.BytesIO(part))
    orig = pydicom.dcmread(corpus["paths"]["base"])
    assert ds.PatientIdentityRemoved == "YES" and ds.PatientID != PID
    assert frames(ds) == frames(orig)
    assert not any(i.lower() in header_text(part).lower() for i in IDENTIFIERS)
    # frames over WADO-RS: unchanged
    r = _get(srv, f"/studies/{st}/series/{se}/instances/{sops['base']}/frames/1", t,
              accept='multipart/related; type="application/octet-stream"; transfer-syntax=*')
    assert r.status_code == 200 and _parts(r)[0] == frames(orig)[0]
    # LABEL and OVERVIEW do not exist for a research principal
    for name in ("label", "overview"):
        base = f"/studies/{st}/series/{se}/instances/{sops[name]}"
        assert _get(srv, base + "/metadata", t).status_code == 404
        assert _get(srv, base, t, accept='multipart/related; type="application/dicom"').status_code == 404
        assert _get(srv, base + "/frames/1", t, accept="multipart/related; type=\"application/octet-stream\"").status_code == 404
    # matching on what the view removes is refused (it would disclose it)
    r = _get(srv, "/studies", t, params={"PatientName": "Kowalski*"})
    assert r.status_code == 400 and "cannot match on PatientName" in r.text
    r = _get(srv, "/studies", t, params={"StudyInstanceUID": st})
    assert r.status_code == 200 and len(r.json()) == 1


def test_viewer_token_still_reads_what_is_stored(research_srv, corpus):
    srv, toks = research_srv
    r = _get(srv, f"/studies/{corpus['study']}/series/{corpus['series']}/instances", toks["viewer"])
    assert len(r.json()) == 4
    r = _get(srv, f"/studies/{corpus['study']}/metadata", toks["viewer"])
    assert PID in r.text


def test_research_role_does_not_combine_with_identified_reads(research_srv):
    srv, _ = research_srv
    r = run_cli("token", "create", "--role", "research", "--role", "viewer", data=srv.data_dir)
    assert r.returncode == 2 and "cannot be held with viewer" in r.stderr and "Traceback" not in r.stderr
    assert Principal("x", "x", frozenset({"research"}), "token").deidentified
    assert not Principal("x", "x", frozenset({"viewer"}), "token").deidentified


def test_a_slide_opens_over_dicomweb_with_a_research_token(research_srv, corpus):
    """What the viewer does (series of the study with Modality=SM, metadata, tiles), through
    wsidicom's DICOMweb client: the slide opens and reads the stored pixels; no label."""
    from wsidicom import WsiDicom, WsiDicomWebClient

    srv, toks = research_srv
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {toks['research']}"
    r = session.get(srv.dicomweb_url + f"/studies/{corpus['study']}/series", params={"Modality": "SM"})
    assert r.status_code == 200 and [d["0020000E"]["Value"][0] for d in r.json()] == [corpus["series"]]
    client = WsiDicomWebClient.create_client(srv.dicomweb_url, auth=session)
    local_files = [corpus["paths"]["base"], corpus["paths"]["level2"]]
    with WsiDicom.open_web(client, corpus["study"], corpus["series"]) as web, WsiDicom.open(local_files) as local:
        assert len(web.levels) == 2
        a = np.asarray(web.read_region((100, 90), 0, (300, 200)))
        b = np.asarray(local.read_region((100, 90), 0, (300, 200)))
        assert np.array_equal(a, b)
        assert web.labels is None or len(web.labels) == 0
        assert not web.overviews


def test_study_browser_summaries_in_a_research_view(research_srv, corpus):
    srv, toks = research_srv
    r = requests.get(srv.http_url + "/browser/studies", params={"study": corpus["study"]},
                     headers={"Authorization": f"Bearer {toks['research']}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert not any(i.lower() in r.text.lower() for i in IDENTIFIERS), r.text
    (summary,) = r.json()
    (slide,) = summary["slides"]
    assert slide["instances"] == 2 and not slide["label"] and not slide["overview"]
    assert slide["stain"] == ["hematoxylin and eosin"]


def test_deidentified_tokens_over_the_api_and_transcoded_instances(research_srv, corpus):
    srv, toks = research_srv
    sec = run_cli("token", "create", "--role", "secadmin", data=srv.data_dir, check=True).stdout.strip()
    r = requests.post(srv.http_url + "/api/tokens", json={"roles": ["viewer"], "deidentify": True, "name": "study"},
                      headers={"Authorization": f"Bearer {sec}"}, timeout=30)
    assert r.status_code == 201 and r.json()["deidentify"] is True, r.text
    t = r.json()["secret"]
    listed = json.loads(run_cli("token", "list", "--json", data=srv.data_dir, check=True).stdout)
    assert {d["id"]: d["deidentify"] for d in listed}[r.json()["id"]] is True
    # an instance transcoded on request (Explicit VR Little Endian) is de-identified too
    base = f"/studies/{corpus['study']}/series/{corpus['series']}/instances/{corpus['sops']['base']}"
    got = _get(srv, base, t, accept='multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1')
    assert got.status_code == 200, got.text
    (part,) = _parts(got)
    ds = pydicom.dcmread(io.BytesIO(part))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PatientIdentityRemoved == "YES" and ds.PatientID != PID
    assert not any(i.lower() in header_text(part).lower() for i in IDENTIFIERS)


def test_deidentify_config_section():
    import tomllib

    from archive.config import ConfigError, apply

    cfg = apply(Config(), tomllib.loads("[deidentify]\nretain_dates = false\nkeep_label = true\n"))
    opts = DeidOptions.from_config(cfg)
    assert not opts.retain_dates and opts.keep_label and opts.clean_descriptors
    assert DeidOptions.from_config(Config()) == DeidOptions()
    with pytest.raises(ConfigError, match="deidentify.keep_lable"):
        apply(Config(), tomllib.loads("[deidentify]\nkeep_lable = true\n"))
    with pytest.raises(ConfigError, match="deidentify.retain_uids"):
        apply(Config(), tomllib.loads('[deidentify]\nretain_uids = "yes"\n'))


def test_names_in_every_component_group_are_cleaned_from_kept_text(corpus):
    deid = Deidentifier(DeidOptions(), UidMap(corpus["arc"].index, "job-names"))
    ds = pydicom.dcmread(corpus["paths"]["base"], stop_before_pixels=True)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Wang^Li=王^丽"
    ds.StudyDescription = "Biopsy of Wang Li (王丽), Li Wang"
    ds.SeriesDescription = f"slide {CONTAINER} of {ACC}"
    out = deid.dataset(ds)
    assert out.StudyDescription == "Biopsy of [removed] ([removed]), [removed]"
    assert out.SeriesDescription == f"slide {deid.mapped_id(CONTAINER)} of [removed]"
    assert str(out.PatientName) == f"ANON^{deid.pseudonym(PID)}"


def test_dimse_retrieves_are_refused_to_deidentified_principals(corpus):
    from archive.access import Forbidden
    from archive.query import Key

    who = Principal("r", "research", frozenset({"research"}), "node")
    with pytest.raises(Forbidden, match="not sent over DIMSE"):
        corpus["arc"].retrieve_set("STUDY", [Key("0020000D", "UI", [corpus["study"]])], who=who)
    assert len(corpus["arc"].retrieve_set("STUDY", [Key("0020000D", "UI", [corpus["study"]])])) == 4


def test_research_bulk_data_only_for_what_the_view_keeps(research_srv, corpus):
    srv, toks = research_srv
    base = f"/studies/{corpus['study']}/series/{corpus['series']}/instances/{corpus['sops']['base']}"
    viewer_meta = _get(srv, base + "/metadata", toks["viewer"]).json()[0]
    research_meta = _get(srv, base + "/metadata", toks["research"]).json()[0]
    private = [el["BulkDataURI"] for tag, el in viewer_meta.items() if tag.startswith("0009") and "BulkDataURI" in el]
    assert private, "the private OB should be out of line in the stored metadata"
    assert not any(tag.startswith("0009") for tag in research_meta)
    path = private[0].split("/bulkdata/", 1)[1]
    assert _get(srv, base + "/bulkdata/" + path, toks["viewer"], accept="*/*").status_code == 200
    assert _get(srv, base + "/bulkdata/" + path, toks["research"], accept="*/*").status_code == 404
    icc = research_meta["00480105"]["Value"][0]["00282000"]["BulkDataURI"]
    assert icc.startswith("http") and "/bulkdata/00480105/0/00282000" in icc
    r = _get(srv, base + "/bulkdata/00480105/0/00282000", toks["research"], accept="*/*")
    v = _get(srv, base + "/bulkdata/00480105/0/00282000", toks["viewer"], accept="*/*")
    assert r.status_code == v.status_code == 200 and _parts(r) == _parts(v)  # kept values: as stored
    assert _parts(r)[0] == bytes(4096)  # the generated ICC profile (zeros)
