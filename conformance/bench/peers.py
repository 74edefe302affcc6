"""Start the systems a benchmark compares: `pathpacs serve` and Orthanc, on free ports."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
# The release before frame checksums (schema 3): stop 5 as it landed. The upgrade test writes
# an archive with its code, and the frame benchmark measures it beside today's code.
PREVIOUS_RELEASE = "5747fcb8ba5b9931c7ba5a5ba9cfc527c61d20f7"


def previous_release(dest: Path) -> Path:
    """Extract PREVIOUS_RELEASE's source tree from this repository's git history into `dest`.
    Run it with PYTHONPATH=dest (its `archive` package then shadows ours)."""
    if (dest / "archive" / "cli.py").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE], capture_output=True,
                         check=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set of a live process, in MB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Proc:
    proc: subprocess.Popen
    http_port: int
    dicom_port: int
    aet: str
    workdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def start_pathpacs(workdir: Path, extra: list[str] | None = None) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    cmd = [sys.executable, "-m", "archive", "serve", "--data", str(workdir / "data"), "--host", "127.0.0.1",
           "--dicom-port", str(dicom), "--http-port", str(http), "--quiet", *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=open(workdir / "pathpacs.log", "ab"), stderr=subprocess.STDOUT)
    wait_port(dicom, proc)
    wait_port(http, proc)
    return Proc(proc, http, dicom, "PATHPACS", workdir)


def start_orthanc(workdir: Path, plugins: list[str] | None = None, extra: dict | None = None) -> Proc:
    binary = shutil.which("Orthanc")
    if binary is None:
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
    workdir.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    cfg = {
        "Name": "bench", "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": plugins or [], "StorageCompression": False,
        "DicomCheckCalledAet": False, "ConcurrentJobs": 2, "HttpThreadsCount": 50,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    cfg.update(extra or {})
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([binary, str(workdir / "orthanc.json")],
                            stdout=open(workdir / "orthanc.log", "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ})
    wait_port(http, proc)
    wait_port(dicom, proc)
    return Proc(proc, http, dicom, "ORTHANC", workdir)
