"""Several `pathpacs serve` nodes over one index (archive.cluster): heartbeats and `cluster
status`, leases (contention, a kill -9'd holder taken over after expiry), crash sweeps that
never touch a live node's pending blobs, background passes once across the cluster, frame
reads on one node while another moves the study, token revocation and share links across
nodes, and several nodes' audit trails verified and merged.

Two real servers (n1, n2) share one index (PostgreSQL when the backend is there, else one
LMDB index directory through `[index] path`) and one set of filesystem tiers; each has its
own data directory (staging, audit trail)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
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
from conftest import ROOT, Server, free_port, pathpacs_cmd, run_cli

LEASE = 3.0  # cluster.lease_seconds of every node here: dead after 3 s without a heartbeat
# the shared index: PostgreSQL (the production set-up) unless PATHPACS_TEST_CLUSTER_INDEX=lmdb
# (two nodes of one machine over one LMDB directory, `[index] path`)
HAVE_PG = importlib.util.find_spec("archive.index.postgresql") is not None \
    and os.environ.get("PATHPACS_TEST_CLUSTER_INDEX", "postgresql") == "postgresql"

CONFIG = """
{index}
[cluster]
node = "{node}"
lease_seconds = {lease}
[tiers.hot]
path = "{root}/shared/hot"
[tiers.warm]
path = "{root}/shared/warm"
[auth]
mode = "token"
cache_seconds = 2
[audit]
flush_seconds = 1
[consultation]
public_url = "http://127.0.0.1:{port}"
[lifecycle]
rules_every_minutes = 0.05
[[rules]]
from = "hot"
to = "warm"
match = {{PatientID = "MOVEME"}}
"""


def _index_section(request, root: Path) -> str:
    if HAVE_PG:
        dsn = request.getfixturevalue("postgres").create_database()
        return f'[index]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
    return f'[index]\npath = "{root}/index"\n'


def write_config(site: dict, node: str, port: int = 0) -> Path:
    p = site["root"] / f"{node}.toml"
    p.write_text(CONFIG.format(index=site["index"], node=node, lease=LEASE, root=site["root"], port=port or 1))
    return p


@pytest.fixture(scope="module")
def site(request, tmp_path_factory):
    """Nodes n1 and n2 serving one index and one set of tiers; a study imported through n1."""
    root = tmp_path_factory.mktemp("cluster")
    files = factory.wsi_series(root / "in", levels=((1024, 1024), (512, 512), (256, 256)), tile=256)
    s: dict = {"root": root, "files": files, "index": _index_section(request, root)}
    servers = {}
    for node in ("n1", "n2"):
        port = free_port()
        cfg = write_config(s, node, port)
        s[f"cfg_{node}"], s[f"data_{node}"] = cfg, root / f"data-{node}"
        servers[node] = Server(root / f"data-{node}", free_port(), port, config=cfg)
    try:
        servers["n1"].start()
        servers["n2"].start()
        res = run_cli("import", "--quiet", str(root / "in"), "--config", str(s["cfg_n1"]), data=s["data_n1"])
        assert res.returncode == 0, res.stderr
        made = cli(s, "n1", "token", "create", "--role", "viewer", "--name", "reader")
        assert made.returncode == 0, made.stderr
        hdr = pydicom.dcmread(files[0], stop_before_pixels=True)
        s.update(srv=servers, token=made.stdout.strip(), study=str(hdr.StudyInstanceUID),
                 series=str(hdr.SeriesInstanceUID), sop=str(hdr.SOPInstanceUID))
        yield s
    finally:
        for srv in servers.values():
            srv.stop()


def cli(site: dict, node: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli(*args, "--config", str(site[f"cfg_{node}"]), data=site[f"data_{node}"], **kw)


def status(site: dict, node: str = "n1") -> dict:
    res = cli(site, node, "cluster", "status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def frame_url(site: dict, node: str, n: int = 1) -> str:
    return (f"{site['srv'][node].dicomweb_url}/studies/{site['study']}/series/{site['series']}/instances/"
            f"{site['sop']}/frames/{n}")


def get_frame(site: dict, node: str, token: str, n: int = 1, session=requests) -> requests.Response:
    return session.get(frame_url(site, node, n), headers={"Authorization": f"Bearer {token}",
                                                          "Accept": "image/jpeg"}, timeout=30)


def helper(code: str, *args: str) -> subprocess.Popen:
    """A Python process of this source tree running `code` (the cluster API from another process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)


OPEN_INDEX = """
import sys, time
from pathlib import Path
from archive.config import load
from archive.index import open_index
from archive.cluster import Cluster
cfg = load(Path(sys.argv[1]))
index = open_index(Path(cfg.index_path or "unused"), map_size_gb=cfg.lmdb_map_size_gb, backend=cfg.index_backend,
                   dsn=cfg.index_dsn, pool_size=2)
"""


def open_cluster(site: dict, node: str):
    from archive.cluster import Cluster
    from archive.config import load
    from archive.index import open_index

    cfg = load(site["cfg_n1"])
    index = open_index(Path(cfg.index_path or site["root"] / "unused"), map_size_gb=cfg.lmdb_map_size_gb,
                       backend=cfg.index_backend, dsn=cfg.index_dsn, pool_size=2)
    return index, Cluster(index, node, LEASE)


# -- heartbeats and status ---------------------------------------------------------------------

def test_every_node_heartbeats_and_cluster_status_lists_them(site):
    st = status(site, "n2")
    nodes = {n["node"]: n for n in st["nodes"]}
    assert st["this_node"] == "n2"
    assert nodes["n1"]["alive"] and nodes["n2"]["alive"]
    assert nodes["n1"]["http_port"] == site["srv"]["n1"].http_port
    assert nodes["n2"]["dicom_port"] == site["srv"]["n2"].dicom_port
    assert nodes["n1"]["pid"] == site["srv"]["n1"].proc.pid
    seen = nodes["n1"]["seen"]
    time.sleep(LEASE)  # refreshed every lease_seconds / 3
    assert {n["node"]: n for n in status(site)["nodes"]}["n1"]["seen"] > seen
    text = cli(site, "n1", "cluster", "status")
    assert text.returncode == 0 and "node n1" in text.stdout and "alive" in text.stdout, text.stdout
    # both nodes see the same archive: one QIDO answer everywhere
    h = {"Authorization": f"Bearer {site['token']}"}
    answers = [requests.get(f"{site['srv'][n].dicomweb_url}/studies/{site['study']}/instances", headers=h,
                            timeout=10).json() for n in ("n1", "n2")]
    sops = [sorted(x["00080018"]["Value"][0] for x in a) for a in answers]  # (retrieve URLs name each node)
    assert len(sops[0]) == len(site["files"]) and sops[0] == sops[1]


def test_cluster_status_without_an_archive_is_one_line_and_index_path_is_relative_to_the_config(tmp_path):
    res = run_cli("cluster", "status", data=tmp_path / "none")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no archive" in res.stderr, res.stderr
    from archive.config import load

    (tmp_path / "c.toml").write_text('[index]\npath = "shared/index"\n[cluster]\nnode = "x1"\n')
    cfg = load(tmp_path / "c.toml")
    assert cfg.index_path == tmp_path / "shared" / "index" and cfg.node() == "x1"


def test_sweep_rule_own_dead_sessions_and_long_dead_nodes_only(site):
    """Cluster.may_remove, the rule of the crash sweep and of move recovery."""
    from archive.cluster import parse_session, session_tag

    index, me = open_cluster(site, "u1")
    try:
        now = time.time()
        assert parse_session(session_tag("u1", "abc", now)) == ("u1", "abc", int(now))
        assert parse_session("abc") == (None, "abc", None)  # an entry from before clusters
        dead_local, live_local = (lambda s: False), (lambda s: True)
        assert me.may_remove("abc", dead_local) and not me.may_remove("abc", live_local)
        assert me.may_remove(session_tag("u1", "abc"), dead_local)
        assert not me.may_remove(session_tag("u1", "abc"), live_local)
        old = session_tag("u2", "s", now - 10 * LEASE)
        index.put_record("nodes", "u2", {"seen": now})  # u2 alive: never, however old the entry
        assert not me.may_remove(old, dead_local)
        index.put_record("nodes", "u2", {"seen": now - 1.5 * LEASE})  # dead, but not for a lease yet
        assert not me.may_remove(old, dead_local)
        index.put_record("nodes", "u2", {"seen": now - 3 * LEASE})  # dead for more than a lease
        assert me.may_remove(old, dead_local)
        assert not me.may_remove(session_tag("u2", "s", now), dead_local)  # the entry is younger than a lease
        index.delete_record("nodes", "u2")  # no heartbeat at all: dead
        assert me.may_remove(old, dead_local)
    finally:
        index.close()


# -- leases ------------------------------------------------------------------------------------

CONTEND = OPEN_INDEX + """
cl = Cluster(index, sys.argv[2], float(sys.argv[4]))
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
print("won" if cl.leases.acquire("test.contend", float(sys.argv[4])) else "lost", flush=True)
time.sleep(60)
"""


def test_two_processes_contend_one_wins_and_a_killed_holder_is_taken_over(site):
    at = time.time() + 2.0
    procs = [helper(CONTEND, str(site["cfg_n1"]), node, str(at), "3") for node in ("c1", "c2")]
    try:
        said = [p.stdout.readline().strip() for p in procs]
        assert sorted(said) == ["lost", "won"], (said, [p.stderr.read() for p in procs if p.poll() is not None])
        winner = procs[said.index("won")]
        index, me = open_cluster(site, "c3")
        try:
            assert not me.leases.acquire("test.contend", 3)  # held, in time
            held = dict(me.leases.held())
            assert held["test.contend"]["owner"].startswith("c1:" if said[0] == "won" else "c2:")
            winner.kill()
            winner.wait()
            t0 = time.monotonic()
            # another node's holder: no heartbeat to judge by, so its lease runs out first
            assert not me.leases.acquire("test.contend", 3)
            while not me.leases.acquire("test.contend", 3):
                assert time.monotonic() - t0 < 5, "a dead holder's lease was never taken over"
                time.sleep(0.1)
            assert time.monotonic() - t0 > 0.5  # not before its time ran out
            assert dict(me.leases.held())["test.contend"]["owner"] == me.owner
            me.leases.release("test.contend")
            assert "test.contend" not in dict(me.leases.held())
            # a holder of this node that is gone is taken over at once (its pid is checked)
            same = helper(CONTEND, str(site["cfg_n1"]), "c3", "0", "30")
            assert same.stdout.readline().strip() == "won"
            assert not me.leases.acquire("test.contend", 3)
            same.kill()
            same.wait()
            assert me.leases.acquire("test.contend", 3)
            me.leases.release("test.contend")
        finally:
            index.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()


# -- background passes once across the cluster --------------------------------------------------

def test_a_background_pass_runs_on_exactly_one_of_two_nodes(site):
    line = "lifecycle pass (scheduled copy checks) on node"
    srv = site["srv"]
    deadline = time.monotonic() + 20
    while not any(line in s.log() for s in srv.values()):
        assert time.monotonic() < deadline, "no node ran the pass"
        time.sleep(0.5)
    time.sleep(2 * LEASE)  # the other node asked again meanwhile (every lease_seconds)
    counts = {n: s.log().count(line) for n, s in srv.items()}
    assert sorted(counts.values()) == [0, 1], counts
    # the pass is recorded as done (by whom), so no node runs it again within its period
    index, me = open_cluster(site, "probe")
    try:
        rec = index.record("leases", "lifecycle.fixity")
        ran = next(n for n, c in counts.items() if c)
        assert rec is not None and rec["by"].startswith(f"{ran}:") and rec["owner"] == ""
    finally:
        index.close()


# -- caches are caches: frames on one node while another moves the study -------------------------

def test_frame_reads_on_one_node_while_another_moves_the_study_never_fail(site):
    ds = pydicom.dcmread(site["files"][0])
    want = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    errors: list = []
    count = [0]
    stop = threading.Event()

    def reader() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                n = 1 + count[0] % len(want)
                r = get_frame(site, "n1", site["token"], n, s)
                if r.status_code != 200 or r.content != want[n - 1]:
                    errors.append((n, r.status_code, r.text[:200]))
                count[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for tier in ("warm", "hot", "warm", "hot"):
            res = cli(site, "n2", "tier", "move", "--study", site["study"], "--to", tier)  # node n2 moves
            assert res.returncode == 0 and "moved" in res.stdout, res.stdout + res.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert count[0] > 20 and errors == [], (count, errors[:5])
    assert "fixity" not in site["srv"]["n1"].log()  # no read took the move for damage


def test_two_nodes_moving_one_study_at_once_take_turns(site):
    """`tier move` on two nodes at once: the second waits for the first's lease ("lifecycle.rules"),
    so every instance is moved once, nothing fails, and the study ends on one tier."""
    n = len(site["files"])
    procs = [subprocess.Popen(pathpacs_cmd() + ["tier", "move", "--study", site["study"], "--to", "warm",
                                                "--config", str(site[f"cfg_{node}"]), "--data", str(site[f"data_{node}"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for node in ("n1", "n2")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    moved = [int(re.search(r"(\d+) instances moved", out).group(1)) for out, _ in outs]
    assert sorted(moved) == [0, n], outs  # one node moved them all, the other found them there
    assert all("not moved" not in err for _, err in outs), outs
    back = cli(site, "n1", "tier", "move", "--study", site["study"], "--to", "hot")
    assert back.returncode == 0, back.stderr


def test_a_tier_rule_moves_a_study_once_while_both_nodes_serve_its_frames(site):
    """The rule pass runs under a cluster lease on one node; frames of the moving study are
    served by both nodes throughout, byte-identical."""
    root = site["root"]
    files = factory.wsi_series(root / "in-move", levels=((1024, 1024), (512, 512)), tile=256, patient_id="MOVEME")
    ds = pydicom.dcmread(files[0])
    want = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    errors: list = []
    count = [0]
    stop = threading.Event()

    def reader(node: str) -> None:
        url = f"{site['srv'][node].dicomweb_url}/studies/{study}/series/{series}/instances/{sop}/frames/"
        with requests.Session() as s:
            while not stop.is_set():
                n = 1 + count[0] % len(want)
                r = s.get(f"{url}{n}", headers={"Authorization": f"Bearer {site['token']}", "Accept": "image/jpeg"},
                          timeout=30)
                if r.status_code != 200 or r.content != want[n - 1]:
                    errors.append((node, n, r.status_code, r.text[:200]))
                count[0] += 1

    res = run_cli("import", "--quiet", str(root / "in-move"), "--config", str(site["cfg_n1"]), data=site["data_n1"])
    assert res.returncode == 0, res.stderr
    threads = [threading.Thread(target=reader, args=(n,)) for n in ("n1", "n2", "n1", "n2")]
    for t in threads:
        t.start()
    index, _ = open_cluster(site, "probe")
    try:
        deadline = time.monotonic() + 30
        while any(index.instance(x).blob.tier != "warm" for x in sops):
            assert time.monotonic() < deadline, "the rule never moved the study"
            time.sleep(0.2)
        time.sleep(1)  # reads after the move, from the new tier
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        index.close()
    assert count[0] > 20 and errors == [], (count, errors[:5])
    trails = [a for n in ("n1", "n2") for a in ("--trail", str(site[f"data_{n}"] / "audit"))]
    deadline = time.monotonic() + 10
    while True:
        out = cli(site, "n1", "audit", "--event", "moved", "--study", study, "--format", "json", *trails)
        moved = [json.loads(x) for x in out.stdout.splitlines()]
        if sum(m["detail"]["instances"] for m in moved) >= len(sops) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sum(m["detail"]["instances"] for m in moved) == len(sops), moved
    assert len({m["node"] for m in moved}) == 1  # one node ran the pass that moved it


# -- crash sweeps: a node's pending blobs are its own ----------------------------------------------

PLACE = """
import sys, time, uuid
from pathlib import Path
from archive.config import load
from archive.records import BlobRef
from archive.service import Archive
cfg = load(Path(sys.argv[1]))
cfg.data_dir = Path(sys.argv[2])
arc = Archive(cfg)
if sys.argv[3] == "place":
    arc.cluster.nodes.start()
    spool = arc.spool()
    spool.write(b"uncommitted " * 1000)
    done = spool.finish()
    blob = BlobRef(arc.ingest_tier.name, uuid.uuid4().hex)
    arc.index.add_pending(blob, arc.pending_session())  # as ingest does, before the put
    arc.ingest_tier.put_file(done.path, blob.key, owned=True)
    print(blob.key, flush=True)
    time.sleep(300)
arc.close()
"""


def blob_exists(site: dict, key: str) -> bool:
    return any((site["root"] / "shared" / "hot").rglob(key))


def pending_keys(site: dict) -> set[str]:
    index, _ = open_cluster(site, "probe")
    try:
        return {b.key for b, _s in index.pending()}
    finally:
        index.close()


def test_a_live_nodes_pending_blob_survives_another_nodes_sweep(site):
    root = site["root"]
    cfg_a = write_config(site, "na")
    data_a = root / "data-na"
    a = helper(PLACE, str(cfg_a), str(data_a), "place")
    try:
        key = a.stdout.readline().strip()
        assert key and blob_exists(site, key), a.stderr.read() if a.poll() is not None else key
        time.sleep(LEASE + 0.5)  # the entry is older than a lease; na is alive (its heartbeat is fresh)
        b = site["srv"]["n2"]
        b.stop()  # a clean stop: n2's heartbeat goes at once
        assert "n2" not in {n["node"] for n in status(site)["nodes"]}
        b.start()  # n2's start-up sweep
        assert blob_exists(site, key) and key in pending_keys(site)
        assert "n2" in {n["node"] for n in status(site)["nodes"] if n["alive"]}
        a.kill()  # kill -9: na's staging session is dead, its heartbeat stops
        a.wait()
        # na restarts: its own dead session's leftover goes
        res = helper(PLACE, str(cfg_a), str(data_a), "open")
        assert res.wait(60) == 0, res.stderr.read()
        assert not blob_exists(site, key) and key not in pending_keys(site)
    finally:
        a.kill()
        a.wait()


def test_a_dead_nodes_pending_blob_is_swept_by_another_node_after_its_lease(site):
    root = site["root"]
    cfg_d = write_config(site, "nd")
    a = helper(PLACE, str(cfg_d), str(root / "data-nd"), "place")
    key = a.stdout.readline().strip()
    assert key and blob_exists(site, key)
    a.kill()
    a.wait()
    t0 = time.monotonic()
    assert cli(site, "n2", "tier", "status").returncode == 0  # n2 opens the archive (and sweeps)
    if time.monotonic() - t0 < 2 * LEASE:  # (so it swept before nd was dead for a lease: a slow start may not)
        assert blob_exists(site, key)
    time.sleep(2 * LEASE + 1)  # nd's heartbeat expired more than a lease ago; the entry is older than one
    assert cli(site, "n2", "tier", "status").returncode == 0
    assert not blob_exists(site, key) and key not in pending_keys(site)
    assert {n["node"]: n["alive"] for n in status(site)["nodes"]}["nd"] is False


# -- security across nodes ------------------------------------------------------------------------

def test_a_token_revoked_through_one_node_is_refused_by_the_other_within_10_s(site):
    made = cli(site, "n1", "token", "create", "--role", "viewer", "--name", "to revoke")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert get_frame(site, "n2", token).status_code == 200
    assert get_frame(site, "n1", token).status_code == 200
    assert cli(site, "n1", "token", "revoke", token[3:19]).returncode == 0  # through node n1
    t0 = time.monotonic()
    while (code := get_frame(site, "n2", token).status_code) != 401:
        assert code == 200, code
        assert time.monotonic() - t0 < 10, "node n2 still accepts a token revoked through n1"
        time.sleep(0.25)
    assert get_frame(site, "n1", token).status_code == 401


def test_a_share_link_created_on_one_node_opens_through_the_other(site):
    res = cli(site, "n1", "share", "--json", "--study", site["study"], "--expires", "1h")
    assert res.returncode == 0, res.stderr
    token = json.loads(res.stdout)["url"].split("#", 1)[1]
    r = get_frame(site, "n2", token)
    assert r.status_code == 200 and len(r.content) > 100
    me = requests.get(f"{site['srv']['n2'].http_url}/api/whoami", headers={"Authorization": f"Bearer {token}"},
                      timeout=10).json()
    assert me["studies"] == [site["study"]]
    assert requests.get(f"{site['srv']['n2'].http_url}/share", timeout=10).status_code == 200


# -- audit: one trail per node, verified each, listed merged ----------------------------------------

def test_audit_trails_of_two_nodes_verify_each_and_list_merged_in_time_order(site, tmp_path):
    time.sleep(1.5)  # the aggregated reads of the tests above reach the trails
    trails = [site["data_n1"] / "audit", site["data_n2"] / "audit"]
    args = [a for t in trails for a in ("--trail", str(t))]
    res = cli(site, "n1", "audit", "verify", *args)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all("chain intact" in x for x in lines) and str(trails[1]) in lines[1], lines
    listed = cli(site, "n1", "audit", "--format", "json", *args)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(x) for x in listed.stdout.splitlines()]
    assert {r["node"] for r in rows} == {"n1", "n2"}
    from archive.audit import Trail

    when = {(r.node, r.seq): r.time for t in trails for r in Trail(t).records()}
    times = [when[(r["node"], r["seq"])] for r in rows if (r["node"], r["seq"]) in when]
    assert len(times) >= len(rows) - 1 and times == sorted(times)  # (the last: this command's own record)
    table = cli(site, "n1", "audit", "--event", "retrieved", *args)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[0] == "node", table.stdout[:300]
    # a broken copy of n2's trail is named; n1's still verifies
    broken = tmp_path / "n2-audit"
    shutil.copytree(trails[1], broken)
    seg = sorted(broken.glob("trail-*.jsonl"))[0]
    text = seg.read_text().splitlines()
    text[0] = text[0].replace('"n2"', '"n9"')
    seg.write_text("\n".join(text) + "\n")
    res = cli(site, "n1", "audit", "verify", "--trail", str(trails[0]), "--trail", str(broken))
    assert res.returncode == 1 and "chain intact" in res.stdout and f"audit trail {broken}" in res.stderr, \
        res.stdout + res.stderr


def test_consultation_lease_owners_are_named_by_node_not_host(site, tmp_path):
    """Nodes of one machine share a host name: a consultation job's lease owner names the node,
    and only this node's owners are judged by their pid."""
    from archive.config import load
    from archive.consult.jobs import _alive
    from archive.service import Archive

    cfg = load(site["cfg_n1"])
    cfg.data_dir = tmp_path / "data"
    with Archive(cfg) as arc:
        assert arc.consultations.owner.startswith(f"n1:{os.getpid()}:")
        assert arc.cluster.owner.startswith(f"n1:{os.getpid()}:")

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert _alive(f"n9:{dead.pid}:abc", "n1")  # another node's: alive until its lease runs out
    assert not _alive(f"n1:{dead.pid}:abc", "n1")  # this node's process is gone: taken over at once
    assert _alive(f"n1:{os.getpid()}:abc", "n1")
