"""C-STORE ingest: a ~300 MB WSI series by dcmsend into pathpacs and into Orthanc, the fsync
write speed of the disk (the physical limit), and a 2 GB instance for pathpacs' peak RSS."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from conformance.synthetic import wsi_header, write_streamed

from .peers import PREVIOUS_RELEASE, peak_rss_mb, previous_release, start_orthanc, start_pathpacs


def _tile_pool(n: int, size: int, quality: int = 80, seed: int = 0) -> list[bytes]:
    """Realistic-size JPEG tiles (textured noise compresses like tissue, ~10-30 KB at 256 px)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        base = rng.integers(90, 250, size=(size // 4, size // 4, 3), dtype=np.uint8)
        img = np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))
        img = np.clip(img.astype(np.int16) + rng.integers(-12, 12, size=img.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(img, "RGB").save(out, format="JPEG", quality=quality)
        pool.append(out.getvalue())
    return pool


def make_series(outdir: Path, target_mb: int = 300, tile: int = 256) -> tuple[list[Path], int]:
    """A 4-level WSI series whose base level brings the total near target_mb."""
    outdir.mkdir(parents=True, exist_ok=True)
    pool = _tile_pool(256, tile)
    mean = sum(map(len, pool)) / len(pool) + 8
    base_frames = int(target_mb * 1e6 / mean / (1 + 1 / 4 + 1 / 16 + 1 / 64))
    cols = int((base_frames * 4 / 3) ** 0.5)
    rows = max(1, base_frames // cols)
    study, series = generate_uid(), generate_uid()
    paths, total = [], 0
    for level in range(4):
        c, r = max(1, cols >> level), max(1, rows >> level)
        hdr = wsi_header(study, series, c * tile, r * tile, tile, instance_number=level + 1)
        p = outdir / f"level{level}.dcm"
        frames = (pool[i % len(pool)] for i in range(c * r))
        total += write_streamed(p, hdr, frames, c * r)
        paths.append(p)
    return paths, total


def make_big_instance(path: Path, size_bytes: int, tile: int = 512) -> int:
    pool = _tile_pool(64, tile, quality=92, seed=1)
    mean = sum(map(len, pool)) / len(pool) + 8
    n = int(size_bytes / mean)
    cols = int(n ** 0.5)
    rows = n // cols
    hdr = wsi_header(generate_uid(), generate_uid(), cols * tile, rows * tile, tile)
    return write_streamed(path, hdr, (pool[i % len(pool)] for i in range(cols * rows)), cols * rows)


def fsync_write_mb_s(directory: Path, size_mb: int = 512) -> float:
    path = directory / "fsync-probe"
    chunk = os.urandom(1 << 20)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(size_mb):
            fh.write(chunk)
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return size_mb * (1 << 20) / 1e6 / dt


def dcmsend(port: int, aet: str, files: list[Path]) -> float:
    t = time.perf_counter()
    res = subprocess.run(["dcmsend", "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                         capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"dcmsend to {aet} failed: {res.stderr.strip()[-300:]}")
    return dt


def hdr_study(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def getscu_study(port: int, aet: str, study: str, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    res = subprocess.run(["getscu", "-aec", aet, "+xy", "-S", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={study}", "-od", str(out), "127.0.0.1", str(port)],
                         capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"getscu from {aet} failed: {res.stderr.strip()[-300:]}")
    return dt


def run(workdir: Path, quick: bool = False) -> list[dict]:
    rows: list[dict] = []
    series, total = make_series(workdir / "series", target_mb=60 if quick else 300)
    mb = total / 1e6
    rows.append({"benchmark": "disk", "system": "sequential write + fsync (limit)",
                 "value": f"{fsync_write_mb_s(workdir, 128 if quick else 512):.0f} MB/s", "note": ""})

    pp = start_pathpacs(workdir / "pathpacs" / "data", quiet=True)
    try:
        dt = dcmsend(pp.dicom_port, pp.aet, series)
        rows.append({"benchmark": f"C-STORE {mb:.0f} MB WSI series (dcmsend)", "system": "pathpacs",
                     "value": f"{mb / dt:.0f} MB/s ({dt:.2f} s)",
                     "note": f"durable (sha256, fsync, rename, LMDB commit); peak RSS {peak_rss_mb(pp.proc.pid):.0f} MB"})
        big = workdir / "big.dcm"
        size = make_big_instance(big, (256 << 20) if quick else (2 << 30))
        dt_big = dcmsend(pp.dicom_port, pp.aet, [big])
        rows.append({"benchmark": f"C-STORE one {size / 2**30:.2f} GiB instance", "system": "pathpacs",
                     "value": f"{size / 1e6 / dt_big:.0f} MB/s ({dt_big:.2f} s)",
                     "note": f"server peak RSS {peak_rss_mb(pp.proc.pid):.0f} MB (target < 300 MB)"})
        big_study = hdr_study(big)
        big.unlink()
        dt_get = getscu_study(pp.dicom_port, pp.aet, big_study, workdir / "got")
        rows.append({"benchmark": f"C-GET that {size / 2**30:.2f} GiB instance (getscu, stored syntax)",
                     "system": "pathpacs", "value": f"{size / 1e6 / dt_get:.0f} MB/s ({dt_get:.2f} s)",
                     "note": f"server peak RSS {peak_rss_mb(pp.proc.pid):.0f} MB (streamed from disk)"})
        shutil.rmtree(workdir / "got", ignore_errors=True)
    finally:
        pp.stop(timeout=30)
        shutil.rmtree(workdir / "pathpacs", ignore_errors=True)

    # the previous release on the same series, for "no slower than before"
    old = start_pathpacs(workdir / "previous" / "data", quiet=True,
                         release=previous_release(workdir / "previous-release"))
    try:
        dt_old = dcmsend(old.dicom_port, old.aet, series)
        rows.append({"benchmark": f"C-STORE {mb:.0f} MB WSI series (dcmsend)",
                     "system": f"pathpacs {PREVIOUS_RELEASE[:7]} (previous release)",
                     "value": f"{mb / dt_old:.0f} MB/s ({dt_old:.2f} s)",
                     "note": f"today's code takes {dt / dt_old:.0%} of its time"})
    finally:
        old.stop(timeout=30)
        shutil.rmtree(workdir / "previous", ignore_errors=True)

    orthanc = start_orthanc(workdir / "orthanc", extra={"Name": "bench"})
    try:
        dt_o = dcmsend(orthanc.dicom_port, orthanc.aet, series)
        rows.append({"benchmark": f"C-STORE {mb:.0f} MB WSI series (dcmsend)", "system": "Orthanc (Debian)",
                     "value": f"{mb / dt_o:.0f} MB/s ({dt_o:.2f} s)",
                     "note": f"peak RSS {peak_rss_mb(orthanc.proc.pid):.0f} MB; pathpacs is {dt_o / dt:.1f}x faster"})
    finally:
        orthanc.stop(timeout=30)
        shutil.rmtree(workdir / "orthanc", ignore_errors=True)
    return rows
