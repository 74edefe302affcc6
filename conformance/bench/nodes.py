"""C-STORE aggregate MB/s through HAProxy into 1, 2 and 3 pathpacs nodes over one PostgreSQL index
and SeaweedFS (S3) tiers (conformance/cluster.py: the configs of docs/deployment.md).

The same instances each time (a fresh database and S3 prefix per cluster size), sent by parallel
dcmsend processes through the balancer's DIMSE port (leastconn spreads the associations). On this
2-core machine every node, PostgreSQL, SeaweedFS, HAProxy and the senders share the CPUs: the
point is no contention cliff (3 nodes >= 1 node), not scaling; NOTES states the projection.

Before the cluster, the decomposition (`decompose`): one `pathpacs serve` straight (no HAProxy)
with LMDB or PostgreSQL and a filesystem or S3 ingest tier, and the bare obstore PUT of the same
files (the S3 floor); the cluster's 1 node is also sent to straight (HAProxy's share).
"""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

from pydicom.uid import generate_uid

from conformance.cluster import start_cluster
from conformance.synthetic import wsi_header, write_streamed

from .ingest import _tile_pool
from .peers import start_pathpacs, start_postgres, start_seaweedfs

SENDERS = 6  # parallel dcmsend processes (scanners sending at once)
ROUNDS = 4  # the best of four rounds per cluster size, the sizes in turn each round (a shared, noisy machine)

NOTES = """Where one node's C-STORE time goes (the "straight to one node" rows: the same instances, the
four configurations in turn round by round, no HAProxy). Ranges over 4 runs of this section on
2026-12-02 (another job shared the cores, so compare within a run): the S3 ingest tier is the
cost, a node with SeaweedFS runs at 0.35-0.58 x its filesystem rate whichever index, 0.56-0.79 x
the bare obstore PUT of the same files (the S3 floor row, no DICOM, no index: 120-151 MB/s);
PostgreSQL instead of LMDB is 0.75-1.06 x on the filesystem and 0.86-1.03 x beside S3; HAProxy is
within the noise (0.92-1.14 x the cluster's node straight); 3 nodes vs 1 ranged 0.85-1.45 x.
CPU seconds per 273 MB (/proc, separate runs): SeaweedFS 2.1-2.6 s in every configuration with
S3, the pathpacs node 0.8-1.1 s (filesystem) / 1.3 s (S3), the six dcmsend 0.25 s: on 2 shared
cores SeaweedFS is the bound. py-spy of a PostgreSQL + SeaweedFS node: of ingest()'s wall time
77% is the S3 PUT (obstore, GIL released), 13% add_instance's transaction, 2% add_pending, 3%
describe (CRC32C, DICOM JSON), 1% parse (1.2 ms per 8 MB file); the node's Python holds the GIL
~16% of the time, so pathpacs' own code is not what limits this machine. One second sha256 of
every byte was avoidable: obstore signed each PUT's payload (hashing the body again after ingest
did); over https the store now sends UNSIGNED-PAYLOAD (TLS protects the body), which halves the
client's CPU per upload (0.31-0.36 -> 0.15-0.22 s per 273 MB, measured over http with it
forced); over http, as here, the signature stays. The 37 MB/s once recorded for 1 node through
HAProxy was taken under other load: 83-105 MB/s in these runs.

Projection to a real cluster (assumptions stated, not measured here). On this machine the
nodes, PostgreSQL, SeaweedFS (which writes every byte again to the same disk), HAProxy and the six
dcmsend senders share 2 cores: the aggregate is bound by the CPU of the whole box, so adding nodes
can only show that there is no contention cliff (no lock or pool convoy in the shared index), not
scaling. A node's work per instance is sha256 and CRC32C while receiving, one S3 PUT and one short
index transaction (advisory locks per patient, study and series only); nodes share nothing but
PostgreSQL commits (a few per instance; one PostgreSQL server commits thousands per second) and the
S3 service's bandwidth. Assumptions: each node on its own machine with >= 4 cores, PostgreSQL on its
own machine, S3 and network not saturated (10 GbE). Then each node ingests at least the 1-node rate
above (which here also pays for PostgreSQL and SeaweedFS on the same cores; this machine's
single-file S3 upload is ~200 MB/s, "s3 client") and N nodes give about N x that rate until the S3
service or the network saturates. Six scanners writing 2 GB slides every 4 minutes need ~50 MB/s:
one node carries them; more nodes are for availability and reading load."""


def make_instances(outdir: Path, count: int, mb_each: float, tile: int = 256) -> tuple[list[Path], int]:
    """`count` WSI instances of about `mb_each` MB, one study per sender (realistic JPEG tiles)."""
    outdir.mkdir(parents=True, exist_ok=True)
    pool = _tile_pool(128, tile)
    mean = sum(map(len, pool)) / len(pool) + 8
    n = max(1, int(mb_each * 1e6 / mean))
    cols = int(n ** 0.5)
    rows = max(1, n // cols)
    studies = [generate_uid() for _ in range(SENDERS)]
    paths, total = [], 0
    for i in range(count):
        hdr = wsi_header(studies[i % SENDERS], generate_uid(), cols * tile, rows * tile, tile, instance_number=i + 1)
        p = outdir / f"i{i:03d}.dcm"
        total += write_streamed(p, hdr, (pool[(i * 7 + j) % len(pool)] for j in range(cols * rows)), cols * rows)
        paths.append(p)
    return paths, total


def send_parallel(port: int, files: list[Path], senders: int = SENDERS) -> float:
    """Wall time for `senders` dcmsend processes, each with its share of the files."""
    shares = [files[i::senders] for i in range(senders)]
    t = time.perf_counter()
    procs = [subprocess.Popen(["dcmsend", "-aec", "PATHPACS", "127.0.0.1", str(port), *map(str, share)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for share in shares if share]
    errors = [p.communicate()[1] for p in procs]
    dt = time.perf_counter() - t
    failed = [e for p, e in zip(procs, errors) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} dcmsend failed: {failed[0].strip()[-300:]}")
    return dt


# The decomposition: one `pathpacs serve`, no HAProxy, each index backend with each ingest tier.
SINGLE = (("lmdb", "fs", "LMDB + filesystem"), ("lmdb", "s3", "LMDB + SeaweedFS"),
          ("postgresql", "fs", "PostgreSQL + filesystem"), ("postgresql", "s3", "PostgreSQL + SeaweedFS"))


def single_config(backend: str, tier: str, pg, weed, bucket: str, prefix: str) -> str:
    """A one-node config: the LMDB or PostgreSQL index, a filesystem or S3 "hot" ingest tier."""
    text = ""
    if backend == "postgresql":
        text += f'[index]\nbackend = "postgresql"\ndsn = "{pg.create_database()}"\npool_size = 8\n\n'
    if tier == "s3":
        k = weed.store_kwargs()
        text += (f'[tiers.hot]\ns3 = {{ endpoint = "{k["endpoint"]}", bucket = "{bucket}", prefix = "{prefix}hot", '
                 f'region = "{k["region"]}", access_key = "{k["access_key"]}", secret_key = "{k["secret_key"]}" }}\n')
    return text


def s3_floor(weed, bucket: str, prefix: str, files: list[Path], senders: int = SENDERS) -> float:
    """The bare S3 client: obstore puts of the same files, `senders` at once (threads), the way
    storage_tiers.S3Store uploads a staged file (one PUT, multipart above its threshold)."""
    from concurrent.futures import ThreadPoolExecutor

    from storage_tiers.s3 import S3Store

    store = S3Store("floor", bucket=bucket, prefix=prefix, **weed.store_kwargs())
    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(senders) as pool:
            list(pool.map(lambda ip: store.put_file(ip[1], f"f{ip[0]:04d}"), enumerate(files)))
        return time.perf_counter() - t
    finally:
        store.close()


def decompose(workdir: Path, files: list[Path], count: int, mb_each: float, mb: float, pg, weed,
              bucket: str) -> list[dict]:
    """Rows of one node straight (no HAProxy) with each index and tier, and the S3 floor. The
    configurations take turns round by round (the machine's noise falls on all of them alike)."""
    times: dict[tuple[str, str], list[float]] = {(b, t): [] for b, t, _ in SINGLE}
    floor: list[float] = []
    servers = {}
    try:
        for b, t, _ in SINGLE:
            cfg = single_config(b, t, pg, weed, bucket, f"s{uuid.uuid4().hex[:8]}/")
            srv = start_pathpacs(workdir / f"single-{b}-{t}" / "data", config_text=cfg, quiet=True)
            servers[(b, t)] = srv
            send_parallel(srv.dicom_port, files[:SENDERS])  # warm-up
        for r in range(ROUNDS):
            fresh, _ = make_instances(workdir / f"single-files-{r}", count, mb_each)
            floor.append(s3_floor(weed, bucket, f"floor{r}-{uuid.uuid4().hex[:6]}/", fresh))
            for key, srv in servers.items():
                # each configuration its own instances (new UIDs), the same sizes and tiles
                fresh, _ = make_instances(workdir / f"single-files-{r}", count, mb_each)
                times[key].append(send_parallel(srv.dicom_port, fresh))
            shutil.rmtree(workdir / f"single-files-{r}", ignore_errors=True)
    finally:
        for srv in servers.values():
            srv.stop(timeout=30)
        for b, t, _ in SINGLE:
            shutil.rmtree(workdir / f"single-{b}-{t}", ignore_errors=True)
    bench = f"C-STORE {mb:.0f} MB ({count} instances, {SENDERS} dcmsend in parallel) straight to one node"
    base = min(times[("lmdb", "fs")])
    rows = []
    for b, t, label in SINGLE:
        dt = min(times[(b, t)])
        rows.append({"benchmark": bench, "system": f"1 node ({label})", "value": f"{mb / dt:.0f} MB/s ({dt:.2f} s)",
                     "rounds": " / ".join(f"{mb / x:.0f}" for x in times[(b, t)]) + " MB/s",
                     "note": "the reference" if (b, t) == ("lmdb", "fs") else f"{base / dt:.2f} x LMDB + filesystem"})
    dt = min(floor)
    rows.append({"benchmark": f"S3 PUT of the same {mb:.0f} MB ({count} files, {SENDERS} in parallel)",
                 "system": "obstore (storage_tiers.S3Store.put_file) -> SeaweedFS",
                 "value": f"{mb / dt:.0f} MB/s ({dt:.2f} s)", "rounds": " / ".join(f"{mb / x:.0f}" for x in floor) + " MB/s",
                 "note": "the S3 floor: no DICOM, no index"})
    return rows


def run(workdir: Path, quick: bool = False) -> list[dict]:
    count, mb_each = (12, 4) if quick else (36, 8)
    files, total = make_instances(workdir / "files", count, mb_each)
    mb = total / 1e6
    pg = start_postgres()
    weed = start_seaweedfs(workdir / "weed")
    rows: list[dict] = []
    rates: dict[int, float] = {}
    try:
        bucket = weed.create_bucket(f"bench-nodes-{uuid.uuid4().hex[:8]}")
        rows += decompose(workdir, files, count, mb_each, mb, pg, weed, bucket)
        clusters: dict = {}
        try:
            for n in (1, 2, 3):  # all three up at once, measured in turn round by round (noise spread alike)
                clusters[n] = start_cluster(workdir / f"cluster{n}", n, pg, weed, bucket, quiet=True)
                send_parallel(clusters[n].dimse_port, files[:SENDERS])  # warm-up: connections, pools, S3 sessions
            times: dict[int, list[float]] = {1: [], 2: [], 3: []}
            direct: list[float] = []
            for r in range(ROUNDS):  # new instances each round (the same sizes and tiles)
                for n, cl in clusters.items():
                    fresh, _ = make_instances(workdir / f"files{n}-{r}", count, mb_each)
                    times[n].append(send_parallel(cl.dimse_port, fresh))
                    shutil.rmtree(workdir / f"files{n}-{r}", ignore_errors=True)
                fresh, _ = make_instances(workdir / f"files-direct-{r}", count, mb_each)
                direct.append(send_parallel(clusters[1].nodes[0].dicom_port, fresh))  # HAProxy bypassed
                shutil.rmtree(workdir / f"files-direct-{r}", ignore_errors=True)
            for n, cl in clusters.items():
                dt = min(times[n])
                stats = cl.cli(0, "stats", check=True).stdout
                stored = int(next(line.split()[1] for line in stats.splitlines() if line.startswith("instances")))
                sent = (ROUNDS + (ROUNDS if n == 1 else 0)) * count + min(SENDERS, count)
                if stored != sent:
                    raise RuntimeError(f"{stored} instances stored, {sent} sent")
                rates[n] = mb / dt
                rows.append({"benchmark": f"C-STORE {mb:.0f} MB ({count} instances, {SENDERS} dcmsend in parallel) through HAProxy",
                             "system": f"{n} node{'s' if n > 1 else ''} (PostgreSQL + SeaweedFS)",
                             "value": f"{mb / dt:.0f} MB/s ({dt:.2f} s)",
                             "rounds": " / ".join(f"{mb / t:.0f}" for t in times[n]) + " MB/s",
                             "note": f"{rates[n] / rates[1]:.2f} x one node" if n > 1 else "durable: S3 PUT + index commit"})
                if n == 1:
                    rows.append({"benchmark": f"C-STORE {mb:.0f} MB ({count} instances, {SENDERS} dcmsend in parallel) "
                                              "straight to the node, no HAProxy",
                                 "system": "1 node of the cluster (its node.toml: PostgreSQL + SeaweedFS)",
                                 "value": f"{mb / min(direct):.0f} MB/s ({min(direct):.2f} s)",
                                 "rounds": " / ".join(f"{mb / t:.0f}" for t in direct) + " MB/s",
                                 "note": f"through HAProxy: {min(direct) / dt:.2f} x this rate"})
        finally:
            for n, cl in clusters.items():
                cl.stop()
                shutil.rmtree(workdir / f"cluster{n}", ignore_errors=True)
    finally:
        weed.stop(timeout=1)
        pg.remove()
    ratio = rates[3] / rates[1]
    verdict = ("no contention cliff" if ratio >= 1 else "no contention cliff (within 5% noise)" if ratio >= 0.95
               else "a contention cliff: 3 nodes < 1 node")
    rows.append({"benchmark": "3 nodes vs 1 node (2 shared cores)", "system": "pathpacs cluster",
                 "value": f"{ratio:.2f} x", "note": f"{verdict} (target >= 1 x on this machine)"})
    return rows
