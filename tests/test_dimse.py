"""DIMSE services against real peers: dcmtk tools and pynetdicom as SCU/SCP."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    Verification,
    VLWholeSlideMicroscopyImageStorage,
)

import factory
from conftest import free_port, need, run_cli

WSI = str(VLWholeSlideMicroscopyImageStorage)


def dcmsend(srv, *files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [need("dcmsend"), "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def pixel_bytes(path: Path) -> bytes:
    return pydicom.dcmread(path).PixelData


def stats(srv) -> dict[str, int]:
    out = run_cli("stats", data=srv.data_dir, check=True).stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line.split()[0] in
            {"patients", "studies", "series", "instances"}}


def assoc(srv, contexts, **kw):
    ae = AE(ae_title="TESTSCU")
    for cx in contexts:
        if isinstance(cx, tuple):
            ae.add_requested_context(*cx)
        else:
            ae.add_requested_context(cx)
    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet, **kw)
    assert a.is_established
    return a


def test_echoscu(server):
    res = subprocess.run([need("echoscu"), "-aec", server.aet, "127.0.0.1", str(server.dicom_port)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_dcmsend_then_getscu_round_trip_is_byte_identical(server, wsi_files, tmp_path):
    res = dcmsend(server, *wsi_files)
    assert res.returncode == 0, res.stdout + res.stderr
    assert stats(server)["instances"] == len(wsi_files)
    study = str(pydicom.dcmread(wsi_files[0], stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "got"
    out.mkdir()
    res = subprocess.run(
        [need("getscu"), "-aec", server.aet, "+xy", "-S", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study}", "-od", str(out), "127.0.0.1", str(server.dicom_port)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    assert len(got) == len(wsi_files)
    for f in wsi_files:
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert pixel_bytes(got[sop]) == pixel_bytes(f)


def test_getscu_without_jpeg_gets_decoded_pixels(server, wsi_files, tmp_path):
    """getscu's defaults accept only uncompressed syntaxes: the archive decodes for it."""
    assert dcmsend(server, *wsi_files).returncode == 0
    sop = str(pydicom.dcmread(wsi_files[-1], stop_before_pixels=True).SOPInstanceUID)
    study = str(pydicom.dcmread(wsi_files[-1], stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "plain"
    out.mkdir()
    res = subprocess.run(
        [need("getscu"), "-aec", server.aet, "-S", "-k", "QueryRetrieveLevel=IMAGE",
         "-k", f"StudyInstanceUID={study}", "-k", f"SOPInstanceUID={sop}", "-od", str(out),
         "127.0.0.1", str(server.dicom_port)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    got = pydicom.dcmread(next(out.iterdir()))
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    original = pydicom.dcmread(wsi_files[-1])
    assert (got.pixel_array == original.pixel_array).all()


def findscu(srv, tmp_path: Path, *keys: str, root: str = "-S") -> list[Dataset]:
    out = tmp_path / f"find{time.monotonic_ns()}"
    out.mkdir()
    args = [need("findscu"), "-aec", srv.aet, root, "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    res = subprocess.run(args + ["127.0.0.1", str(srv.dicom_port)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


@pytest.fixture
def populated(server, tmp_path):
    a = factory.wsi_series(tmp_path / "a", patient_id="P100", patient_name="Doe^Jane",
                           study_date="20260110", accession="ACC-A")
    b = factory.wsi_series(tmp_path / "b", patient_id="P200", patient_name="Smith^John",
                           study_date="20250620", accession="ACC-B", levels=((512, 512),))
    sc = factory.secondary_capture(tmp_path / "sc.dcm", patient_id="P200", patient_name="Smith^John",
                                   study_date="20240101")
    assert dcmsend(server, *a, *b, sc).returncode == 0
    return server, a, b, sc


def test_findscu_matching_and_computed_attributes(populated, tmp_path):
    srv, a, b, sc = populated
    r = findscu(srv, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=P100", "StudyInstanceUID",
                "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
    assert len(r) == 1
    assert r[0].PatientID == "P100"
    assert r[0].ModalitiesInStudy == "SM"
    assert int(r[0].NumberOfStudyRelatedSeries) == 1
    assert int(r[0].NumberOfStudyRelatedInstances) == 3

    r = findscu(srv, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=smith*", "StudyDate")
    assert sorted(x.StudyDate for x in r) == ["20240101", "20250620"]

    r = findscu(srv, tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=20250101-20261231", "PatientID")
    assert sorted(x.PatientID for x in r) == ["P100", "P200"]

    r = findscu(srv, tmp_path, "QueryRetrieveLevel=STUDY", "AccessionNumber=ACC-?", "PatientID")
    assert len(r) == 2

    r = findscu(srv, tmp_path, "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=OT", "PatientID")
    assert [x.PatientID for x in r] == ["P200"]

    study_a = str(pydicom.dcmread(a[0], stop_before_pixels=True).StudyInstanceUID)
    r = findscu(srv, tmp_path, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_a}",
                "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances")
    assert len(r) == 1 and r[0].Modality == "SM" and int(r[0].NumberOfSeriesRelatedInstances) == 3

    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in a[:2]]
    r = findscu(srv, tmp_path, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_a}",
                "SOPInstanceUID=" + "\\".join(sops), "InstanceNumber")
    assert sorted(x.SOPInstanceUID for x in r) == sorted(sops)

    r = findscu(srv, tmp_path, "QueryRetrieveLevel=PATIENT", "PatientID=P200",
                "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances", root="-P")
    assert len(r) == 1 and int(r[0].NumberOfPatientRelatedStudies) == 2
    assert int(r[0].NumberOfPatientRelatedInstances) == 2

    r = findscu(srv, tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=NOBODY", "StudyInstanceUID")
    assert r == []


def test_cfind_bad_level_and_bad_date_fail(populated):
    srv = populated[0]
    a = assoc(srv, [PatientRootQueryRetrieveInformationModelFind,
                    "1.2.840.10008.5.1.4.1.2.2.1"])
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = ""
    statuses = [s.Status for s, _ in a.send_c_find(q, "1.2.840.10008.5.1.4.1.2.2.1")]
    assert statuses == [0xA900]  # Study Root has no PATIENT level
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyDate = "2026-13-45"
    statuses = [s.Status for s, _ in a.send_c_find(q, "1.2.840.10008.5.1.4.1.2.2.1")]
    assert statuses == [0xC000]
    a.release()
    assert subprocess.run([need("echoscu"), "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port)]).returncode == 0


def test_movescu_to_configured_node(make_server, wsi_files, tmp_path):
    move_port = free_port()
    srv = make_server(config_text=f'[dimse]\naccept_unknown_ae = true\n[nodes.viewer]\naet = "MOVESCU"\nhost = "127.0.0.1"\nport = {move_port}\n')
    assert dcmsend(srv, *wsi_files).returncode == 0
    study = str(pydicom.dcmread(wsi_files[0], stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "moved"
    out.mkdir()
    res = subprocess.run(
        [need("movescu"), "+xy", "-aet", "MOVESCU", "-aec", srv.aet, "-aem", "MOVESCU", "--port", str(move_port),
         "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "-od", str(out),
         "127.0.0.1", str(srv.dicom_port)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    got = sorted(out.iterdir())
    assert len(got) == len(wsi_files)
    originals = {pydicom.dcmread(f).SOPInstanceUID: pixel_bytes(f) for f in wsi_files}
    for p in got:
        ds = pydicom.dcmread(p)
        assert ds.PixelData == originals[ds.SOPInstanceUID]

    # Unknown destination: 0xA801 from pynetdicom's move SCP.
    a = assoc(srv, ["1.2.840.10008.5.1.4.1.2.2.2"])
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study
    statuses = [s.Status for s, _ in a.send_c_move(q, "NOWHERE", "1.2.840.10008.5.1.4.1.2.2.2")]
    a.release()
    assert statuses[-1] == 0xA801


def test_cget_partial_failure_counts(server, wsi_files):
    """A C-GET whose requestor cannot take one SOP class: that sub-operation fails, the rest complete."""
    sc = factory.secondary_capture(wsi_files[0].parent.parent / "sc_get.dcm",
                                   study=str(pydicom.dcmread(wsi_files[0], stop_before_pixels=True).StudyInstanceUID))
    assert dcmsend(server, *wsi_files, sc).returncode == 0
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.3")
    ae.add_requested_context(WSI, ["1.2.840.10008.1.2.4.50"])
    received = []
    handlers = [(evt.EVT_C_STORE, lambda e: (received.append(e.dataset.SOPInstanceUID), 0x0000)[1])]
    a = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet,
                     ext_neg=[build_role(WSI, scp_role=True)], evt_handlers=handlers)
    assert a.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = pydicom.dcmread(sc).StudyInstanceUID
    responses = [s for s, _ in a.send_c_get(q, "1.2.840.10008.5.1.4.1.2.2.3")]
    a.release()
    final = responses[-1]
    assert final.Status == 0xB000
    assert final.NumberOfCompletedSuboperations == len(wsi_files)
    assert final.NumberOfFailedSuboperations == 1
    assert len(received) == len(wsi_files)


# -- storage commitment ------------------------------------------------------------

def _commit_request(items: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    seq = []
    for cls, sop in items:
        it = Dataset()
        it.ReferencedSOPClassUID = cls
        it.ReferencedSOPInstanceUID = sop
        seq.append(it)
    ds.ReferencedSOPSequence = Sequence(seq)
    return ds


def _report_collector():
    """(reports, event set on the first report, N-EVENT-REPORT handler) for a commitment requester."""
    reports: list = []
    got = threading.Event()

    def on_report(event):
        reports.append((event.request.EventTypeID, event.event_information))
        got.set()
        return 0x0000, None

    return reports, got, on_report


def test_storage_commitment_same_association(server, wsi_files):
    assert dcmsend(server, *wsi_files).returncode == 0
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in wsi_files]
    reports, got, on_report = _report_collector()

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    a = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet,
                     evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert a.is_established
    unknown = generate_uid()
    req = _commit_request([(WSI, s) for s in sops] + [(WSI, unknown)])
    status, _ = a.send_n_action(req, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    assert status.Status == 0x0000
    assert got.wait(30), "no N-EVENT-REPORT on the open association"
    time.sleep(0.2)  # let our N-EVENT-REPORT response go out before releasing, as a modality would
    a.release()
    event_type, info = reports[0]
    assert event_type == 2  # some failed
    assert info.TransactionUID == req.TransactionUID
    assert sorted(x.ReferencedSOPInstanceUID for x in info.ReferencedSOPSequence) == sorted(sops)
    assert [x.ReferencedSOPInstanceUID for x in info.FailedSOPSequence] == [unknown]
    assert info.FailedSOPSequence[0].FailureReason == 0x0112
    assert "reported on the same association" in server.log()


def test_storage_commitment_new_association_and_rotted_blob(make_server, wsi_files):
    scp_port = free_port()
    srv = make_server(config_text=f'[dimse]\naccept_unknown_ae = true\n[nodes.scanner]\naet = "SCANNER"\nhost = "127.0.0.1"\nport = {scp_port}\n')
    assert dcmsend(srv, *wsi_files).returncode == 0
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in wsi_files]
    # Rot one blob on disk: it must not be reported as committed.
    from archive.service import Archive
    from conftest import archive_config
    arc = Archive(archive_config(srv.data_dir), readonly=True)  # as its server sees it (LMDB or PostgreSQL)
    rec = arc.instance(sops[1])
    arc.close()
    blob = srv.data_dir / "hot" / "blobs" / rec.blob.key[:2] / rec.blob.key[2:4] / rec.blob.key
    raw = bytearray(blob.read_bytes())
    raw[-100] ^= 0xFF
    blob.write_bytes(bytes(raw))

    reports, got, on_report = _report_collector()

    listener = AE(ae_title="SCANNER")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    scp = listener.start_server(("127.0.0.1", scp_port), block=False,
                                evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(StorageCommitmentPushModel)
        a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
        req = _commit_request([(WSI, s) for s in sops])
        status, _ = a.send_n_action(req, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        a.release()  # report must come on a new association
        assert status.Status == 0x0000
        assert got.wait(30), "no N-EVENT-REPORT on a new association"
        time.sleep(0.2)  # let the response go out before the listener stops
    finally:
        scp.shutdown()
    event_type, info = reports[0]
    assert event_type == 2
    assert sorted(x.ReferencedSOPInstanceUID for x in info.ReferencedSOPSequence) == sorted([sops[0], sops[2]])
    assert [x.ReferencedSOPInstanceUID for x in info.FailedSOPSequence] == [sops[1]]
    assert info.FailedSOPSequence[0].FailureReason == 0x0110
    assert f"commitment {req.TransactionUID} reported to SCANNER: 0" in srv.log()  # answered Success


# -- bad input ------------------------------------------------------------------------

def _send_raw(srv, path: Path, sop_class: str, ts: str) -> int:
    """Send a file's bytes as-is (pynetdicom chunked send), whatever its content."""
    from pynetdicom import _config
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        a = assoc(srv, [(sop_class, [ts])])
        status = a.send_c_store(path)
        a.release()
        return status.Status
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _assert_nothing_stored(srv):
    assert stats(srv)["instances"] == 0
    blobs = list((srv.data_dir / "hot" / "blobs").rglob("*"))
    assert [b for b in blobs if b.is_file()] == []
    leftovers = [p for p in (srv.data_dir / "hot" / "tmp").rglob("*") if p.is_file() and p.name != "lock"]
    assert leftovers == []
    res = subprocess.run([need("echoscu"), "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port)], timeout=30)
    assert res.returncode == 0, "server stopped answering after bad input"


def test_missing_uids_are_refused(server, tmp_path):
    for attr in ("StudyInstanceUID", "SeriesInstanceUID"):
        ds = factory.wsi_instance(generate_uid(), generate_uid(), 256, 256)
        delattr(ds, attr)
        p = tmp_path / f"no-{attr}.dcm"
        ds.save_as(p, enforce_file_format=True)
        assert _send_raw(server, p, WSI, "1.2.840.10008.1.2.4.50") == 0xC000
    _assert_nothing_stored(server)
    assert "missing Study Instance UID" in server.log()


def test_sop_class_not_matching_context_is_refused(server, tmp_path):
    ds = factory.wsi_instance(generate_uid(), generate_uid(), 256, 256)
    ds.SOPClassUID = factory.SECONDARY_CAPTURE  # data set says SC, file meta and context say WSI
    ds.preamble = b"\0" * 128
    p = tmp_path / "mismatch.dcm"
    pydicom.dcmwrite(p, ds, enforce_file_format=False)
    assert pydicom.dcmread(p).file_meta.MediaStorageSOPClassUID == WSI
    assert _send_raw(server, p, WSI, "1.2.840.10008.1.2.4.50") == 0xA900
    _assert_nothing_stored(server)


def test_truncated_and_malformed_data_are_refused(server, tmp_path):
    ds = factory.wsi_instance(generate_uid(), generate_uid(), 1024, 1024)
    good = tmp_path / "good.dcm"
    ds.save_as(good, enforce_file_format=True)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) - 5000])
    assert _send_raw(server, truncated, WSI, "1.2.840.10008.1.2.4.50") == 0xC000
    # Valid file meta, then garbage where the data set should be.
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 64)
    assert _send_raw(server, garbage, WSI, "1.2.840.10008.1.2.4.50") == 0xC000
    _assert_nothing_stored(server)


def test_same_uid_identical_is_noop_different_is_refused(server, tmp_path):
    study, series = generate_uid(), generate_uid()
    sop = generate_uid()
    a = factory.wsi_instance(study, series, 256, 256, sop=sop, seed=1)
    b = factory.wsi_instance(study, series, 256, 256, sop=sop, seed=2)
    pa, pb = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.save_as(pa, enforce_file_format=True)
    b.save_as(pb, enforce_file_format=True)
    assert _send_raw(server, pa, WSI, "1.2.840.10008.1.2.4.50") == 0x0000
    assert _send_raw(server, pa, WSI, "1.2.840.10008.1.2.4.50") == 0x0000
    assert _send_raw(server, pb, WSI, "1.2.840.10008.1.2.4.50") == 0x0111
    assert stats(server)["instances"] == 1
    out = tmp_path / "get"
    out.mkdir()
    res = subprocess.run(
        [need("getscu"), "-aec", server.aet, "+xy", "-S", "-k", "QueryRetrieveLevel=IMAGE",
         "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}", "-k", f"SOPInstanceUID={sop}",
         "-od", str(out), "127.0.0.1", str(server.dicom_port)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert pixel_bytes(next(out.iterdir())) == a.PixelData  # the first copy is kept


def test_replace_policy(make_server, tmp_path):
    srv = make_server(config_text='[archive]\non_conflict = "replace"\n')
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    a = factory.wsi_instance(study, series, 256, 256, sop=sop, seed=1)
    b = factory.wsi_instance(study, series, 256, 256, sop=sop, seed=2)
    pa, pb = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.save_as(pa, enforce_file_format=True)
    b.save_as(pb, enforce_file_format=True)
    assert _send_raw(srv, pa, WSI, "1.2.840.10008.1.2.4.50") == 0x0000
    assert _send_raw(srv, pb, WSI, "1.2.840.10008.1.2.4.50") == 0x0000
    assert stats(srv)["instances"] == 1
    blobs = [p for p in (srv.data_dir / "hot" / "blobs").rglob("*") if p.is_file()]
    # the replaced version is kept (rejected, until a purge: tests/test_deletion.py), not overwritten
    assert len(blobs) == 2 and {pydicom.dcmread(p).PixelData for p in blobs} == {a.PixelData, b.PixelData}
    from pydicom.encaps import generate_frames

    r = requests.get(f"{srv.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                     headers={"Accept": "image/jpeg"})
    first = [next(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))) for ds in (a, b)]
    assert first[0] != first[1] and r.status_code == 200 and r.content == first[1]  # the new version is served


def test_disk_full_is_out_of_resources(make_server, tmp_path):
    """A write failure (file size limit standing in for a full disk) -> 0xA700, nothing kept."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    s = make_server(preexec_fn=limit)
    try:
        big = factory.wsi_instance(generate_uid(), generate_uid(), 1024, 1024,
                                   transfer_syntax="1.2.840.10008.1.2.1")
        p = tmp_path / "big.dcm"
        big.save_as(p, enforce_file_format=True)
        assert p.stat().st_size > 2 << 20
        assert _send_raw(s, p, WSI, "1.2.840.10008.1.2.1") == 0xA700
        _assert_nothing_stored(s)
    finally:
        s.stop()  # stats above ran in a child without the limit


# -- crash ------------------------------------------------------------------------------

def test_kill9_mid_stream_loses_nothing_acknowledged(make_server, tmp_path):
    srv = make_server()
    files = []
    for i in range(40):
        ds = factory.wsi_instance(generate_uid(), generate_uid(), 1024, 1024, seed=i)
        p = tmp_path / f"c{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    acked: list[str] = []
    done = threading.Event()

    def sender():
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(WSI, ["1.2.840.10008.1.2.4.50"])
        a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
        try:
            for p in files:
                ds = pydicom.dcmread(p)
                st = a.send_c_store(ds)
                if st and st.get("Status") == 0x0000:
                    acked.append(ds.SOPInstanceUID)
                if not a.is_established:
                    break
        except Exception:
            pass
        finally:
            done.set()

    t = threading.Thread(target=sender)
    t.start()
    while len(acked) < 10 and not done.is_set():
        time.sleep(0.005)
    srv.kill9()
    t.join(30)
    assert 10 <= len(acked) < len(files)
    srv.start()  # same data dir
    out = run_cli("verify", "--quiet", data=srv.data_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    n = stats(srv)["instances"]
    assert n >= len(acked)
    listing = run_cli("ls", data=srv.data_dir, check=True).stdout
    for sop in acked:
        assert sop in listing
    # Nothing partial: every blob on disk belongs to a committed record.
    blobs = [p for p in (srv.data_dir / "hot" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == n


def test_real_full_disk_is_out_of_resources_and_recovers(make_server, tmp_path):
    """The data directory on a 4 MB filesystem: an instance that does not fit is refused 0xA700,
    leaves nothing behind, and the next one that fits is stored."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the RLIMIT_FSIZE test covers the path)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {res.stderr.strip()}")
    try:
        srv = make_server(data_dir=mnt / "data")
        big = factory.wsi_instance(generate_uid(), generate_uid(), 1536, 1024, transfer_syntax="1.2.840.10008.1.2.1")
        p = tmp_path / "big.dcm"
        big.save_as(p, enforce_file_format=True)
        assert p.stat().st_size > 4 << 20
        assert _send_raw(srv, p, WSI, "1.2.840.10008.1.2.1") == 0xA700
        _assert_nothing_stored(srv)
        small = factory.wsi_instance(generate_uid(), generate_uid(), 256, 256)
        ps = tmp_path / "small.dcm"
        small.save_as(ps, enforce_file_format=True)
        assert _send_raw(srv, ps, WSI, "1.2.840.10008.1.2.4.50") == 0x0000
        assert stats(srv)["instances"] == 1
        srv.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_patient_level_cget_returns_all_of_the_patients_studies(server, tmp_path):
    a_files = factory.wsi_series(tmp_path / "a", patient_id="PGET", levels=((256, 256),))
    b_files = factory.wsi_series(tmp_path / "b", patient_id="PGET", levels=((256, 256), (128, 128)))
    other = factory.wsi_series(tmp_path / "c", patient_id="OTHER", levels=((256, 256),))
    assert dcmsend(server, *a_files, *b_files, *other).returncode == 0
    out = tmp_path / "got"
    out.mkdir()
    res = subprocess.run(
        [need("getscu"), "-aec", server.aet, "+xy", "-P", "-k", "QueryRetrieveLevel=PATIENT",
         "-k", "PatientID=PGET", "-od", str(out), "127.0.0.1", str(server.dicom_port)],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    got = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out.iterdir())
    want = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in a_files + b_files)
    assert got == want
