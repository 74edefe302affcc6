"""Deletion that cannot go wrong (issue 10): IOCM reject -> hidden from QIDO, WADO and C-FIND ->
restore -> visible -> reject -> purge removes every copy on every tier -> the study stored again is
a new, visible study; the rejection note is a valid KOS (dciodvfy); DICOMweb DELETE for
administrators only; received rejection notes honoured only from one who may reject; replace
keeps the old version as rejected; kill -9 during a purge, then a rerun finishes it."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.encaps import generate_frames

import factory
from conftest import ROOT, Server, free_port, need, run_cli

TIERS = """
[tiers.hot]
path = "{root}/hot"
[tiers.warm]
path = "{root}/warm"
[deletion]
purge_after_days = {days}
"""
OLD = "19900101"  # a study date whose 15 years of retention are over


def config(tmp: Path, days: float = 0, extra: str = "") -> Path:
    p = tmp / "deletion.toml"
    p.write_text(TIERS.format(root=tmp / "tiers", days=days) + extra)
    return p


def cli(cfg: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, "--config", str(cfg), data=data)


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "blobs" in p.parts)


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def frames_of(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def c_find_studies(srv: Server, study: str) -> list[str]:
    """Study Instance UIDs a pynetdicom peer's C-FIND finds, and the final status (0x0000)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title="FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study
    found, final = [], None
    for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        if status.Status == 0xFF00:
            found.append(str(ident.StudyInstanceUID))
        else:
            final = status.Status
    assoc.release()
    assert final == 0x0000
    return found


def c_get_files(srv: Server, study: str, out: Path) -> list[str]:
    """SOP Instance UIDs dcmtk's getscu receives for a study-level C-GET."""
    out.mkdir()
    res = subprocess.run([need("getscu"), "-aec", srv.aet, "-S", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={study}", "-od", str(out), "127.0.0.1", str(srv.dicom_port)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir())


def wait_for(predicate, timeout: float = 5.0) -> bool:
    """Another process's reject reaches a server within its refresh interval (0.25 s)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def stored(tmp_path):
    """A study of two series: a two-level WSI series moved to warm, a secondary capture on hot."""
    files = factory.wsi_series(tmp_path / "in", levels=((512, 512), (256, 256)), study_date=OLD)
    study = uids(files[0])[0]
    sc = factory.secondary_capture(tmp_path / "in" / "sc.dcm", study=study, study_date=OLD)
    cfg = config(tmp_path)
    data = tmp_path / "data"
    res = cli(cfg, data, "import", "--quiet", str(tmp_path / "in"))
    assert res.returncode == 0 and "3 stored" in res.stdout, res.stdout + res.stderr
    res = cli(cfg, data, "tier", "move", "--series", uids(files[0])[1], "--to", "warm")
    assert res.returncode == 0, res.stderr
    hot, warm = tmp_path / "tiers" / "hot", tmp_path / "tiers" / "warm"
    assert len(blob_files(hot)) == 1 and len(blob_files(warm)) == 2
    return cfg, data, files, sc, study


def test_reject_restore_reject_purge_store_again(stored, tmp_path):
    cfg, data, files, sc, study = stored
    _, series, sop = uids(files[0])
    hot, warm = tmp_path / "tiers" / "hot", tmp_path / "tiers" / "warm"
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        base = srv.dicomweb_url
        frame_url = f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1"
        first_frame = frames_of(files[0])[0]
        assert requests.get(f"{base}/studies").json()[0]["0020000D"]["Value"] == [study]
        assert requests.get(frame_url, headers={"Accept": "image/jpeg"}).content == first_frame
        assert c_find_studies(srv, study) == [study]

        res = cli(cfg, data, "reject", "--study", study, "--reason", "quality")
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"rejected 3 instances of study {study} (113001); rejection note ")
        note = res.stdout.split()[-1]
        assert wait_for(lambda: requests.get(f"{base}/studies").json() == [])
        assert requests.get(f"{base}/studies?StudyInstanceUID={study}").json() == []
        assert requests.get(f"{base}/instances").json() == []
        for url in (frame_url, f"{base}/studies/{study}", f"{base}/studies/{study}/metadata",
                    f"{base}/studies/{study}/series/{series}/instances/{sop}",
                    f"{base}/studies/{study}/series/{series}/instances/{sop}/metadata",
                    f"{base}/studies/{study}/series/{series}/thumbnail"):
            r = requests.get(url)
            assert r.status_code == 404, (url, r.status_code, r.text)
        assert c_find_studies(srv, study) == []
        assert c_get_files(srv, study, tmp_path / "get-rejected") == []
        # kept on their tiers, the note beside them (hot)
        assert len(blob_files(warm)) == 2 and len(blob_files(hot)) == 2

        # the rejection note: a Key Object Selection Document titled 113001, valid per dciodvfy
        notes = [p for p in blob_files(hot) if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) == note]
        assert len(notes) == 1
        kos = pydicom.dcmread(notes[0])
        assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and kos.StudyInstanceUID == study
        title = kos.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
            "113001", "DCM", "Rejected for Quality Reasons")
        refs = {str(r.ReferencedSOPInstanceUID) for se in kos.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
        assert refs == {uids(f)[2] for f in files} | {uids(sc)[2]}
        v = subprocess.run([need("dciodvfy"), str(notes[0])], capture_output=True, text=True, timeout=60)
        out = v.stdout + v.stderr
        assert "Error" not in out and "Warning" not in out, out
        assert "KeyObjectSelectionDocument" in out

        listed = cli(cfg, data, "rejected")
        kinds = sorted(line.split()[2] for line in listed.stdout.splitlines() if line.split()[1] == "113001")
        assert listed.returncode == 0 and kinds == ["instance"] * 3 + ["note"], listed.stdout

        res = cli(cfg, data, "restore", "--study", study)
        assert res.returncode == 0 and res.stdout.strip() == f"restored 3 instances of study {study}", res.stdout
        assert wait_for(lambda: len(requests.get(f"{base}/studies").json()) == 1)
        assert requests.get(frame_url, headers={"Accept": "image/jpeg"}).content == first_frame
        assert c_find_studies(srv, study) == [study]
        assert c_get_files(srv, study, tmp_path / "get-restored") == sorted(uids(f)[2] for f in files + [sc])
        # the note stays hidden (it is purged with its reject's time)
        assert note not in requests.get(f"{base}/studies/{study}/instances").text

        res = cli(cfg, data, "restore", "--study", study)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "nothing rejected" in res.stderr

        res = cli(cfg, data, "reject", "--study", study, "--reason", "113037")
        assert res.returncode == 0, res.stderr
        assert wait_for(lambda: requests.get(f"{base}/studies").json() == [])

        dry = cli(cfg, data, "purge", "--dry-run")
        assert dry.returncode == 0 and dry.stdout.startswith("would purge 5 instances of 1 studies"), dry.stdout
        assert len(blob_files(warm)) == 2 and len(blob_files(hot)) == 3

        res = cli(cfg, data, "purge")
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.startswith("purged 5 instances of 1 studies and 0 replaced versions"), res.stdout
        assert blob_files(hot) == [] and blob_files(warm) == []
        stats = cli(cfg, data, "stats")
        assert stats.returncode == 0 and stats.stdout.splitlines()[:4] == [
            "patients   0", "studies    0", "series     0", "instances  0"], stats.stdout
        assert cli(cfg, data, "rejected").stdout == ""

        # stored again: a new study, visible to everyone (dcm4chee keeps it hidden)
        import dicomweb_client

        client = dicomweb_client.DICOMwebClient(base)
        client.store_instances([pydicom.dcmread(f) for f in files])
        assert requests.get(f"{base}/studies").json()[0]["0020000D"]["Value"] == [study]
        assert requests.get(frame_url, headers={"Accept": "image/jpeg"}).content == first_frame
        assert c_find_studies(srv, study) == [study]
    finally:
        srv.stop()


# -- DICOMweb DELETE and received rejection notes, with the principal the auth middleware sets ----

def test_dicomweb_delete_is_reject_for_administrators_only(stored, tmp_path):
    cfg, data, files, sc, study = stored
    _, series, sop = uids(files[0])
    sc_series, sc_sop = uids(sc)[1:]
    # the real server: anonymous callers (auth mode none) may not reject
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        r = requests.delete(f"{srv.dicomweb_url}/studies/{study}")
        assert r.status_code == 403 and "may not administer the archive" in r.text, r.text
        assert len(requests.get(f"{srv.dicomweb_url}/studies").json()) == 1
    finally:
        srv.stop()

    # with authentication: a sysadmin token rejects, a viewer cannot, nobody without a token
    auth_cfg = tmp_path / "auth.toml"
    auth_cfg.write_text(cfg.read_text() + '\n[auth]\nmode = "token"\ncache_seconds = 1\n')

    def tok(*roles: str, name: str = "") -> dict:
        args = [a for r in roles for a in ("--role", r)] + (["--name", name] if name else [])
        res = cli(auth_cfg, data, "token", "create", *args)
        assert res.returncode == 0, res.stderr
        return {"Authorization": f"Bearer {res.stdout.strip()}"}

    ADMIN, VIEWER, UPLOADER = tok("sysadmin", name="test admin"), tok("viewer"), tok("uploader")
    srv = Server(data, free_port(), free_port(), config=auth_cfg).start()
    try:
        url = srv.dicomweb_url
        inst = f"{url}/studies/{study}/series/{series}/instances/{sop}"
        assert requests.delete(inst).status_code == 401
        assert requests.delete(inst, headers=VIEWER).status_code == 403
        assert requests.delete(f"{url}/studies/{study}/series/{series}/instances/1.2.3.4",
                               headers=ADMIN).status_code == 404
        assert requests.delete(f"{url}/studies/1.2.3.4", headers=ADMIN).status_code == 404
        r = requests.delete(inst + "?reason=tired", headers=ADMIN)
        assert r.status_code == 400 and "CID 7011" in r.text
        r = requests.delete(inst + "?reason=safety", headers=ADMIN)
        assert r.status_code == 204 and r.content == b""
        assert requests.get(inst, headers=VIEWER).status_code == 404
        assert requests.get(inst, headers=ADMIN).status_code == 200  # administrators still see it
        seen = requests.get(f"{url}/studies/{study}/instances", headers=VIEWER).json()
        assert sorted(d["00080018"]["Value"][0] for d in seen) == sorted([uids(files[1])[2], sc_sop])
        # NumberOfStudyRelatedInstances counts what the caller sees
        st = requests.get(f"{url}/studies", headers=VIEWER).json()[0]
        assert st["00201208"]["Value"] == [2]
        assert requests.get(f"{url}/studies", headers=ADMIN).json()[0]["00201208"]["Value"] == [4]

        assert run_cli("tier", "hold", "--study", study, "--config", str(cfg), data=data).returncode == 0
        time.sleep(0.3)
        r = requests.delete(f"{url}/studies/{study}/series/{sc_series}", headers=ADMIN)
        assert r.status_code == 409 and "legal hold" in r.text, r.text
        assert run_cli("tier", "release", "--study", study, "--config", str(cfg), data=data).returncode == 0

        # a rejection note received by STOW: honoured from an administrator, a plain KOS otherwise
        import dicomweb_client

        from archive import config as config_mod
        from archive.rejection_note import build
        from archive.service import Archive

        look = config_mod.load(cfg)
        look.data_dir = data
        arc = Archive(look, readonly=True)  # beside the server, as the CLI does
        try:
            sc_rec = arc.instance(sc_sop)
            st_rec = arc.study(study)
        finally:
            arc.close()
        note_path = tmp_path / "note.dcm"
        build("113038", [sc_rec], st_rec.attrs, {}, note_path)
        dicomweb_client.DICOMwebClient(url, headers=UPLOADER).store_instances([pydicom.dcmread(note_path)])
        time.sleep(0.05)
        sc_url = f"{url}/studies/{study}/series/{sc_series}/instances/{sc_sop}"
        assert requests.get(sc_url, headers=VIEWER).status_code == 200
        note2 = tmp_path / "note2.dcm"
        build("113038", [sc_rec], st_rec.attrs, {}, note2)
        dicomweb_client.DICOMwebClient(url, headers=ADMIN).store_instances([pydicom.dcmread(note2)])
        deadline = time.monotonic() + 5  # another process's reject: seen within the 0.25 s refresh
        while requests.get(sc_url, headers=VIEWER).status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        arc = Archive(look, readonly=True)
        try:
            mark = dict(arc.deletion.rejected())[sc_sop]
        finally:
            arc.close()
        assert mark["code"] == "113038" and mark["who"] == "test admin"
        assert mark["note"] == str(pydicom.dcmread(note2).SOPInstanceUID)
    finally:
        srv.stop()


def test_received_note_through_the_archive_api_and_import(stored, tmp_path):
    """Ingest honours a note only with may_reject (the DIMSE layer sets it per node after merge);
    `pathpacs import` stores a note as a plain KOS."""
    cfg, data, files, sc, study = stored
    from archive import config as config_mod
    from archive.access import ANONYMOUS
    from archive.rejection_note import build
    from archive.service import Archive

    c = config_mod.load(cfg)
    c.data_dir = data
    with Archive(c) as arc:
        recs = [arc.instance(uids(f)[2]) for f in files]
        attrs = arc.study(study).attrs
    p1, p2 = tmp_path / "n1.dcm", tmp_path / "n2.dcm"
    build("113001", recs, attrs, {}, p1)
    build("113001", recs, attrs, {}, p2)
    res = cli(cfg, data, "import", "--quiet", str(p1))
    assert res.returncode == 0 and "1 stored" in res.stdout
    with Archive(c) as arc:
        assert len(list(arc.search("IMAGE", [], who=ANONYMOUS))) == 4  # 3 + the plain KOS
        result = arc.ingest_file(p2, may_reject=True)
        assert result.ok and result.reason is None
        visible = {r.sop for r in arc.search("IMAGE", [], who=ANONYMOUS)}
        assert visible == {uids(sc)[2], str(pydicom.dcmread(p1).SOPInstanceUID)}


def test_replace_keeps_the_old_version_rejected(tmp_path):
    src = factory.secondary_capture(tmp_path / "a.dcm", study_date=OLD)
    ds = pydicom.dcmread(src)
    ds.PixelData = bytes(reversed(range(256)))
    changed = tmp_path / "b" / "a.dcm"
    changed.parent.mkdir()
    ds.save_as(changed, enforce_file_format=True)
    cfg = config(tmp_path, extra='[archive]\non_conflict = "replace"\n')
    data = tmp_path / "data"
    hot = tmp_path / "tiers" / "hot"
    study, series, sop = uids(src)
    assert "1 stored" in cli(cfg, data, "import", str(src)).stdout
    res = cli(cfg, data, "import", str(changed))
    assert res.returncode == 0 and "1 replaced" in res.stdout, res.stdout + res.stderr
    kept = {p.read_bytes() for p in blob_files(hot)}
    assert kept == {src.read_bytes(), changed.read_bytes()}  # nothing overwritten, nothing deleted
    listed = cli(cfg, data, "rejected").stdout
    assert f"replaced  version   study {study}  {sop}" in listed, listed

    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        url = f"{srv.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}"

        def served() -> bytes:
            r = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            assert r.status_code == 200
            return r.content

        assert changed.read_bytes() in served()
        res = cli(cfg, data, "restore", "--instance", sop, "--replaced")
        assert res.returncode == 0, res.stderr
        assert wait_for(lambda: src.read_bytes() in served())
        assert len(blob_files(hot)) == 2  # the newer one is kept in its turn
        res = cli(cfg, data, "purge")
        assert res.returncode == 0 and res.stdout.startswith("purged 0 instances of 0 studies and 1 replaced versions")
        assert [p.read_bytes() for p in blob_files(hot)] == [src.read_bytes()]
        assert src.read_bytes() in served()
    finally:
        srv.stop()


KILL_AFTER_FIRST_DELETE = """
import os, signal, sys
sys.argv = ["pathpacs", "purge", "--config", sys.argv[1], "--data", sys.argv[2]]
from storage_tiers.filesystem import FilesystemStore
real = FilesystemStore.delete
def delete(self, key):
    real(self, key)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 midway: one copy deleted, records untouched
FilesystemStore.delete = delete
from archive.cli import main
main()
"""


def test_kill9_during_purge_then_rerun_finishes(stored, tmp_path):
    cfg, data, files, sc, study = stored
    hot, warm = tmp_path / "tiers" / "hot", tmp_path / "tiers" / "warm"
    assert cli(cfg, data, "reject", "--study", study, "--reason", "quality").returncode == 0
    assert len(blob_files(hot)) + len(blob_files(warm)) == 4
    crashed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_DELETE, str(cfg), str(data)],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert crashed.returncode == -9, crashed.stderr
    assert len(blob_files(hot)) + len(blob_files(warm)) == 3  # one copy gone, then the crash

    from archive import config as config_mod
    from archive.access import SYSTEM
    from archive.service import Archive

    c = config_mod.load(cfg)
    c.data_dir = data
    with Archive(c, readonly=True) as arc:
        assert len(arc.index.purges()) == 4  # the intent, recorded first
        # nothing half-deleted is visible, not even to administrators
        assert list(arc.search("IMAGE", [], who=SYSTEM)) == []
    res = cli(cfg, data, "purge")
    assert res.returncode == 0 and res.stdout.startswith("purged 4 instances of 1 studies"), res.stdout + res.stderr
    assert blob_files(hot) == [] and blob_files(warm) == []
    with Archive(c, readonly=True) as arc:
        assert arc.index.purges() == {} and arc.stats().instances == 0 and arc.study(study) is None
    assert "3 stored" in cli(cfg, data, "import", "--quiet", str(tmp_path / "in")).stdout
    with Archive(c, readonly=True) as arc:
        from archive.access import ANONYMOUS

        assert [r.study for r in arc.search("STUDY", [], who=ANONYMOUS)] == [study]
