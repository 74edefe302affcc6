"""Storage tiers on filesystems (hot, warm, an off-site replica): moves that lose nothing, rules,
replicas, repair, availability, index backup and rebuild, capacity — through the CLI and a
running server, as an admin would. (The S3 tier's own tests are in test_tiers_s3.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.encaps import generate_frames

import factory
from conftest import Server, free_port, need, run_cli

TIERS = """
[tiers.hot]
path = "{root}/hot"
[tiers.warm]
path = "{root}/warm"
[tiers.offsite]
path = "{root}/offsite"
availability = "NEARLINE"
price_per_tb_month = 1.0
"""


def config(tmp: Path, extra: str = "") -> Path:
    p = tmp / "tiers.toml"
    p.write_text(TIERS.format(root=tmp / "tiers") + extra)
    return p


def cli(cfg: Path, data: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli(*args, "--config", str(cfg), data=data, **kw)


def frames_of(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp" and "blobs" in p.parts)


@pytest.fixture
def archive(tmp_path):
    files = factory.wsi_series(tmp_path / "in", levels=((512, 512), (256, 256)))
    cfg = config(tmp_path)
    data = tmp_path / "data"
    assert cli(cfg, data, "import", "--quiet", str(tmp_path / "in")).returncode == 0
    return cfg, data, files


def test_move_hot_warm_and_back_serves_identical_bytes(archive, tmp_path):
    cfg, data, files = archive
    study = uids(files[0])[0]
    res = cli(cfg, data, "tier", "move", "--study", study, "--to", "warm")
    assert res.returncode == 0 and "2 instances moved to warm" in res.stdout, res.stdout + res.stderr
    assert len(blob_files(tmp_path / "tiers" / "warm")) == 2 and blob_files(tmp_path / "tiers" / "hot") == []
    status = cli(cfg, data, "tier", "status").stdout
    assert "warm" in status and status.splitlines()[2].split()[3] == "2", status  # 2 instances on warm
    assert cli(cfg, data, "verify", "--quiet").returncode == 0

    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        st, se, sop = uids(files[0])
        u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}"
        for n, want in enumerate(frames_of(files[0]), 1):
            r = requests.get(f"{u}/frames/{n}", headers={"Accept": "image/jpeg"}, timeout=30)
            assert r.status_code == 200 and r.content == want
        r = requests.get(u, headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
        assert r.status_code == 200 and files[0].read_bytes() in r.content
        assert requests.get(f"{srv.dicomweb_url}/studies/{st}/thumbnail", timeout=30).status_code == 200
        # C-GET by getscu from the warm tier: the same bytes
        out = tmp_path / "got"
        out.mkdir()
        res = subprocess.run([need("getscu"), "-aec", srv.aet, "+xy", "-S", "-k", "QueryRetrieveLevel=STUDY",
                              "-k", f"StudyInstanceUID={st}", "-od", str(out), "127.0.0.1", str(srv.dicom_port)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        got = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in out.iterdir()}
        assert got[sop] == pydicom.dcmread(files[0]).PixelData
    finally:
        srv.stop()
    res = cli(cfg, data, "tier", "recall", "--study", study)
    assert res.returncode == 0 and "2 instances moved to hot" in res.stdout
    assert blob_files(tmp_path / "tiers" / "warm") == [] and len(blob_files(tmp_path / "tiers" / "hot")) == 2


@pytest.mark.parametrize("step", ["copied", "verified", "switched"])
def test_kill_9_during_a_move_loses_nothing(archive, tmp_path, step):
    cfg, data, files = archive
    study = uids(files[0])[0]
    res = cli(cfg, data, "tier", "move", "--study", study, "--to", "warm",
              env={**os.environ, "PATHPACS_CRASH_AFTER": step})
    assert res.returncode == -signal.SIGKILL
    # the next start finishes (after the switch) or rolls back (before it)
    assert cli(cfg, data, "verify", "--quiet").returncode == 0
    hot, warm = blob_files(tmp_path / "tiers" / "hot"), blob_files(tmp_path / "tiers" / "warm")
    assert len(hot) + len(warm) == 2, (hot, warm)  # nothing lost, nothing dangling
    if step == "switched":
        assert len(warm) == 1  # the first instance had switched; its source is gone
    else:
        assert len(hot) == 2 and warm == []
    res = cli(cfg, data, "tier", "move", "--study", study, "--to", "warm")
    assert res.returncode == 0 and len(blob_files(tmp_path / "tiers" / "warm")) == 2
    assert cli(cfg, data, "verify", "--quiet").returncode == 0


def test_reads_racing_moves_never_fail(archive, tmp_path):
    """Frames and whole instances read without pause while the study moves back and forth:
    every answer is 200 with the stored bytes (a read racing a switch looks again)."""
    import threading

    cfg, data, files = archive
    st, se, sop = uids(files[0])
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    want = frames_of(files[0])
    whole = files[0].read_bytes()
    errors: list = []
    stop = threading.Event()
    count = [0]

    def reader() -> None:
        s = requests.Session()
        u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}"
        while not stop.is_set():
            n = 1 + count[0] % len(want)
            r = s.get(f"{u}/frames/{n}", headers={"Accept": "image/jpeg"}, timeout=30)
            if r.status_code != 200 or r.content != want[n - 1]:
                errors.append(("frame", n, r.status_code))
            r = s.get(u, headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
            if r.status_code != 200 or whole not in r.content:
                errors.append(("instance", r.status_code))
            count[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for tier in ("warm", "hot", "warm", "hot"):
            res = cli(cfg, data, "tier", "move", "--study", st, "--to", tier)
            assert res.returncode == 0, res.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        srv.stop()
    assert count[0] > 10 and errors == [], errors[:5]
    assert "fixity" not in srv.log()  # no read took a move for damage


def test_rules_replicas_availability_repair(tmp_path):
    files = factory.wsi_series(tmp_path / "in", levels=((512, 512),))
    cfg = config(tmp_path, """
[[rules]]
from = "hot"
to = "warm"
after_days_since_access = 0
match = { Modality = "SM" }

[[replicas]]
tier = "offsite"
of = ["hot", "warm"]
within_minutes = 0.05

[lifecycle]
rules_every_minutes = 0.02
""")
    data = tmp_path / "data"
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        assert subprocess.run([need("dcmsend"), "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port), str(files[0])],
                              capture_output=True, timeout=60).returncode == 0
        st, se, sop = uids(files[0])
        deadline = time.monotonic() + 60

        def placed() -> bool:  # the move switched to warm and the replica is recorded, not just written
            rows = {ln.split()[0]: ln.split() for ln in cli(cfg, data, "tier", "status").stdout.splitlines()[1:]}
            return rows["warm"][3] == "1" and rows["hot"][3] == "0" and rows["offsite"][4] == "1"

        while not placed():
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.3)
        r = requests.get(f"{srv.dicomweb_url}/studies", params={"StudyInstanceUID": st}, timeout=30)
        assert r.json()[0]["00080056"]["Value"] == ["ONLINE"]  # warm is ONLINE; replicas don't count
        # rot the primary (on warm): frames come from the replica meanwhile, verify finds it
        primary = blob_files(tmp_path / "tiers" / "warm")[0]
        raw = bytearray(primary.read_bytes())
        want = frames_of(files[0])
        at = bytes(raw).find(want[0]) + 100
        raw[at] ^= 0xFF
        primary.write_bytes(bytes(raw))
        u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}"
        r = requests.get(f"{u}/frames/1", headers={"Accept": "image/jpeg"}, timeout=30)
        assert r.status_code == 200 and r.content == want[0]
    finally:
        srv.stop()
    res = cli(cfg, data, "verify", "--quiet")
    assert res.returncode == 1 and "sha256 mismatch" in res.stdout and "primary copy" in res.stdout
    res = cli(cfg, data, "repair")
    assert res.returncode == 0 and "repaired 1 copies" in res.stdout, res.stdout + res.stderr
    assert cli(cfg, data, "verify", "--quiet").returncode == 0
    status = cli(cfg, data, "tier", "status").stdout
    assert [line.split()[4] for line in status.splitlines() if line.startswith("offsite")] == ["1"]


def test_apply_dry_run_pin_and_hold(archive, tmp_path):
    cfg, data, files = archive
    cfg.write_text(cfg.read_text() + '\n[[rules]]\nfrom = "hot"\nto = "warm"\nafter_days_since_received = 0\n')
    study = uids(files[0])[0]
    res = cli(cfg, data, "tier", "apply", "--dry-run")
    assert res.returncode == 0 and "would move 2 instances" in res.stdout and study in res.stdout
    assert blob_files(tmp_path / "tiers" / "warm") == []
    assert "pinned" in cli(cfg, data, "tier", "pin", "--study", study).stdout
    assert "would move 0 instances" in cli(cfg, data, "tier", "apply", "--dry-run").stdout
    cli(cfg, data, "tier", "unpin", "--study", study)
    assert "hold" in cli(cfg, data, "tier", "hold", "--study", study).stdout
    res = cli(cfg, data, "tier", "apply")
    assert res.returncode == 0 and "2 instances moved" in res.stdout
    assert len(blob_files(tmp_path / "tiers" / "warm")) == 2
    res = cli(cfg, data, "tier", "pin", "--study", "1.2.3")
    assert res.returncode == 2 and "not found" in res.stderr


def test_index_backup_delete_and_rebuild(archive, tmp_path):
    cfg, data, files = archive
    st, se, sop = uids(files[0])
    assert cli(cfg, data, "tier", "move", "--series", se, "--to", "warm").returncode == 0
    more = factory.wsi_series(tmp_path / "more", levels=((256, 256),), patient_id="P9")
    assert cli(cfg, data, "import", "--quiet", str(more[0])).returncode == 0
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        res = cli(cfg, data, "index", "backup", str(tmp_path / "backup"))  # while the server runs
        assert res.returncode == 0 and (tmp_path / "backup" / "data.mdb").is_file()
        before = _answers(srv)
    finally:
        srv.stop()
    import shutil

    shutil.rmtree(data / "index")
    res = cli(cfg, data, "index", "rebuild")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "index rebuilt: 3 instances (1 on hot, 2 on warm" in res.stdout
    srv = Server(data, free_port(), free_port(), config=cfg).start()
    try:
        after = _answers(srv)
        u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}"
        for n, want in enumerate(frames_of(files[0]), 1):
            r = requests.get(f"{u}/frames/{n}", headers={"Accept": "image/jpeg"}, timeout=30)
            assert r.status_code == 200 and r.content == want
    finally:
        srv.stop()
    assert after == before
    assert cli(cfg, data, "verify", "--quiet").returncode == 0


def _answers(srv: Server) -> dict:
    out = {}
    for q in ("studies", "series", "instances?includefield=all"):
        r = requests.get(f"{srv.dicomweb_url}/{q}", timeout=30)
        docs = json.loads(r.text.replace(srv.dicomweb_url, "BASE"))
        out[q] = sorted(docs, key=lambda d: json.dumps(d, sort_keys=True))
    return out


def test_capacity_and_bad_config(tmp_path):
    cfg = config(tmp_path, """
[[rules]]
from = "hot"
to = "warm"
after_days_since_access = 90
[[replicas]]
tier = "offsite"
of = ["hot", "warm"]
""")
    cfg.write_text(cfg.read_text().replace('[tiers.warm]\npath', '[tiers.warm]\nprice_per_tb_month = 0.5\npath'))
    res = run_cli("capacity", "--config", str(cfg), "--slides-per-day", "4000", "--gb-per-slide", "1.5",
                  "--years", "3", data=tmp_path / "d")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "2,190 TB a year arriving" in lines[0]
    year1 = lines[2].split()
    hot, warm, offsite = (float(x.replace(",", "")) for x in year1[1:4])
    assert abs(hot - 4000 * 1.5 / 1000 * 90) < 1 and abs(warm - 6 * (365 - 90)) < 1  # 540 TB, 1,650 TB
    assert abs(offsite - (hot + warm)) < 1  # the replica holds a copy of both
    for text, where in (('[[rules]]\nfrom = "hot"\nto = "nowhere"\nafter_days_since_access = 1\n', "rules[0].to"),
                        ('[[rules]]\nfrom = "warm"\nto = "hot"\nafter_days_since_access = 1\n'
                         '[[rules]]\nfrom = "hot"\nto = "warm"\nafter_days_since_access = 1\n', "cycle")):
        bad = tmp_path / "bad.toml"
        bad.write_text(TIERS.format(root=tmp_path / "t") + text)
        res = run_cli("stats", "--config", str(bad), data=tmp_path / "d")
        assert res.returncode == 2 and where in res.stderr and res.stderr.count("\n") == 1, res.stderr
