"""Three pathpacs nodes on loopback over one PostgreSQL index and SeaweedFS (S3) tiers, behind a real
HAProxy (conformance/cluster.py; the node and HAProxy configs are the examples of
docs/deployment.md). One cluster for the module; the tests run in file order on it.

What a user of a cluster relies on: whatever node a request lands on, the answer is the same; two
nodes storing at once never duplicate a patient or study and never overwrite an instance; a
node killed -9 loses nothing it acknowledged; background moves run once; a PostgreSQL restart is
a clean 503 / DIMSE failure, then service again; a revoked token fails everywhere within 10 s.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pynetdicom import AE
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelFind)

import factory
from conformance.cluster import Cluster, start_cluster, wait_until
from conftest import need

WSI = factory.WSI
JPEG = "1.2.840.10008.1.2.4.50"

# A lifecycle rule for the tier test (appended to docs/deployment.md's node.toml), its passes every 6 s.
RULE = """
[[rules]]
from = "hot"
to = "cold"
match = { StudyDescription = "MOVE-ME" }
"""


@pytest.fixture(scope="module")
def cluster(postgres, seaweedfs, tmp_path_factory):
    bucket = seaweedfs.create_bucket(f"cluster-{uuid.uuid4().hex[:10]}")
    cl = start_cluster(tmp_path_factory.mktemp("cluster"), 3, postgres, seaweedfs, bucket, extra_toml=RULE,
                       settings={"rules_every_minutes": "0.1"})
    try:
        yield cl
    finally:
        cl.stop()


@pytest.fixture(scope="module")
def token(cluster) -> str:
    return cluster.token("viewer", "uploader")


def urls(cl: Cluster) -> dict[str, str]:
    """Every node's HTTP address and the balancer's."""
    return {**{n: node.http_url for n, node in zip(cl.names, cl.nodes) if node.proc is not None},
            "lb": cl.http_url}


def dimse_ports(cl: Cluster) -> dict[str, int]:
    return {**{n: node.dicom_port for n, node in zip(cl.names, cl.nodes) if node.proc is not None},
            "lb": cl.dimse_port}


def healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=5).status_code == 200
    except requests.RequestException:  # a node still reconnecting its pool may not answer in time
        return False


def get(url: str, token: str, **params) -> requests.Response:
    return requests.get(url, params=params, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def qido(base: str, token: str, path: str, **params) -> list[dict]:
    r = get(f"{base}/dicomweb/{path}", token, limit="10000", **params)
    assert r.status_code in (200, 204), (r.status_code, r.text[:300])
    return r.json() if r.status_code == 200 else []


def v(doc: dict, tag: str):
    vals = doc.get(tag, {}).get("Value", [])
    return vals[0] if vals else None


def qido_answer(base: str, token: str) -> dict[str, set]:
    """QIDO at every level, reduced to what must be equal everywhere."""
    return {
        "studies": {(v(d, "0020000D"), v(d, "00100020"), v(d, "00201206"), v(d, "00201208"))
                    for d in qido(base, token, "studies", includefield="00201206,00201208")},
        "series": {(v(d, "0020000E"), v(d, "00201209")) for d in qido(base, token, "series")},
        "instances": {v(d, "00080018") for d in qido(base, token, "instances")},
    }


def c_find(port: int, level: str, patient_root: bool = False, **keys) -> list[Dataset]:
    ae = AE(ae_title="TESTSCU")
    model = PatientRootQueryRetrieveInformationModelFind if patient_root else StudyRootQueryRetrieveInformationModelFind
    ae.add_requested_context(model)
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, val in keys.items():
        setattr(ds, k, val)
    assoc = ae.associate("127.0.0.1", port, ae_title="PATHPACS")
    assert assoc.is_established, f"no association with port {port}"
    out = []
    try:
        for status, ident in assoc.send_c_find(ds, model):
            assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
            if status.Status in (0xFF00, 0xFF01):
                out.append(ident)
    finally:
        assoc.release()
    return out


def cfind_answer(port: int, studies: list[str]) -> dict[str, set]:
    ans: dict[str, set] = {"patients": set(), "studies": set(), "series": set(), "instances": set()}
    for p in c_find(port, "PATIENT", patient_root=True, PatientID="", NumberOfPatientRelatedInstances=""):
        ans["patients"].add((p.PatientID, int(p.NumberOfPatientRelatedInstances)))
    for s in c_find(port, "STUDY", StudyInstanceUID="", NumberOfStudyRelatedInstances=""):
        ans["studies"].add((s.StudyInstanceUID, int(s.NumberOfStudyRelatedInstances)))
    for st in studies:
        for s in c_find(port, "SERIES", StudyInstanceUID=st, SeriesInstanceUID="", NumberOfSeriesRelatedInstances=""):
            ans["series"].add((s.SeriesInstanceUID, int(s.NumberOfSeriesRelatedInstances)))
        for i in c_find(port, "IMAGE", StudyInstanceUID=st, SeriesInstanceUID="", SOPInstanceUID=""):
            ans["instances"].add(i.SOPInstanceUID)
    return ans


def dcmsend(port: int, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([need("dcmsend"), "-aec", "PATHPACS", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=300)


def c_store(port: int, datasets: list[Dataset], *, barrier: threading.Barrier | None = None,
            each: bool = False) -> dict[str, int]:
    """C-STORE in one association (each=True: one association per instance); SOP -> status
    (-1: no answer: the association failed)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(WSI, [JPEG])
    ae.dimse_timeout = ae.network_timeout = 30
    ae.acse_timeout = 10
    out: dict[str, int] = {}
    groups = [[ds] for ds in datasets] if each else [datasets]
    if barrier is not None:
        barrier.wait()
    for group in groups:
        assoc = ae.associate("127.0.0.1", port, ae_title="PATHPACS")
        if not assoc.is_established:
            out.update({str(ds.SOPInstanceUID): -1 for ds in group})
            continue
        try:
            for ds in group:
                st = assoc.send_c_store(ds)
                out[str(ds.SOPInstanceUID)] = int(st.Status) if st and "Status" in st else -1
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
    return out


def slide(study: str, series: str, *, sop: str | None = None, patient: str = "P1", seed: int = 0,
          frames: int = 4, **kw) -> Dataset:
    cols = max(1, frames // 2)
    return factory.wsi_instance(study, series, 256 * cols, 256 * 2 if frames > 1 else 256, sop=sop,
                                patient_id=patient, seed=seed, **kw)


def frames_of(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def wado_frames(base: str, token: str, ds: Dataset) -> list[bytes]:
    """Every frame of the instance, one request per frame (bytes as stored)."""
    st, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    out = []
    for n in range(1, int(ds.NumberOfFrames) + 1):
        r = requests.get(f"{base}/dicomweb/studies/{st}/series/{se}/instances/{sop}/frames/{n}",
                         headers={"Authorization": f"Bearer {token}",
                                  "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
                         timeout=30)
        assert r.status_code == 200, (r.status_code, r.text[:200])
        out.append(_first_part(r))
    return out


def _first_part(r: requests.Response) -> bytes:
    ctype = r.headers["Content-Type"]
    bnd = re.search(r'boundary="?([^";]+)"?', ctype).group(1).encode()
    part = r.content.split(b"--" + bnd)[1]
    body = part.split(b"\r\n\r\n", 1)[1]
    return body[: body.rfind(b"\r\n")]


# -- the tests ---------------------------------------------------------------------------------------

def test_healthz_names_each_node_and_the_balancer_spreads_requests(cluster):
    for name, node in zip(cluster.names, cluster.nodes):
        r = requests.get(f"{node.http_url}/healthz", timeout=5)
        assert (r.status_code, r.text.strip()) == (200, name)
    seen = {requests.get(f"{cluster.http_url}/healthz", timeout=5).text.strip() for _ in range(6)}
    assert seen == set(cluster.names)


def test_dcmsend_to_every_node_at_once_and_the_balancer_every_node_answers_the_same(cluster, token, tmp_path):
    targets = {**{n: p.dicom_port for n, p in zip(cluster.names, cluster.nodes)}, "lb": cluster.dimse_port}
    series = {t: factory.wsi_series(tmp_path / t, patient_id=f"PD-{t}", levels=((512, 512), (256, 256)))
              for t in targets}
    results: dict[str, subprocess.CompletedProcess] = {}
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, dcmsend(targets[t], series[t])))
               for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t, res in results.items():
        assert res.returncode == 0, (t, res.stderr[-500:], cluster.logs())
    sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for files in series.values() for p in files}
    studies = [str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for files in series.values()]

    answers = {where: qido_answer(base, token) for where, base in urls(cluster).items()}
    first = answers["n1"]
    assert sops <= first["instances"]
    assert {s[0] for s in first["studies"]} >= set(studies)
    for where, ans in answers.items():
        assert ans == first, f"QIDO through {where} differs from n1"
    finds = {where: cfind_answer(port, studies) for where, port in dimse_ports(cluster).items()}
    for where, ans in finds.items():
        assert ans == finds["n1"], f"C-FIND through {where} differs from n1"
    assert sops <= finds["n1"]["instances"]
    assert {p for p in finds["n1"]["patients"] if p[0].startswith("PD-")} == {(f"PD-{t}", 2) for t in targets}


def test_two_nodes_storing_one_patient_and_study_at_once_make_one_of_each(cluster, token):
    n = 6
    a, b = [], []
    for k in range(n):
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        a.append(slide(study, series, patient=f"PC-{k}", seed=k, frames=1))
        b.append(slide(study, series, patient=f"PC-{k}", seed=100 + k, frames=1, instance_number=2))
    barrier = threading.Barrier(2)
    res: dict[str, dict] = {}
    ts = [threading.Thread(target=lambda: res.__setitem__("a", c_store(cluster.nodes[0].dicom_port, a, barrier=barrier, each=True))),
          threading.Thread(target=lambda: res.__setitem__("b", c_store(cluster.nodes[1].dicom_port, b, barrier=barrier, each=True)))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert set(res["a"].values()) == {0} and set(res["b"].values()) == {0}, (res, cluster.logs())
    for k in range(n):
        for base in urls(cluster).values():
            studies = qido(base, token, "studies", PatientID=f"PC-{k}", includefield="00201206,00201208")
            assert [(v(s, "0020000D"), v(s, "00201206"), v(s, "00201208")) for s in studies] == \
                [(a[k].StudyInstanceUID, 1, 2)]
        pats = c_find(cluster.nodes[2].dicom_port, "PATIENT", patient_root=True, PatientID=f"PC-{k}",
                      NumberOfPatientRelatedStudies="")
        assert [(p.PatientID, int(p.NumberOfPatientRelatedStudies)) for p in pats] == [(f"PC-{k}", 1)]


def test_identical_duplicates_through_two_nodes_are_one_instance(cluster, token):
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    dss = [slide(study, series, patient="PDUP", seed=k, frames=1, instance_number=k + 1) for k in range(5)]
    barrier = threading.Barrier(2)
    res: dict[str, dict] = {}
    ts = [threading.Thread(target=lambda i=i: res.__setitem__(i, c_store(cluster.nodes[i].dicom_port, dss,
                                                                          barrier=barrier, each=True)))
          for i in (0, 2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert set(res[0].values()) == {0} and set(res[2].values()) == {0}, res
    for base in urls(cluster).values():
        got = sorted(v(d, "00080018") for d in qido(base, token, "instances", StudyInstanceUID=study))
        assert got == sorted(str(d.SOPInstanceUID) for d in dss)


def test_different_content_under_one_uid_through_two_nodes_is_refused_on_one(cluster, token):
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    sops = [pydicom.uid.generate_uid() for _ in range(5)]
    va = [slide(study, series, sop=s, patient="PCONF", seed=k, frames=1) for k, s in enumerate(sops)]
    vb = [slide(study, series, sop=s, patient="PCONF", seed=50 + k, frames=1) for k, s in enumerate(sops)]
    barrier = threading.Barrier(2)
    res: dict[str, dict] = {}
    ts = [threading.Thread(target=lambda: res.__setitem__("a", c_store(cluster.nodes[0].dicom_port, va, barrier=barrier, each=True))),
          threading.Thread(target=lambda: res.__setitem__("b", c_store(cluster.nodes[1].dicom_port, vb, barrier=barrier, each=True)))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k, sop in enumerate(sops):
        statuses = sorted([res["a"][sop], res["b"][sop]])
        assert statuses == [0x0000, 0x0111], (sop, [hex(s) for s in statuses])
        winner = va[k] if res["a"][sop] == 0 else vb[k]
        for base in (cluster.nodes[2].http_url, cluster.http_url):
            assert wado_frames(base, token, winner) == frames_of(winner)  # the acknowledged version, never the other


def test_a_tier_rule_runs_once_while_two_nodes_serve_the_moving_study(cluster, token, seaweedfs):
    """Every node's background worker asks for the rules pass (every 6 s here); the cluster lease
    gives each pass to one node: each instance is moved once, reads on two nodes never fail."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    dss = [slide(study, series, patient="PMOVE", seed=200 + k, frames=4, instance_number=k + 1,
                 study_description="MOVE-ME") for k in range(8)]
    expected = {str(d.SOPInstanceUID): frames_of(d) for d in dss}
    errors: list[str] = []
    reads = [0]
    stop = threading.Event()

    def reader(i: int) -> None:
        base = cluster.nodes[i].http_url
        while not stop.is_set():
            for d in dss:
                try:
                    if wado_frames(base, token, d) != expected[str(d.SOPInstanceUID)]:
                        errors.append(f"n{i + 1}: frames of {d.SOPInstanceUID} differ")
                    reads[0] += 1
                except AssertionError as exc:
                    errors.append(f"n{i + 1}: {exc}")

    s3 = seaweedfs.client()

    def on_cold() -> list[str]:
        return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
                    Bucket=cluster.bucket, Prefix=f"{cluster.prefix}cold") for o in page.get("Contents", [])]

    assert set(c_store(cluster.nodes[2].dicom_port, dss).values()) == {0}
    readers = [threading.Thread(target=reader, args=(i,)) for i in (0, 1)]
    for t in readers:
        t.start()
    try:
        wait_until(lambda: len(on_cold()) >= len(dss), timeout=60, interval=0.5, what="the study on cold")
        time.sleep(1)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:5]
    assert reads[0] >= len(dss)
    logs = [node.log() for node in cluster.nodes]
    for sop in expected:
        moves = [n for n, log in zip(cluster.names, logs) if f"moved {sop} from hot to cold" in log]
        assert sum(log.count(f"moved {sop} from hot to cold") for log in logs) == 1, (sop, moves)
    assert len(on_cold()) == len(dss)  # one copy each, no loser's copy left behind
    for base in urls(cluster).values():
        for d in dss:
            assert wado_frames(base, token, d) == expected[str(d.SOPInstanceUID)]


def test_kill_9_of_a_node_mid_ingest_loses_nothing_acknowledged(cluster, token):
    victim = cluster.nodes[1]
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    dss = [slide(study, series, patient="PKILL", seed=300 + k, frames=8, instance_number=k + 1) for k in range(60)]
    tmp = victim.data_dir / "hot" / "tmp"
    sessions_before = {p.name for p in tmp.iterdir()} if tmp.exists() else set()
    assert sessions_before, "the running node has a staging session"
    acked: dict[str, int] = {}

    def send() -> None:  # one association, instance after instance, as a scanner sends
        acked.update(c_store(victim.dicom_port, dss))

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: len(qido(cluster.nodes[0].http_url, token, "instances", StudyInstanceUID=study)) >= 8,
               timeout=60, interval=0.05, what="8 instances stored through n2")
    cluster.kill9(1)
    sender.join(60)
    ok = {sop for sop, st in acked.items() if st == 0}
    assert 8 <= len(ok) < len(dss), f"{len(ok)} acknowledged: the kill did not land mid-ingest"
    # the survivors and the balancer keep serving (HAProxy redispatches from the dead node)
    for _ in range(6):
        for base in (cluster.nodes[0].http_url, cluster.nodes[2].http_url, cluster.http_url):
            assert get(f"{base}/dicomweb/studies", token, StudyInstanceUID=study).status_code == 200
    stored = {v(d, "00080018") for d in qido(cluster.http_url, token, "instances", StudyInstanceUID=study)}
    assert ok <= stored
    by_sop = {str(d.SOPInstanceUID): d for d in dss}
    for sop in stored:  # every stored instance is intact, acknowledged or not
        assert wado_frames(cluster.nodes[2].http_url, token, by_sop[sop]) == frames_of(by_sop[sop])
    res = cluster.cli(0, "verify", "--quiet")
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-1000:]
    # the killed node's staging is swept when it restarts (its dead session: only its own disk)
    cluster.restart(1)
    left = {p.name for p in tmp.iterdir()}
    assert not (left & sessions_before), f"dead staging sessions left: {left & sessions_before}"
    for base in urls(cluster).values():
        assert {v(d, "00080018") for d in qido(base, token, "instances", StudyInstanceUID=study)} == stored


def test_postgresql_restart_under_load_fails_cleanly_then_serves(cluster, token, postgres):
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    stop = threading.Event()
    http: list[tuple[str, int, str]] = []
    started: list[float] = []  # when each request of `http` was sent
    stores: dict[str, int] = {}
    made: dict[str, Dataset] = {}

    def querier() -> None:
        while not stop.is_set():
            for where, base in urls(cluster).items():
                started.append(time.monotonic())
                try:
                    r = get(f"{base}/dicomweb/studies", token, PatientID="PPG")
                    http.append((where, r.status_code, r.text[:200]))
                except requests.RequestException as exc:
                    http.append((where, -1, str(exc)[:200]))
            time.sleep(0.05)

    def storer() -> None:
        k = 0
        while not stop.is_set():
            ds = slide(study, series, patient="PPG", seed=400 + k, frames=1, instance_number=k + 1)
            made[str(ds.SOPInstanceUID)] = ds
            stores.update(c_store(cluster.nodes[k % 3].dicom_port, [ds]))
            k += 1
            time.sleep(0.05)

    threads = [threading.Thread(target=querier), threading.Thread(target=storer)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        t_stop = time.monotonic()
        postgres.stop()
        time.sleep(2)
        with ThreadPoolExecutor(3) as pool:  # the load balancer's check takes every node out meanwhile
            checks = list(pool.map(lambda n: requests.get(f"{n.http_url}/healthz", timeout=15), cluster.nodes))
        for h in checks:
            assert h.status_code == 503 and h.text.strip(), (h.status_code, h.text)
        time.sleep(2)
        t_back = time.monotonic()
        postgres.start()
        # every node's pool reconnects: success again within a few seconds
        wait_until(lambda: all(healthy(n.http_url) for n in cluster.nodes), timeout=30,
                   what="every node healthy again")
        cluster.haproxy.wait_up()
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    during = [h for h, t in zip(http, started) if t_stop <= t < t_back]
    assert any(code == 503 for _, code, _ in during), f"no request noticed the gap: {during[:8]}"
    bad = [(w, c, t) for w, c, t in http if c not in (200, 503)]
    assert not bad, bad[:5]
    assert all(t.strip() for _, c, t in http if c == 503), "a 503 without a reason"
    assert [c for _, c, _ in http[-6:]] == [200] * 6, http[-6:]
    failed = {s for s, st in stores.items() if st != 0}
    assert failed, "no C-STORE fell into the gap"
    assert {stores[s] for s in failed} <= {0xA700, -1}, {hex(stores[s]) for s in failed}  # Out of Resources (the index is unavailable), or no association
    ok = {s for s, st in stores.items() if st == 0}
    stored = {v(d, "00080018") for d in qido(cluster.http_url, token, "instances", StudyInstanceUID=study)}
    assert ok <= stored and not (stored & failed - ok), (len(ok), len(stored), len(failed))
    for sop in stored:
        assert wado_frames(cluster.http_url, token, made[sop]) == frames_of(made[sop])
    studies = qido(cluster.http_url, token, "studies", StudyInstanceUID=study, includefield="00201208")
    assert [v(s, "00201208") for s in studies] == [len(stored)]  # counts agree with what is there


def test_a_token_revoked_on_one_node_fails_on_every_node_within_10_s(cluster):
    tok = cluster.token("viewer", i=2)
    for base in urls(cluster).values():
        assert get(f"{base}/dicomweb/studies", tok, limit="1").status_code == 200
    token_id = re.match(r"pp_([0-9a-f]+)\.", tok).group(1)
    cluster.cli(0, "token", "revoke", token_id, check=True)
    t0 = time.monotonic()
    wait_until(lambda: all(get(f"{node.http_url}/dicomweb/studies", tok, limit="1").status_code == 401
                           for node in cluster.nodes), timeout=10, interval=0.25, what="revoked everywhere")
    assert time.monotonic() - t0 <= 10
    assert get(f"{cluster.http_url}/dicomweb/studies", tok, limit="1").status_code == 401


def test_a_share_link_works_through_any_node(cluster, token):
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds = slide(study, series, patient="PSHARE", seed=500, frames=2)
    assert c_store(cluster.nodes[0].dicom_port, [ds]) == {str(ds.SOPInstanceUID): 0}
    res = cluster.cli(1, "share", "--study", study, "--expires", "1h", check=True)
    link = res.stdout.strip().splitlines()[-1]
    share_token = link.split("#", 1)[1]
    for base in urls(cluster).values():
        assert wado_frames(base, share_token, ds) == frames_of(ds)
        other = get(f"{base}/dicomweb/studies", share_token)
        assert [v(d, "0020000D") for d in other.json()] == [study]  # the link sees its study only
