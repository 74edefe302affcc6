"""Everything the archive does with pynetdicom's internals, in one place.

pynetdicom's public API has no hook for: choosing where received C-STORE data is spooled, bounding
what the upper layer reads from a peer, or throttling what it queues for sending. The functions
here reach into private names to do those things. Nothing else in `archive.dimse` may use a
private pynetdicom name (one starting with `_`, or `DULServiceProvider` / `DIMSEServiceProvider`
internals); add it here, to `PRIVATE_NAMES`, and keep `tests/test_dimse_hardening.py` green.

`check_version()` refuses to start with a pynetdicom outside the range these were tested with;
`missing_private_names()` lists the names below that a pynetdicom no longer has, so an upgrade
fails a test instead of the archive.
"""
from __future__ import annotations

import copy
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Callable

import pynetdicom
from pynetdicom import _config, dimse_messages
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext, build_context

if TYPE_CHECKING:
    from pynetdicom.association import Association

TESTED = ((3, 0), (3, 1))  # pynetdicom >=3.0,<3.1
TESTED_TEXT = ">=3.0,<3.1"


class UnsupportedPynetdicom(RuntimeError):
    pass


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def check_version(version: str | None = None) -> None:
    """Raise UnsupportedPynetdicom unless pynetdicom's version is in the tested range."""
    version = version or pynetdicom.__version__
    v = _version(version)
    if not (TESTED[0] <= v[:2] < TESTED[1]):
        raise UnsupportedPynetdicom(
            f"pynetdicom {version} is installed; pathpacs's DIMSE server was tested with pynetdicom "
            f"{TESTED_TEXT} and relies on its internals (archive/dimse/compat.py): install a "
            f"version in that range (pip install 'pynetdicom{TESTED_TEXT}')")


# (where, name): every private or internal pynetdicom name this module touches.
PRIVATE_NAMES = [
    ("pynetdicom._config", "STORE_RECV_CHUNKED_DATASET"),
    ("pynetdicom._config", "STORE_SEND_CHUNKED_DATASET"),
    ("pynetdicom._config", "LOG_HANDLER_LEVEL"),
    ("pynetdicom.dimse_messages", "NamedTemporaryFile"),
    ("pynetdicom.dimse_messages", "open"),  # the builtin, looked up there when a file is sent
    ("C_STORE primitive", "_dataset_file"),
    ("Association", "dul"),
    ("Association", "dimse"),
    ("DULServiceProvider", "_read_pdu_data"),
    ("DULServiceProvider", "_decode_pdu"),
    ("DULServiceProvider", "_recv_pdu"),
    ("DULServiceProvider", "event_queue"),
    ("DULServiceProvider", "to_provider_queue"),
    ("DULServiceProvider", "send_pdu"),
    ("DULServiceProvider", "socket"),
    ("DULServiceProvider", "state_machine"),
    ("DULServiceProvider", "idle_timer_expired"),
    ("StateMachine", "current_state"),
    ("DIMSEServiceProvider", "receive_primitive"),
    ("DIMSEServiceProvider", "message"),
    ("DIMSEServiceProvider", "msg_queue"),
    ("DIMSEMessage", "encoded_command_set"),
    ("DIMSEMessage", "data_set"),
    ("AssociationSocket", "socket"),
    ("AssociationSocket", "close"),
    ("Association", "_serve_request"),
]


def missing_private_names() -> list[str]:
    """The entries of PRIVATE_NAMES this pynetdicom lacks (checked on real, unstarted objects),
    plus behaviour the reader below copies from `DULServiceProvider._read_pdu_data`."""
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.transport import AssociationSocket

    assoc = Association(AE(), "acceptor")
    sock = AssociationSocket(assoc, client_socket=socket.socket())
    assoc.dul.socket = sock
    objects = {
        "pynetdicom._config": _config,
        "pynetdicom.dimse_messages": dimse_messages,
        "C_STORE primitive": C_STORE(),
        "Association": assoc,
        "DULServiceProvider": assoc.dul,
        "StateMachine": assoc.dul.state_machine,
        "DIMSEServiceProvider": assoc.dimse,
        "DIMSEMessage": DIMSEMessage(),
        "AssociationSocket": sock,
    }
    import builtins

    objects_with_builtins = {**objects, "pynetdicom.dimse_messages": _ModuleView(dimse_messages, builtins)}
    missing = [f"{where}.{name}" for where, name in PRIVATE_NAMES
               if not hasattr(objects_with_builtins[where], name)]
    import inspect

    if "open(self._data_set_path[0], \"rb\")" not in inspect.getsource(DIMSEMessage.encode_msg):
        missing.append("DIMSEMessage.encode_msg opening the data set file with open(path, 'rb')")
    from pynetdicom import dul as dul_module, fsm

    if set(getattr(dul_module, "_PDU_TYPES", {})) != {bytes([t]) for t in PDU_TYPES}:
        missing.append("pynetdicom.dul._PDU_TYPES (PDU types 1..7)")
    for key in (("Evt17", "Sta2"), ("Evt17", "Sta6"), ("Evt19", "Sta2"), ("Evt19", "Sta6")):
        if key not in getattr(fsm, "TRANSITION_TABLE", {}):
            missing.append(f"pynetdicom.fsm.TRANSITION_TABLE[{key}]")
    cx = build_context("1.2.840.10008.1.1", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    cx.scu_role, cx.scp_role, cx.context_id = True, True, 1
    if not _plain_attributes(cx):
        missing.append("PresentationContext attributes are no longer plain values (cheap_copy_contexts)")
    sock.socket.close()
    return missing


# -- configuration and C-STORE spooling -----------------------------------------------------

def configure() -> None:
    """Process-wide pynetdicom settings for the archive:
    - receive C-STORE data sets into a file (see receive.py), send stored files in chunks;
    - no 'standard' DIMSE/PDU log handlers: they only make debug output (pynetdicom logs at
      WARNING here), cost a call per PDU, and raise on malformed messages (each a traceback);
    - pynetdicom.utils logs every undecodable or non-conformant value a peer sends, and
      pynetdicom.dimse every undecodable DIMSE message, with a traceback: a hostile peer could
      fill the log; the failure is in the association's one log line instead."""
    if not _saved:
        _saved.update(recv=_config.STORE_RECV_CHUNKED_DATASET, send=_config.STORE_SEND_CHUNKED_DATASET,
                      log=_config.LOG_HANDLER_LEVEL, ntf=dimse_messages.NamedTemporaryFile,
                      open=dimse_messages.__dict__.get("open"))
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom.utils").setLevel(logging.CRITICAL)
    logging.getLogger("pynetdicom.dimse").setLevel(logging.CRITICAL)  # "invalid DIMSE message" + traceback


_saved: dict = {}


def restore() -> None:
    """Put back what configure(), use_spool_factory() and verify_sent_files() changed (a
    server stopped inside a process that goes on using pynetdicom, e.g. a test's SCU)."""
    if not _saved:
        return
    _config.STORE_RECV_CHUNKED_DATASET = _saved["recv"]
    _config.STORE_SEND_CHUNKED_DATASET = _saved["send"]
    _config.LOG_HANDLER_LEVEL = _saved["log"]
    dimse_messages.NamedTemporaryFile = _saved["ntf"]
    if _saved["open"] is None:
        dimse_messages.__dict__.pop("open", None)
    else:
        dimse_messages.open = _saved["open"]  # type: ignore[attr-defined]
    _saved.clear()


def chunked_file_sends() -> None:
    """Make C-STOREs of a file path send it in chunks, as stored, never decoded in memory (a
    sender without a DIMSE server: the consultation route, `archive.consult.dimse_route`)."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def use_spool_factory(factory) -> None:
    """Make pynetdicom create `factory(...)` where it would create a NamedTemporaryFile for a
    received C-STORE data set (the call happens in the association's DUL reactor thread)."""
    dimse_messages.NamedTemporaryFile = factory  # type: ignore[assignment]


def request_spool(request):
    """The spool file a C-STORE request primitive's data set was written to (None if in memory)."""
    return getattr(request, "_dataset_file", None)


# -- accepting -----------------------------------------------------------------------------

class _CheapCopyContext(PresentationContext):
    """pynetdicom deep-copies the server's supported contexts for every accepted connection,
    before any byte is read: ~55 ms of CPU for the archive's 170 storage classes x 44 syntaxes,
    which turns a flood of connections into a CPU flood (and makes echoscu wait behind 40 idle
    sockets). A context's attributes are immutable values and lists of UIDs (str): copying the
    lists is a deep copy (checked by missing_private_names)."""

    def __deepcopy__(self, memo):
        new = _CheapCopyContext.__new__(_CheapCopyContext)
        new.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in vars(self).items()})
        return new


def cheap_copy_contexts(contexts: list) -> list:
    """The same presentation contexts, as objects pynetdicom copies cheaply."""
    out = []
    for cx in contexts:
        new = _CheapCopyContext.__new__(_CheapCopyContext)
        new.__dict__.update(copy.deepcopy(vars(cx)))
        out.append(new)
    return out


def _plain_attributes(cx) -> bool:
    return all(v is None or isinstance(v, (str, int, bool)) or
               (isinstance(v, list) and all(isinstance(x, str) for x in v)) for v in vars(cx).values())


# -- sending --------------------------------------------------------------------------------

def throttle_sends(assoc: "Association", max_queued: int) -> None:
    """Make `assoc` wait before queueing a PDU while more than `max_queued` are waiting to be
    sent: pynetdicom's outgoing queue is unbounded, so a fast disk and a slow peer would
    otherwise pile a whole file up in memory."""
    dul = assoc.dul
    queue_put = dul.send_pdu

    def send_pdu(primitive) -> None:
        while dul.to_provider_queue.qsize() > max_queued and assoc.is_established:
            time.sleep(0.0005)
        queue_put(primitive)

    dul.send_pdu = send_pdu


# -- receiving: bounded PDUs and DIMSE messages ----------------------------------------------

PDU_TYPES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
             0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
# Upper layer states in which P-DATA-TF PDUs legitimately arrive (association established or
# being released); in any other state only small control PDUs may come.
ASSOCIATED_STATES = {"Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11", "Sta12"}
INVALID_PDU_PARAMETER = 0x06  # A-ABORT reason (PS3.8 9.3.8), source: service provider


def set_socket_timeout(assoc: "Association", seconds: float | None) -> None:
    """Timeout of each send/recv on the association's TCP socket (requestor associations:
    pynetdicom leaves it blocking once connected)."""
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is not None:
        try:
            raw.settimeout(seconds)
        except OSError:
            pass


def dul_thread(assoc: "Association"):
    """The association's upper layer reactor thread (it reads the socket and decodes PDUs)."""
    return assoc.dul


def idle_timed_out(assoc: "Association") -> bool:
    """True once pynetdicom's network (idle) timer of `assoc` has expired."""
    return bool(assoc.dul.idle_timer_expired())


def abort_and_close(assoc: "Association") -> None:
    """From the DUL thread: send an A-ABORT (service provider, invalid PDU parameter) and close
    the connection, without reading any more of what the peer sent."""
    dul = assoc.dul
    sock = dul.socket
    raw = getattr(sock, "socket", None)
    if raw is not None:
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = INVALID_PDU_PARAMETER
        try:
            raw.settimeout(1.0)
            raw.sendall(pdu.encode())
        except OSError:
            pass
    if sock is not None:
        sock.close()  # shutdown + close, then Evt17: the state machine ends the association


def _recv_into(raw: socket.socket, buf: bytearray, start: int) -> int:
    """Fill buf[start:] from the socket; returns the bytes now in buf (fewer than len(buf) if
    the peer closed the connection). The socket's timeout applies to each wait (TimeoutError)."""
    view = memoryview(buf)
    got = start
    try:
        while got < len(buf):
            k = raw.recv_into(view[got:], min(len(buf) - got, 1 << 20))
            if k == 0:
                break
            got += k
    finally:
        view.release()
    return got


class ReadWatcher:
    """What the bounded reader asks and reports, per connection (see connections._Watcher).
    Called in the association's DUL thread."""

    def pdu_limit(self, pdu_type: int, associated: bool) -> int: ...
    def oversized(self, pdu_type: int, length: int, limit: int) -> None: ...
    def stalled(self, exc: BaseException) -> None: ...
    def peer_closed(self, got: int, wanted: int) -> None: ...
    def invalid(self, what: str) -> None: ...
    def reading(self, busy: bool) -> None: ...  # a PDU is being read (True) / no longer (False)


def bound_pdu_reads(assoc: "Association", watcher: ReadWatcher) -> None:
    """Replace the DUL's PDU reader of `assoc` (before its threads start) by one that reads the
    6-byte PDU header, asks `watcher.pdu_limit` for the largest length allowed for that PDU type
    in the current state, and aborts + closes the connection instead of reading a longer PDU's
    body. pynetdicom 3.0's reader would allocate whatever length the peer announces (up to 4 GiB).
    Otherwise it behaves like pynetdicom's `DULServiceProvider._read_pdu_data` (same FSM events)."""
    dul = assoc.dul

    def read_pdu_data() -> None:
        watcher.reading(True)
        try:
            _read_pdu_data()
        finally:
            watcher.reading(False)

    def _read_pdu_data() -> None:
        raw = getattr(dul.socket, "socket", None)
        try:
            if raw is None:
                raise ConnectionError("socket already closed")
            header = bytearray(6)
            got = _recv_into(raw, header, 0)
            if got < 6:
                watcher.peer_closed(got, 6)
                dul.event_queue.put("Evt17")  # transport connection closed
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in PDU_TYPES:
                watcher.invalid(f"unknown PDU type 0x{pdu_type:02X}")
                dul.event_queue.put("Evt19")  # unrecognised PDU
                return
            limit = watcher.pdu_limit(pdu_type, dul.state_machine.current_state in ASSOCIATED_STATES)
            if length > limit:
                watcher.oversized(pdu_type, length, limit)
                abort_and_close(assoc)
                return
            pdu_bytes = bytearray(6 + length)
            pdu_bytes[:6] = header
            got = _recv_into(raw, pdu_bytes, 6)
        except (OSError, ValueError) as exc:  # timeout mid-PDU, reset, closed under us
            watcher.stalled(exc)
            dul.event_queue.put("Evt17")
            return
        if got != 6 + length:
            watcher.peer_closed(got, 6 + length)
            dul.event_queue.put("Evt17")
            return
        try:
            pdu, event = dul._decode_pdu(pdu_bytes)
        except Exception as exc:
            watcher.invalid(f"undecodable {PDU_TYPES[pdu_type]} PDU ({type(exc).__name__}: {exc})"[:200])
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    dul._read_pdu_data = read_pdu_data  # type: ignore[method-assign]


def bound_messages(assoc: "Association", check: Callable[[int, int, int], str | None],
                   on_violation: Callable[[str], None]) -> None:
    """After each P-DATA received on `assoc`, call `check(command bytes, in-memory data set bytes
    of the message being assembled, complete messages waiting to be served)`; a returned reason
    aborts and closes the association. pynetdicom accumulates a message's fragments, and queues
    complete messages, without any limit (C-STORE data sets go to a spool file and are not
    counted)."""
    dimse = assoc.dimse
    original = dimse.receive_primitive

    def receive_primitive(primitive) -> None:
        try:
            original(primitive)
        except Exception as exc:  # pynetdicom 3.0 lets a malformed command set kill the DUL thread
            on_violation(f"undecodable DIMSE message ({type(exc).__name__}: {exc}): A-ABORT sent"[:200])
            abort_and_close(assoc)
            return
        if "Evt19" in tuple(assoc.dul.event_queue.queue):  # pynetdicom found it invalid; it aborts
            on_violation("invalid DIMSE message: A-ABORT sent")
            return
        msg = dimse.message
        command = data = 0
        if msg is not None:
            command = msg.encoded_command_set.tell()
            if msg.data_set is not None:
                data = msg.data_set.tell()
        reason = check(command, data, dimse.msg_queue.qsize())
        if reason is not None:
            on_violation(reason)
            abort_and_close(assoc)

    dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]


# -- sending stored files, verified while pynetdicom reads them ----------------------------------

class _ModuleView:
    """A module's names plus the builtins it falls back on (for the private-name check)."""

    def __init__(self, module, builtins_module) -> None:
        self._m, self._b = module, builtins_module

    def __getattr__(self, name: str):
        try:
            return getattr(self._m, name)
        except AttributeError:
            return getattr(self._b, name)


class SendDamaged(Exception):
    """A stored file read for sending is not the bytes recorded at ingest."""


class _VerifiedReader:
    """The file pynetdicom reads a stored instance from, hashing every byte read: when the end
    is reached with the wrong size or sha256, the last read raises SendDamaged instead of
    returning the last fragment, so the C-STORE sub-operation fails and never completes."""

    def __init__(self, fh, expect: "Expectation") -> None:
        import hashlib

        self._fh, self._expect = fh, expect
        self._hash = hashlib.sha256()
        self._pos = 0  # bytes hashed from the start of the file

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset > self._pos:  # pynetdicom skips the file meta: hash it first
            self._fh.seek(self._pos)
            self._hash.update(self._fh.read(offset - self._pos))
            self._pos = offset
        return self._fh.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._hash.update(data)
        self._pos += len(data)
        end = n < 0 or len(data) < n or self._pos >= self._expect.size
        if end:
            rest = self._fh.read(1)  # a longer file is damaged too
            if self._pos != self._expect.size or rest or self._hash.hexdigest() != self._expect.sha256:
                what = "sha256 mismatch" if self._pos == self._expect.size and not rest else "size mismatch"
                self._expect.on_damage(what)
                raise SendDamaged(what)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


class Expectation:
    def __init__(self, sha256: str, size: int, on_damage: Callable[[str], None]) -> None:
        self.sha256, self.size, self.on_damage = sha256, size, on_damage


_expected: dict[str, Expectation] = {}


def expect_file(path, sha256: str, size: int, on_damage: Callable[[str], None]) -> None:
    """The next sends of `path` are verified against (sha256, size) while read."""
    _expected[str(path)] = Expectation(sha256, size, on_damage)


def forget_file(path) -> None:
    _expected.pop(str(path), None)


def _open(file, mode="r", *args, **kwargs):
    expect = _expected.get(str(file)) if mode == "rb" else None
    fh = open(file, mode, *args, **kwargs)
    return fh if expect is None else _VerifiedReader(fh, expect)


def verify_sent_files() -> None:
    """Make pynetdicom's file sends (C-STORE sub-operations of C-GET/C-MOVE) go through
    `_open`: files registered with expect_file are hashed while read."""
    dimse_messages.open = _open  # type: ignore[attr-defined]


# -- refusing requests -----------------------------------------------------------------------

def peer_certificate(assoc: "Association") -> dict | None:
    """The verified client certificate of a TLS association (`SSLSocket.getpeercert()`), else None."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    getpeercert = getattr(raw, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        return getpeercert() or None
    except (ValueError, OSError):  # no handshake yet, closed
        return None


def gate_requests(assoc: "Association", check: Callable[[object], int | None]) -> None:
    """Before pynetdicom hands a DIMSE request to its service class (and so to our handler),
    ask `check(request)`: a status means "refused", answered here with that status and no
    handler runs. pynetdicom has no public hook for this, and a C-MOVE handler cannot answer a
    failure without first opening the sub-association to the destination."""
    from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE, N_ACTION

    original = assoc._serve_request

    def serve_request(msg, context_id: int) -> None:
        status = check(msg) if getattr(msg, "is_valid_request", False) else None
        if status is None:
            return original(msg, context_id)
        rsp = type(msg)()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        if isinstance(msg, N_ACTION):
            rsp.AffectedSOPClassUID = msg.RequestedSOPClassUID
            rsp.AffectedSOPInstanceUID = msg.RequestedSOPInstanceUID
        else:
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        if isinstance(msg, C_STORE):
            rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
        if isinstance(msg, (C_GET, C_MOVE)):
            rsp.NumberOfCompletedSuboperations = 0
            rsp.NumberOfFailedSuboperations = 0
            rsp.NumberOfWarningSuboperations = 0
            rsp.NumberOfRemainingSuboperations = 0
        rsp.Status = int(status)
        assoc.dimse.send_msg(rsp, context_id)

    assoc._serve_request = serve_request  # type: ignore[method-assign]
