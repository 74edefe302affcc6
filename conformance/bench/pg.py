"""PostgreSQL index benchmark: the same run, the same slide, the index on LMDB and on PostgreSQL.

1. Random level-0 frames via DICOMweb (8 clients, the way a viewer pans): the slide of the
   dicomweb benchmark (conformance.bench.frames.make_slide, kept in bench-work/dicomweb/slide)
   is STOWed into an LMDB archive, whose index is then moved into PostgreSQL by
   `pathpacs index migrate` (timed: it is the admin's path); the two servers serve the same
   blobs and are measured alternately, best of three each. Target: PostgreSQL >= 80% of LMDB.
2. QIDO study searches at 1 M indexed instances (records only, no blobs: 200,000 studies of 5,
   conformance.bench.frames._qido_docs, the records the 100k QIDO benchmark uses) on
   PostgreSQL beside LMDB at the same size: p50 of a Patient ID, a name prefix, a date range and
   the newest-first sorted first page. The PostgreSQL load goes through `add_instances` in
   batches and is timed, then VACUUM ANALYZE (what autovacuum does after a bulk load); if it
   cannot reach the size within LOAD_BUDGET_S it stops there, both backends are measured at
   the size reached, and the row says so. Target: <= 20 ms p50.

PostgreSQL is Debian's server, started by conformance.bench.peers.start_postgres (a fresh
cluster per run), as in the tests.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

from .frames import _qido_docs, _timed_get, load, make_slide, stow
from .peers import ROOT, start_pathpacs, start_postgres

FRAME_TARGET = 0.80
QIDO_TARGET_MS = 20.0
LOAD_BUDGET_S = 1500.0  # for the PostgreSQL bulk load of the QIDO index
LOAD_BATCH = 5000
ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
INCLUDE = "includefield=00081030&includefield=00201206"


def _pg_config(dsn: str) -> str:
    return f'[index]\nbackend = "postgresql"\ndsn = "{dsn}"\n\n[cluster]\nnode = "bench"\n'


def _news(n: int, per_study: int = 5):
    """The first n NewInstances of the QIDO benchmark's synthetic records (a deterministic
    sequence: any prefix is the same data)."""
    from archive import metadata as md
    from archive.index import NewInstance
    from archive.records import InstanceRecord

    for rec, meta, patient, study, series in _qido_docs(n):
        yield NewInstance(InstanceRecord.from_json(rec), [], [], md.dumps(meta), {}, patient, study, series)


def frames(work: Path, dsn: str, quick: bool) -> list[dict]:
    import pydicom

    slide_dir = ROOT / "bench-work" / ("pg-slide-quick" if quick else "dicomweb/slide")
    files = make_slide(slide_dir, *((8192, 6144) if quick else ()))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    st, se, sop, n = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, int(ds.NumberOfFrames)
    data = work / "frames-data"
    shutil.rmtree(data, ignore_errors=True)
    lmdb_srv = start_pathpacs(data, quiet=True, log_path=work / "frames-lmdb.log")
    pg_srv = None
    rows = []
    try:
        put = stow(f"{lmdb_srv.dicomweb_url}/studies", files, work)
        if put["status"] != 200:
            raise RuntimeError(f"STOW answered {put['status']}")
        lmdb_srv.stop(timeout=30)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "archive", "index", "migrate", "--to", "postgresql", "--dsn", dsn,
                        "--quiet", "--data", str(data)], cwd=ROOT, check=True, capture_output=True)
        migrated = time.perf_counter() - t
        lmdb_srv = start_pathpacs(data, quiet=True, log_path=work / "frames-lmdb.log")
        pg_srv = start_pathpacs(data, config_text=_pg_config(dsn), quiet=True, log_path=work / "frames-pg.log")
        rnd = random.Random(1)
        picks = [rnd.randint(1, n) for _ in range(1000 if quick else 3000)]
        path = f"/studies/{st}/series/{se}/instances/{sop}/frames/"
        best: dict[str, dict] = {}
        for _round in range(3):
            for name, srv in (("LMDB", lmdb_srv), ("PostgreSQL", pg_srv)):
                r = load([srv.dicomweb_url + path + str(k) for k in picks], 8, ACCEPT)
                if r["errors"]:
                    raise RuntimeError(f"{name}: {r['errors']} frame requests failed")
                if name not in best or r["per_s"] > best[name]["per_s"]:
                    best[name] = r
    finally:
        lmdb_srv.stop(timeout=30)
        if pg_srv is not None:
            pg_srv.stop(timeout=30)
    ratio = best["PostgreSQL"]["per_s"] / best["LMDB"]["per_s"]
    what = f"random level-0 frames, 8 clients ({n} frames, {sum(f.stat().st_size for f in files) / 1e6:.0f} MB slide)"
    for name in ("LMDB", "PostgreSQL"):
        r = best[name]
        rows.append({"benchmark": what, "system": f"pathpacs, {name} index", "value": f"{r['per_s']} frames/s",
                     "note": f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['MB_per_s']} MB/s; best of 3, alternately"
                     + (f"; {ratio:.0%} of LMDB, target >= {FRAME_TARGET:.0%}: "
                        + ("met" if ratio >= FRAME_TARGET else "MISSED") if name == "PostgreSQL" else "")})
    rows.append({"benchmark": f"pathpacs index migrate --to postgresql of that archive ({len(files)} instances)",
                 "system": "pathpacs", "value": f"{migrated:.1f} s", "note": "whole command, counts verified"})
    return rows


def _load_pg(dsn: str, n: int) -> tuple[int, float]:
    """Up to n synthetic instances into the PostgreSQL index by add_instances batches; (reached, s)."""
    from archive.index import open_index

    idx = open_index(Path("/nonexistent"), backend="postgresql", dsn=dsn)
    t = time.perf_counter()
    done = 0
    news = _news(n)
    try:
        while done < n and time.perf_counter() - t < LOAD_BUDGET_S:
            batch = list(islice(news, LOAD_BATCH))
            idx.add_instances(batch)
            done += len(batch)
            print(f"postgresql: {done} instances loaded, {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    finally:
        idx.close()
    loaded = time.perf_counter() - t
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:  # what autovacuum does soon after a bulk load:
        conn.execute("VACUUM ANALYZE")  # measured on a settled database, not during its catch-up
    return done, loaded


def _load_lmdb(data: Path, n: int) -> float:
    """n synthetic instances into an LMDB archive in bench-work (kept between runs)."""
    from archive.service import Archive

    marker = data / f"complete-{n}"
    if marker.exists():
        return 0.0
    shutil.rmtree(data, ignore_errors=True)
    t = time.perf_counter()
    arc = Archive.open(data)
    try:
        news = _news(n)
        for _start in range(0, n, 100_000):
            arc.index.add_instances(islice(news, 100_000))
    finally:
        arc.close()
    marker.write_text("ok")
    return time.perf_counter() - t


def qido(work: Path, dsn: str, quick: bool) -> list[dict]:
    n = 20_000 if quick else 1_000_000
    reached, pg_load = _load_pg(dsn, n)
    lmdb_data = ROOT / "bench-work" / "postgresql" / f"qido-lmdb-{reached}"
    lmdb_load = _load_lmdb(lmdb_data, reached)
    pg_data = work / "qido-pg-data"
    servers = {"LMDB": start_pathpacs(lmdb_data, quiet=True, log_path=work / "qido-lmdb.log")}
    rows = []
    try:
        servers["PostgreSQL"] = start_pathpacs(pg_data, config_text=_pg_config(dsn), quiet=True,
                                               log_path=work / "qido-pg.log")
        cases = [
            ("PatientID=PID0012345", "/dicomweb/studies?PatientID=PID0012345"),
            ("name prefix PatientName=smi* limit=25", f"/dicomweb/studies?{INCLUDE}&PatientName=smi*&limit=25"),
            ("date range StudyDate=20240101-20240131 limit=25",
             f"/dicomweb/studies?{INCLUDE}&StudyDate=20240101-20240131&limit=25"),
            ("newest first: browser/search sort=-date limit=25", f"/browser/search?{INCLUDE}&sort=-date&limit=25"),
            ("first page: studies limit=25", f"/dicomweb/studies?{INCLUDE}&limit=25"),
        ]
        size = f"{reached / 1e6:g} M" if reached >= 1_000_000 else f"{reached // 1000}k"
        for what, url in cases:
            for name, srv in servers.items():
                r = _timed_get(srv.http_url + url, 5 if quick else 21)
                note = f"min {r['min_ms']} ms, {r['bytes']} bytes"
                if name == "PostgreSQL":
                    note += f"; target <= {QIDO_TARGET_MS:.0f} ms: " + ("met" if r["p50_ms"] <= QIDO_TARGET_MS else "MISSED")
                rows.append({"benchmark": f"QIDO at {size} instances: {what}", "system": f"pathpacs, {name} index",
                             "value": f"{r['p50_ms']} ms p50", "note": note})
    finally:
        for srv in servers.values():
            srv.stop(timeout=30)
    rate = reached / pg_load if pg_load else 0
    note = f"add_instances in batches of {LOAD_BATCH}, {rate:,.0f} instances/s"
    if reached < n:
        note += (f"; stopped by the {LOAD_BUDGET_S:.0f} s budget: {n:,} would take about "
                 f"{n / rate / 60:.0f} min at that rate")
    rows.append({"benchmark": f"QIDO index load: {reached:,} synthetic instances", "system": "pathpacs, PostgreSQL index",
                 "value": f"{pg_load:.0f} s", "note": note})
    rows.append({"benchmark": f"QIDO index load: {reached:,} synthetic instances", "system": "pathpacs, LMDB index",
                 "value": f"{lmdb_load:.0f} s", "note": "add_instances, 100k per transaction (0 s: kept from an earlier run)"})
    return rows


def run(workdir: Path, quick: bool = False) -> list[dict]:
    """Entry for `make bench` (conformance.bench)."""
    pg = start_postgres()
    try:
        rows = frames(workdir, pg.create_database(), quick)
        rows += qido(workdir, pg.create_database(), quick)
    finally:
        pg.remove()
    return rows
