"""The DIMSE server against hostile and broken peers: idle and half-open sockets, oversized PDUs,
aborted transfers, lying C-STORE commands, and a fuzzer. Real server processes, real peers
(dcmtk, pynetdicom), raw sockets for what no well-behaved peer would send."""
from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode

import factory
from conftest import Server, free_port, need, run_cli

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = factory.SECONDARY_CAPTURE
WSI = str(factory.WSI)
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


# -- raw upper layer -----------------------------------------------------------------------

def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called: str = "PATHPACS", calling: str = "RAWSCU",
                 contexts=((1, VERIFICATION, (str(ImplicitVRLittleEndian),)),), max_pdu: int = 16384) -> bytes:
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, bytes([cid, 0, 0, 0]) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.7777"))
    return struct.pack(">BBI", 1, 0, len(body)) + body


def pdata(cid: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (control: 0 data, 1 command, +2 last fragment)."""
    pdv = bytes([cid, control]) + data
    return struct.pack(">BBI", 4, 0, len(pdv) + 4) + struct.pack(">I", len(pdv)) + pdv


def command(**elements) -> bytes:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.CommandGroupLength = len(encode(ds, True, True))
    return encode(ds, True, True)


def echo_rq(message_id: int = 1) -> bytes:
    return command(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=message_id,
                   CommandDataSetType=0x0101)


def recv_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """(type, body) of the next PDU, or None if the connection closed first."""
    head = _recv_n(sock, 6)
    if len(head) < 6:
        return None
    pdu_type, _, length = struct.unpack(">BBI", head)
    body = _recv_n(sock, length)
    return (pdu_type, body) if len(body) == length else None


def _recv_n(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return buf


def max_length_of(ac_body: bytes) -> int | None:
    """The Maximum Length (user information sub-item 0x51) an A-ASSOCIATE-AC announces."""
    pos = 68  # protocol version, reserved, 16+16 AE titles (echoed), 32 reserved
    while pos + 4 <= len(ac_body):
        item_type, _, length = struct.unpack(">BBH", ac_body[pos:pos + 4])
        if item_type == 0x50:
            sub, end = pos + 4, pos + 4 + length
            while sub + 4 <= end:
                s_type, _, s_len = struct.unpack(">BBH", ac_body[sub:sub + 4])
                if s_type == 0x51:
                    return struct.unpack(">I", ac_body[sub + 4:sub + 8])[0]
                sub += 4 + s_len
        pos += 4 + length
    return None


def raw_associate(srv: Server, contexts=None, calling: str = "RAWSCU") -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", srv.dicom_port), timeout=10)
    sock.sendall(associate_rq(srv.aet, calling, **({"contexts": contexts} if contexts else {})))
    reply = recv_pdu(sock)
    assert reply is not None and reply[0] == 0x02, f"no A-ASSOCIATE-AC: {reply!r}"
    return sock, reply[1]


def closed_by_server(sock: socket.socket, within: float) -> float:
    """Seconds until the server closes `sock` (recv returns b""), reading and dropping whatever
    it sends first (an A-ABORT); fails after `within` seconds."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            sock.settimeout(max(0.01, within - (time.monotonic() - start)))
    except socket.timeout:
        pytest.fail(f"the server did not close the connection within {within} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - start


# -- helpers ---------------------------------------------------------------------------------

def echoscu(srv: Server) -> subprocess.CompletedProcess:
    return subprocess.run([need("echoscu"), "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port)],
                          capture_output=True, text=True, timeout=30)


def stats(srv: Server) -> dict[str, int]:
    out = run_cli("stats", data=srv.data_dir, check=True).stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
            if line.split() and line.split()[0] in {"patients", "studies", "series", "instances"}}


def data_bytes(srv: Server) -> int:
    """Bytes under the data directory, without the LMDB index and the session lock files."""
    total = 0
    for p in srv.data_dir.rglob("*"):
        if p.is_file() and "index" not in p.relative_to(srv.data_dir).parts[:1] and p.name != "lock":
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
    return total


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def log_lines(srv: Server, pattern: str) -> list[str]:
    return [line for line in srv.log().splitlines() if re.search(pattern, line)]


def rss(srv: Server) -> int:
    return psutil.Process(srv.proc.pid).memory_info().rss


# -- 1. idle and half-open connections -----------------------------------------------------

def test_idle_half_pdu_sockets_neither_lock_out_nor_stay(make_server):
    srv = make_server(config_text="[dimse]\nacse_timeout = 2\n")
    idle = []
    for _ in range(40):  # more than max_associations (32)
        s = socket.create_connection(("127.0.0.1", srv.dicom_port), timeout=10)
        s.sendall(b"\x01\x00\x00\x00")  # the start of an A-ASSOCIATE-RQ header, then silence
        idle.append(s)
    opened = time.monotonic()
    time.sleep(0.3)
    res = echoscu(srv)
    assert res.returncode == 0, res.stdout + res.stderr  # not "local limit exceeded"
    for s in idle:
        left = max(0.1, opened + 2 + 2.5 - time.monotonic())
        closed_by_server(s, within=left)  # acse_timeout + a margin after they connected
        s.close()
    assert echoscu(srv).returncode == 0
    pattern = r"association - -> - from 127\.0\.0\.1:\d+: timed out after \d\.\d s"
    assert wait_for(lambda: len(log_lines(srv, pattern)) == 40, 5), srv.log()[-2000:]


def test_max_associations_counts_only_requested_associations(make_server):
    srv = make_server(config_text="[dimse]\nacse_timeout = 5\nmax_associations = 2\n")
    idle = [socket.create_connection(("127.0.0.1", srv.dicom_port), timeout=10) for _ in range(5)]
    for s in idle:
        s.sendall(b"\x01\x00")
    time.sleep(0.2)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(VERIFICATION)
    held = [ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet) for _ in range(2)]
    assert all(a.is_established for a in held)  # the 5 idle sockets hold no slot...
    third = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
    assert third.is_rejected  # ... but the limit still holds for real associations
    held[0].release()
    time.sleep(0.3)
    assert echoscu(srv).returncode == 0
    held[1].release()
    assert wait_for(lambda: log_lines(srv, r"HOLDER -> PATHPACS .*refused .*local limit exceeded \(max_associations\)"), 3)
    for s in idle:
        s.close()


def test_max_pending_closes_the_excess_at_once(make_server):
    srv = make_server(config_text="[dimse]\nacse_timeout = 2\nmax_pending = 5\n")
    idle = [socket.create_connection(("127.0.0.1", srv.dicom_port), timeout=10) for _ in range(5)]
    time.sleep(0.3)
    extra = socket.create_connection(("127.0.0.1", srv.dicom_port), timeout=10)
    assert closed_by_server(extra, within=1.0) < 1.0  # refused at once, not after acse_timeout
    extra.close()
    assert wait_for(lambda: log_lines(srv, r"closed 1 new connection\(s\) at once.*max_pending"), 3)
    for s in idle:
        closed_by_server(s, within=4.5)
        s.close()
    assert echoscu(srv).returncode == 0


@pytest.mark.parametrize("how", ["stall", "dribble"])
def test_established_peer_stalling_mid_pdu_is_dropped(make_server, how):
    srv = make_server(config_text="[dimse]\nacse_timeout = 1\nnetwork_timeout = 1\n")
    sock, _ = raw_associate(srv)
    sock.sendall(pdata(1, 3, echo_rq()))  # one good C-ECHO ...
    reply = recv_pdu(sock)
    assert reply is not None and reply[0] == 0x04
    pdu = pdata(1, 3, echo_rq(2))
    sock.sendall(pdu[:9])  # ... then half a PDU, and silence, or the rest a byte every 0.3 s
    start = time.monotonic()
    if how == "dribble":
        try:
            for b in pdu[9:-1]:
                time.sleep(0.3)
                sock.sendall(bytes([b]))
                if time.monotonic() - start > 5:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
    closed_by_server(sock, within=max(0.1, start + 1 + 2.5 - time.monotonic()))
    assert time.monotonic() - start > 0.7
    sock.close()
    line = wait_for(lambda: log_lines(srv, r"association RAWSCU -> PATHPACS from 127\.0\.0\.1:\d+: timed out"), 3)
    assert line and "C-ECHO 1" in line[0], srv.log()[-2000:]
    # pynetdicom's idle timer and the socket timeout have the same length: either may see it.
    assert re.search(r"in the middle of a PDU|no complete PDU within network_timeout|one PDU took over", line[0])
    assert echoscu(srv).returncode == 0


def test_sigterm_is_not_held_up_by_open_connections(make_server):
    srv = make_server()
    ae = AE(ae_title="IDLER")
    ae.add_requested_context(VERIFICATION)
    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
    assert a.is_established  # and then nothing: network_timeout is 120 s
    half = socket.create_connection(("127.0.0.1", srv.dicom_port), timeout=10)
    half.sendall(b"\x01\x00\x00")
    time.sleep(0.2)
    start = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - start < 5
    assert log_lines(srv, r"association IDLER -> PATHPACS .*: aborted after .*\(the archive is stopping\)")
    half.close()


# -- 2. oversized PDUs -------------------------------------------------------------------------

def test_oversized_pdus_are_never_read(make_server):
    srv = make_server(config_text="[dimse]\nacse_timeout = 5\nmax_pdu = 65536\n")
    before = rss(srv)
    # Before any association: an A-ASSOCIATE-RQ announcing 4 GiB - 1, and a P-DATA of 1 GiB.
    for header in (b"\x01\x00\xff\xff\xff\xff", b"\x04\x00\x40\x00\x00\x00"):
        s = socket.create_connection(("127.0.0.1", srv.dicom_port), timeout=10)
        s.sendall(header + bytes(1000))
        reply = recv_pdu(s)
        assert reply is not None and reply[0] == 0x07  # A-ABORT ...
        assert closed_by_server(s, within=1.0) < 1.0  # ... and closed at once
        s.close()
    # In an association: the server announced our max_pdu; a P-DATA 1 byte over it (plus the
    # tolerance) is refused, one within it is served.
    sock, ac = raw_associate(srv)
    assert max_length_of(ac) == 65536
    sock.sendall(pdata(1, 3, echo_rq()))
    assert recv_pdu(sock)[0] == 0x04
    too_long = 65536 + 64 + 1
    sock.sendall(struct.pack(">BBI", 4, 0, too_long) + struct.pack(">I", too_long - 4) + bytes(4096))
    reply = recv_pdu(sock)
    assert reply is not None and reply[0] == 0x07
    closed_by_server(sock, within=1.0)
    sock.close()
    pattern = r"from 127\.0\.0\.1:\d+: aborted .*PDU of \d+ bytes announced"
    assert wait_for(lambda: len(log_lines(srv, pattern)) == 3, 3), srv.log()[-3000:]
    lines = log_lines(srv, pattern)
    assert any("P-DATA-TF PDU of 65601 bytes" in line and "RAWSCU -> PATHPACS" in line for line in lines)
    assert any("A-ASSOCIATE-RQ PDU of 4294967295 bytes" in line for line in lines)
    assert echoscu(srv).returncode == 0
    assert rss(srv) < before + (64 << 20)


def test_peer_announcing_unlimited_pdus_gets_bounded_ones(make_server, tmp_path):
    """A C-GET requestor announcing Maximum Length 0 (unlimited) is sent PDUs of at most
    max(max_pdu, 4 MiB), not a whole 12 MB instance in one PDU (held in memory to send it)."""
    from pynetdicom import build_role

    srv = make_server()
    big = factory.wsi_instance(generate_uid(), generate_uid(), 2048, 2048, transfer_syntax=str(ExplicitVRLittleEndian))
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    ae = AE(ae_title="GREEDY")
    ae.add_requested_context(WSI, [ExplicitVRLittleEndian])
    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
    assert _send_chunked(a, path).Status == 0
    a.release()

    ae = AE(ae_title="GREEDY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.3")
    ae.add_requested_context(WSI, [ExplicitVRLittleEndian])
    sizes, received = [], []

    def on_pdu(event):
        if event.pdu.pdu_type == 0x04:
            sizes.append(len(event.pdu.encode()))

    handlers = [(evt.EVT_PDU_RECV, on_pdu),
                (evt.EVT_C_STORE, lambda e: (received.append(e.request.AffectedSOPInstanceUID), 0x0000)[1])]
    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet, ext_neg=[build_role(WSI, scp_role=True)],
                     evt_handlers=handlers, max_pdu=0)
    assert a.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = big.StudyInstanceUID
    q.SeriesInstanceUID = big.SeriesInstanceUID
    q.SOPInstanceUID = big.SOPInstanceUID
    statuses = [st.Status for st, _ in a.send_c_get(q, "1.2.840.10008.5.1.4.1.2.2.3")]
    a.release()
    assert statuses[-1] == 0 and received == [big.SOPInstanceUID]
    assert sum(sizes) > path.stat().st_size - 1000
    assert max(sizes) <= (4 << 20) + 12


def test_huge_dimse_identifier_is_refused(make_server):
    """A C-FIND identifier that never ends (fragments without the last bit) is cut off."""
    srv = make_server(config_text="[dimse]\nacse_timeout = 5\n")
    sock, ac = raw_associate(srv, contexts=((1, STUDY_FIND, (str(ImplicitVRLittleEndian),)),))
    sock.sendall(pdata(1, 3, command(AffectedSOPClassUID=STUDY_FIND, CommandField=0x0020, MessageID=1,
                                     Priority=0, CommandDataSetType=0x0001)))
    chunk = pdata(1, 0, bytes(max_length_of(ac) - 6 - 64))
    sent = 0
    try:
        while sent < (40 << 20):
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < (40 << 20)  # the server closed the connection before 40 MB were sent
    sock.close()
    assert wait_for(lambda: log_lines(srv, r"RAWSCU -> PATHPACS .*aborted .*DIMSE data set over"), 3)
    assert echoscu(srv).returncode == 0


# -- 3. aborted C-STORE transfers leave nothing on disk ----------------------------------------

def _store_command(sop_class: str, sop: str) -> bytes:
    return command(AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=1, Priority=0,
                   CommandDataSetType=0x0000, AffectedSOPInstanceUID=sop)


@pytest.mark.parametrize("ending", ["abort", "drop"])
def test_raw_cstore_cut_midway_leaves_no_spool(make_server, ending):
    srv = make_server(config_text="[dimse]\nacse_timeout = 5\n")
    baseline = data_bytes(srv)
    sock, ac = raw_associate(srv, contexts=((1, WSI, (str(ExplicitVRLittleEndian),)),))
    sock.sendall(pdata(1, 3, _store_command(WSI, generate_uid())))
    fragment = pdata(1, 0, b"\x55" * (max_length_of(ac) - 6 - 64))
    for _ in range(6):  # ~24 MB of a data set that is never finished
        sock.sendall(fragment)
    assert wait_for(lambda: data_bytes(srv) > baseline + (20 << 20), 10), "the server did not spool the data"
    if ending == "abort":
        sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    sock.close()
    assert wait_for(lambda: data_bytes(srv) == baseline, 10), f"{data_bytes(srv) - baseline} bytes left"
    line = wait_for(lambda: log_lines(srv, r"RAWSCU -> PATHPACS .*aborted.*1 partial C-STORE data set"), 3)
    assert line, srv.log()[-2000:]
    assert echoscu(srv).returncode == 0
    assert stats(srv)["instances"] == 0


# The SCU's own DUL thread may complain about a P-DATA queued just after its abort.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_pynetdicom_cstore_aborted_midway_leaves_no_spool(make_server, tmp_path):
    srv = make_server(config_text="[dimse]\nacse_timeout = 5\nmax_pdu = 65536\n")
    big = factory.wsi_instance(generate_uid(), generate_uid(), 2048, 2048, transfer_syntax=str(ExplicitVRLittleEndian))
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    assert path.stat().st_size > 10 << 20
    baseline = data_bytes(srv)

    ae = AE(ae_title="SCANNER")
    ae.dimse_timeout = 5
    ae.add_requested_context(WSI, [ExplicitVRLittleEndian])
    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
    assert a.is_established
    send_pdu = a.dul.send_pdu

    def slow_send(primitive):  # test-only: pace the SCU so the abort lands mid-transfer
        if type(primitive).__name__ == "P_DATA" and (a.is_aborted or a._sent_abort):
            raise ConnectionAbortedError("aborted")
        time.sleep(0.003)
        send_pdu(primitive)

    a.dul.send_pdu = slow_send
    outcome = {}

    def sender():
        try:
            outcome["status"] = a.send_c_store(path)
        except Exception as exc:  # the abort may surface here
            outcome["error"] = exc

    t = threading.Thread(target=sender)
    t.start()
    assert wait_for(lambda: data_bytes(srv) > baseline + (2 << 20), 10)
    a.abort()
    t.join(20)
    assert not t.is_alive()
    assert not outcome.get("status")  # no response: the transfer never completed
    assert wait_for(lambda: data_bytes(srv) == baseline, 10), f"{data_bytes(srv) - baseline} bytes left"
    assert wait_for(lambda: log_lines(srv, r"SCANNER -> PATHPACS .*aborted .*by the peer.*partial C-STORE"), 3)
    assert echoscu(srv).returncode == 0
    assert stats(srv)["instances"] == 0


# -- 4. the SOP class is the presentation context's ---------------------------------------------

def _store_on_context(srv: Server, path_or_ds, context_class: str) -> int:
    """C-STORE whatever `path_or_ds` says, on the context accepted for `context_class`
    (test-only: pynetdicom's context lookup is patched to pick it)."""
    ae = AE(ae_title="LIAR")
    ae.add_requested_context(context_class, [ExplicitVRLittleEndian])
    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
    assert a.is_established
    (cx,) = a.accepted_contexts
    a._get_valid_context = lambda *args, **kwargs: cx
    status = _send_chunked(a, path_or_ds)
    a.release()
    return status.Status


def _send_chunked(a, path_or_ds):
    """send_c_store, sending a file as it is (the command's SOP class from its file meta)."""
    from pynetdicom import _config  # test-only
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return a.send_c_store(path_or_ds)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def test_cstore_sop_class_is_checked_against_the_context(make_server, tmp_path):
    srv = make_server()
    sc = factory.secondary_capture(tmp_path / "sc.dcm")
    # The data set and the command say SC, the accepted context is CT Image Storage.
    assert _store_on_context(srv, pydicom.dcmread(sc), CT) == 0xA900
    # The data set says CT (so ingest would see no mismatch with a CT context), the command SC.
    ds = pydicom.dcmread(sc)
    ds.SOPClassUID = CT
    ct_path = tmp_path / "ct-with-sc-meta.dcm"
    ds.file_meta.MediaStorageSOPClassUID = SC
    ds.save_as(ct_path, enforce_file_format=False)
    assert _store_on_context(srv, ct_path, CT) == 0xA900
    assert stats(srv)["instances"] == 0
    assert [p for p in (srv.data_dir / "hot").rglob("*") if p.is_file() and p.name != "lock"] == []
    assert log_lines(srv, r"refused \(0xA900\): Affected SOP Class UID 1\.2\.840\.10008\.5\.1\.4\.1\.1\.7 is not "
                          r"the presentation context's 1\.2\.840\.10008\.5\.1\.4\.1\.1\.2")
    assert len(log_lines(srv, r"SOP Class .* does not match the presentation context")) == 0
    # The honest version of the first store is accepted.
    assert _store_on_context(srv, pydicom.dcmread(sc), SC) == 0x0000
    assert stats(srv)["instances"] == 1


# -- 5. one log line per association -------------------------------------------------------------

def test_one_log_line_per_association(make_server, tmp_path):
    srv = make_server(config_text="[dimse]\nrequire_called_aet = true\n")
    assert echoscu(srv).returncode == 0
    sc = factory.secondary_capture(tmp_path / "sc.dcm")
    ds = pydicom.dcmread(sc)
    ds.SOPClassUID = CT  # data set CT, file meta (so command and context) SC: 0xA900 from ingest
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=False)
    ae = AE(ae_title="LOGSCU")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(SC, [ExplicitVRLittleEndian])
    ae.add_requested_context(STUDY_FIND)
    a = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
    assert a.is_established
    assert a.send_c_echo().Status == 0
    assert a.send_c_store(sc).Status == 0
    assert _send_chunked(a, bad).Status == 0xA900
    for _ in range(2):
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        assert [s.Status for s, _ in a.send_c_find(q, STUDY_FIND)][-1] == 0
    a.release()
    b = ae.associate("127.0.0.1", srv.dicom_port, ae_title=srv.aet)
    assert b.is_established
    b.abort()
    wrong = ae.associate("127.0.0.1", srv.dicom_port, ae_title="NOTUS")
    assert wrong.is_rejected

    def lines():
        return log_lines(srv, r"pathpacs\.dimse: association (LOGSCU|ECHOSCU) ")
    wait_for(lambda: len(lines()) >= 4, 5)
    line_re = r"association {} -> {} from 127\.0\.0\.1:\d+: {} after \d+\.\d s{}; {}$"
    expected = [
        line_re.format("ECHOSCU", "PATHPACS", "released", "", r"C-ECHO 1"),
        line_re.format("LOGSCU", "PATHPACS", "released", "",
                       r"C-ECHO 1 C-STORE 2 \(1 ok, 1 failed\) C-FIND 2"),
        line_re.format("LOGSCU", "PATHPACS", "aborted", r" \(by the peer \(A-ABORT\)\)", "no operations"),
        line_re.format("LOGSCU", "NOTUS", "refused", r" \(called AE title not recognised\)", "no operations"),
    ]
    got = lines()
    for pattern in expected:
        assert sum(bool(re.search(pattern, line)) for line in got) == 1, (pattern, got)
    assert len(got) == 4, got


# -- 6. pynetdicom internals stay in compat.py ---------------------------------------------------

def test_compat_names_exist_and_version_guard():
    from archive.dimse import compat

    assert compat.missing_private_names() == []
    compat.check_version()  # the installed one
    compat.check_version("3.0.0")
    for version in ("2.1.0", "3.1.0", "4.0.0.dev0"):
        with pytest.raises(compat.UnsupportedPynetdicom, match=re.escape(">=3.0,<3.1")):
            compat.check_version(version)


def test_only_compat_touches_pynetdicom_internals():
    """No module of archive.dimse but compat.py names a pynetdicom internal (attribute or import)."""
    import ast

    internal = {"_config", "_dataset_file", "NamedTemporaryFile", "dul", "dimse", "_read_pdu_data",
                "_decode_pdu", "to_provider_queue", "send_pdu", "state_machine", "_recv_pdu", "msg_queue",
                "_get_valid_context", "_accepted_cx", "_maximum_associations", "_handlers", "_servers"}
    root = Path(__file__).resolve().parent.parent / "archive" / "dimse"
    offenders = []
    for path in sorted(root.glob("*.py")):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in internal:
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pynetdicom"):
                names = [a.name for a in node.names if a.name.startswith("_") or a.name in internal]
                if names or "._" in node.module:
                    offenders.append(f"{path.name}:{node.lineno}: from {node.module} import {names}")
    assert offenders == []


# -- fuzz -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    cfg = base / "config.toml"
    cfg.write_text("[dimse]\nacse_timeout = 1\nnetwork_timeout = 2\nmax_pdu = 65536\n")
    srv = Server(base / "data", free_port(), free_port(), config=cfg).start()
    srv.baseline_rss = rss(srv)
    yield srv
    srv.stop()


VALID_RQ = associate_rq(contexts=((1, VERIFICATION, (str(ImplicitVRLittleEndian),)),
                                  (3, STUDY_FIND, (str(ImplicitVRLittleEndian),))))


@st.composite
def mutated(draw, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data += draw(st.binary(max_size=64))
    return bytes(data)


random_pdu = st.builds(
    lambda t, r, length, body: struct.pack(">BBI", t, r, length) + body,
    st.one_of(st.integers(1, 7), st.integers(0, 255)), st.integers(0, 255),
    st.one_of(st.integers(0, 512), st.integers(0, 0xFFFFFFFF)), st.binary(max_size=1024))

after_association = st.one_of(
    mutated(pdata(1, 3, echo_rq())),
    mutated(pdata(3, 3, command(AffectedSOPClassUID=STUDY_FIND, CommandField=0x0020, MessageID=7,
                                Priority=0, CommandDataSetType=0x0001))),
    st.builds(lambda cid, ctl, data: pdata(cid, ctl, data), st.integers(0, 255), st.integers(0, 255),
              st.binary(max_size=512)),
    random_pdu,
)

case = st.one_of(
    st.tuples(st.just("pre"), st.one_of(mutated(VALID_RQ), random_pdu, st.binary(max_size=256))),
    st.tuples(st.just("post"), st.lists(after_association, min_size=1, max_size=4)),
)


def _play(srv: Server, kind: str, payload) -> None:
    try:
        with socket.create_connection(("127.0.0.1", srv.dicom_port), timeout=2) as s:
            if kind == "pre":
                s.sendall(payload)
            else:
                s.sendall(VALID_RQ)
                reply = recv_pdu(s)
                if reply is None or reply[0] != 0x02:
                    return
                for pdu in payload:
                    s.sendall(pdu)
            s.settimeout(0.05)
            try:
                s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                pass
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=case)
def test_fuzzed_pdus_do_not_hurt_the_server(fuzz_server, case):
    srv = fuzz_server
    _play(srv, *case)
    assert srv.proc.poll() is None, srv.log()[-3000:]
    assert rss(srv) < srv.baseline_rss + (256 << 20)


def test_after_the_fuzz_the_server_still_answers(fuzz_server):
    srv = fuzz_server
    assert srv.proc.poll() is None
    res = echoscu(srv)
    assert res.returncode == 0, res.stdout + res.stderr
    assert rss(srv) < srv.baseline_rss + (256 << 20)
