"""Several pathpacs nodes over one PostgreSQL index and S3 tiers on SeaweedFS, behind HAProxy.

`start_cluster(workdir, n, postgres, seaweedfs, bucket)` -> a `Cluster`: n `pathpacs serve`
processes (`peers.Pathpacs`, node names n1..nN, each its own data directory for staging and audit,
its own DIMSE and HTTP port), the shared DSN (a fresh database of `postgres`), the tiers in
`bucket` under a fresh prefix, and HAProxy in front. Each node's config is the `node.toml`
example of docs/deployment.md with its placeholders filled in (the doc's examples are the ones
the tests run); `settings` change keys of the example (`{"rules_every_minutes": "0.1"}`: the
line `rules_every_minutes = ...` rewritten), `extra_toml` is appended (a test's rules). Used by
tests/test_cluster.py and the "nodes" benchmark.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from conformance.bench import peers
from conformance.bench.peers import Haproxy, Pathpacs, Postgres, SeaweedFS, doc_example, free_port, render


def node_config(*, node: str, dicom_port: int, http_port: int, dsn: str, seaweedfs: SeaweedFS, bucket: str,
                prefix: str, extra_toml: str = "", settings: dict[str, str] | None = None) -> str:
    """docs/deployment.md's node.toml for one node on 127.0.0.1; `settings`: key -> TOML value
    replacing the value of that key's line in the example (a key the example lacks is an error)."""
    k = seaweedfs.store_kwargs()
    values = {"HOST": "127.0.0.1", "DICOM_PORT": dicom_port, "HTTP_PORT": http_port, "PG_DSN": dsn, "NODE": node,
              "LB_ADDRESS": "127.0.0.1", "S3_ENDPOINT": k["endpoint"], "S3_BUCKET": bucket,
              "S3_PREFIX": prefix, "S3_REGION": k["region"], "S3_ACCESS_KEY": k["access_key"],
              "S3_SECRET_KEY": k["secret_key"]}
    text = render(doc_example("node.toml"), values)
    for key, value in (settings or {}).items():
        text, n = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", text, flags=re.M)
        if n != 1:
            raise KeyError(f"docs/deployment.md's node.toml has {n} lines setting {key}")
    return text + ("\n" + extra_toml if extra_toml else "")


@dataclass
class Cluster:
    workdir: Path
    dsn: str
    bucket: str
    prefix: str
    nodes: list[Pathpacs] = field(default_factory=list)
    haproxy: Haproxy | None = None

    @property
    def names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(len(self.nodes))]

    @property
    def http_url(self) -> str:
        """The balancer's HTTP address."""
        assert self.haproxy is not None
        return self.haproxy.url

    @property
    def dimse_port(self) -> int:
        """The balancer's DIMSE port."""
        assert self.haproxy is not None
        return self.haproxy.dimse_port

    def config(self, i: int) -> Path:
        """Node i's config file (0-based)."""
        assert self.nodes[i].config is not None
        return self.nodes[i].config

    def cli(self, i: int, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        """`pathpacs ARGS --config <node i> --data <node i>` (a verb run on that node's machine)."""
        cmd = [sys.executable, "-m", "archive", *args, "--config", str(self.config(i)),
               "--data", str(self.nodes[i].data_dir)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=peers.ROOT, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} on n{i + 1} -> {res.returncode}: {res.stderr.strip()[-800:]}")
        return res

    def token(self, *roles: str, i: int = 0) -> str:
        """A new API token with these roles (created through node i's CLI: the shared index)."""
        args = ["token", "create", "--name", f"cluster-{uuid.uuid4().hex[:6]}"]
        for r in roles or ("viewer", "uploader"):
            args += ["--role", r]
        return self.cli(i, *args, check=True).stdout.strip().splitlines()[-1]

    def kill9(self, i: int) -> None:
        self.nodes[i].kill9()

    def restart(self, i: int, timeout: float = 90) -> Pathpacs:
        """Start node i again on its ports and data directory (after kill9 or stop)."""
        node = self.nodes[i]
        if node.proc is not None:
            node.stop()
        node.start(timeout=timeout)
        peers.wait_http(f"{node.http_url}/healthz", node.proc, timeout)
        if self.haproxy is not None:
            self.haproxy.wait_up([self.names[i]])
        return node

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for node in self.nodes:
            node.stop(timeout=30)

    def logs(self) -> str:
        """Every node's log and HAProxy's, for a failing test's message."""
        parts = [f"--- {n}\n{node.log()[-3000:]}" for n, node in zip(self.names, self.nodes)]
        if self.haproxy is not None:
            parts.append(f"--- haproxy\n{self.haproxy.log()[-2000:]}")
        return "\n".join(parts)


def start_cluster(workdir: Path, n: int, postgres: Postgres, seaweedfs: SeaweedFS, bucket: str, *,
                  dsn: str | None = None, prefix: str | None = None, extra_toml: str = "",
                  settings: dict[str, str] | None = None,
                  quiet: bool = False, balancer: bool = True, timeout: float = 90) -> Cluster:
    """n nodes (started one after another: the first creates the schema) and HAProxy in front."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(workdir, dsn or postgres.create_database(), bucket,
                      prefix if prefix is not None else f"c{uuid.uuid4().hex[:8]}/")
    try:
        for i in range(n):
            name = f"n{i + 1}"
            dicom_port, http_port = free_port(), free_port()
            cfg = workdir / f"{name}.toml"
            cfg.write_text(node_config(node=name, dicom_port=dicom_port, http_port=http_port, dsn=cluster.dsn,
                                       seaweedfs=seaweedfs, bucket=bucket, prefix=cluster.prefix,
                                       extra_toml=extra_toml, settings=settings))
            node = Pathpacs(workdir / name / "data", dicom_port, http_port, config=cfg, quiet=quiet,
                            log_path=workdir / f"{name}.log")
            cluster.nodes.append(node)
            node.start(timeout=timeout)
            peers.wait_http(f"{node.http_url}/healthz", node.proc, timeout)
        if balancer:
            cluster.haproxy = peers.start_haproxy(workdir / "haproxy", [p.http_port for p in cluster.nodes],
                                                  [p.dicom_port for p in cluster.nodes], names=cluster.names)
            cluster.haproxy.wait_up()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_until(predicate, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned), else TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)
