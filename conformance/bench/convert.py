"""Benchmark: SVS -> DICOM WSI with pathpacs vs wsidicomizer (and OrthancWSIDicomizer).

    python -m conformance.bench.convert [--size-mb 320] [--workdir bench-work/convert] [--repeat 1]

Generates an Aperio-like SVS (JPEG tiles with shared JPEGTables, RGB-coded,
levels 1/4/16, thumbnail, LZW label, JPEG macro) of about ``--size-mb`` with
tifffile, then times each converter as a child process on the same file
(page cache warm for all), reporting wall seconds, the child's peak RSS (from
``wait4``) and the output size. ``main()`` returns the rows as dicts for
BENCHMARKS.md.

wsidicomizer pins an older wsidicom than pathpacs uses, so it runs from its
own venv: ``$WSIDICOMIZER`` (path to its executable) or
``bench-work/wsidicomizer-venv``, created with pip on first use
(``conformance.bench.peers.wsidicomizer``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .peers import ROOT, wsidicomizer

REPO = ROOT


# --- the slide ---------------------------------------------------------------------------

def _tile_pool(n: int, tile: int, rng: np.random.Generator, quality: int):
    """n distinct tissue-like tiles and a few glass tiles, as Aperio-style abbreviated JPEG."""
    import imagecodecs

    from converters.jpeg import split_tables, strip_app_markers

    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)
    tables = None
    tissue, glass = [], []
    for k in range(n + 8):
        if k < n:
            f1, f2, f3 = rng.uniform(8, 60, size=3)
            img = np.empty((tile, tile, 3), np.float32)
            img[..., 0] = 190 + 45 * np.sin(xx / f1 + k) * np.cos(yy / f2)
            img[..., 1] = 120 + 60 * np.sin((xx + yy) / f3)
            img[..., 2] = 180 + 50 * np.cos(xx / f2 - yy / f1)
            img += rng.normal(0, 14, size=img.shape).astype(np.float32)
        else:
            img = 236 + rng.normal(0, 3, size=(tile, tile, 3)).astype(np.float32)
        full = imagecodecs.jpeg8_encode(np.clip(img, 0, 255).astype(np.uint8), level=quality,
                                        colorspace="rgb", outcolorspace="rgb")
        tab, abbrev = split_tables(strip_app_markers(full))
        tables = tables or tab
        (tissue if k < n else glass).append(abbrev)
    return tables, tissue, glass


def make_svs(path: Path, size_mb: float = 320, tile: int = 256, quality: int = 80, seed: int = 0) -> dict:
    import tifffile

    rng = np.random.default_rng(seed)
    tables, tissue, glass = _tile_pool(96, tile, rng, quality)
    mean_tissue = np.mean([len(t) for t in tissue])
    mean_glass = np.mean([len(t) for t in glass])
    tissue_fraction = 0.6
    per_tile = tissue_fraction * mean_tissue + (1 - tissue_fraction) * mean_glass
    n_tiles = size_mb * 1e6 / per_tile / (1 + 1 / 16 + 1 / 256)
    tiles_x = int(math.sqrt(n_tiles * 4 / 3))
    tiles_y = int(n_tiles / tiles_x)
    W, H = tiles_x * tile, tiles_y * tile

    def level_tiles(w: int, h: int):
        nx, ny = math.ceil(w / tile), math.ceil(h / tile)
        for ty in range(ny):
            for tx in range(nx):
                cy, cx = (ty + 0.5) / ny - 0.5, (tx + 0.5) / nx - 0.5
                inside = (cx / 0.45) ** 2 + (cy / 0.4) ** 2 < 1 and rng.random() > 0.05
                yield tissue[rng.integers(len(tissue))] if inside else glass[rng.integers(len(glass))]

    head = "Aperio Image Library v12.0.15 \r\n"
    desc0 = (f"{head}{W}x{H} [0,0 {W}x{H}] ({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = 20|"
             f"ScanScope ID = BENCH|Filename = bench|Date = 11/23/21|Time = 10:00:00|MPP = 0.2520")
    rgb = {"subsampling": (1, 1), "compressionargs": {"outcolorspace": "RGB"}}
    small = np.full((H // 64, W // 64, 3), 236, np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, f in enumerate((1, 4, 16)):
            w, h = W // f, H // f
            d = desc0 if i == 0 else f"{head}{W}x{H} -> {w}x{h} - ({tile}x{tile}) JPEG/RGB Q={quality}"
            tw.write(level_tiles(w, h), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     photometric="rgb", jpegtables=tables, description=d, subfiletype=0, metadata=None, **rgb)
            if i == 0:
                tw.write(small, compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                         description=f"{head}{W}x{H} -> {small.shape[1]}x{small.shape[0]} - ", subfiletype=0,
                         rowsperstrip=16, metadata=None)
        label = np.full((400, 400, 3), 250, np.uint8)
        label[150:250, 50:350] = 30
        tw.write(label, compression="lzw", photometric="rgb", description=f"{head}label 400x400",
                 subfiletype=1, metadata=None)
        tw.write(small[::2, ::2].copy(), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                 description=f"{head}macro", subfiletype=9, metadata=None)
    return {"path": str(path), "width": W, "height": H, "bytes": path.stat().st_size}


# --- running ------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, rusage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    out = proc.stdout.read().decode(errors="replace")
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "peak_rss_mb": rusage.ru_maxrss / 1024, "rc": proc.returncode,
            "stdout": out, "stderr": err}


def _dir_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m conformance.bench.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=320)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "convert")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; the fastest is reported")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--no-wsidicomizer", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args(argv)
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"bench-{int(a.size_mb)}mb.svs"
    if not slide.exists():
        t0 = time.perf_counter()
        tmp = slide.with_suffix(".tmp")
        info = make_svs(tmp, a.size_mb)
        os.replace(tmp, slide)
        print(f"generated {slide.name}: {info['width']}x{info['height']}, {info['bytes'] / 1e6:.0f} MB "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    size_mb = slide.stat().st_size / 1e6
    with open(slide, "rb") as f:  # warm the page cache for every tool alike
        while f.read(16 << 20):
            pass

    tools: list[tuple[str, list[str] | None]] = []
    out_base = work / "out"
    tools.append(("pathpacs convert", [sys.executable, "-m", "converters", "convert", str(slide), "-o",
                                       "{out}", "--quiet", "--workers", str(a.workers)]))
    if not a.no_wsidicomizer:
        exe = wsidicomizer()
        tools.append(("wsidicomizer", [exe, "-i", str(slide), "-o", "{out}", "-w", str(a.workers)] if exe else None))
    if not a.no_orthanc:
        exe = shutil.which("OrthancWSIDicomizer")
        tools.append(("OrthancWSIDicomizer", [exe, str(slide), "--folder={out}", f"--threads={a.workers}",
                                              "--max-size=0"] if exe else None))

    rows: list[dict] = []
    for name, cmd in tools:
        if cmd is None:
            rows.append({"tool": name, "input_mb": round(size_mb, 1), "seconds": None, "peak_rss_mb": None,
                         "output_mb": None, "note": "not available"})
            continue
        best = None
        for _ in range(max(1, a.repeat)):
            out = out_base / name.split()[0]
            shutil.rmtree(out, ignore_errors=True)
            if name != "wsidicomizer":  # wsidicomizer insists on creating the folder itself
                out.mkdir(parents=True)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
            r = _run([c.replace("{out}", str(out)) for c in cmd], env={**os.environ, "PYTHONPATH": str(REPO)})
            if r["rc"] != 0:
                best = {"seconds": None, "peak_rss_mb": None, "output_mb": None,
                        "note": f"failed: {(r['stderr'].strip().splitlines() or ['?'])[-1][:200]}"}
                break
            r["output_mb"] = _dir_mb(out)
            r["files"] = sum(1 for p in out.rglob("*") if p.is_file())
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        row = {"tool": name, "input_mb": round(size_mb, 1),
               "seconds": round(best["seconds"], 2) if best.get("seconds") else None,
               "peak_rss_mb": round(best["peak_rss_mb"]) if best.get("peak_rss_mb") else None,
               "output_mb": round(best["output_mb"], 1) if best.get("output_mb") else None,
               "files": best.get("files"), "note": best.get("note", "")}
        rows.append(row)
    ref = next((r for r in rows if r["tool"] == "wsidicomizer" and r["seconds"]), None)
    for r in rows:
        r["speedup_vs_wsidicomizer"] = round(ref["seconds"] / r["seconds"], 2) if ref and r["seconds"] else None
    print(f"{'tool':<22}{'seconds':>9}{'peak RSS MB':>13}{'output MB':>11}{'x wsidicomizer':>16}")
    for r in rows:
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        print(f"{r['tool']:<22}{fmt(r['seconds']):>9}{fmt(r['peak_rss_mb']):>13}{fmt(r['output_mb']):>11}"
              f"{fmt(r['speedup_vs_wsidicomizer']):>16}  {r.get('note') or ''}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()


def run(workdir: Path, quick: bool = False) -> list[dict]:
    """Entry for `make bench` (conformance.bench). The slide and wsidicomizer's venv are kept
    in bench-work/convert between runs, so `workdir` is not used."""
    return main(["--size-mb", "60" if quick else "320", "--repeat", "1" if quick else "3"])
