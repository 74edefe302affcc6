"""`pathpacs index migrate --to postgresql`: an archive written by `pathpacs serve` on LMDB, moved
into a real PostgreSQL (the conftest `postgres` server), answers the same through a server on the
PostgreSQL index: QIDO JSON at every level, frames and metadata byte for byte, tokens, rejection.
A migration killed with -9 is finished by running it again; bad input is one line."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

import factory
from conftest import Server, free_port, need, pathpacs_cmd, run_cli, ROOT
from test_index_contract import index, new  # noqa: F401  (index: the fixture over both backends)

from archive.index import LmdbIndex, open_index
from archive.records import BlobRef


def dcmsend(srv: Server, *files: Path) -> None:
    res = subprocess.run([need("dcmsend"), "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port), *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def qido(srv: Server, path: str) -> list:
    r = requests.get(f"{srv.dicomweb_url}/{path}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def answers(srv: Server, study: str, series: str, wsi: list[str]) -> dict:
    """What a viewer reads: QIDO at each level, the study's metadata, frames of every WSI level."""
    out = {
        "studies": qido(srv, "studies?includefield=all"),
        "by patient": qido(srv, "studies?PatientID=P1"),
        "series": qido(srv, f"studies/{study}/series?includefield=all"),
        "instances": qido(srv, f"studies/{study}/series/{series}/instances?includefield=all"),
        # across studies the order is the backend's (PS3.18 sets none): compared as a set
        "all instances": sorted(qido(srv, "instances"), key=lambda d: d["00080018"]["Value"][0]),
    }
    r = requests.get(f"{srv.dicomweb_url}/studies/{study}/metadata", timeout=30)
    assert r.status_code == 200
    out["metadata"] = r.content
    for i, sop in enumerate(wsi):
        for frame in (1, 2, 3) if i == 0 else (1,):  # the base level has several, the smallest one
            r = requests.get(f"{srv.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}/frames/{frame}",
                             headers={"Accept": "multipart/related; type=application/octet-stream"}, timeout=30)
            assert r.status_code == 200
            out[f"frame {sop} {frame}"] = frame_bytes(r)
    return out


def frame_bytes(r: requests.Response) -> bytes:
    """The one part of a multipart frame answer (its boundary is random per answer)."""
    boundary = r.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    body = r.content.split(b"\r\n\r\n", 1)[1]
    return body.rsplit(b"\r\n--" + boundary, 1)[0]


def pg_config(path: Path, dsn: str) -> Path:
    path.write_text(f'[index]\nbackend = "postgresql"\ndsn = "{dsn}"\n\n[cluster]\nnode = "n1"\n')
    return path


@pytest.fixture(scope="module")
def migrated(tmp_path_factory, postgres):
    """An LMDB archive written by a server (WSI pyramid + a secondary capture, a token, a rejected
    instance, a pinned study), its answers, then its migration into a fresh database."""
    tmp = tmp_path_factory.mktemp("migrate")
    files = factory.wsi_series(tmp / "wsi")
    other = factory.secondary_capture(tmp / "sc.dcm", patient_id="P2")
    rejected = factory.secondary_capture(tmp / "sc2.dcm", patient_id="P3")
    data = tmp / "data"
    srv = Server(data, free_port(), free_port()).start()
    try:
        dcmsend(srv, *files, other, rejected)
        import pydicom

        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        study, series = first.StudyInstanceUID, first.SeriesInstanceUID
        wsi = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files]
        gone = pydicom.dcmread(rejected, stop_before_pixels=True).SOPInstanceUID
        run_cli("token", "create", "--role", "viewer", "--name", "migrated", data=data, check=True)
        run_cli("reject", "--instance", gone, "--reason", "113001", data=data, check=True)
        run_cli("tier", "pin", "--study", study, data=data, check=True)
        dsn = postgres.create_database()
        busy = run_cli("index", "migrate", "--to", "postgresql", "--dsn", dsn, data=data)
        before = answers(srv, study, series, wsi)
    finally:
        srv.stop()
    res = run_cli("index", "migrate", "--to", "postgresql", "--dsn", dsn, "--quiet", data=data)
    yield {"data": data, "dsn": dsn, "res": res, "busy": busy, "before": before, "study": study,
           "series": series, "wsi": wsi, "ports": (srv.dicom_port, srv.http_port), "tmp": tmp}


def test_migration_refused_while_the_server_runs(migrated):
    busy = migrated["busy"]
    assert busy.returncode == 2
    assert busy.stderr.strip().count("\n") == 0 and "stop the server first" in busy.stderr


def test_migrated_index_answers_like_the_lmdb_one(migrated):
    res = migrated["res"]
    assert res.returncode == 0, res.stderr
    assert "counts verified" in res.stdout and 'backend = "postgresql"' in res.stdout
    data = migrated["data"]
    assert (data / "index" / "data.mdb").is_file()  # the fallback is left where it was
    cfg = pg_config(migrated["tmp"] / "pg.toml", migrated["dsn"])
    dicom_port, http_port = migrated["ports"]  # the same ports: RetrieveURLs in QIDO answers match
    srv = Server(data, dicom_port, http_port, config=cfg).start()
    try:
        after = answers(srv, migrated["study"], migrated["series"], migrated["wsi"])
    finally:
        srv.stop()
    before = migrated["before"]
    assert len(before["studies"]) == 2 and len(before["all instances"]) == 4  # the rejected one hidden
    for key in before:
        assert after[key] == before[key], key
    listed = json.loads(run_cli("token", "list", "--json", "--config", str(cfg), data=data, check=True).stdout)
    assert [t["name"] for t in listed] == ["migrated"]


def test_migrating_again_adds_nothing_and_verifies(migrated):
    res = run_cli("index", "migrate", "--to", "postgresql", "--dsn", migrated["dsn"], data=migrated["data"])
    assert res.returncode == 0, res.stderr
    stats = run_cli("stats", data=migrated["data"], check=True).stdout
    n = int(stats.split("instances")[1].split()[0])
    assert f"index migrated: 0 instances added, {n} already there; counts verified" in res.stdout
    assert f"instances              {n}" in res.stdout  # the verified counts are printed


def synthetic_archive(data: Path, n: int) -> None:
    """An LMDB index of `n` generated instances (no blobs: migration never reads them) with a
    replica, a verified time, a fixity-free checksum queue entry and records."""
    idx = LmdbIndex(data / "index", map_size=1 << 30)
    try:
        idx.add_instances(new(f"1.3.{i}", study=f"1.2.{i % 40}", series=f"1.2.{i % 40}.{i % 3}", pid=f"P{i % 7}")
                          for i in range(n))
        idx.add_copy("1.3.5", BlobRef("cold", "replica-5"))
        idx.set_verified("1.3.5", "cold", "2026-01-02T00:00:00.000")
        idx.put_record("shares", "s1", {"id": "s1", "study": "1.2.5"})
    finally:
        idx.close()


def test_killed_migration_is_finished_by_a_rerun(tmp_path, pg_dsn):
    data = tmp_path / "data"
    total = 3000
    synthetic_archive(data, total)
    cmd = pathpacs_cmd() + ["index", "migrate", "--to", "postgresql", "--dsn", pg_dsn, "--batch", "25",
                            "--quiet", "--data", str(data)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            idx = open_index(data / "index", backend="postgresql", dsn=pg_dsn, readonly=True, pool_size=1)
            try:
                seen = idx.stats().instances
            finally:
                idx.close()
        except Exception:
            seen = 0  # the schema is not there yet
        if seen >= 100:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the migration finished before it could be killed"
    assert 100 <= seen < total
    res = run_cli("index", "migrate", "--to", "postgresql", "--dsn", pg_dsn, "--quiet", data=data)
    assert res.returncode == 0, res.stderr
    assert "counts verified" in res.stdout
    added = int(res.stdout.split("index migrated: ")[1].split()[0])
    assert 0 < added <= total - 100
    idx = open_index(data / "index", backend="postgresql", dsn=pg_dsn, readonly=True, pool_size=1)
    try:
        assert idx.stats().instances == total
        assert idx.copies("1.3.5") == [BlobRef("cold", "replica-5")]
        assert idx.verified("1.3.5", "cold") == "2026-01-02T00:00:00.000"
        assert idx.record("shares", "s1") == {"id": "s1", "study": "1.2.5"}
        assert idx.all_frames("1.3.7").crcs == [1000, 1001]
        assert idx.bulk("1.3.7", "00282000") == b"icc" * 500
    finally:
        idx.close()


def test_bad_dsn_and_missing_archive_are_one_line(tmp_path, postgres):
    data = tmp_path / "data"
    synthetic_archive(data, 3)
    bad = f"host=127.0.0.1 port={free_port()} user=pathpacs dbname=nope connect_timeout=2"
    for args, where in ((["--dsn", bad], data), (["--dsn", postgres.dsn("no_such_db")], data),
                        (["--dsn", postgres.dsn()], tmp_path / "empty"), ([], data),
                        (["--dsn", postgres.dsn(), "--batch", "0"], data)):
        res = run_cli("index", "migrate", "--to", "postgresql", *args, data=where)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("pathpacs: error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "empty").exists()  # nothing created where there was no archive


def test_bulk_values_and_put_version_alike_on_both_backends(index):
    """The two operations migrate adds to the Index protocol, on LMDB and PostgreSQL."""
    index.add_instances([new("1.3.1"), new("1.3.2", blob="b2")])
    assert index.bulk_values("1.3.1") == {"00282000": b"icc" * 500}
    assert index.bulk_values("1.3.9") == {}
    entry = {"key": "1.3.1\x002026-01-01T00:00:00.000\x00abcd1234", "record": new("1.3.1", blob="old").record,
             "copies": [BlobRef("cold", "old-copy")], "time": "2026-01-01T00:00:00.000", "who": "SCU"}
    gen = index.rejection_generation()
    assert index.put_version(entry) is True
    assert index.put_version(entry) is False  # that key is there: nothing changes
    [kept] = index.versions("1.3.1")
    assert kept["key"] == entry["key"] and kept["record"].blob == BlobRef("hot", "old")
    assert kept["copies"] == [BlobRef("cold", "old-copy")] and kept["who"] == "SCU"
    assert index.blob_referenced(BlobRef("hot", "old")) and index.blob_referenced(BlobRef("cold", "old-copy"))
    assert index.rejection_generation() > gen  # processes refresh what they hide
