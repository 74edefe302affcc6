"""A 300 MB case from A to B over a WAN-like link, dropped once mid-way (issue 12).

B runs in a network namespace behind a veth pair shaped to 100 Mbit/s each way (tbf); A reaches
it through a relay that adds 25 ms each way (50 ms RTT) and closes every connection once when
40% of the case has gone through, refusing connections for a second (conformance.shaped_link:
this kernel has no netem). The job, run by `consult send --wait`, must end done with every
instance at B bit for bit (sha256 recorded at B's ingest, and B's own verify), and no instance
confirmed before the drop sent again: only the one in flight is retried."""
from __future__ import annotations

import hashlib
import json
import time

import pytest

from conftest import run_cli
from conformance import shaped_link, synthetic

TOTAL = 300 << 20


@pytest.fixture(scope="module")
def link():
    why = shaped_link.available()
    if why is not None:
        pytest.skip(why)
    with shaped_link.ShapedLink(rate="100mbit") as made:
        yield made


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large-case")
    study, paths = synthetic.large_case(folder, TOTAL)
    shas = {}
    import pydicom

    for p in paths:
        sop = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        shas[sop] = h.hexdigest()
    return folder, study, shas


@pytest.fixture(scope="module")
def b(tmp_path_factory, link):
    root = tmp_path_factory.mktemp("link-b")
    token = run_cli("token", "create", "--role", "uploader", "--role", "viewer", "--name", "hospital A",
                    data=root / "B", check=True).stdout.strip()
    srv = shaped_link.start_far_pathpacs(link, root / "B", config_text='[auth]\nmode = "token"\n', aet="HOSPB")
    srv.token = token
    yield srv
    srv.stop()


def test_300_mb_over_a_shaped_link_dropped_once_arrives_intact(tmp_path, link, case, b):
    folder, study, shas = case
    relay = shaped_link.Relay(link.far_ip, b.http_port, delay=0.025, drop_after=int(TOTAL * 0.4), outage=1.0).start()
    try:
        a = tmp_path / "A"
        run_cli("import", "--quiet", str(folder), data=a, check=True)
        cfg = tmp_path / "A.toml"
        cfg.write_text(f'[consultation]\nretry_max_seconds = 60\n\n[partners.b]\n'
                       f'dicomweb = "http://127.0.0.1:{relay.port}/dicomweb"\ntoken = "{b.token}"\ntimeout = 60\n')
        started = time.monotonic()
        res = run_cli("consult", "send", "--study", study, "--to", "b", "--wait", "--quiet", "--config", str(cfg),
                      data=a, timeout=300)
        elapsed = time.monotonic() - started
        assert res.returncode == 0, res.stdout + res.stderr
        assert relay.dropped_at is not None, "the link was never dropped"
        assert relay.connections >= 2  # reconnected after the drop
    finally:
        relay.stop()
    job_id = res.stdout.split()[0]
    job = {j["id"]: j for j in json.loads(run_cli("consult", "list", "--json", data=a, check=True).stdout)}[job_id]
    assert job["state"] == "done" and job["verified"] == len(shas) + 1, job  # + the request SR
    # 300 MB at 100 Mbit/s is >= 25 s: the link was really shaped
    assert elapsed > TOTAL * 8 / 100e6, elapsed

    from archive.config import Config
    from archive.service import Archive

    arc_b = Archive(Config(data_dir=b.data_dir), readonly=True)
    try:
        for sop, sha in shas.items():
            rec = arc_b.instance(sop)
            assert rec is not None and rec.sha256 == sha, sop
    finally:
        arc_b.close()
    res = run_cli("verify", "--quiet", data=b.data_dir)
    assert res.returncode == 0, res.stdout + res.stderr

    arc_a = Archive(Config(data_dir=a), readonly=True)
    try:
        items = [i for _, i in arc_a.consultations.items(job_id)]
    finally:
        arc_a.close()
    attempts = {i["sop"]: i["attempts"] for i in items}
    assert all(i["state"] == "confirmed" for i in items), items
    resent = [sop for sop, n in attempts.items() if n > 1]
    # the drop cut one upload (maybe two: a response lost just after B stored it); nothing
    # confirmed before the drop went again
    assert 1 <= len(resent) <= 2, attempts
    assert b.log().count("stored") >= len(shas)
