"""Every DIMSE connection from accept to close: admission, timeouts, bounds, and one log line.

- Admission (`verify_request`, socketserver's hook on the pynetdicom server): at most
  `max_pending` connections may be negotiating (accepted, association not yet established);
  the excess is closed at once (counted in one warning line every few seconds, not one per
  connection). An accepted socket gets `acse_timeout` as its timeout.
- Deadline: a connection whose association is not established `acse_timeout` after accept is
  shut down by the watchdog thread, whatever it is doing (silent, dribbling a PDU byte by byte).
  Until its A-ASSOCIATE-RQ has arrived it holds none of the `max_associations` slots
  (`awaiting_request`, used by server.ArchiveAE).
- Established: the socket timeout becomes `network_timeout`, so a peer that stops in the middle
  of a PDU cannot hold a thread forever, and one that dribbles a PDU is shut down once that PDU
  has taken longer than `network_timeout`; pynetdicom's idle timer (same value) covers silence
  between PDUs.
- Bounds (compat.bound_pdu_reads / bound_messages): a PDU longer than `max_pdu` (+ header
  tolerance) for P-DATA, or than a few hundred KiB for association PDUs, is never read: the
  connection gets an A-ABORT and is closed. So is one whose DIMSE command, in-memory data set
  (C-FIND identifier, N-ACTION information) or queue of unanswered requests grows past the
  limits below. Our outgoing PDUs are capped too, for peers that announce 0 (unlimited).
- End: when the association is released, aborted, refused or timed out (or the connection just
  closes) its unfinished C-STORE spool files are deleted (receive.discard_unfinished) and one
  line is logged on "pathpacs.dimse":
  `association CALLING -> CALLED from HOST:PORT: released after 2.3 s; C-STORE 12 (11 ok, 1 failed) C-FIND 3`
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE, MaximumLengthNotification

from . import compat, receive

if TYPE_CHECKING:
    from archive.config import Config

log = logging.getLogger("pathpacs.dimse")

ASSOCIATE_RQ_LIMIT = 256 << 10   # A-ASSOCIATE-RQ: 128 contexts x many syntaxes, user identity
CONTROL_PDU_LIMIT = 64 << 10     # other association PDUs (all tiny), and P-DATA before/after an association
P_DATA_OVERHEAD = 64             # tolerance over max_pdu, for peers that count header bytes in
MAX_COMMAND_BYTES = 64 << 10     # a DIMSE command set is a few hundred bytes
MAX_MEMORY_DATASET = 16 << 20    # identifiers, N-ACTION information: C-STORE data sets go to disk
MAX_QUEUED_MESSAGES = 32         # complete requests waiting to be served (no async ops are negotiated)
OUTGOING_PDU_FLOOR = 4 << 20     # our PDUs to a peer announcing 0 / more: max(max_pdu, this)
REFUSAL_LOG_INTERVAL = 5.0

_REJECTIONS = {
    (1, 2): "application context name not supported", (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded (max_associations)",
}
_PENDING = (0xFF00, 0xFF01)


@dataclass(eq=False)
class Connection:
    address: tuple
    sock: socket.socket | None
    opened: float
    deadline: float
    assoc: Any = None
    requested: bool = False      # its A-ASSOCIATE-RQ arrived
    accepted: bool = False       # we sent A-ASSOCIATE-AC
    established: bool = False
    calling: str = "-"
    called: str = "-"
    ops: dict[str, list[int]] = field(default_factory=dict)  # "C-STORE": [requests, ok, failed]
    outcome: str | None = None   # released | aborted | timed out | refused | closed
    detail: str = ""
    violation: bool = False      # the peer broke a limit or the protocol: logged as a warning
    peer_aborted: bool = False
    closed: bool = False
    finalized: bool = False
    shut_at: float | None = None
    reading_since: float | None = None  # its DUL thread is inside a PDU since then

    @property
    def peer(self) -> str:
        host, port = self.address[0], self.address[1] if len(self.address) > 1 else "?"
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def cap_peer_pdu(user, cap: int) -> None:
    """Never send PDUs longer than `cap`, even to a peer announcing 0 (unlimited) or more:
    pynetdicom would otherwise read a whole stored file into one PDU. (Sending PDUs shorter
    than the peer's maximum is always allowed.)"""
    for item in user.user_information:
        if isinstance(item, MaximumLengthNotification):
            if not item.maximum_length_received or item.maximum_length_received > cap:
                item.maximum_length_received = cap


class _Watcher(compat.ReadWatcher):
    """The bounded PDU reader's reports for one connection (called in its DUL thread)."""

    def __init__(self, owner: "Connections", conn: Connection) -> None:
        self.owner, self.conn = owner, conn

    def pdu_limit(self, pdu_type: int, associated: bool) -> int:
        if pdu_type == 0x04 and associated:
            return self.owner.cfg.max_pdu + P_DATA_OVERHEAD
        if pdu_type == 0x07:
            self.conn.peer_aborted = True
        return ASSOCIATE_RQ_LIMIT if pdu_type == 0x01 else CONTROL_PDU_LIMIT

    def oversized(self, pdu_type: int, length: int, limit: int) -> None:
        self.owner.note(self.conn, "aborted", f"{compat.PDU_TYPES[pdu_type]} PDU of {length} bytes "
                        f"announced, over the limit of {limit}: A-ABORT sent, connection closed", violation=True)

    def stalled(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):
            timeout = self.owner.cfg.network_timeout if self.conn.established else self.owner.cfg.acse_timeout
            self.owner.note(self.conn, "timed out", f"no data for {timeout:g} s in the middle of a PDU",
                            violation=True)
        else:
            self.owner.note(self.conn, "aborted" if self.conn.accepted else "closed",
                            f"connection lost ({type(exc).__name__}: {exc})"[:160])

    def peer_closed(self, got: int, wanted: int) -> None:
        where = f" in the middle of a PDU ({got} of {wanted} bytes)" if got else ""
        self.owner.note(self.conn, "aborted" if self.conn.accepted else "closed",
                        f"connection closed by the peer{where}")

    def invalid(self, what: str) -> None:
        self.owner.note(self.conn, "aborted", f"invalid PDU from the peer: {what}", violation=True)

    def reading(self, busy: bool) -> None:
        self.conn.reading_since = time.monotonic() if busy else None


class Connections:
    """The registry of live connections of one DIMSE server; see the module docstring."""

    def __init__(self, cfg: "Config") -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._all: set[Connection] = set()
        self._by_addr: dict[tuple, Connection] = {}
        self._by_assoc: dict[Any, Connection] = {}
        self._refused = 0
        self._refused_logged = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- wiring ---------------------------------------------------------------------------

    @property
    def handlers(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
            (evt.EVT_DIMSE_SENT, self._on_dimse_sent),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="dimse-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def close_all(self, wait: float = 3.0) -> None:
        """The server is stopping: abort every association and close every connection, so no
        peer (an idle one, a silent one) keeps the process alive after SIGTERM."""
        with self._lock:
            conns = [c for c in self._all if not c.finalized]
        for conn in conns:
            with self._lock:
                if conn.outcome is None:
                    conn.outcome = "aborted" if conn.accepted else "closed"
                    conn.detail = "the archive is stopping"
            if conn.established and conn.assoc is not None and conn.assoc.is_established:
                try:
                    conn.assoc.abort(block=False)  # A-ABORT queued; the DUL thread sends it
                except Exception:
                    pass
        deadline = time.monotonic() + wait
        time.sleep(0.1)
        for conn in conns:
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for conn in conns:
            if conn.assoc is not None and conn.assoc.ident is not None:
                compat.dul_thread(conn.assoc).join(max(0.0, deadline - time.monotonic()))
            self._maybe_finish(conn, force=True)

    # -- admission ------------------------------------------------------------------------

    def verify_request(self, request: socket.socket, client_address) -> bool:
        """socketserver's hook, before a thread is started for the connection."""
        now = time.monotonic()
        address = tuple(client_address)
        with self._lock:
            if self._pending() >= self.cfg.max_pending:
                self._refused += 1
                refused = True
            else:
                conn = Connection(address, request, now, now + self.cfg.acse_timeout)
                self._all.add(conn)
                self._by_addr[address] = conn
                refused = False
        if refused:
            self._log_refusals(now, address)
            return False
        try:
            request.settimeout(self.cfg.acse_timeout)
        except OSError:
            pass
        return True

    def _pending(self) -> int:
        return sum(1 for c in self._all if not c.established and not c.finalized)

    def awaiting_request(self) -> int:
        """Association threads alive whose A-ASSOCIATE-RQ has not arrived (they hold no slot)."""
        with self._lock:
            waiting = [c.assoc for c in self._all if c.assoc is not None and not c.requested]
        return sum(1 for a in waiting if a.is_alive())

    def _log_refusals(self, now: float, address: tuple | None = None) -> None:
        with self._lock:
            if not self._refused or now - self._refused_logged < REFUSAL_LOG_INTERVAL:
                return
            count, self._refused = self._refused, 0
            self._refused_logged = now
        latest = f" (latest from {address[0]})" if address else ""
        log.warning("closed %d new connection(s) at once%s: %d connections are still negotiating "
                    "(max_pending)", count, latest, self.cfg.max_pending)

    # -- events -----------------------------------------------------------------------------

    def _conn(self, assoc) -> Connection | None:
        with self._lock:
            return self._by_assoc.get(assoc)

    def _on_conn_open(self, event) -> None:
        assoc = event.assoc
        address = tuple(event.address)
        now = time.monotonic()
        with self._lock:
            conn = self._by_addr.pop(address, None)
            if conn is None:  # not admitted through verify_request (should not happen)
                conn = Connection(address, None, now, now + self.cfg.acse_timeout)
                self._all.add(conn)
            conn.assoc = assoc
            self._by_assoc[assoc] = conn
        compat.bound_pdu_reads(assoc, _Watcher(self, conn))
        compat.bound_messages(assoc, self._message_check,
                              lambda reason: self.note(conn, "aborted", reason, violation=True))

    def _message_check(self, command: int, data: int, queued: int) -> str | None:
        if command > MAX_COMMAND_BYTES:
            return f"DIMSE command set over {MAX_COMMAND_BYTES} bytes: A-ABORT sent, connection closed"
        if data > MAX_MEMORY_DATASET:
            return f"DIMSE data set over {MAX_MEMORY_DATASET} bytes: A-ABORT sent, connection closed"
        if queued > MAX_QUEUED_MESSAGES:
            return f"over {MAX_QUEUED_MESSAGES} requests sent without waiting for responses: A-ABORT sent"
        return None

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        conn = self._conn(assoc)
        primitive = assoc.requestor.primitive  # the A-ASSOCIATE-RQ
        calling = str(getattr(primitive, "calling_ae_title", "") or "").strip() or "-"
        called = str(getattr(primitive, "called_ae_title", "") or "").strip() or "-"
        if conn is not None:
            with self._lock:
                conn.requested = True
                conn.calling, conn.called = calling, called
        cap_peer_pdu(assoc.requestor, max(self.cfg.max_pdu, OUTGOING_PDU_FLOOR))

    def _on_acse_sent(self, event) -> None:
        conn = self._conn(event.assoc)
        if conn is None:
            return
        p = event.primitive
        with self._lock:
            if isinstance(p, A_ASSOCIATE) and p.result is not None:
                if p.result == 0:
                    conn.accepted = True
                else:
                    why = _REJECTIONS.get((p.result_source, p.diagnostic), f"result {p.result}, source "
                                          f"{p.result_source}, reason {p.diagnostic}")
                    conn.outcome, conn.detail = "refused", why
            elif isinstance(p, A_RELEASE) and p.result is not None:
                conn.outcome = conn.outcome or "released"
            elif isinstance(p, (A_ABORT, A_P_ABORT)) and conn.outcome is None:
                if compat.idle_timed_out(event.assoc):  # pynetdicom aborts when its idle timer expires
                    conn.outcome = "timed out"
                    conn.detail = f"no complete PDU within network_timeout ({self.cfg.network_timeout:g} s)"
                else:
                    conn.outcome, conn.detail = "aborted", "by the archive"

    def _on_established(self, event) -> None:
        conn = self._conn(event.assoc)
        if conn is None:
            return
        with self._lock:
            conn.established = True
        if conn.sock is not None:
            try:
                conn.sock.settimeout(self.cfg.network_timeout)
            except OSError:
                pass

    def _on_dimse_recv(self, event) -> None:
        name = type(event.message).__name__
        if not name.endswith("_RQ"):
            return
        conn = self._conn(event.assoc)
        if conn is not None:
            with self._lock:
                conn.ops.setdefault(name[:-3].replace("_", "-"), [0, 0, 0])[0] += 1

    def _on_dimse_sent(self, event) -> None:
        msg = event.message
        name = type(msg).__name__
        if not name.endswith("_RSP"):
            return
        status = getattr(msg.command_set, "Status", None)
        if status in _PENDING:
            return
        conn = self._conn(event.assoc)
        if conn is not None:
            ok = status is not None and (status in (0x0000, 0x0001, 0x0107, 0x0116, 0xFE00)
                                         or 0xB000 <= status <= 0xBFFF)
            with self._lock:
                counts = conn.ops.setdefault(name[:-4].replace("_", "-"), [0, 0, 0])
                counts[1 if ok else 2] += 1

    def _on_released(self, event) -> None:
        conn = self._conn(event.assoc)
        if conn is not None:
            self.note(conn, "released", "")

    def _on_aborted(self, event) -> None:
        conn = self._conn(event.assoc)
        if conn is None:
            return
        if compat.idle_timed_out(event.assoc):
            self.note(conn, "timed out", f"no complete PDU within network_timeout ({self.cfg.network_timeout:g} s)")
        elif conn.peer_aborted:
            self.note(conn, "aborted", "by the peer (A-ABORT)")
        else:
            self.note(conn, "aborted", "")

    def _on_rejected(self, event) -> None:
        conn = self._conn(event.assoc)
        if conn is not None:
            self.note(conn, "refused", "")

    def _on_conn_close(self, event) -> None:
        conn = self._conn(event.assoc)
        if conn is not None:
            with self._lock:
                conn.closed = True
            self._maybe_finish(conn)

    def note(self, conn: Connection, outcome: str, detail: str, violation: bool = False) -> None:
        """Record why `conn` ends (the first reason given wins), then finish it if it is over."""
        with self._lock:
            if conn.outcome is None:
                conn.outcome, conn.detail = outcome, detail
            conn.violation = conn.violation or violation
        self._maybe_finish(conn)

    # -- the end of a connection --------------------------------------------------------------

    def _maybe_finish(self, conn: Connection, force: bool = False) -> None:
        with self._lock:
            if conn.finalized:
                return
            if not force and not (conn.closed and (conn.outcome is not None or not conn.accepted)):
                return  # an established association that closed: its released/aborted event follows
            conn.finalized = True
        self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        files = size = 0
        if conn.assoc is not None:
            files, size = receive.discard_unfinished(compat.dul_thread(conn.assoc))
        elapsed = time.monotonic() - conn.opened
        outcome, detail = conn.outcome, conn.detail
        if outcome is None:
            if not conn.requested and elapsed >= self.cfg.acse_timeout * 0.9:
                outcome, detail = "timed out", f"no A-ASSOCIATE-RQ within acse_timeout ({self.cfg.acse_timeout:g} s)"
            else:
                outcome = "closed" if not conn.accepted else "aborted"
        if outcome == "closed" and not detail:
            detail = "connection closed before an association was established"
        ops = []
        for name, (requests, ok, failed) in sorted(conn.ops.items(), key=lambda kv: _OP_ORDER.get(kv[0], 99)):
            text = f"{name} {max(requests, ok + failed)}"
            if name == "C-STORE" or failed:
                text += f" ({ok} ok, {failed} failed)"
            ops.append(text)
        if files:
            ops.append(f"{files} partial C-STORE data set(s) deleted ({size} bytes)")
        line = (f"association {conn.calling} -> {conn.called} from {conn.peer}: {outcome} after "
                f"{elapsed:.1f} s{' (' + detail + ')' if detail else ''}; {' '.join(ops) or 'no operations'}")
        log.log(logging.WARNING if conn.violation or outcome == "timed out" else logging.INFO, "%s", line)

    def _watch(self) -> None:
        tick = max(0.05, min(0.5, self.cfg.acse_timeout / 4))
        while not self._stop.wait(tick):
            try:
                self._sweep(time.monotonic())
            except Exception:  # never let the watchdog die
                log.exception("DIMSE watchdog")

    def _sweep(self, now: float) -> None:
        grace = self.cfg.acse_timeout + 5
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            if not conn.established and not conn.finalized and conn.shut_at is None and now >= conn.deadline:
                # Silent, dribbling or stuck before its association: wake whatever reads it.
                conn.shut_at = now
                stage = "no A-ASSOCIATE-RQ" if not conn.requested else "association not established"
                self.note(conn, "timed out", f"{stage} within acse_timeout ({self.cfg.acse_timeout:g} s)")
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            since = conn.reading_since
            if (conn.established and not conn.finalized and conn.shut_at is None and since is not None
                    and now - since > self.cfg.network_timeout + 1):
                # A peer dribbling one PDU: each recv() gets a byte before network_timeout, but
                # the PDU as a whole may not take longer than that (pynetdicom's idle timer
                # would abort the association, but only once the PDU is complete).
                conn.shut_at = now
                self.note(conn, "timed out", f"one PDU took over network_timeout ({self.cfg.network_timeout:g} s)")
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            assoc = conn.assoc
            if assoc is None:
                over = now > conn.deadline + grace  # never got a thread (its handler failed)
            elif assoc.ident is None:
                over = now > conn.deadline + grace  # thread never started
            else:
                over = not assoc.is_alive() and not compat.dul_thread(assoc).is_alive()
            if over:
                self._maybe_finish(conn, force=True)  # ended without the events (DUL crash path)
                if conn.sock is not None:
                    try:
                        conn.sock.close()
                    except OSError:
                        pass
                with self._lock:
                    self._all.discard(conn)
                    if assoc is not None:
                        self._by_assoc.pop(assoc, None)
                    if self._by_addr.get(conn.address) is conn:
                        del self._by_addr[conn.address]
        self._log_refusals(now)


_OP_ORDER = {n: i for i, n in enumerate(
    ["C-ECHO", "C-STORE", "C-FIND", "C-GET", "C-MOVE", "C-CANCEL", "N-ACTION", "N-EVENT-REPORT"])}
