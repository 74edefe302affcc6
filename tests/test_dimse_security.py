"""DIMSE access control: the calling-AE allow-list, services per node, check_host, against
dcmtk (echoscu, findscu, storescu, getscu, movescu) and pynetdicom as SCU."""
from __future__ import annotations

import subprocess
import tomllib

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

import factory
from conftest import free_port, need, run_cli

NODES = (
    '[nodes.reader]\naet = "READER"\nhost = "127.0.0.1"\nport = 11990\nallow = ["find"]\n'
    '[nodes.scanner]\naet = "SCANNER"\nhost = "127.0.0.1"\nport = 11991\nallow = ["store"]\n'
    '[nodes.pacs]\naet = "PACS"\nhost = "127.0.0.1"\nport = 11992\ncheck_host = true\n'
    '[nodes.local]\naet = "LOCALHOST"\nhost = "localhost"\nport = 11993\ncheck_host = true\nallow = ["find"]\n'
)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with nodes declared (so unknown AEs are refused) and one study stored by SCANNER."""
    from conftest import Server

    folder = tmp_path_factory.mktemp("secured")
    cfg = folder / "config.toml"
    cfg.write_text(NODES)
    srv = Server(folder / "data", free_port(), free_port(), config=cfg).start()
    sc = factory.secondary_capture(folder / "sc.dcm", patient_id="SEC1")
    res = storescu(srv, "SCANNER", sc)
    assert res.returncode == 0, res.stdout + res.stderr
    srv.sc = sc
    yield srv
    srv.stop()


def storescu(srv, aet: str, path) -> subprocess.CompletedProcess:
    return subprocess.run([need("storescu"), "-v", "-aet", aet, "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port),
                           str(path)], capture_output=True, text=True, timeout=60)


def findscu(srv, aet: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("findscu"), "-v", "-aet", aet, "-aec", srv.aet, "-S", "-k", "QueryRetrieveLevel=STUDY",
                           "-k", "PatientID=SEC1", "-k", "StudyInstanceUID", "127.0.0.1", str(srv.dicom_port)],
                          capture_output=True, text=True, timeout=60)


def instances(srv) -> int:
    out = run_cli("stats", data=srv.data_dir, check=True).stdout
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("instances")))


def study_find(srv, aet: str, bind: str | None = None, patient: str = "SEC1"):
    """(association established, statuses of a C-FIND for SEC1) with pynetdicom as the SCU."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    kw = {"bind_address": (bind, 0)} if bind else {}
    assoc = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet, **kw)
    if not assoc.is_established:
        return False, []
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient
    q.StudyInstanceUID = ""
    statuses = [int(st.Status) for st, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind) if st]
    assoc.release()
    return True, statuses


def test_unknown_ae_is_refused_at_association(secured):
    res = subprocess.run([need("echoscu"), "-aet", "NOBODY", "-aec", secured.aet, "127.0.0.1",
                          str(secured.dicom_port)], capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr, res.stdout + res.stderr
    assert "Calling AE Title Not Recognized" in res.stdout + res.stderr
    res = findscu(secured, "NOBODY")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stdout + res.stderr, res.stdout + res.stderr
    # pynetdicom sees A-ASSOCIATE-RJ: permanent (1), service user (1), calling AE not recognised (3)
    ae = AE(ae_title="NOBODY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", secured.dicom_port, ae_title=secured.aet)
    assert assoc.is_rejected
    assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.result_source,
            assoc.acceptor.primitive.diagnostic) == (1, 1, 3)
    log = secured.log()
    assert "refused NOBODY from 127.0.0.1: calling AE 'NOBODY' is not a configured node" in log
    assert "association NOBODY -> PATHPACS from 127.0.0.1:" in log and "(calling AE title not recognised)" in log
    assert subprocess.run([need("echoscu"), "-aet", "READER", "-aec", secured.aet, "127.0.0.1",
                           str(secured.dicom_port)], capture_output=True, timeout=30).returncode == 0


def test_find_only_node_can_find_but_not_store(secured, tmp_path):
    res = findscu(secured, "READER")
    assert res.returncode == 0, res.stdout + res.stderr
    ok, statuses = study_find(secured, "READER")
    assert ok and statuses == [0xFF00, 0x0000]
    before = instances(secured)
    sc = factory.secondary_capture(tmp_path / "new.dcm", patient_id="SEC2")
    res = storescu(secured, "READER", sc)
    # dcmtk 3.6.7 has no name for 0x0124 (PS3.7 C.5.2 Refused: Not Authorized) in storage
    assert "Received Store Response (Unknown Status: 0x124)" in res.stdout + res.stderr, res.stdout + res.stderr
    assert instances(secured) == before
    # pynetdicom: the exact status
    ae = AE(ae_title="READER")
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", secured.dicom_port, ae_title=secured.aet)
    assert assoc.is_established
    assert assoc.send_c_store(pydicom.dcmread(sc)).Status == 0x0124
    assoc.release()
    assert instances(secured) == before
    assert "refused READER from 127.0.0.1: C-STORE refused (0x0124): node 'reader' may not store" in secured.log()


def test_store_only_node_cannot_find_get_move_or_commit(secured, tmp_path):
    res = findscu(secured, "SCANNER")
    assert "Received Final Find Response (Unknown Status: 0x124)" in res.stdout + res.stderr, res.stdout + res.stderr
    ok, statuses = study_find(secured, "SCANNER")
    assert ok and statuses == [0x0124]
    ds = pydicom.dcmread(secured.sc)
    # C-GET: refused, nothing sent
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(Verification)
    role = build_role(SecondaryCaptureImageStorage, scp_role=True)
    assoc = ae.associate("127.0.0.1", secured.dicom_port, ae_title=secured.aet, ext_neg=[role])
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ds.StudyInstanceUID
    got = [int(st.Status) for st, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet) if st]
    assert got == [0x0124]
    q.PatientID = "SEC1"
    moved = [int(st.Status) for st, _ in assoc.send_c_move(q, "READER", PatientRootQueryRetrieveInformationModelMove)
             if st]
    assert moved == [0x0124]
    info = Dataset()
    info.TransactionUID = pydicom.uid.generate_uid()
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    info.ReferencedSOPSequence = [ref]
    status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    assert status.Status == 0x0124
    assert assoc.send_c_echo().Status == 0x0000  # C-ECHO is always allowed
    assoc.release()
    log = secured.log()
    for service in ("find", "get", "move", "commit"):
        assert f"node 'scanner' may not {service}" in log


def test_check_host_refuses_the_wrong_address(secured):
    ok, statuses = study_find(secured, "PACS", bind="127.0.0.1")
    assert ok and statuses == [0xFF00, 0x0000]
    ok, _ = study_find(secured, "PACS", bind="127.0.0.2")
    assert not ok
    assert ("refused PACS from 127.0.0.2: calling AE 'PACS' (node 'pacs') called from 127.0.0.2, "
            "not from its host 127.0.0.1") in secured.log()
    # a host name is resolved: localhost is 127.0.0.1, not 127.0.0.2
    assert study_find(secured, "LOCALHOST", bind="127.0.0.1") == (True, [0xFF00, 0x0000])
    assert study_find(secured, "LOCALHOST", bind="127.0.0.2") == (False, [])


def test_getscu_and_movescu_from_allowed_nodes(make_server, tmp_path):
    """A node with the default allow list (everything) retrieves; with accept_unknown_ae = true
    an unknown AE is admitted (viewer + uploader) beside the declared nodes."""
    move_port = free_port()
    srv = make_server(config_text=f'[dimse]\naccept_unknown_ae = true\n'
                                  f'[nodes.viewer]\naet = "MOVESCU"\nhost = "127.0.0.1"\nport = {move_port}\n')
    sc = factory.secondary_capture(tmp_path / "sc.dcm", patient_id="SEC3")
    assert storescu(srv, "ANYONE", sc).returncode == 0
    out = tmp_path / "got"
    out.mkdir()
    res = subprocess.run([need("getscu"), "-aet", "MOVESCU", "-aec", srv.aet, "-S", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", "PatientID=SEC3", "-od", str(out), "127.0.0.1", str(srv.dicom_port)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    [got] = list(out.iterdir())
    assert pydicom.dcmread(got).PixelData == pydicom.dcmread(sc).PixelData
    moved = tmp_path / "moved"
    moved.mkdir()
    res = subprocess.run([need("movescu"), "-aet", "MOVESCU", "-aec", srv.aet, "-S", "--port", str(move_port),
                          "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=SEC3", "-od", str(moved),
                          "127.0.0.1", str(srv.dicom_port)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(list(moved.iterdir())) == 1


def test_no_nodes_means_everyone_is_admitted(server, tmp_path):
    """Existing configurations keep working: without [nodes.*] any calling AE may store and find."""
    sc = factory.secondary_capture(tmp_path / "sc.dcm", patient_id="SEC4")
    assert storescu(server, "WHOEVER", sc).returncode == 0
    assert study_find(server, "SOMEONE", patient="SEC4") == (True, [0xFF00, 0x0000])


def test_accept_unknown_ae_false_without_nodes_refuses_everyone(make_server):
    srv = make_server(config_text="[dimse]\naccept_unknown_ae = false\n")
    assert study_find(srv, "SOMEONE") == (False, [])


def test_allow_list_config_is_validated(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[nodes.x]\naet = "X"\nhost = "127.0.0.1"\nport = 104\nallow = ["find", "delete"]\n')
    res = run_cli("ls", "--config", str(cfg), data=tmp_path / "data")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("pathpacs: config error: nodes.x.allow.1: Input should be 'store', 'find',")
    cfg.write_text('[nodes.x]\naet = "X"\nhost = "127.0.0.1"\nport = 104\ncheck_host = "yes"\n')
    res = run_cli("ls", "--config", str(cfg), data=tmp_path / "data")
    assert res.returncode == 2
    assert res.stderr.strip() == "pathpacs: config error: nodes.x.check_host: Input should be a valid boolean (got 'yes')"


def test_admission_decisions_principals_and_the_audit_hook():
    """The one decision module, on a configuration: nodes, unknown AEs, check_host (IPv4-mapped
    IPv6 too), a certificate binding the AE, the principal's roles, and every refusal reaching
    the audit callable once."""
    from archive import config as config_mod
    from archive.access import Right
    from archive.dimse.admission import Admission, Refused, node_allows, principal_for

    cfg = config_mod.apply(config_mod.Config(), tomllib.loads(NODES + (
        '[nodes.scanner2]\naet = "SCAN2"\nhost = "127.0.0.1"\nport = 11994\nallow = ["store", "reject"]\n'
        'cert_cn = "scanner-2"\n')))
    audited: list[tuple[str, str, str]] = []
    adm = Admission(cfg, lambda *args: audited.append(args))
    assert adm.admit("READER", "10.1.2.3").name == "reader"
    assert adm.admit("PACS", "::ffff:127.0.0.1").name == "pacs"
    with pytest.raises(Refused, match="not a configured node"):
        adm.admit("NOBODY", "127.0.0.1")
    with pytest.raises(Refused, match="called from 127.0.0.2, not from its host 127.0.0.1"):
        adm.admit("PACS", "127.0.0.2")
    cert = {"subject": ((("commonName", "scanner-2"),),)}
    assert adm.admit("SCAN2", "127.0.0.1", cert).name == "scanner2"
    with pytest.raises(Refused, match="is not 'SCAN2', the AE of node 'scanner2'"):
        adm.admit("READER", "127.0.0.1", cert)
    assert not node_allows(cfg.nodes["reader"], "store") and node_allows(cfg.nodes["reader"], "find")
    assert node_allows(None, "store") and not node_allows(None, "reject")
    p = principal_for(cfg.nodes["scanner2"], "SCAN2", "127.0.0.1")
    assert (p.id, p.via, p.roles, p.address) == ("scanner2", "node", frozenset({"uploader", "sysadmin"}), "127.0.0.1")
    assert p.can(Right.STORE) and p.can(Right.ADMIN)
    assert principal_for(cfg.nodes["reader"], "READER", "h").roles == frozenset({"viewer"})
    assert principal_for(None, "ANY", "h").roles == frozenset({"viewer", "uploader"})
    adm.refuse("NOBODY", "127.0.0.1", "calling AE 'NOBODY' is not a configured node")
    assert audited == [("NOBODY", "127.0.0.1", "calling AE 'NOBODY' is not a configured node")]
    # without nodes every AE is admitted (as no node); accept_unknown_ae = false refuses them
    assert Admission(config_mod.Config()).admit("ANY", "127.0.0.1") is None
    strict = config_mod.apply(config_mod.Config(), {"dimse": {"accept_unknown_ae": False}})
    with pytest.raises(Refused):
        Admission(strict).admit("ANY", "127.0.0.1")


def test_rejection_notes_by_c_store_are_honoured_only_from_nodes_allowed_to_reject(tmp_path):
    """IHE IOCM over DIMSE: a node whose `allow` holds "reject" has the rejection notes it sends
    honoured (the instances hidden); the same note from a store-only node is kept as a plain KOS."""
    import time

    import requests

    from archive import config as config_mod
    from archive.rejection_note import build
    from archive.service import Archive
    from conftest import Server

    cfg = tmp_path / "config.toml"
    cfg.write_text('[nodes.scanner]\naet = "SCANNER"\nhost = "127.0.0.1"\nport = 11991\nallow = ["store"]\n'
                   '[nodes.ris]\naet = "RIS"\nhost = "127.0.0.1"\nport = 11994\nallow = ["store", "reject"]\n')
    srv = Server(tmp_path / "data", free_port(), free_port(), config=cfg).start()
    try:
        sc = factory.secondary_capture(tmp_path / "sc.dcm", patient_id="IOCM1")
        assert storescu(srv, "SCANNER", sc).returncode == 0
        sop = str(pydicom.dcmread(sc).SOPInstanceUID)
        look = config_mod.load(cfg)
        look.data_dir = srv.data_dir
        arc = Archive(look, readonly=True)
        try:
            rec = arc.instance(sop)
            attrs = arc.study(rec.study).attrs
        finally:
            arc.close()
        url = f"{srv.dicomweb_url}/instances?SOPInstanceUID={sop}"
        note = tmp_path / "note.dcm"
        build("113001", [rec], attrs, {}, note)
        res = storescu(srv, "SCANNER", note)
        assert res.returncode == 0, res.stdout + res.stderr
        time.sleep(0.5)
        assert len(requests.get(url, timeout=10).json()) == 1  # not honoured: SCANNER may not reject
        note2 = tmp_path / "note2.dcm"
        build("113001", [rec], attrs, {}, note2)
        res = storescu(srv, "RIS", note2)
        assert res.returncode == 0, res.stdout + res.stderr
        deadline = time.monotonic() + 5
        while requests.get(url, timeout=10).json():
            assert time.monotonic() < deadline, "the note from RIS was not honoured"
            time.sleep(0.1)
        marks = run_cli("rejected", "--config", str(cfg), data=srv.data_dir, check=True).stdout
        assert sop in marks and "113001" in marks
    finally:
        srv.stop()
