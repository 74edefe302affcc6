"""`serve --http-workers N`: several HTTP processes on one port share the index."""
from __future__ import annotations

import json
import os
import time
import urllib.request

import pydicom

import factory
from conftest import run_cli


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def test_http_workers_share_the_index_and_stop_with_the_server(make_server, tmp_path):
    srv = make_server(extra=["--http-workers", "2"])
    deadline = time.monotonic() + 30
    while len(_children(srv.proc.pid)) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = _children(srv.proc.pid)
    assert workers, "no worker process started"
    files = factory.wsi_series(tmp_path / "in", patient_id="W1")
    run_cli("import", "--quiet", str(tmp_path / "in"), data=srv.data_dir, check=True)
    sop = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    for _ in range(40):  # new connections land on either process
        with urllib.request.urlopen(f"{srv.dicomweb_url}/instances?SOPInstanceUID={sop}", timeout=10) as r:
            body = json.loads(r.read())
        assert [x["00080018"]["Value"][0] for x in body] == [sop]
    assert srv.stop() == 0
    time.sleep(0.5)
    assert [p for p in workers if os.path.exists(f"/proc/{p}") and
            open(f"/proc/{p}/stat").read().split()[2] != "Z"] == []
