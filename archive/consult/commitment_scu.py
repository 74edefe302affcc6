"""Storage Commitment as SCU (PS3.4 J): waiting for the partner's N-EVENT-REPORT.

We send the N-ACTION (`DimseRoute.confirm`); the partner reports the verdict either on the
same association (if we keep it open) or on a new association it opens to our AE title, at
our DIMSE port. Orthanc always does the latter: it connects to the modality its
configuration lists for our AE title. So the report can arrive in three places:

- on the route's own association: the route binds `on_report` to it;
- at the archive's running DIMSE server (`serve`, maybe another process): the server binds
  `handle_n_event_report`, which records the report in the index's "commitments" table;
- at a short-lived listener the route starts on our DIMSE port when no server holds it
  (`pathpacs consult send --wait` with no `serve` running).

`Pending` is the in-process registry of transactions we wait for; reports for a transaction
we did not start, or from another AE than the one we asked, are refused (0x0110).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt

if TYPE_CHECKING:
    from archive.service import Archive

log = logging.getLogger("pathpacs.consult.commitment")
# archive.dimse.contexts.STORAGE_COMMITMENT; not imported: archive.dimse.server imports this module
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
TABLE = "commitments"
PROCESSING_FAILURE = 0x0110
SUCCESS = 0x0000

# PS3.3 C.14.1.1 Failure Reason (0008,1197), for the job's error text
FAILURE_REASONS = {
    0x0110: "processing failure", 0x0112: "no such object instance", 0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported", 0x0119: "class/instance conflict",
    0x0131: "duplicate transaction UID",
}


@dataclass
class Report:
    """The partner's verdict on one transaction: committed UIDs, failed UID -> reason."""

    committed: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        return {"committed": sorted(self.committed), "failed": self.failed}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "Report":
        return cls(set(rec.get("committed", [])), dict(rec.get("failed", {})))


def parse(info) -> Report:
    """An N-EVENT-REPORT's Event Information (event type 1: all committed; 2: some failed)."""
    report = Report()
    for item in info.get("ReferencedSOPSequence", []) or []:
        report.committed.add(str(item.get("ReferencedSOPInstanceUID", "")))
    for item in info.get("FailedSOPSequence", []) or []:
        code = int(item.get("FailureReason", PROCESSING_FAILURE) or PROCESSING_FAILURE)
        report.failed[str(item.get("ReferencedSOPInstanceUID", ""))] = \
            f"commitment refused: {FAILURE_REASONS.get(code, 'failure')} (0x{code:04X})"
    report.committed.discard("")
    report.failed.pop("", None)
    return report


class Pending:
    """Transactions this process waits for: TransactionUID -> (partner AE title, Event, Report)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[str, threading.Event, list[Report]]] = {}

    def add(self, transaction: str, partner_aet: str) -> None:
        with self._lock:
            self._waiting[transaction] = (partner_aet, threading.Event(), [])

    def deliver(self, transaction: str, calling_aet: str | None, report: Report) -> bool:
        """Hand a report to its waiter; False when nobody here waits for it (or from that AE)."""
        with self._lock:
            entry = self._waiting.get(transaction)
        if entry is None or (calling_aet is not None and calling_aet != entry[0]):
            return False
        entry[2].append(report)
        entry[1].set()
        return True

    def wait(self, transaction: str, timeout: float) -> Report | None:
        with self._lock:
            entry = self._waiting.get(transaction)
        if entry is None or not entry[1].wait(timeout):
            return None
        return entry[2][0]

    def discard(self, transaction: str) -> None:
        with self._lock:
            self._waiting.pop(transaction, None)


PENDING = Pending()


def _calling_aet(event) -> str:
    return str(getattr(event.assoc.requestor, "ae_title", "") or "").strip()


def on_report(event):
    """EVT_N_EVENT_REPORT on the route's own association (the partner is the acceptor there)."""
    if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT:
        return PROCESSING_FAILURE, None
    info = event.event_information
    ok = PENDING.deliver(str(info.get("TransactionUID", "")), None, parse(info))
    return (SUCCESS if ok else PROCESSING_FAILURE), None


def handle_n_event_report(event, arc: "Archive | None" = None):
    """EVT_N_EVENT_REPORT at the archive's DIMSE server (a partner reporting on a new
    association): delivered to a waiter in this process, else recorded in the index for the
    process that sent the N-ACTION (it registered the transaction there, with the partner's AE)."""
    req = event.request
    if str(req.AffectedSOPClassUID) != STORAGE_COMMITMENT:
        return PROCESSING_FAILURE, None
    info = event.event_information
    transaction = str(info.get("TransactionUID", ""))
    calling = _calling_aet(event)
    report = parse(info)
    if PENDING.deliver(transaction, calling, report):
        log.info("commitment %s reported by %s on a new association", transaction, calling)
        return SUCCESS, None
    if arc is None or not transaction:
        return PROCESSING_FAILURE, None
    accepted = []

    def record(old: dict | None) -> dict | None:
        if old is None or old.get("partner_aet") != calling or old.get("state") != "waiting":
            return old
        accepted.append(True)
        return {**old, "state": "reported", "reported_at": time.time(), **report.as_record()}

    arc.index.update_record(TABLE, transaction, record)
    if not accepted:
        log.warning("N-EVENT-REPORT for unknown commitment %r from %r refused", transaction, calling)
        return PROCESSING_FAILURE, None
    log.info("commitment %s reported by %s (recorded for the sending process)", transaction, calling)
    return SUCCESS, None


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on our DIMSE port (then no server can take the report)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Listener:
    """A short-lived commitment-report acceptor on our AE title and DIMSE port, for a sending
    process with no DIMSE server (it accepts only N-EVENT-REPORTs of pending transactions)."""

    def __init__(self, aet: str, host: str, port: int) -> None:
        ae = AE(ae_title=aet)
        ae.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        ae.add_supported_context("1.2.840.10008.1.1")
        self._server = ae.start_server((host, port), block=False, evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, lambda event: _listener_report(event)),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
        ])

    def close(self) -> None:
        self._server.shutdown()


def _listener_report(event):
    info = event.event_information
    ok = PENDING.deliver(str(info.get("TransactionUID", "")), _calling_aet(event), parse(info))
    return (SUCCESS if ok else PROCESSING_FAILURE), None
