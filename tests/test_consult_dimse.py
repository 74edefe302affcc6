"""The DIMSE route against real SCPs (issue 12): a pathpacs B over DICOM TLS with Storage
Commitment reported on the same association, and a pynetdicom Storage SCP run by the test that
answers what a partner in trouble answers: out of resources (0xA700, retried until it stores),
and "data set does not match SOP class" (0xA900, the job fails with that reason)."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

import factory
from certs import make_ca
from conftest import Server, free_port, run_cli
from archive.dimse.contexts import STORAGE_SOP_CLASSES, STORAGE_TRANSFER_SYNTAXES, VERIFICATION


def put_case(data: Path, folder: Path) -> tuple[dict[str, str], str]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    shas = {}
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(((1024, 768), (512, 384))):
        ds = factory.wsi_instance(study, series, w, h, seed=i, frame_of_reference=frame, instance_number=i + 1)
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        shas[ds.SOPInstanceUID] = hashlib.sha256(factory.dataset_bytes(path.read_bytes())).hexdigest()
    run_cli("import", "--quiet", str(folder), data=data, check=True)
    return shas, study


def send(data: Path, cfg: Path, study: str, partner: str) -> tuple[int, dict, str]:
    res = run_cli("consult", "send", "--study", study, "--to", partner, "--wait", "--quiet", "--config", str(cfg),
                  data=data, timeout=180)
    job_id = res.stdout.split()[0] if res.stdout.strip() else ""
    jobs = {j["id"]: j for j in json.loads(run_cli("consult", "list", "--json", data=data, check=True).stdout)}
    return res.returncode, jobs.get(job_id, {}), res.stderr


@pytest.fixture(scope="module")
def b_tls(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dimse-b")
    ca = make_ca(tmp / "pki")
    server = ca.issue("pathpacs.test", server=True)
    tls_port = free_port()
    cfg = tmp / "b.toml"
    cfg.write_text(f'[dimse]\ntls_port = {tls_port}\n[tls]\ncert = "{server.cert}"\nkey = "{server.key}"\n')
    s = Server(tmp / "data", free_port(), free_port(), aet="HOSPB", config=cfg)
    s.wait_ports = (s.dicom_port, tls_port, s.http_port)
    s.start()
    s.tls_port, s.ca = tls_port, ca.cert
    yield s
    s.stop()


class ScriptedScp:
    """A Storage SCP answering C-STOREs with the statuses of `script` in turn, then 0x0000."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.stored: list[str] = []
        self.answers: list[int] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="SCRIPTED")
        for sop_class in STORAGE_SOP_CLASSES[:120]:
            ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.77.1.6", STORAGE_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33", STORAGE_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, lambda event: 0)])

    def on_store(self, event):
        with self.lock:
            status = self.script.pop(0) if self.script else 0x0000
            self.answers.append(status)
            if status == 0:
                self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return status

    def close(self) -> None:
        self.server.shutdown()


def test_tls_partner_with_commitment_on_the_same_association(tmp_path, b_tls):
    shas, study = put_case(tmp_path / "A", tmp_path / "case")
    cfg = tmp_path / "A.toml"
    cfg.write_text(f'[archive]\naet = "HOSPA"\n\n[partners.b]\naet = "HOSPB"\nhost = "127.0.0.1"\n'
                   f'port = {b_tls.tls_port}\ntls = true\nca = "{b_tls.ca}"\ntimeout = 30\n')
    code, job, err = send(tmp_path / "A", cfg, study, "b")
    assert code == 0, err
    assert job["state"] == "done" and job["route"] == "dimse" and job["verified"] == len(shas) + 1, job
    from archive.config import Config
    from archive.service import Archive

    arc = Archive(Config(data_dir=b_tls.data_dir), readonly=True)
    try:
        for sop, sha in shas.items():
            rec = arc.instance(sop)
            assert rec is not None
            stored = b"".join(arc.instance_chunks(rec))
            assert hashlib.sha256(factory.dataset_bytes(stored)).hexdigest() == sha  # bit for bit, over TLS
    finally:
        arc.close()
    assert "reported on the same association" in b_tls.log(), b_tls.log()[-2000:]


def test_out_of_resources_is_retried_and_a_mismatch_fails_the_job(tmp_path):
    shas, study = put_case(tmp_path / "A", tmp_path / "case")
    busy, bad = ScriptedScp([0xA700, 0xA701]), ScriptedScp([0xA900])
    try:
        cfg = tmp_path / "A.toml"
        cfg.write_text(
            '[consultation]\nretry_max_seconds = 30\n\n'
            f'[partners.busy]\naet = "SCRIPTED"\nhost = "127.0.0.1"\nport = {busy.port}\ncommitment = false\n\n'
            f'[partners.bad]\naet = "SCRIPTED"\nhost = "127.0.0.1"\nport = {bad.port}\ncommitment = false\n')
        code, job, err = send(tmp_path / "A", cfg, study, "busy")
        assert code == 0, err
        assert job["state"] == "done" and job["verified"] is None, job  # the SCP answers no C-FIND
        assert busy.answers[:2] == [0xA700, 0xA701] and set(shas) <= set(busy.stored)
        assert len(busy.stored) == len(shas) + 1  # each instance (and the request SR) stored once

        code, job, err = send(tmp_path / "A", cfg, study, "bad")
        assert code == 1
        assert job["state"] == "failed", job
        assert "data set does not match SOP class (C-STORE status 0xA900)" in job["error"], job
        assert bad.answers == [0xA900]  # not retried
    finally:
        busy.close()
        bad.close()
