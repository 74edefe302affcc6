"""A case sent to Orthanc (issue 12): as a DIMSE partner with Storage Commitment, and as a
DICOMweb (STOW-RS) partner through Orthanc's DICOMweb plugin.

Orthanc is a real commitment SCP: it answers the N-ACTION and reports the verdict on a new
association to the AE its configuration lists for our AE title, i.e. to A's DIMSE server. The
job is run by `consult send --wait` in its own process while A's `serve` holds the DIMSE port
(the report reaches the sending process through A's index), by A's background worker (the
report reaches the sender in the same process), and by `--wait` for an archive with no server
running (the route listens on its DIMSE port for the report). Orthanc's copy is what A holds: the data
set bytes after the file meta (DIMSE: Orthanc writes its own file meta) or the whole file
(STOW), checked through Orthanc's REST API."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import requests
from pydicom.uid import generate_uid

import factory
from conftest import free_port, run_cli, start_orthanc
from conformance.bench import peers


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("consult-orthanc")


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"a": free_port(), "a2": free_port()}


@pytest.fixture(scope="module")
def orthanc(root, ports):
    if not peers.orthanc_plugins("libOrthancDicomWeb.so"):
        pytest.fail("Orthanc's DICOMweb plugin is not installed (make test installs orthanc-dicomweb)")
    o = start_orthanc(root / "orthanc", modalities={"hospa": ("HOSPA", "127.0.0.1", ports["a"]),
                                                    "hospa2": ("HOSPA2", "127.0.0.1", ports["a2"])},
                      plugins=peers.orthanc_plugins("libOrthancDicomWeb.so"))
    yield o
    o.stop()


@pytest.fixture(scope="module")
def a(root, ports, orthanc):
    config = f'''[archive]
aet = "HOSPA"
dicom_port = {ports["a"]}

[consultation]
name = "hospA"
institution = "Hospital A"
retry_max_seconds = 10

[partners.orthanc]
aet = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
commitment = true
timeout = 30

[partners.orthanc-web]
dicomweb = "{orthanc.dicomweb_url}"
'''
    srv = peers.start_pathpacs(root / "A", config_text=config, aet="HOSPA", dicom_port=ports["a"])
    yield srv
    srv.stop()


def put_case(data_dir: Path, root: Path, name: str) -> tuple[dict[str, bytes], str]:
    """A three-level slide imported into the archive at data_dir: (SOP Instance UID -> the
    file's bytes, Study Instance UID)."""
    folder = root / name
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = {}
    for i, (w, h) in enumerate(((1536, 1024), (768, 512), (384, 256))):
        ds = factory.wsi_instance(study, series, w, h, seed=i, frame_of_reference=frame, instance_number=i + 1,
                                  patient_id="PORTHANC")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[ds.SOPInstanceUID] = path.read_bytes()
    run_cli("import", "--quiet", str(folder), data=data_dir, check=True)
    return files, study


def orthanc_file(orthanc, sop: str) -> bytes:
    found = requests.post(f"{orthanc.url}/tools/lookup", data=sop, timeout=10).json()
    ids = [x["ID"] for x in found if x["Type"] == "Instance"]
    assert ids, f"{sop} is not at Orthanc"
    r = requests.get(f"{orthanc.url}/instances/{ids[0]}/file", timeout=30)
    assert r.status_code == 200
    return r.content


def jobs(a) -> dict[str, dict]:
    res = run_cli("consult", "list", "--json", data=a if isinstance(a, Path) else a.data_dir, check=True)
    return {j["id"]: j for j in json.loads(res.stdout)}


def wait_final(a, job_id: str, timeout: float = 90) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = jobs(a)[job_id]
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished: {job}")


def test_dimse_partner_with_commitment_from_the_cli(a, orthanc, root):
    files, study = put_case(a.data_dir, root, "case1")
    res = run_cli("consult", "send", "--study", study, "--to", "orthanc", "--question", "ER status?", "--wait",
                  "--quiet", "--config", str(a.config), data=a.data_dir, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr + a.log()[-3000:]
    job = jobs(a)[res.stdout.split()[0]]
    assert job["state"] == "done" and job["route"] == "dimse", job
    assert job["verified"] == len(files) + 1, job  # the slide's levels and the request SR, counted by C-FIND
    for sop, data in files.items():
        assert sha(factory.dataset_bytes(orthanc_file(orthanc, sop))) == sha(factory.dataset_bytes(data)), sop
    # Orthanc committed on a new association to A's DIMSE server, which handed the verdict
    # to the sending process through the index
    assert "commitment" in a.log() and "recorded for the sending process" in a.log(), a.log()[-3000:]
    assert job["instances_sent"] == len(files) + 1


def test_dimse_partner_from_the_background_worker(a, orthanc, root):
    files, study = put_case(a.data_dir, root, "case2")
    res = run_cli("consult", "send", "--study", study, "--to", "orthanc", "--quiet", "--config", str(a.config),
                  data=a.data_dir, check=True)
    job = wait_final(a, res.stdout.split()[0])
    assert job["state"] == "done" and job["verified"] == len(files) + 1, job
    for sop, data in files.items():
        assert sha(factory.dataset_bytes(orthanc_file(orthanc, sop))) == sha(factory.dataset_bytes(data)), sop
    assert "reported by ORTHANC on a new association" in a.log(), a.log()[-3000:]


def test_dicomweb_partner_orthanc_stow(a, orthanc, root):
    files, study = put_case(a.data_dir, root, "case3")
    res = run_cli("consult", "send", "--study", study, "--to", "orthanc-web", "--wait", "--quiet",
                  "--config", str(a.config), data=a.data_dir, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    job = jobs(a)[res.stdout.split()[0]]
    assert job["state"] == "done" and job["route"] == "dicomweb" and job["verified"] == len(files) + 1, job
    for sop, data in files.items():
        assert sha(orthanc_file(orthanc, sop)) == sha(data), sop


def test_no_server_running_the_route_takes_the_report_itself(root, ports, orthanc, tmp_path):
    """Archive A2 has no `serve`: the sending process listens on A2's DIMSE port for the
    N-EVENT-REPORT while it waits. A partner that rejects the association fails the job with
    the partner's reason, and A2 keeps its copy."""
    data = root / "A2"
    files, study = put_case(data, root, "case4")
    strict = start_orthanc(tmp_path / "strict", extra={"DicomCheckCalledAet": True})
    try:
        cfg = root / "A2.toml"
        cfg.write_text(f'''[archive]
aet = "HOSPA2"
dicom_port = {ports["a2"]}

[partners.orthanc]
aet = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
timeout = 30

[partners.strict]
aet = "NOT-ORTHANC"
host = "127.0.0.1"
port = {strict.dicom_port}
''')
        res = run_cli("consult", "send", "--study", study, "--to", "orthanc", "--wait", "--quiet",
                      "--config", str(cfg), data=data, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        job = jobs(data)[res.stdout.split()[0]]
        assert job["state"] == "done" and job["verified"] == len(files) + 1, job
        for sop, body in files.items():
            assert sha(factory.dataset_bytes(orthanc_file(orthanc, sop))) == sha(factory.dataset_bytes(body)), sop

        res = run_cli("consult", "send", "--study", study, "--to", "strict", "--wait", "--quiet",
                      "--config", str(cfg), data=data, timeout=180)
        assert res.returncode == 1, res.stdout + res.stderr
        job = jobs(data)[res.stdout.split()[0]]
        assert job["state"] == "failed" and "Called AE title not recognised" in job["error"], job
        assert requests.get(f"{strict.url}/instances", timeout=10).json() == []
    finally:
        strict.stop()
    res = run_cli("verify", "--quiet", data=data)
    assert res.returncode == 0, res.stdout + res.stderr


def test_commitment_asked_again_after_the_report_never_came_nothing_resent(root, orthanc, tmp_path):
    """Orthanc does not know A3's AE title, so it drops A3's commitment request (Orthanc refuses
    N-ACTIONs of unlisted AEs): the job fails saying so, its instances stored but unconfirmed. Once Orthanc knows A3
    (REST /modalities) and A3's `serve` runs, `consult retry` asks for commitment again and
    the job ends done without sending any instance a second time."""
    data, port = root / "A3", free_port()
    files, study = put_case(data, root, "case5")
    partner = f'[partners.orthanc]\naet = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\ntimeout = 5\n'
    cfg = root / "A3.toml"
    cfg.write_text(f'[archive]\naet = "HOSPA3"\ndicom_port = {port}\n\n{partner}')
    res = run_cli("consult", "send", "--study", study, "--to", "orthanc", "--wait", "--quiet", "--config", str(cfg),
                  data=data, timeout=180)
    assert res.returncode == 1, res.stdout + res.stderr
    job_id = res.stdout.split()[0]
    job = jobs(data)[job_id]
    assert job["state"] == "failed" and "Storage Commitment request" in job["error"], job
    assert "does it know our AE title 'HOSPA3'" in job["error"], job

    from archive.config import Config
    from archive.service import Archive

    def items() -> list[dict]:
        arc = Archive(Config(data_dir=data), readonly=True)
        try:
            return [i for _, i in arc.consultations.items(job_id)]
        finally:
            arc.close()

    assert {i["state"] for i in items()} == {"stored"}, items()
    r = requests.put(f"{orthanc.url}/modalities/hospa3", json={"AET": "HOSPA3", "Host": "127.0.0.1", "Port": port},
                     timeout=10)
    assert r.status_code == 200, r.text
    run_cli("consult", "retry", job_id, "--config", str(cfg), data=data, check=True)
    srv = peers.start_pathpacs(data, config_text=cfg.read_text(), aet="HOSPA3", dicom_port=port)
    try:
        job = wait_final(data, job_id)
    finally:
        srv.stop()
    assert job["state"] == "done" and job["verified"] == len(files) + 1, job
    got = items()
    assert all(i["state"] == "confirmed" and i["attempts"] == 1 for i in got), got


def test_an_instance_the_partner_no_longer_holds_is_not_committed(root, ports, orthanc):
    """The route itself (in this process, a listener on A2's port for the report): Orthanc
    lost one of two stored instances before the commitment request, and says so."""
    from archive.config import Config, Partner
    from archive.consult.dimse_route import DimseRoute
    from archive.consult.routes import Item

    folder = root / "case6"
    study, series = generate_uid(), generate_uid()
    items = []
    for i in range(2):
        ds = factory.wsi_instance(study, series, 512, 512, seed=i, instance_number=i + 1)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items.append(Item(ds.SOPInstanceUID, ds.SOPClassUID, study, path.stat().st_size,
                          chunks=lambda path=path: iter([path.read_bytes()])))
    cfg = Config(data_dir=root / "route-data", aet="HOSPA2", dicom_port=ports["a2"])
    route = DimseRoute(Partner(name="orthanc", aet=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port,
                               timeout=20), cfg)
    try:
        assert [route.send(it).committed for it in items] == [False, False]
        lost = items[1].sop_uid
        found = requests.post(f"{orthanc.url}/tools/lookup", data=lost, timeout=10).json()
        assert requests.delete(f"{orthanc.url}/instances/{found[0]['ID']}", timeout=10).status_code == 200
        held = route.confirm([it.sop_uid for it in items])
    finally:
        route.close()
    assert held == {items[0].sop_uid}
    assert route.refused[lost].startswith("commitment refused: "), route.refused
