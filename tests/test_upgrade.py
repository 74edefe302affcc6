"""Upgrades never lose data: an archive written by the previous release's own code (checked out
from git, run as it shipped) opens, migrates, and serves identical frames, now checksummed."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.encaps import generate_frames

import factory
from conftest import Server, free_port, run_cli



@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    """The last release before frame checksums (schema 2), extracted from git history."""
    from conformance.bench.peers import PREVIOUS_RELEASE, previous_release as extract

    try:
        return extract(tmp_path_factory.mktemp("previous-release"))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot check out the previous release {PREVIOUS_RELEASE[:10]} from git history "
                    f"(a shallow clone?): {exc}")


def old_cli(release: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the previous release's `pathpacs` (its own archive package shadows ours)."""
    env = {**os.environ, "PYTHONPATH": str(release)}
    code = ("import sys, archive; assert archive.__file__.startswith(sys.argv[1]), archive.__file__; "
            "from archive.cli import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, str(release), *args], capture_output=True,
                          text=True, cwd=release, env=env, timeout=300)


def _frames(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def _old_archive(release: Path, tmp: Path) -> tuple[Path, list[Path]]:
    files = factory.wsi_series(tmp / "in", levels=((1024, 768), (512, 384)))
    data = tmp / "data"
    res = old_cli(release, "import", "--quiet", "--data", str(data), str(tmp / "in"))
    assert res.returncode == 0, res.stderr
    assert "2 stored" in res.stdout
    import lmdb

    env = lmdb.open(str(data / "index"), max_dbs=32, readonly=True, lock=False)
    with env.begin() as txn:  # really the old layout: no schema 3, frame tables without CRCs
        state = env.open_db(b"state", txn=txn, create=False)
        assert txn.get(b"schema", db=state) in (None, b"2")  # that release wrote none for a new archive
        frames = env.open_db(b"frames", txn=txn, create=False)
        heads = [bytes(v).split(b"\n", 1)[0] for _k, v in txn.cursor(db=frames)]
        assert len(heads) == 2 and all(b'"v"' not in h for h in heads)
    env.close()
    return data, files


def _blob_of(data: Path, sop: str) -> Path:
    from archive.config import Config
    from archive.service import Archive

    arc = Archive(Config(data_dir=data), readonly=True)
    try:
        rec = arc.instance(sop)
        return arc.tier(rec.blob.tier).local_path(rec.blob.key)
    finally:
        arc.close()


def _get_frame(srv: Server, path: Path, n: int) -> requests.Response:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return requests.get(f"{srv.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                        f"/instances/{ds.SOPInstanceUID}/frames/{n}",
                        headers={"Accept": "image/jpeg"}, timeout=30)


def test_previous_release_archive_migrates_with_verified_checksums(previous_release, tmp_path):
    data, files = _old_archive(previous_release, tmp_path)
    # Rot one blob of the old archive: the migration must not trust it.
    bad = _blob_of(data, str(pydicom.dcmread(files[1], stop_before_pixels=True).SOPInstanceUID))
    raw = bytearray(bad.read_bytes())
    raw[-100] ^= 0xFF
    bad.write_bytes(bytes(raw))

    res = run_cli("migrate", data=data)
    assert res.returncode == 1, res.stderr  # one instance could not be verified
    assert "frame checksums added to 1 instances, 1 damaged" in res.stdout
    assert "Traceback" not in res.stderr
    assert run_cli("migrate", data=data).stdout.strip() == "nothing to migrate"

    srv = Server(data, free_port(), free_port()).start()
    try:
        for n in range(1, 13):  # 1024x768 in 256 px tiles: 12 frames, identical bytes
            r = _get_frame(srv, files[0], n)
            assert r.status_code == 200 and r.content == _frames(files[0])[n - 1]
        r = _get_frame(srv, files[1], 1)  # the rotted one: refused, not served unchecked
        assert r.status_code == 500 and "damaged" in r.text
    finally:
        srv.stop()
    # The migrated tables are checked: a byte flipped now inside a frame is caught on read.
    good = _blob_of(data, str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID))
    first = _frames(files[0])[0]
    raw = bytearray(good.read_bytes())
    at = bytes(raw).find(first) + len(first) // 2
    raw[at] ^= 0x01
    good.write_bytes(bytes(raw))
    srv = Server(data, free_port(), free_port()).start()
    try:
        assert _get_frame(srv, files[0], 1).status_code == 500
        r = _get_frame(srv, files[0], 2)
        assert r.status_code == 200 and r.content == _frames(files[0])[1]
    finally:
        srv.stop()
    assert "fixity:" in srv.log()


def test_server_migrates_previous_release_archive_in_background(previous_release, tmp_path):
    data, files = _old_archive(previous_release, tmp_path)
    srv = Server(data, free_port(), free_port()).start()
    try:
        for n in (1, 5, 12):  # served while (or after) the migration runs
            r = _get_frame(srv, files[0], n)
            assert r.status_code == 200 and r.content == _frames(files[0])[n - 1]
        deadline = time.monotonic() + 60
        while "frame checksums added to 2 instances (0 damaged)" not in srv.log():
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.2)
        r = _get_frame(srv, files[1], 3)
        assert r.status_code == 200 and r.content == _frames(files[1])[2]
    finally:
        srv.stop()
    assert run_cli("migrate", data=data).stdout.strip() == "nothing to migrate"
    assert run_cli("verify", "--quiet", data=data).returncode == 0


QUERIES = [
    "studies", "studies?PatientID=P1", "studies?PatientName=*a*&includefield=all", "series",
    "series?Modality=SM", "instances", "instances?includefield=all",
]


def _answers(srv: Server, study: str, series: str) -> dict[str, object]:
    """What a client sees: QIDO answers and metadata, with this server's base URL taken out."""
    out: dict[str, object] = {}
    for q in QUERIES + [f"studies/{study}/metadata", f"studies/{study}/series/{series}/metadata"]:
        r = requests.get(f"{srv.dicomweb_url}/{q}", headers={"Accept-Encoding": "identity"}, timeout=30)
        assert r.status_code == 200, (q, r.status_code, r.text[:200])
        out[q] = sorted(requests.compat.json.loads(r.text.replace(srv.dicomweb_url, "BASE")),
                        key=lambda d: str(sorted(d.items())))
    return out


def _served_by_previous(release: Path, tmp: Path):
    """An archive of the previous release and what that release served of it: (data dir, files,
    the first file's header, QIDO answers and metadata, the first file's 12 frames)."""
    data, files = _old_archive(release, tmp)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    old = Server(data, free_port(), free_port(), release=release).start()
    try:
        before = _answers(old, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        old_frames = [_get_frame(old, files[0], n).content for n in range(1, 13)]
    finally:
        old.stop()
    return data, files, ds, before, old_frames


def test_same_answers_before_and_after_the_upgrade(previous_release, tmp_path):
    """The previous release serving its own archive, then today's code on that archive after
    its migration: the same QIDO answers and metadata, the same frames."""
    data, files, ds, before, old_frames = _served_by_previous(previous_release, tmp_path)
    new = Server(data, free_port(), free_port()).start()
    try:
        after = _answers(new, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        new_frames = [_get_frame(new, files[0], n).content for n in range(1, 13)]
    finally:
        new.stop()
    assert new_frames == old_frames == _frames(files[0])
    for q in before:
        assert after[q] == before[q], q


def test_previous_release_archive_moves_to_postgresql(previous_release, tmp_path, postgres):
    """An archive written by the previous release's code, moved straight to PostgreSQL by
    `pathpacs index migrate` (its LMDB index brought to today's layout first): a server on the
    PostgreSQL index answers as the previous release did, with the same frames."""
    data, files, ds, before, old_frames = _served_by_previous(previous_release, tmp_path)
    dsn = postgres.create_database()
    res = run_cli("index", "migrate", "--to", "postgresql", "--dsn", dsn, "--quiet", data=data)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "index migrated: 2 instances added" in res.stdout and "Traceback" not in res.stderr
    cfg = tmp_path / "postgresql.toml"
    cfg.write_text(f'[index]\nbackend = "postgresql"\ndsn = "{dsn}"\n')
    new = Server(data, free_port(), free_port(), config=cfg, index="lmdb").start()  # its own [index]
    try:
        after = _answers(new, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        new_frames = [_get_frame(new, files[0], n).content for n in range(1, 13)]
    finally:
        new.stop()
    assert new_frames == old_frames == _frames(files[0])
    for q in before:
        assert after[q] == before[q], q
