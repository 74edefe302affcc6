"""The core paths end to end against a PostgreSQL-backed `pathpacs serve` (issue 13): C-STORE by
dcmsend, C-FIND at every level, C-GET, STOW by dicomweb-client, QIDO at every level, WADO frames
and metadata, Storage Commitment, a tier move under reads, token auth, a consultation send to an
LMDB-backed partner, and kill -9 during a dcmsend. Each path once, through one module-scoped
server over one fresh database of the session's PostgreSQL; the helpers (and, where a test is
self-contained, the test itself) come from the LMDB modules, so both backends answer the same
assertions. (A whole LMDB module runs against PostgreSQL with `pytest --index=postgresql`.)"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

import factory
import test_auth as auth
import test_consult_send as consult
import test_dicomweb as dw
import test_dimse as dimse
import test_tiers as tiers
from conftest import Server, archive_config, free_port, need, run_cli

ICC = bytes(range(256)) * 8  # above the bulk threshold: a BulkDataURI in the metadata


def _uid(path: Path, keyword: str) -> str:
    return str(getattr(pydicom.dcmread(path, stop_before_pixels=True), keyword))


# -- the archives -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pgpaths")


@pytest.fixture(scope="module")
def b(root):
    """The consultation partner: an LMDB-backed archive with token authentication."""
    srv = Server(root / "B", free_port(), free_port(), aet="HOSPB", index="lmdb",
                 config=_write(root / "B.toml", '[auth]\nmode = "token"\n')).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def b_token(b) -> str:
    return run_cli("token", "create", "--role", "uploader", "--role", "viewer", "--name", "pg hospital",
                   data=b.data_dir, check=True).stdout.strip()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def srv(root, postgres, b, b_token):
    """The PostgreSQL-backed archive: two filesystem tiers, and partner B for consultations."""
    config = f'''[tiers.hot]
path = "{root}/tiers/hot"
[tiers.warm]
path = "{root}/tiers/warm"

[consultation]
name = "pgA"
institution = "PG Hospital"
retry_max_seconds = 30

[partners.b]
dicomweb = "{b.dicomweb_url}"
token = "{b_token}"
'''
    s = Server(root / "A", free_port(), free_port(), aet="PGPACS", index="postgresql",
               config=_write(root / "A.toml", config)).start()
    yield s
    s.stop()


def test_the_server_really_runs_on_postgresql(srv, postgres):
    import psycopg

    assert "[index]" in srv.config.read_text() and not (srv.data_dir / "index" / "data.mdb").exists()
    dsn = re.search(r'dsn = "([^"]+)"', srv.config.read_text()).group(1)
    with psycopg.connect(dsn) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    assert tables, "no tables in the archive's database"


@pytest.fixture(scope="module")
def populated(srv, root):
    """Two patients by dcmsend: P100 (a 3-level WSI study), P200 (a 1-level WSI and an SC study)."""
    a = factory.wsi_series(root / "in-a", patient_id="P100", patient_name="Doe^Jane",
                           study_date="20260110", accession="ACC-A")
    bb = factory.wsi_series(root / "in-b", patient_id="P200", patient_name="Smith^John",
                            study_date="20250620", accession="ACC-B", levels=((512, 512),))
    sc = factory.secondary_capture(root / "sc.dcm", patient_id="P200", patient_name="Smith^John",
                                   study_date="20240101")
    res = dimse.dcmsend(srv, *a, *bb, sc)
    assert res.returncode == 0, res.stdout + res.stderr
    return srv, a, bb, sc


# -- DIMSE -------------------------------------------------------------------------------------

def test_cstore_by_dcmsend_then_cfind_at_every_level(populated, tmp_path):
    srv, a, bb, sc = populated
    assert dimse.stats(srv)["instances"] >= 5
    find = lambda *keys, root="-S": dimse.findscu(srv, tmp_path, *keys, root=root)  # noqa: E731

    r = find("QueryRetrieveLevel=PATIENT", "PatientID=P200", "PatientName", "NumberOfPatientRelatedStudies",
             "NumberOfPatientRelatedInstances", root="-P")
    assert len(r) == 1 and r[0].PatientName == "Smith^John"
    assert int(r[0].NumberOfPatientRelatedStudies) == 2 and int(r[0].NumberOfPatientRelatedInstances) == 2

    r = find("QueryRetrieveLevel=STUDY", "PatientID=P100", "StudyInstanceUID", "ModalitiesInStudy",
             "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
    assert [x.StudyInstanceUID for x in r] == [_uid(a[0], "StudyInstanceUID")]
    assert r[0].ModalitiesInStudy == "SM" and int(r[0].NumberOfStudyRelatedSeries) == 1
    assert int(r[0].NumberOfStudyRelatedInstances) == 3
    r = find("QueryRetrieveLevel=STUDY", "PatientName=smith*", "StudyDate")  # wildcard, case-insensitive
    assert sorted(x.StudyDate for x in r) == ["20240101", "20250620"]
    r = find("QueryRetrieveLevel=STUDY", "PatientID=P200", "StudyDate=20250101-20261231", "AccessionNumber")
    assert [x.AccessionNumber for x in r] == ["ACC-B"]  # a date range
    r = find("QueryRetrieveLevel=STUDY", "AccessionNumber=ACC-?", "PatientID")
    assert sorted(x.PatientID for x in r) == ["P100", "P200"]
    r = find("QueryRetrieveLevel=STUDY", "ModalitiesInStudy=OT", "PatientID=P200", "StudyInstanceUID")
    assert len(r) == 1 and r[0].StudyInstanceUID == _uid(sc, "StudyInstanceUID")

    study = _uid(a[0], "StudyInstanceUID")
    r = find("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID", "Modality",
             "NumberOfSeriesRelatedInstances")
    assert len(r) == 1 and r[0].Modality == "SM" and int(r[0].NumberOfSeriesRelatedInstances) == 3

    sops = [_uid(p, "SOPInstanceUID") for p in a[:2]]
    r = find("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID=" + "\\".join(sops),
             "InstanceNumber")
    assert sorted(x.SOPInstanceUID for x in r) == sorted(sops)  # a UID list
    assert find("QueryRetrieveLevel=STUDY", "PatientID=NOBODY", "StudyInstanceUID") == []


def test_cget_by_getscu_is_byte_identical(populated, tmp_path):
    srv, a, _, _ = populated
    out = tmp_path / "got"
    out.mkdir()
    res = subprocess.run(
        [need("getscu"), "-aec", srv.aet, "+xy", "-S", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={_uid(a[0], 'StudyInstanceUID')}", "-od", str(out),
         "127.0.0.1", str(srv.dicom_port)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    assert sorted(got) == sorted(_uid(p, "SOPInstanceUID") for p in a)
    for f in a:
        assert dimse.pixel_bytes(got[_uid(f, "SOPInstanceUID")]) == dimse.pixel_bytes(f)


def test_storage_commitment_n_action_and_n_event_report(srv, wsi_files):
    # test_dimse's own test, unchanged, against this server: committed, and one unknown SOP failed 0x0112
    dimse.test_storage_commitment_same_association(srv, wsi_files)


# -- DICOMweb ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stowed(srv, root):
    """A WSI study (two levels, an ICC profile) and a native one, stored by dicomweb-client."""
    from dicomweb_client.api import DICOMwebClient

    levels = factory.wsi_series(root / "stow", patient_id="PSTOW", patient_name="Web^Wanda", accession="ACCW",
                                study_date="20230303", icc_profile=ICC, levels=((512, 512), (256, 256)))
    native = factory.wsi_series(root / "native", levels=((512, 256),), patient_id="PSTOW",
                                transfer_syntax=dw.ELE_TS, study_date="20230304")
    client = DICOMwebClient(url=srv.dicomweb_url)
    files = levels + native
    resp = client.store_instances([pydicom.dcmread(f) for f in files])
    assert len(resp.ReferencedSOPSequence) == len(files) and "FailedSOPSequence" not in resp
    return {"client": client, "levels": levels, "native": native}


def test_stow_then_qido_at_every_level(srv, stowed, populated):
    client = stowed["client"]
    study, series, _ = dw._uids(stowed["levels"][0])
    r = client.search_for_studies(search_filters={"PatientID": "PSTOW"})
    assert sorted(x["0020000D"]["Value"][0] for x in r) == sorted(
        {_uid(p, "StudyInstanceUID") for p in stowed["levels"] + stowed["native"]})
    r = client.search_for_studies(search_filters={"PatientName": "web*", "StudyDate": "20230301-20230303"},
                                  fields=["NumberOfStudyRelatedInstances", "ModalitiesInStudy"])
    assert len(r) == 1 and r[0]["0020000D"]["Value"] == [study]
    assert r[0]["00201208"]["Value"] == [2] and r[0]["00080061"]["Value"] == ["SM"]
    r = client.search_for_studies(search_filters={"AccessionNumber": "ACC-?"})  # the DIMSE-stored ones too
    assert sorted(x["00100020"]["Value"][0] for x in r) == ["P100", "P200"]
    r = client.search_for_series(study, fields=["NumberOfSeriesRelatedInstances"])
    assert [x["0020000E"]["Value"][0] for x in r] == [series] and r[0]["00201209"]["Value"] == [2]
    r = client.search_for_instances(study, series)
    assert sorted(x["00080018"]["Value"][0] for x in r) == sorted(dw._uids(p)[2] for p in stowed["levels"])
    r = requests.get(f"{srv.dicomweb_url}/instances", params={"PatientID": "PSTOW", "limit": 2, "offset": 1},
                     timeout=30)
    assert r.status_code == 200 and len(r.json()) == 2  # 3 instances, from the second
    r = requests.get(f"{srv.dicomweb_url}/studies", params={"StudyDate": "2023-99-99"}, timeout=30)
    assert r.status_code == 400


def test_wado_frames_are_the_stored_bytes_and_metadata_matches(srv, stowed):
    client = stowed["client"]
    for path in stowed["levels"] + stowed["native"]:
        st, se, sop = dw._uids(path)
        want = dw._frames(path)
        native = not pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
        got = client.retrieve_instance_frames(st, se, sop, frame_numbers=list(range(1, len(want) + 1)),
                                              media_types=("application/octet-stream" if native else "image/jpeg",))
        assert got == want, path.name
    st, se, sop = dw._uids(stowed["levels"][0])
    r = requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/2,1",
                     headers={"Accept": "multipart/related; type=image/jpeg"}, timeout=30)
    assert r.status_code == 200 and [b for _, b in dw._parts(r)] == dw._frames(stowed["levels"][0])[1::-1]
    assert requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/999",
                        timeout=30).status_code == 404

    meta = client.retrieve_series_metadata(st, se)
    assert sorted(m["00080018"]["Value"][0] for m in meta) == sorted(dw._uids(p)[2] for p in stowed["levels"])
    one = next(m for m in meta if m["00080018"]["Value"][0] == sop)
    ds = pydicom.dcmread(stowed["levels"][0], stop_before_pixels=True)
    assert one["00480006"]["Value"] == [ds.TotalPixelMatrixColumns] and one["00100020"]["Value"] == ["PSTOW"]
    uri = one["00480105"]["Value"][0]["00282000"]["BulkDataURI"]
    assert client.retrieve_bulkdata(uri) == [ICC]
    frames = client.retrieve_bulkdata(one["7FE00010"]["BulkDataURI"], media_types=(("application/octet-stream", "*"),))
    assert frames == dw._frames(stowed["levels"][0])  # Pixel Data's BulkDataURI: all frames, in order


# -- storage tiers -------------------------------------------------------------------------------

def test_tier_move_under_reads_keeps_serving_the_same_frames(srv, stowed, root):
    """`pathpacs tier move` (a CLI process on the same database) while the server serves frames:
    every answer 200 with the stored bytes, the blobs end on the warm tier, and back."""
    path = stowed["levels"][0]
    st, se, sop = dw._uids(path)
    want = tiers.frames_of(path)
    u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}"
    errors: list = []
    stop = threading.Event()
    count = [0]

    def reader() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                n = 1 + count[0] % len(want)
                r = s.get(f"{u}/frames/{n}", headers={"Accept": "image/jpeg"}, timeout=30)
                if r.status_code != 200 or r.content != want[n - 1]:
                    errors.append((n, r.status_code, r.text[:200] if r.status_code != 200 else "other bytes"))
                count[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for tier, moved in (("warm", "2 instances moved to warm"), ("hot", "2 instances moved to hot"),
                            ("warm", "2 instances moved to warm")):
            res = run_cli("tier", "move", "--study", st, "--to", tier, "--config", str(srv.config), data=srv.data_dir)
            assert res.returncode == 0 and moved in res.stdout, res.stdout + res.stderr
    finally:
        stop.set()
        t.join(60)
    assert count[0] > 3 and errors == [], errors[:5]
    assert len(tiers.blob_files(root / "tiers" / "warm")) == 2
    for n, b in enumerate(want, 1):  # after the move, served from warm
        r = requests.get(f"{u}/frames/{n}", headers={"Accept": "image/jpeg"}, timeout=30)
        assert r.status_code == 200 and r.content == b
    assert run_cli("verify", "--quiet", "--config", str(srv.config), data=srv.data_dir).returncode == 0
    assert "fixity" not in srv.log()  # no read took the move for damage


# -- token authentication -------------------------------------------------------------------------

def test_token_create_and_revoke(make_server):
    s = make_server(config_text='[auth]\nmode = "token"\ncache_seconds = 2\n', index="postgresql")
    assert "[index]" in s.config.read_text()
    t = auth.token(s.data_dir, "--role", "viewer", "--name", "pg viewer")
    studies = f"{s.dicomweb_url}/studies"
    assert requests.get(studies, timeout=10).status_code == 401
    assert requests.get(studies, headers=auth.bearer("pp_nobody00.not-a-secret"), timeout=10).status_code == 401
    assert requests.get(studies, headers=auth.bearer(t), timeout=10).status_code == 200
    assert auth._call(s, "POST", "/dicomweb/studies", auth.bearer(t)).status_code == 403  # a viewer stores nothing
    run_cli("token", "revoke", t[3:19], data=s.data_dir, check=True)
    deadline = time.monotonic() + 10
    while requests.get(studies, headers=auth.bearer(t), timeout=10).status_code != 401:
        assert time.monotonic() < deadline, "a revoked token still works after 10 s"
        time.sleep(0.2)
    listed = run_cli("token", "list", "--json", data=s.data_dir, check=True).stdout
    assert '"revoked"' in listed


# -- consultation ---------------------------------------------------------------------------------

def test_consultation_send_to_an_lmdb_partner(srv, b, b_token):
    case = consult.make_case(((1024, 768), (512, 384)), patient_id="PGCONSULT")
    originals = consult.put_case(srv, case)
    study = case[0].StudyInstanceUID
    job = consult.send(srv, study=study, partner="b", question="Margins?", priority="routine")
    assert job["instances_total"] == len(case) + 1  # and the request SR
    job = consult.wait_final(srv, job["id"])
    assert job["state"] == "done" and job["verified"] == len(case) + 1, job
    for ds in case:
        got = consult.wado_bytes(b.dicomweb_url, study, ds.SeriesInstanceUID, ds.SOPInstanceUID, b_token)
        assert consult.sha(got) == consult.sha(originals[ds.SOPInstanceUID])
    # any request answers about the job: it lives in the database
    assert consult.job_of(srv, job["id"])["state"] == "done"
    consult.a_intact(srv, originals, case)


# -- kill -9 during ingest ------------------------------------------------------------------------

def test_kill9_during_dcmsend_keeps_every_acknowledged_instance_and_sweeps_staging(make_server, tmp_path):
    files = []
    for i in range(40):
        ds = factory.wsi_instance(generate_uid(), generate_uid(), 1024, 1024, seed=i, patient_id="PKILL")
        p = tmp_path / f"k{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    s = make_server(index="postgresql")
    proc = subprocess.Popen([need("dcmsend"), "-d", "-aec", s.aet, "127.0.0.1", str(s.dicom_port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    acked: list[str] = []
    sop, in_rsp = None, False
    assert proc.stdout is not None
    for line in proc.stdout:  # dcmsend -d: each C-STORE RSP names its SOP instance, then its status
        if "Message Type" in line:
            in_rsp = "C-STORE RSP" in line
        elif in_rsp and "Affected SOP Instance UID" in line:
            sop = line.rsplit(":", 1)[1].strip()
        elif in_rsp and "DIMSE Status" in line and "0x0000" in line and sop:
            acked.append(sop)
            if len(acked) == 10:
                sessions = [d for d in (s.data_dir / "hot" / "tmp").iterdir() if d.is_dir()]
                s.kill9()
                break
    proc.stdout.close()
    proc.wait(60)
    assert len(acked) == 10, "dcmsend ended before 10 instances were acknowledged"
    assert sessions, "the receiving server had no staging session"

    s.start()  # the same data directory and database
    res = run_cli("verify", "--quiet", data=s.data_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    n = dimse.stats(s)["instances"]
    assert len(acked) <= n < len(files)
    listing = run_cli("ls", data=s.data_dir, check=True).stdout
    assert all(sop in listing for sop in acked)
    by_sop = {_uid(p, "SOPInstanceUID"): p for p in files}
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=s.dicomweb_url)
    for sop in acked:  # intact: the same pixels, frame by frame
        st, se, _ = dw._uids(by_sop[sop])
        want = dw._frames(by_sop[sop])
        assert client.retrieve_instance_frames(st, se, sop, frame_numbers=list(range(1, len(want) + 1)),
                                               media_types=("image/jpeg",)) == want
    blobs = [p for p in (s.data_dir / "hot" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == n  # nothing partial: every blob belongs to a committed record
    from archive.service import Archive

    arc = Archive(archive_config(s.data_dir), readonly=True)
    try:
        assert type(arc.index).__name__ == "PostgresIndex"
        assert arc.index.pending() == []  # the killed receiver's pending blobs resolved at the restart
    finally:
        arc.close()
    left = [d for d in sessions if d.exists()]
    assert left == [], f"the killed server's staging was not swept: {left}"
    parts = [p for p in (s.data_dir / "hot" / "tmp").rglob("*") if p.is_file() and p.name != "lock"]
    assert parts == []
