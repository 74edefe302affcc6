"""The PostgreSQL index under what an embedded index never sees: several processes writing one
database at once, the database going away and coming back, and caches of other processes.

Writers are separate Python processes (each its own PostgresIndex and pool), started together
on a barrier file; the database is the session's real PostgreSQL (conftest `pg_dsn`), or a
server of its own for the restart test.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

from archive.index.postgresql import PostgresIndex, schema_exists
from archive.records import BlobRef
from archive.status import Outcome, Unavailable
from conformance.bench import peers
from test_index_contract import new

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from archive.index.postgresql import PostgresIndex
    from test_index_contract import new
    dsn, me, job, barrier = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    index = PostgresIndex(dsn, pool_size=2)
    while not os.path.exists(barrier):
        time.sleep(0.005)
    out = {{}}
    if job == "store":
        for i in range(40):
            # even: the same bytes in every process; odd: each process its own bytes
            sha = "a" * 64 if i % 2 == 0 else me * 64
            n = new(f"1.20.{{i}}", study=f"9.{{i % 3}}", series=f"9.{{i % 3}}.{{i % 2}}", pid="PX", sha=sha,
                    size=10 + i, blob=f"blob-{{me}}-{{i}}")
            out[n.record.sop] = index.add_instance(n, replace=False).outcome.name
        for i in range(10):  # each process its own instances in the shared series
            n = new(f"1.21.{{me}}.{{i}}", study="9.0", series="9.0.0", pid="PX", size=5, blob=f"own-{{me}}-{{i}}")
            out[n.record.sop] = index.add_instance(n, replace=False).outcome.name
    elif job == "count":
        for _ in range(50):
            index.update_record("leases", "counter", lambda r: {{"n": (r or {{"n": 0}})["n"] + 1, "by": me}})
    elif job == "move":  # the instances 1.22.* (stored beforehand) hot -> cold, beside the writers
        from archive.records import BlobRef
        for i in range(30):
            out[str(i)] = index.move_switch(f"1.22.{{i}}", BlobRef("hot", f"b-{{i}}"), BlobRef("cold", f"c-{{i}}"))
    elif job == "open":
        out["ok"] = True
    elif job == "bulk":  # add_instances batches: UIDs shared by every bulk process, and its own
        for b in range(4):
            batch = [new(f"1.30.{{i}}", study=f"9.{{i % 3}}", series=f"9.{{i % 3}}.{{i % 2}}", pid="PX", size=10 + i,
                         blob=f"bulk-{{me}}-{{i}}") for i in range(15 * b, 15 * b + 15)]
            batch += [new(f"1.31.{{me}}.{{b}}.{{i}}", study=f"8.{{i % 2}}", series=f"8.{{i % 2}}.{{me}}", pid=f"Q{{i % 2}}",
                          size=3, blob=f"own-{{me}}-{{b}}-{{i}}") for i in range(5)]
            out[str(b)] = index.add_instances(batch)
    elif job == "single":  # add_instance one by one into the families the bulk loads write
        for i in range(60):
            n = new(f"1.32.{{i}}", study=f"{{8 + i % 2}}.{{i % 4}}", series=f"{{8 + i % 2}}.{{i % 4}}.{{i % 3}}",
                    pid="PX" if i % 2 else "Q0", size=7, blob=f"single-{{i}}")  # each study one patient, as bulk's
            out[n.record.sop] = index.add_instance(n, replace=False).outcome.name
    index.close()
    print(json.dumps(out))
""").format(root=str(ROOT), tests=str(TESTS))


def run_workers(dsn: str, job: str, n: int, tmp_path: Path, jobs: list[str] | None = None) -> list[dict]:
    """n processes doing `job` (or one process per entry of `jobs`) at once on `dsn`; their JSON answers."""
    barrier = tmp_path / f"go-{job}"
    jobs = jobs or [job] * n
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, dsn, str(i + 1), j, str(barrier)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, j in enumerate(jobs)]
    time.sleep(1.5 if job != "open" else 0.0)  # every process has opened its pool (the schema exists)
    barrier.touch()
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def rows(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def test_concurrent_writers_never_duplicate_and_count_exactly(pg_dsn, tmp_path):
    PostgresIndex(pg_dsn).close()  # the schema, made once
    outs = run_workers(pg_dsn, "store", 3, tmp_path)
    for i in range(40):
        got = sorted(o[f"1.20.{i}"] for o in outs)
        expected = ["DUPLICATE", "DUPLICATE", "STORED"] if i % 2 == 0 else ["REJECTED", "REJECTED", "STORED"]
        assert got == expected, (i, got)
    for me in ("1", "2", "3"):
        assert all(outs[int(me) - 1][f"1.21.{me}.{i}"] == "STORED" for i in range(10))
    index = PostgresIndex(pg_dsn)
    try:
        assert rows(pg_dsn, "SELECT count(*) FROM patients") == [(1,)]
        assert rows(pg_dsn, "SELECT uid FROM studies ORDER BY uid") == [("9.0",), ("9.1",), ("9.2",)]
        assert rows(pg_dsn, "SELECT count(*) FROM series") == [(6,)]
        assert rows(pg_dsn, "SELECT count(*) FROM instances") == [(70,)]
        assert index.patient("PX^").n_studies == 3
        for k in range(3):
            sops = [i for i in range(40) if i % 3 == k]
            st = index.study(f"9.{k}")
            extra = 30 if k == 0 else 0
            assert st.n_instances == len(sops) + extra and st.tiers == {"hot": len(sops) + extra}
            assert st.bytes == sum(10 + i for i in sops) + (150 if k == 0 else 0) and st.n_series == 2
            assert sum(se.n_instances for se in index.series_of_study(f"9.{k}")) == st.n_instances
        # the stored odd instances keep the bytes of the process that won, never a mix
        for i in range(1, 40, 2):
            rec = index.instance(f"1.20.{i}")
            winner = [o for o in outs if o[f"1.20.{i}"] == "STORED"][0]
            assert rec.sha256 == str(outs.index(winner) + 1) * 64
            assert rec.blob.key == f"blob-{outs.index(winner) + 1}-{i}"
        stats = index.stats()
        assert (stats.patients, stats.studies, stats.series, stats.instances) == (1, 3, 6, 70)
    finally:
        index.close()


def test_tier_counts_exact_while_moves_and_stores_race(pg_dsn, tmp_path):
    index = PostgresIndex(pg_dsn)
    try:
        index.add_instances(new(f"1.22.{i}", study="9.0", series="9.0.0", pid="PX", blob=f"b-{i}") for i in range(30))
        outs = run_workers(pg_dsn, "race", 0, tmp_path, jobs=["move", "store", "store"])
        assert all(outs[0][str(i)] for i in range(30))
        for uid in ("9.0", "9.1", "9.2"):
            st = index.study(uid)
            on = {}
            for se in index.series_of_study(uid):
                for rec in index.instances_of_series(se.uid):
                    on[rec.blob.tier] = on.get(rec.blob.tier, 0) + 1
                assert sum(se.tiers.values()) == se.n_instances
            assert st.tiers == on and sum(on.values()) == st.n_instances
        assert index.study("9.0").tiers["cold"] == 30
    finally:
        index.close()


def test_bulk_loads_beside_single_adds_count_exactly(pg_dsn, tmp_path):
    """Two processes bulk-loading (add_instances) and one adding instances one by one, into the
    same studies, series and patients: every UID added once, every parent record's counts equal
    to what its rows hold (nothing duplicated, nothing lost)."""
    PostgresIndex(pg_dsn).close()
    outs = run_workers(pg_dsn, "mixed", 0, tmp_path, jobs=["bulk", "bulk", "single"])
    assert sum(outs[0][str(b)] + outs[1][str(b)] for b in range(4)) == 60 + 2 * 20
    assert all(outs[2][f"1.32.{i}"] == "STORED" for i in range(60))
    assert rows(pg_dsn, "SELECT count(*) FROM instances") == [(160,)]
    assert rows(pg_dsn, """SELECT s.uid FROM studies s LEFT JOIN (SELECT study, count(*) n, sum(size) b
        FROM instances GROUP BY study) i ON i.study = s.uid LEFT JOIN (SELECT study, count(*) n FROM series
        GROUP BY study) se ON se.study = s.uid WHERE (s.rec->>'n_instances')::int IS DISTINCT FROM i.n
        OR (s.rec->>'bytes')::bigint IS DISTINCT FROM i.b OR (s.rec->>'n_series')::int IS DISTINCT FROM se.n
        OR (s.rec->'tiers'->>'hot')::int IS DISTINCT FROM i.n""") == []
    assert rows(pg_dsn, """SELECT s.uid FROM series s LEFT JOIN (SELECT series, count(*) n, sum(size) b
        FROM instances GROUP BY series) i ON i.series = s.uid WHERE (s.rec->>'n_instances')::int IS DISTINCT FROM i.n
        OR (s.rec->>'bytes')::bigint IS DISTINCT FROM i.b""") == []
    assert rows(pg_dsn, """SELECT p.key FROM patients p LEFT JOIN (SELECT patient, count(*) n FROM studies
        GROUP BY patient) s ON s.patient = p.key WHERE (p.rec->>'n_studies')::int IS DISTINCT FROM s.n""") == []
    assert rows(pg_dsn, "SELECT uid FROM studies ORDER BY uid") == [(u,) for u in ("8.0", "8.1", "8.2", "9.0", "9.1", "9.2", "9.3")]
    assert rows(pg_dsn, "SELECT count(*) FROM blobs") == [(160,)]


def test_update_record_is_atomic_across_processes(pg_dsn, tmp_path):
    PostgresIndex(pg_dsn).close()
    run_workers(pg_dsn, "count", 4, tmp_path)
    index = PostgresIndex(pg_dsn)
    try:
        assert index.record("leases", "counter")["n"] == 200
    finally:
        index.close()


def test_schema_made_once_when_several_processes_open_a_fresh_database(pg_dsn, tmp_path):
    assert not schema_exists(pg_dsn)
    outs = run_workers(pg_dsn, "open", 5, tmp_path)
    assert outs == [{"ok": True}] * 5
    assert schema_exists(pg_dsn)
    assert rows(pg_dsn, "SELECT version FROM pathpacs_schema") == [(1,)]
    PostgresIndex(pg_dsn).close()  # opening again changes nothing
    assert rows(pg_dsn, "SELECT version FROM pathpacs_schema") == [(1,)]


def test_readonly_open_needs_a_schema(pg_dsn):
    with pytest.raises(Unavailable, match="no pathpacs schema"):
        PostgresIndex(pg_dsn, readonly=True)
    PostgresIndex(pg_dsn).close()
    ro = PostgresIndex(pg_dsn, readonly=True)
    try:
        assert ro.readonly and ro.instance("x") is None and ro.stats().instances == 0
        with pytest.raises(Exception):
            ro.put_record("nodes", "n1", {})  # a read-only session refuses writes
    finally:
        ro.close()


def test_frames_cache_dropped_on_forget_and_on_replace(pg_dsn):
    a, b = PostgresIndex(pg_dsn), PostgresIndex(pg_dsn)
    try:
        a.add_instance(new("1.30.1", sha="a" * 64, blob="first"), replace=False)
        assert b.frames("1.30.1", [1]).table.blob == BlobRef("hot", "first")  # b caches it
        assert a.move_switch("1.30.1", BlobRef("hot", "first"), BlobRef("cold", "moved"))
        assert b.frames("1.30.1", [1]).table.blob == BlobRef("hot", "first")  # still cached in b
        b.forget("1.30.1")  # what the Archive does when the blob is gone
        assert b.frames("1.30.1", [1]).table.blob == BlobRef("cold", "moved")
        assert a.add_instance(new("1.30.1", sha="b" * 64, blob="second", frames=((1, 2),)),
                              replace=True).outcome is Outcome.REPLACED
        deadline = time.monotonic() + 3
        while b.frames("1.30.1", [1]).table.blob != BlobRef("hot", "second"):  # the generation moved
            assert time.monotonic() < deadline, "b still serves the replaced location"
            time.sleep(0.05)
        assert b.frames("1.30.1", [1, 2]).fragments == [[(1, 2)], None]
    finally:
        a.close()
        b.close()


def test_unreachable_database_is_unavailable_quickly():
    t = time.monotonic()
    with pytest.raises(Unavailable, match="index database unavailable"):
        PostgresIndex(f"host=127.0.0.1 port={peers.free_port()} user=pathpacs dbname=x connect_timeout=2")
    assert time.monotonic() - t < 10


@pytest.fixture
def own_postgres():
    pg = peers.start_postgres(durable=False)
    yield pg
    pg.remove()


def test_database_stopped_then_back(own_postgres):
    pg = own_postgres
    dsn = pg.create_database()
    index = PostgresIndex(dsn, pool_size=3)
    try:
        index.add_instance(new("1.40.1"), replace=False)
        index.put_record("leases", "job", {"owner": "n1"})

        def change(rec):  # the connection is cut while this transaction is open
            with psycopg.connect(pg.dsn(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                              "OR datname = %s", (dsn.split("dbname=")[1].split()[0],))
            return {"owner": "n2"}

        with pytest.raises(Unavailable, match="index database unavailable"):
            index.update_record("leases", "job", change)
        assert index.record("leases", "job") == {"owner": "n1"}  # nothing half-written; the pool reconnected

        pg.stop()
        for call in (lambda: index.instance("1.40.1"), lambda: index.add_instance(new("1.40.2"), replace=False),
                     lambda: index.frames("1.40.9", [1])):
            t = time.monotonic()
            with pytest.raises(Unavailable, match="index database unavailable"):
                call()
            assert time.monotonic() - t < 10
        pg.start()
        assert index.instance("1.40.1") is not None
        assert index.instance("1.40.2") is None and index.study("1.2.1").n_instances == 1
        assert index.add_instance(new("1.40.2"), replace=False).outcome is Outcome.STORED
        assert index.study("1.2.1").n_instances == 2
    finally:
        index.close()


def test_serve_with_a_postgresql_index(pg_dsn, make_server, wsi_files, tmp_path):
    """`pathpacs serve` with [index] backend = "postgresql": C-STORE by dcmsend, QIDO finds the
    study, WADO frames are the stored bytes, and the CLI reads the same index."""
    import pydicom
    import requests
    from pydicom.encaps import generate_frames

    from conftest import need, run_cli

    config = f'[index]\nbackend = "postgresql"\ndsn = "{pg_dsn}"\npool_size = 4\n\n[cluster]\nnode = "n1"\n'
    srv = make_server(config_text=config)
    res = subprocess.run([need("dcmsend"), "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port), *map(str, wsi_files)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    ds = pydicom.dcmread(wsi_files[0])
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    found = requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": ds.PatientID}, timeout=30)
    assert found.status_code == 200 and [s["0020000D"]["Value"][0] for s in found.json()] == [study]
    expected = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    got = requests.get(f"{srv.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}/frames/2",
                       headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
                       timeout=30)
    assert got.status_code == 200
    boundary = got.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    part = got.content.split(f"--{boundary}".encode())[1]
    assert part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n") == expected[1]
    cfg = tmp_path / "config0.toml"
    out = run_cli("stats", "--config", str(cfg), data=srv.data_dir, check=True).stdout
    counts = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()}
    assert counts["instances"] == str(len(wsi_files)) and counts["studies"] == "1"
    listed = run_cli("ls", "--config", str(cfg), data=srv.data_dir, check=True).stdout
    assert all(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID in listed for f in wsi_files)
    assert not (srv.data_dir / "index" / "data.mdb").exists()  # no LMDB index beside it


def test_schema_of_a_newer_release_is_refused(pg_dsn):
    PostgresIndex(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE pathpacs_schema SET version = 99")
    with pytest.raises(Unavailable, match="schema 99, newer"):
        PostgresIndex(pg_dsn)
