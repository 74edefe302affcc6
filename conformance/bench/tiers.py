"""Storage tiers: random frame reads from hot, warm and cold (S3 on SeaweedFS) beside the bare
S3 client's own ranged GETs of the same frames (the limit); migration hot -> cold beside a bare
multipart upload of the same bytes; index rebuild time per 1,000 instances.

Targets (the tiers issue): cold p99 <= 20 ms and >= 80% of the bare client's throughput;
migration >= 80% of the bare upload. Hot frames are measured against the previous release in
the dicomweb benchmark (same slide).
"""
from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conformance.bench.frames import load, make_slide  # noqa: E402
from conformance.bench.peers import start_pathpacs, start_seaweedfs  # noqa: E402

BUCKET = "tiers-bench"
ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def _config(work: Path, weed) -> Path:
    k = weed.store_kwargs()
    p = work / "tiers.toml"
    p.write_text(f"""
[tiers.hot]
path = "{work}/hot"
[tiers.warm]
path = "{work}/warm"
[tiers.cold]
s3 = {{ endpoint = "{k['endpoint']}", bucket = "{BUCKET}", region = "{k['region']}", access_key = "{k['access_key']}", secret_key = "{k['secret_key']}" }}
[lifecycle]
background = false
""")
    return p


def _cli(cfg: Path, data: Path, *args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "archive", *args, "--quiet", "--config", str(cfg), "--data", str(data)],
                   check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - t


async def _bare_ranged(weed, key: str, slots: list[tuple[int, int]], clients: int) -> dict:
    """obstore's own async ranged GETs of the same frames: the limit of the cold tier."""
    import obstore
    from obstore.store import S3Store

    k = weed.store_kwargs()
    store = S3Store(BUCKET, endpoint=k["endpoint"], region=k["region"], access_key_id=k["access_key"],
                    secret_access_key=k["secret_key"], client_options={"allow_http": True},
                    virtual_hosted_style_request=False)
    queue = list(slots)
    lat: list[float] = []

    async def worker():
        while queue:
            off, length = queue.pop()
            t = time.perf_counter()
            await obstore.get_range_async(store, key, start=off, length=length)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    dt = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "per_s": round(len(lat) / dt, 1), "p50_ms": round(statistics.median(lat) * 1e3, 2),
            "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1e3, 2)}


def _bare_upload(weed, path: Path, key: str) -> float:
    """obstore's own multipart upload of the same file (MB/s)."""
    import obstore
    from obstore.store import S3Store

    k = weed.store_kwargs()
    store = S3Store(BUCKET, endpoint=k["endpoint"], region=k["region"], access_key_id=k["access_key"],
                    secret_access_key=k["secret_key"], client_options={"allow_http": True},
                    virtual_hosted_style_request=False)
    t = time.perf_counter()
    with open(path, "rb") as fh:
        obstore.put(store, key, fh, chunk_size=8 << 20, max_concurrency=4)
    return path.stat().st_size / 1e6 / (time.perf_counter() - t)


def run(workdir: Path, quick: bool = False) -> list[dict]:
    work = REPO / "bench-work" / "tiers"
    shutil.rmtree(work / "run", ignore_errors=True)
    run_dir = work / "run"
    run_dir.mkdir(parents=True)
    files = make_slide(REPO / "bench-work" / "dicomweb" / "slide")
    import pydicom

    base = max((pydicom.dcmread(f, stop_before_pixels=True) for f in files), key=lambda d: int(d.NumberOfFrames))
    n_frames = int(base.NumberOfFrames)
    base_file = next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == base.SOPInstanceUID)
    rnd = random.Random(1)
    picks = [rnd.randint(1, n_frames) for _ in range(1000 if quick else 3000)]
    rows: list[dict] = []
    weed = start_seaweedfs(run_dir / "weed")
    try:
        weed.create_bucket(BUCKET)
        cfg = _config(run_dir, weed)
        data = run_dir / "data"
        _cli(cfg, data, "import", str(base_file))
        st, se, sop = base.StudyInstanceUID, base.SeriesInstanceUID, base.SOPInstanceUID
        size_mb = base_file.stat().st_size / 1e6
        results = {}
        for tier in ("hot", "warm", "cold"):
            if tier != "hot":
                dt = _cli(cfg, data, "tier", "move", "--study", st, "--to", tier)
                if tier == "cold":
                    rows.append({"benchmark": f"migration warm -> cold of a {size_mb:.0f} MB instance",
                                 "system": "pathpacs tier move (copy, sha256 re-read, switch, delete)",
                                 "MB_per_s": round(size_mb / dt, 1), "seconds": round(dt, 2)})
            srv = start_pathpacs(data, config_text=cfg.read_text(), quiet=True)
            try:
                url = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/"
                load([url + str(k) for k in picks[:200]], 8, ACCEPT)
                res = max((load([url + str(k) for k in picks], 8, ACCEPT) for _ in range(2)), key=lambda r: r["per_s"])
                results[tier] = res
                rows.append({"benchmark": f"random level-0 frames, 8 clients ({n_frames}-frame slide)",
                             "system": f"pathpacs WADO-RS, {tier} tier", **res})
            finally:
                srv.stop(timeout=30)
        # the limit: the bare client's ranged GETs of the same frames of the same object
        from archive.config import load as load_config
        from archive.service import Archive

        c = load_config(cfg)
        c.data_dir = data
        arc = Archive(c, readonly=True)
        try:
            located = arc.index.all_frames(sop)
            key = located.table.blob.key
            slots = [located.fragments[k - 1][0] for k in picks]
        finally:
            arc.close()
        bare = asyncio.run(_bare_ranged(weed, key, slots, 8))
        rows.append({"benchmark": f"random level-0 frames, 8 clients ({n_frames}-frame slide)",
                     "system": "bare obstore ranged GET, same object (the limit)", **bare,
                     "note": f"cold tier at {results['cold']['per_s'] / bare['per_s']:.0%} of it"})
        # migration hot -> cold beside the bare upload of the same bytes
        _cli(cfg, data, "tier", "move", "--study", st, "--to", "hot")
        dt = _cli(cfg, data, "tier", "move", "--study", st, "--to", "cold")
        mig = size_mb / dt
        up = max(_bare_upload(weed, base_file, f"bare-{i}") for i in range(2))
        rows.append({"benchmark": f"migration hot -> cold of a {size_mb:.0f} MB instance",
                     "system": "pathpacs tier move (copy, sha256 re-read, switch, delete)",
                     "MB_per_s": round(mig, 1), "seconds": round(dt, 2), "note": f"{mig / up:.0%} of the bare upload"})
        rows.append({"benchmark": f"migration hot -> cold of a {size_mb:.0f} MB instance",
                     "system": "bare obstore multipart upload, same file (the limit)", "MB_per_s": round(up, 1)})
        # index rebuild per 1,000 instances (small ones, spread over hot and warm)
        from conformance.synthetic import secondary_capture

        n = 200 if quick else 1000
        src = run_dir / "many"
        for i in range(n):
            secondary_capture(src / f"{i}.dcm", patient_id=f"PB{i % 50}")
        data2 = run_dir / "data2"
        _cli(cfg, data2, "import", str(src))
        shutil.rmtree(data2 / "index")
        dt = _cli(cfg, data2, "index", "rebuild")
        rows.append({"benchmark": "index rebuild from the blobs", "system": "pathpacs index rebuild",
                     "seconds": round(dt, 2),
                     "note": f"{dt / n * 1000:.1f} s per 1,000 instances ({n} small instances; includes the CLI's start-up)"})
    finally:
        weed.kill()
    return rows


if __name__ == "__main__":
    for r in run(Path("/tmp"), quick="--quick" in sys.argv):
        print(r)
