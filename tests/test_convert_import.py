"""Converters + archive: import_slide, `import` of non-DICOM files, and the watch folder."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archive.importer import import_path, import_slide
from converters.convert import ConvertOptions
from converters.errors import ConversionError

from slide_fixtures import write_ome, write_svs

from archive.service import Archive
from archive.status import Outcome
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def arc(tmp_path):
    a = Archive.open(tmp_path / "data")
    yield a
    a.close()


def _blob_files(data: Path) -> list[Path]:
    return [p for p in (data / "hot" / "blobs").rglob("*") if p.is_file()]


def test_import_slide_stores_every_instance(arc, tmp_path):
    src = tmp_path / "s.svs"
    write_svs(src)
    results = import_slide(arc, src, ConvertOptions())
    assert [r.outcome for r in results] == [Outcome.STORED] * 6
    assert len({r.sop_instance_uid for r in results}) == 6
    assert len(_blob_files(tmp_path / "data")) == 6
    # converted into the archive's own temp dir and moved, not copied: nothing left behind
    leftovers = [p for p in arc.tmp_dir.rglob("*") if p.is_file() and p.name != "lock"]
    assert leftovers == []
    # the archive can serve a frame of the base level
    rec = arc.instance(results[0].sop_instance_uid)
    assert rec is not None


def test_import_slide_same_seed_is_duplicate(arc, tmp_path):
    src = tmp_path / "o.ome.tif"
    write_ome(src)
    first = import_slide(arc, src, ConvertOptions(uid_seed="file-1"))
    again = import_slide(arc, src, ConvertOptions(uid_seed="file-1"))
    assert [r.outcome for r in first] == [Outcome.STORED] * 4
    assert [r.outcome for r in again] == [Outcome.DUPLICATE] * 4
    assert [r.sop_instance_uid for r in first] == [r.sop_instance_uid for r in again]


def test_import_path_bad_file(arc, tmp_path):
    bad = tmp_path / "junk.bin"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(ConversionError, match="unsupported file format"):
        import_path(arc, bad, argparse.Namespace(quiet=True))
    assert _blob_files(tmp_path / "data") == []


def _watch(tmp_path: Path, inbox: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "archive", "watch", str(inbox), "--data", str(tmp_path / "data"),
         "--once", "--interval", "0.1", "--stable-seconds", "0.2", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=120)


def test_watch_folder(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_svs(inbox / "good.svs")
    (inbox / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 100)
    (inbox / ".hidden").write_text("ignored")
    r = _watch(tmp_path, inbox)
    assert "stored good.svs: 6 instances" in r.stdout, r.stdout + r.stderr
    assert "failed broken.svs" in r.stdout
    assert r.returncode == 1  # --once reports that something failed
    assert (inbox / "done" / "good.svs").exists() and not (inbox / "good.svs").exists()
    assert (inbox / "failed" / "broken.svs").exists()
    reason = (inbox / "failed" / "broken.svs.reason").read_text()
    assert "broken.svs" in reason and "\n" == reason[-1] and reason.count("\n") == 1
    assert (inbox / ".hidden").exists()
    assert len(_blob_files(tmp_path / "data")) == 6


def test_watch_restart_does_not_double_import(tmp_path):
    """A file imported before a crash (not yet moved) is not stored again after the restart."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = inbox / "slide.ome.tif"
    write_ome(src)
    r = _watch(tmp_path, inbox)
    assert r.returncode == 0, r.stderr
    n_blobs = len(_blob_files(tmp_path / "data"))
    assert n_blobs == 4
    # simulate "stored, crashed before the move": put it back with the same identity
    done = inbox / "done" / "slide.ome.tif"
    st = done.stat()
    os.replace(done, src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = _watch(tmp_path, inbox)
    assert r.returncode == 0 and "already stored" in r.stdout, r.stdout
    # and even without the state file, deterministic UIDs make the archive see duplicates
    os.replace(done, src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    (inbox / ".pathpacs-watch.json").unlink()
    r = _watch(tmp_path, inbox)
    assert r.returncode == 0 and "(0 new)" in r.stdout, r.stdout + r.stderr
    assert len(_blob_files(tmp_path / "data")) == n_blobs


def test_watch_waits_for_stable_size(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    growing = inbox / "growing.svs"
    growing.write_bytes(b"II*\x00")
    proc = subprocess.Popen(
        [sys.executable, "-m", "archive", "watch", str(inbox), "--data", str(tmp_path / "data"),
         "--once", "--interval", "0.1", "--stable-seconds", "1.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    src = tmp_path / "real.svs"
    write_svs(src)
    data = src.read_bytes()
    # keep appending for a while: the watcher must not take the file meanwhile
    step = len(data) // 8 + 1
    for i in range(0, len(data), step):
        with open(growing, "wb") as f:
            f.write(data[: i + step])
        time.sleep(0.3)
        assert growing.exists(), "taken before its size was stable"
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "stored growing.svs" in out
