"""Shared fixtures: a real `pathpacs serve` process on free ports, and generated data."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conformance.bench.peers import free_port, wait_port  # noqa: F401  (tests import them from here)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


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


@dataclass
class Server:
    data_dir: Path
    dicom_port: int
    http_port: int
    aet: str = "PATHPACS"
    config: Path | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    extra: list[str] = field(default_factory=list)
    preexec_fn: object = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicomweb"

    def start(self) -> "Server":
        cmd = pathpacs_cmd() + [
            "serve", "--data", str(self.data_dir), "--dicom-port", str(self.dicom_port),
            "--http-port", str(self.http_port), "--aet", self.aet, "--host", "127.0.0.1",
        ]
        if self.config:
            cmd += ["--config", str(self.config)]
        self.log_path = self.log_path or self.data_dir.parent / f"server-{self.dicom_port}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd + self.extra, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     preexec_fn=self.preexec_fn)
        wait_port(self.dicom_port, self.proc)
        wait_port(self.http_port, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


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


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def start_orthanc(workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                  plugins: list[str] | None = None) -> Orthanc:
    """A real Orthanc (Debian package) on free ports, storing under `workdir`."""
    import json

    binary = need("Orthanc")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    cfg = {
        "Name": "peer", "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "Plugins": plugins or [], "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
        "StorageCompression": False, "OverwriteInstances": True,
        "DicomScuTimeout": 30, "LimitFindResults": 0, "LimitFindInstances": 0,
    }
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    log = open(workdir / "orthanc.log", "wb")
    proc = subprocess.Popen([binary, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    wait_port(http_port, proc, timeout=60)
    wait_port(dicom_port, proc, timeout=60)
    return Orthanc(http_port, dicom_port, "ORTHANC", proc)


@pytest.fixture
def orthanc_factory(tmp_path):
    started: list[Orthanc] = []

    def factory(**kw) -> Orthanc:
        o = start_orthanc(tmp_path / f"orthanc{len(started)}", **kw)
        started.append(o)
        return o

    yield factory
    for o in started:
        o.proc.terminate()
        try:
            o.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            o.proc.kill()


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
