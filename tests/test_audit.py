"""The audit trail (archive.audit): tamper detection, several writers, real DIMSE and DICOMweb
calls recorded with the right user, address and study (reads aggregated), the CLI, and
forwarding to a real RFC 5424 receiver (plain and TLS) that goes down and comes back."""
from __future__ import annotations

import datetime
import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

import factory
from conftest import ROOT, need, run_cli

from archive.access import ANONYMOUS, Principal
from archive.audit import Trail, build_audit
from archive.audit.events import AuditEvent
from archive.audit.syslog import Forwarder, SyslogTarget, read_status
from archive.config import Config, ConfigError, apply

WSI_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
READER = Principal("u-7", "Dr Wang", frozenset({"viewer"}), "token")


def _cfg(tmp_path: Path, **audit) -> Config:
    cfg = Config(data_dir=tmp_path / "data")
    if audit:
        cfg = apply(cfg, {"audit": audit}, base_dir=tmp_path)
    return cfg


def _records(data: Path) -> list:
    return list(Trail(data / "audit").records())


def _json_rows(res: subprocess.CompletedProcess) -> list[dict]:
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


# -- the chain -------------------------------------------------------------------------------

def _write_some(cfg: Config, n: int) -> None:
    audit = build_audit(cfg)
    for i in range(n):
        audit.queried(READER, "STUDY", f"PatientID=P{i}", "10.1.2.3", "", i, study=f"1.2.3.{i}")
    audit.close()


def test_verify_names_the_first_modified_record(tmp_path):
    cfg = _cfg(tmp_path)
    _write_some(cfg, 5)
    data = cfg.data_dir
    res = run_cli("audit", "verify", "--quiet", data=data)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "5 records, chain intact"
    # the verify was itself recorded (Audit Log Used), and the chain still holds
    last = _records(data)[-1].event
    assert last["kind"] == "audit log used" and last["objects"][0]["query"] == "audit verify"
    assert last["event_id"] == ["110101", "DCM", "Audit Log Used"]
    res = run_cli("audit", "verify", "--quiet", data=data)
    assert res.stdout.strip() == "6 records, chain intact"

    seg = sorted((data / "audit").glob("trail-*.jsonl"))[0]
    raw = bytearray(seg.read_bytes())
    lines = bytes(raw).split(b"\n")
    third = sum(len(x) + 1 for x in lines[:2])  # start of record 3
    at = raw.index(b"P2", third)  # its query text: PatientID=P2 -> PatientID=Q2
    raw[at] = ord("Q")
    seg.write_bytes(bytes(raw))
    res = run_cli("audit", "verify", "--quiet", data=data)
    assert res.returncode == 1
    assert res.stdout == ""
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert "after 2 good records: record 3 (trail-000000000001.jsonl line 3): its hash does not match its content" in err[0]


def test_verify_finds_a_removed_record_and_a_recomputed_hash(tmp_path):
    cfg = _cfg(tmp_path)
    _write_some(cfg, 4)
    seg = sorted((cfg.data_dir / "audit").glob("trail-*.jsonl"))[0]
    original = seg.read_bytes()
    lines = original.split(b"\n")
    seg.write_bytes(b"\n".join(lines[:1] + lines[2:]))  # record 2 removed
    res = run_cli("audit", "verify", "-q", data=cfg.data_dir)
    assert res.returncode == 1
    assert "record 2 (trail-000000000001.jsonl line 2): it says it is record 3" in res.stderr

    # an attacker who edits record 2 and recomputes its hash breaks the link from record 3
    from archive.audit.trail import decode, encode

    rec = decode(lines[1])
    event = dict(rec.event, kind="nothing happened")
    forged, _ = encode(rec.seq, rec.time, rec.prev, event)
    seg.write_bytes(b"\n".join([lines[0], forged.rstrip(b"\n")] + lines[2:]))
    res = run_cli("audit", "verify", "-q", data=cfg.data_dir)
    assert res.returncode == 1
    assert "record 3 (trail-000000000001.jsonl line 3): it does not carry the hash of record 2" in res.stderr


_WRITER = """
import sys
from pathlib import Path
from archive.access import Principal
from archive.audit import build_audit
from archive.config import Config
cfg = Config(data_dir=Path(sys.argv[1]))
audit = build_audit(cfg)
who = Principal(sys.argv[2], sys.argv[2], frozenset({"viewer"}), "token")
for i in range(int(sys.argv[3])):
    audit.queried(who, "STUDY", f"n={i}", "127.0.0.1", "", i)
    if i % 25 == 0:
        audit.flush()  # many small batches, interleaving with the other process
audit.close()
"""


def test_two_processes_write_one_valid_chain(tmp_path):
    data = tmp_path / "data"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(data), name, "400"], cwd=ROOT)
             for name in ("writer-a", "writer-b")]
    assert [p.wait(120) for p in procs] == [0, 0]
    trail = Trail(data / "audit", segment_bytes=64 << 10)
    assert trail.verify().records == 800 and trail.verify().broken is None
    recs = list(trail.records())
    assert [r.seq for r in recs] == list(range(1, 801))
    for name in ("writer-a", "writer-b"):  # each writer's records all there, in its own order
        mine = [r.event["participants"][0]["user_id"] == name for r in recs]
        texts = [r.event["objects"][0]["query"] for r, m in zip(recs, mine) if m]
        assert texts == [f"n={i}" for i in range(400)]
    assert run_cli("audit", "verify", "-q", data=data).stdout.strip() == "800 records, chain intact"


def test_segments_rotate_and_the_chain_continues_across_them(tmp_path):
    cfg = _cfg(tmp_path, segment_mb=1)
    trail = Trail(cfg.audit_dir(), segment_bytes=4096)
    audit = build_audit(cfg)
    audit.trail = trail
    for i in range(40):
        audit.queried(READER, "STUDY", "x" * 200, "10.0.0.1", "", i)
        audit.flush()
    audit.close()
    segs = trail.segments()
    assert len(segs) > 3
    assert trail.verify().records == 40 and trail.verify().broken is None
    segs[1][1].unlink()  # a whole segment removed
    broken = trail.verify().broken
    assert broken is not None and f"segment {segs[2][1].name} starts at record {segs[2][0]}" in broken


def test_a_torn_final_line_is_cut_by_the_next_writer(tmp_path):
    cfg = _cfg(tmp_path)
    _write_some(cfg, 3)
    seg = sorted((cfg.data_dir / "audit").glob("trail-*.jsonl"))[0]
    with open(seg, "ab") as fh:
        fh.write(b'{"hash":"abc')  # a crash in the middle of a write
    _write_some(cfg, 2)
    trail = Trail(cfg.data_dir / "audit")
    assert trail.verify().records == 5 and trail.verify().broken is None


# -- the message -----------------------------------------------------------------------------

def test_atna_xml_of_an_aggregated_retrieve(tmp_path):
    cfg = _cfg(tmp_path)
    audit = build_audit(cfg)
    for i in range(300):  # 300 tile requests of two instances
        audit.retrieved(READER, "1.2.3", "PID9", n_frames=1, address="10.9.8.7", session="http 10.9.8.7",
                        sop=f"1.2.3.4.{i % 2}", sop_class=WSI_CLASS)
    audit.close()
    recs = _records(cfg.data_dir)
    assert len(recs) == 1
    e = AuditEvent.from_dict(recs[0].event)
    root = ET.fromstring(e.to_xml())
    assert root.tag == "AuditMessage"
    assert [c.tag for c in root] == ["EventIdentification", "ActiveParticipant", "ActiveParticipant",
                                     "AuditSourceIdentification", "ParticipantObjectIdentification",
                                     "ParticipantObjectIdentification"]
    ident = root.find("EventIdentification")
    assert ident.get("EventActionCode") == "R" and ident.get("EventOutcomeIndicator") == "0"
    assert ident.find("EventID").attrib == {"csd-code": "110104", "codeSystemName": "DCM",
                                            "originalText": "DICOM Instances Transferred"}
    reader = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert len(reader) == 1
    assert reader[0].get("UserID") == "u-7" and reader[0].get("UserName") == "Dr Wang"
    assert reader[0].get("NetworkAccessPointID") == "10.9.8.7" and reader[0].get("NetworkAccessPointTypeCode") == "2"
    assert reader[0].find("RoleIDCode").get("csd-code") == "110152"
    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == "1.2.3"
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    sc = study.find("ParticipantObjectDescription/SOPClass")
    assert sc.get("UID") == WSI_CLASS and sc.get("NumberOfInstances") == "2"
    assert sorted(i.get("UID") for i in sc.findall("Instance")) == ["1.2.3.4.0", "1.2.3.4.1"]
    assert patient.get("ParticipantObjectID") == "PID9" and patient.get("ParticipantObjectTypeCodeRole") == "1"
    assert e.detail["frames"] == 300 and e.detail["distinct_instances"] == 2


def test_audit_config_is_validated(tmp_path):
    for bad, msg in (({"flush_seconds": 0}, "audit.flush_seconds"), ({"syslog": {"port": 514}}, "audit.syslog.host"),
                     ({"syslog": {"host": "x", "port": 70000}}, "audit.syslog.port"),
                     ({"syslog": {"host": "x", "ca": "ca.pem"}}, "need tls = true"),
                     ({"syslog": {"host": "x", "tls": True, "cert": "c.pem"}}, "both cert and key"),
                     ({"enabled": "yes"}, "audit.enabled"), ({"colour": 1}, "unknown key audit.colour")):
        with pytest.raises(ConfigError) as exc:
            apply(Config(data_dir=tmp_path), {"audit": bad}, base_dir=tmp_path)
        assert msg in str(exc.value), (bad, str(exc.value))
    cfg = apply(Config(data_dir=tmp_path), {"audit": {"path": "trail", "syslog": {"host": "127.0.0.1", "tls": True,
                                                                                  "ca": "ca.pem"}}},
                base_dir=tmp_path)
    assert cfg.audit_dir() == tmp_path / "trail" and cfg.audit.syslog.ca == tmp_path / "ca.pem"
    assert cfg.audit.syslog.port == 6514


def test_disabled_audit_records_nothing(tmp_path):
    cfg = _cfg(tmp_path, enabled=False)
    audit = build_audit(cfg)
    audit.queried(READER, "STUDY", "x", "1.1.1.1", "", 1)
    audit.retrieved(READER, "1.2", n_frames=3)
    audit.close()
    assert not (cfg.data_dir / "audit").exists()


# -- a running server --------------------------------------------------------------------------

def test_dimse_and_dicomweb_calls_are_recorded(make_server, tmp_path):
    files = factory.wsi_series(tmp_path / "wsi", levels=((512, 512), (256, 256)), patient_id="PAT-42")
    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    srv = make_server(config_text="[audit]\nflush_seconds = 600\n[dimse]\nrequire_called_aet = true\n")
    res = subprocess.run([need("storescu"), "-R", "-xy", "-aet", "SCANNER1", "-aec", "PATHPACS", "127.0.0.1",
                          str(srv.dicom_port), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # written when the association is released, not at the end of the 600 s window
    _wait(lambda: any(r.event["kind"] == "stored" for r in _records(srv.data_dir)), timeout=10)
    res = subprocess.run([need("findscu"), "-S", "-aet", "FINDER", "-aec", "PATHPACS", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={study}", "-k", "PatientID", "127.0.0.1", str(srv.dicom_port)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "got"
    out.mkdir()
    res = subprocess.run([need("getscu"), "-aet", "GETTER", "-aec", "PATHPACS", "+xy", "-S", "-k",
                          "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "-od", str(out), "127.0.0.1",
                          str(srv.dicom_port)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and len(list(out.iterdir())) == 2, res.stderr
    res = subprocess.run([need("echoscu"), "-aet", "INTRUDER", "-aec", "NOTUS", "127.0.0.1", str(srv.dicom_port)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0  # refused: called AE title
    base = srv.dicomweb_url
    r = requests.get(f"{base}/studies/{study}/series", timeout=10)
    assert r.status_code == 200 and len(r.json()) == 1
    r = requests.get(f"{base}/studies", params={"StudyInstanceUID": study, "includefield": "PatientName"}, timeout=10)
    assert r.status_code == 200 and len(r.json()) == 1
    assert requests.get(f"{base}/studies?PatientID=P&fuzzymatching=maybe", timeout=10).status_code == 400
    assert requests.get(srv.http_url + "/", timeout=10).status_code == 200  # the study list page
    n_frames = ds.NumberOfFrames
    with requests.Session() as s:
        for i in range(60):
            r = s.get(f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/{i % n_frames + 1}",
                      headers={"Accept": "image/jpeg"}, timeout=10)
            assert r.status_code == 200
        r = s.get(f"{base}/studies/{study}/series/{series}/instances/{sop}",
                  headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30)
        assert r.status_code == 200
        assert s.get(f"{base}/studies/{study}/metadata", timeout=10).status_code == 200
    assert requests.get(f"{base}/studies/1.2.999/series/1.2/instances/1.2/frames/1", timeout=10).status_code == 404
    assert srv.stop() == 0  # aggregated reads are written on the clean stop
    data = srv.data_dir

    rows = _json_rows(run_cli("audit", "--study", study, "--format", "json", data=data))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("stored") == 1, kinds  # one record for the association's two instances
    stored = next(r for r in rows if r["kind"] == "stored")
    assert stored["event_id"] == ["110104", "DCM", "DICOM Instances Transferred"] and stored["action"] == "C"
    sender = next(p for p in stored["participants"] if p.get("requestor"))
    assert (sender["user_id"], sender["address"], sender["aet"]) == ("ae:SCANNER1", "127.0.0.1", "SCANNER1")
    assert stored["detail"]["instances"] == 2
    study_obj = next(o for o in stored["objects"] if o["id_type"][0] == "110180")
    assert study_obj["sop_classes"] == {WSI_CLASS: 2} and sorted(study_obj["instances"]) == sorted(
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)
    assert any(o["role"] == 1 and o["id"] == "PAT-42" for o in stored["objects"])  # the patient, resolved

    queries = [r for r in rows if r["kind"] == "queried"]
    assert sorted(q["detail"]["via"] for q in queries) == ["C-FIND", "QIDO-RS", "QIDO-RS"]
    qido = [q for q in queries if q["detail"]["via"] == "QIDO-RS"]
    assert [q["detail"]["results"] for q in qido] == [1, 1]
    assert qido[1]["objects"][0]["query"] == f"StudyInstanceUID={study}&includefield=PatientName"
    cfind = next(q for q in queries if q["detail"]["via"] == "C-FIND")
    assert cfind["detail"]["results"] == 1 and cfind["participants"][0]["aet"] == "FINDER"
    assert f"0020000D={study}" in cfind["objects"][0]["query"]

    reads = [r for r in rows if r["kind"] == "retrieved"]
    assert len(reads) == 2, reads  # C-GET, then 60 frame requests + an instance + the metadata: one record each
    cget = reads[0]
    getter = next(p for p in cget["participants"] if p.get("requestor"))
    assert (getter["aet"], getter["address"]) == ("GETTER", "127.0.0.1") and cget["detail"]["instances"] == 2
    assert cget["detail"]["session"].startswith("dimse GETTER@127.0.0.1:")
    read = reads[1]
    reader = next(p for p in read["participants"] if p.get("requestor"))
    assert (reader["user_id"], reader["address"]) == ("anonymous", "127.0.0.1")
    assert read["detail"]["frames"] == 60 and read["detail"]["instances"] == 1
    assert read["action"] == "R" and any(o["id"] == "PAT-42" for o in read["objects"])

    every = _json_rows(run_cli("audit", "--format", "json", data=data))
    refused = [r for r in every if r["kind"] == "queried" and r["outcome"] == 4]
    assert len(refused) == 1 and "fuzzymatching" in refused[0]["outcome_text"]
    page = [r for r in every if r["kind"] == "queried" and r["detail"]["via"] == "pages"]
    assert page == []  # the page at / is a shell without patient data; its list is a QIDO-RS call
    rejected = [r for r in every if r["kind"] == "association rejected"]
    assert len(rejected) == 1 and rejected[0]["participants"][0]["aet"] == "INTRUDER"
    assert "NOTUS" in rejected[0]["outcome_text"] and rejected[0]["outcome"] == 4
    starts = [r for r in every if r["kind"] in ("application start", "application stop")]
    assert [r["kind"] for r in starts] == ["application start", "application stop"]
    assert starts[0]["detail"]["dicom_port"] == srv.dicom_port and starts[0]["detail"]["require_called_aet"] is True

    # who looked at this slide, when, from where
    res = run_cli("audit", "--study", study, "--event", "retrieved", data=data)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["#", "time", "(UTC)", "event"]
    assert len(lines) == 3 and "GETTER" in lines[1] and "2 instances" in lines[1]
    assert "retrieved" in lines[2] and "anonymous (uploader,viewer)" in lines[2]
    assert "127.0.0.1" in lines[2] and "PAT-42" in lines[2] and "1 instances, 60 frames" in lines[2]
    assert _json_rows(run_cli("audit", "--patient", "PAT-42", "--user", "SCANNER1", "--format", "json",
                              data=data))[0]["kind"] == "stored"
    res = run_cli("audit", "--study", study, "--format", "xml", data=data)
    root = ET.fromstring(res.stdout.encode())
    assert root.tag == "AuditMessages" and len(root) == len(rows)
    assert {m.find("EventIdentification/EventID").get("csd-code") for m in root} == {"110104", "110112"}
    assert run_cli("audit", "verify", "-q", data=data).returncode == 0
    res = run_cli("stats", data=data)
    assert res.returncode == 0 and re.search(r"^audit +\d+ records \(\d+ bytes\)", res.stdout, re.M), res.stdout


def test_http_workers_append_to_one_chain(make_server):
    srv = make_server(config_text="[http]\nworkers = 3\n[audit]\nflush_seconds = 600\n")
    for i in range(45):  # a new connection each: the kernel spreads them over the workers
        r = requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": f"W{i}"}, timeout=10,
                         headers={"Connection": "close"})
        assert r.status_code == 200
    assert srv.stop() == 0
    trail = Trail(srv.data_dir / "audit")
    assert trail.verify().broken is None
    recs = list(trail.records())
    texts = sorted(r.event["objects"][0].get("query", "") for r in recs if r.event["kind"] == "queried")
    assert texts == sorted(f"PatientID=W{i}" for i in range(45))


def test_audit_cli_refuses_bad_input_in_one_line(tmp_path):
    cfg = _cfg(tmp_path)
    _write_some(cfg, 2)
    for args in (("--since", "yesterday"), ("--limit", "0"), ("--format", "csv")):
        res = run_cli("audit", *args, data=cfg.data_dir)
        assert res.returncode == 2, args
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    now = datetime.datetime.now(datetime.timezone.utc)
    assert len(_json_rows(run_cli("audit", "--since", "1h", "--format", "json", data=cfg.data_dir))) == 2
    later = (now + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    res = run_cli("audit", "--since", later, "--format", "json", data=cfg.data_dir)
    assert res.returncode == 0 and res.stdout == ""


# -- syslog -------------------------------------------------------------------------------------

_HEADER = re.compile(rb'^<85>1 (\S+) (\S+) pathpacs (\d+) IHE\+RFC-3881 \[pathpacs@32473 seq="(\d+)" '
                     rb'hash="([0-9a-f]{64})"\] \xef\xbb\xbf')


class Receiver:
    """An RFC 5424 collector over TCP (RFC 6587 octet counting), TLS optional: each frame is
    checked and kept; stop() closes the listener and every connection."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.frames: list[bytes] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    self.errors.append(f"handshake: {exc}")
                    continue
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while True:
                m = re.match(rb"([1-9][0-9]*) ", buf)
                if not m:
                    if buf and not re.match(rb"[0-9]*\Z", buf):
                        self.errors.append(f"not octet-counted: {buf[:40]!r}")
                    break
                n = int(m.group(1))
                if len(buf) < m.end() + n:
                    break
                with self.lock:
                    self.frames.append(buf[m.end():m.end() + n])
                buf = buf[m.end() + n:]

    def seqs(self) -> list[int]:
        with self.lock:
            return [int(_HEADER.match(f).group(4)) for f in self.frames]

    def stop(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the other thread
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def _wait(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _message(frame: bytes) -> ET.Element:
    m = _HEADER.match(frame)
    assert m is not None, frame[:120]
    datetime.datetime.fromisoformat(m.group(1).decode().replace("Z", "+00:00"))  # RFC 3339 time
    return ET.fromstring(frame[m.end():])


def _tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test audit CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "collector.pem", tmp_path / "collector.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


def test_server_forwards_atna_messages_over_tls(make_server, tmp_path):
    ca, cert, key = _tls_files(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    rx = Receiver(tls=ctx)
    try:
        srv = make_server(config_text=f'[audit]\nflush_seconds = 600\n[audit.syslog]\nhost = "127.0.0.1"\n'
                                      f'port = {rx.port}\ntls = true\nca = "{ca}"\n')
        r = requests.get(f"{srv.dicomweb_url}/studies?PatientID=NOBODY", timeout=10)
        assert r.status_code == 200 and r.json() == []
        _wait(lambda: len(rx.frames) >= 2)
        assert srv.stop() == 0
        _wait(lambda: len(rx.frames) >= 3)  # the stop record goes out before the server exits
        assert rx.errors == []
        msgs = [_message(f) for f in rx.frames]
        codes = [m.find("EventIdentification/EventID").get("csd-code") for m in msgs]
        assert codes == ["110100", "110112", "110100"]
        assert [m.find("EventIdentification/EventTypeCode").get("originalText") for m in (msgs[0], msgs[2])] == [
            "Application Start", "Application Stop"]
        query = msgs[1].find("ParticipantObjectIdentification/ParticipantObjectQuery").text
        import base64

        assert base64.b64decode(query) == b"PatientID=NOBODY"
        assert rx.seqs() == [1, 2, 3]
        recs = _records(srv.data_dir)
        assert [_HEADER.match(f).group(5).decode() for f in rx.frames] == [r.hash for r in recs[:3]]
    finally:
        rx.stop()
    # a collector whose certificate the CA did not sign is refused: nothing is sent to it
    (tmp_path / "other").mkdir()
    _other_ca, other_cert, other_key = _tls_files(tmp_path / "other")
    bad = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bad.load_cert_chain(other_cert, other_key)
    rx2 = Receiver(tls=bad)
    try:
        fwd = Forwarder(Trail(srv.data_dir / "audit"), SyslogTarget("127.0.0.1", rx2.port, tls=True, ca=str(ca),
                                                                    retry_max_seconds=0.5))
        fwd.confirmed = 0
        (srv.data_dir / "audit" / "forward.cursor").unlink()
        fwd.start()
        _wait(lambda: rx2.errors and "certificate verify failed" in (read_status(srv.data_dir / "audit") or {}).get(
            "last_error", ""))
        fwd.stop()
        assert rx2.frames == []
    finally:
        rx2.stop()


def test_collector_down_spools_then_delivers_everything_in_order(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    audit = build_audit(cfg)
    rx = Receiver()
    port = rx.port
    target = SyslogTarget("127.0.0.1", port, max_backlog=10, retry_max_seconds=0.3)
    audit.forwarder = Forwarder(audit.trail, target)
    audit.forwarder.start()
    caplog.set_level(logging.INFO, logger="pathpacs.audit")

    def burst(start: int, n: int) -> None:
        for i in range(start, start + n):
            audit.login(f"user{i}", "10.0.0.9", success=i % 2 == 0, method="token")
        audit.flush()

    burst(0, 20)
    _wait(lambda: len(set(rx.seqs())) == 20)
    rx.stop()
    time.sleep(0.3)
    burst(20, 30)  # the collector is down: these wait in the trail
    _wait(lambda: (read_status(cfg.audit_dir()) or {}).get("alarm") is True
          and read_status(cfg.audit_dir())["head"] == 50)
    st = read_status(cfg.audit_dir())
    assert st["connected"] is False and st["backlog"] >= 11 and st["alarms"] == 1 and st["head"] == 50
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "max_backlog" in r.getMessage()]
    assert len(errors) == 1
    res = run_cli("audit", "status", data=cfg.data_dir)
    assert res.returncode == 0 and "DOWN" in res.stdout and "ALARM" in res.stdout and "alarms 1" in res.stdout

    rx2 = Receiver(port=port)  # the collector is back, on the same port
    try:
        burst(50, 5)
        _wait(lambda: 56 in rx2.seqs())
        _wait(lambda: (read_status(cfg.audit_dir()) or {}).get("backlog") == 0)
        audit.close()
        got = rx.seqs() + rx2.seqs()
        first_seen: list[int] = []
        for s in got:
            if s not in first_seen:
                first_seen.append(s)
        # 55 logins and the `audit status` run (Audit Log Used): nothing lost, in order
        assert first_seen == list(range(1, 57))
        assert rx2.seqs() == sorted(rx2.seqs())  # resent from the last confirmed record, in order
        assert set(rx2.seqs()) >= set(range(21, 57))
        st = read_status(cfg.audit_dir())
        assert st["alarm"] is False and st["delivered"] == 56
        users = [_message(f).find("ActiveParticipant").get("UserID") for f in rx2.frames]
        assert users[-1] == "user54"
        assert len([r for r in caplog.records if r.levelno == logging.ERROR and "max_backlog" in r.getMessage()]) == 1
    finally:
        rx2.stop()


def test_every_event_kind_has_its_atna_codes(tmp_path):
    cfg = _cfg(tmp_path)
    audit = build_audit(cfg)
    admin = Principal("admin-1", "Li Admin", frozenset({"sysadmin"}), "token")
    audit.moved("1.2.3", ["1.2.3.4"], "hot", "cold")
    audit.deleted("rejected", admin, "1.2.3", "P1", ["1.2.3.4"], "113039^DCM^Data Retention Policy Expired")
    audit.deleted("restored", admin, "1.2.3", "P1", ["1.2.3.4"])
    audit.deleted("purged", admin, "1.2.3", "P1", ["1.2.3.4"])
    audit.exported(admin, "1.2.3", "P1", ["1.2.3.4"], "PARTNER")
    audit.association_rejected("STRANGER", "192.0.2.7", "unknown calling AE title")
    audit.login("mallory", "192.0.2.8", success=False, method="token", reason="invalid token")
    audit.login(READER, "10.0.0.2", success=True, method="oidc")
    audit.security("token created", Principal("sec-1", "Sun Sec", frozenset({"secadmin"}), "token"),
                   {"role": "viewer", "expires": "7d"}, subject="token 42")
    audit.security("token revoked", "sec-1", {}, subject="token 42")
    audit.application("start", {"aet": "PATHPACS"})
    with pytest.raises(ValueError):
        audit.deleted("shredded", admin, "1.2.3", None, [])
    audit.close()
    want = [("moved", "110103", "U", 0, None), ("rejected", "110103", "D", 0, None),
            ("restored", "110103", "U", 0, None), ("purged", "110105", "D", 0, None),
            ("exported", "110106", "R", 0, None), ("association rejected", "110113", "E", 4, "110126"),
            ("login", "110114", "E", 4, "110122"), ("login", "110114", "E", 0, "110122"),
            ("token created", "110113", "E", 0, "110137"), ("token revoked", "110113", "E", 0, "110137"),
            ("application start", "110100", "E", 0, "110120")]
    got = []
    for rec in _records(cfg.data_dir):
        e = AuditEvent.from_dict(rec.event)
        root = ET.fromstring(e.to_xml())
        ident = root.find("EventIdentification")
        t = ident.find("EventTypeCode")
        got.append((e.kind, ident.find("EventID").get("csd-code"), ident.get("EventActionCode"),
                    int(ident.get("EventOutcomeIndicator")), t.get("csd-code") if t is not None else None))
        assert root.find("AuditSourceIdentification").get("AuditSourceID") == "PATHPACS"
        assert root.findall("ActiveParticipant")
    assert got == want
    rows = [AuditEvent.from_dict(r.event) for r in _records(cfg.data_dir)]
    assert rows[6].requestor.user_id == "mallory" and rows[6].outcome_text == "invalid token"
    assert rows[3].objects[0].lifecycle == "14"  # purged: ParticipantObjectDataLifeCycle "permanent erasure"


def test_import_and_tier_moves_are_recorded(tmp_path):
    files = factory.wsi_series(tmp_path / "in", levels=((512, 512), (256, 256)), patient_id="PAT-T")
    import getpass

    import pydicom

    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    cfg = tmp_path / "tiers.toml"
    cfg.write_text(f'[tiers.hot]\npath = "{tmp_path}/hot"\n[tiers.warm]\npath = "{tmp_path}/warm"\n')
    data = tmp_path / "data"
    assert run_cli("import", "--quiet", str(tmp_path / "in"), "--config", str(cfg), data=data).returncode == 0
    res = run_cli("tier", "move", "--study", study, "--to", "warm", "--quiet", "--config", str(cfg), data=data)
    assert res.returncode == 0, res.stderr
    rows = _json_rows(run_cli("audit", "--study", study, "--format", "json", "--config", str(cfg), data=data))
    assert [r["kind"] for r in rows] == ["stored", "moved"]
    stored, moved = rows
    importer = next(p for p in stored["participants"] if p.get("requestor"))
    assert importer["user_id"] == f"os:{getpass.getuser()}" and stored["detail"]["instances"] == 2
    assert stored["detail"]["session"].startswith("import pid ")
    assert (moved["event_id"][0], moved["action"]) == ("110103", "U")
    assert moved["detail"] == {"instances": 2, "from_tier": "hot", "to_tier": "warm"}
    assert any(o["id"] == "PAT-T" and o["role"] == 1 for o in moved["objects"])
