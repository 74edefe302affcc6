"""`Audit`: what every entry point calls to record an access or a change (`Archive.audit`).

The request path only builds a small event and puts it on a queue (or, for reads, adds to an
in-memory counter): one writer thread per process appends batches to the trail (archive.audit.
trail) with one fsync per batch. Reads (instances, frames) are aggregated per user, study and
session and flushed every `flush_seconds` and on close, so a viewer panning a slide makes one
record a minute, not one per tile. Stores are aggregated the same way (per association or HTTP
client and study). Nothing is dropped: the queue blocks its caller when it is full (a disk far
slower than the requests), and `close` writes everything still queued or counted.
"""
from __future__ import annotations

import getpass
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..access import Principal
from . import events as ev
from .events import AuditEvent, Participant, ParticipantObject
from .trail import Trail

log = logging.getLogger("pathpacs.audit")

MAX_QUEUED = 100_000  # events waiting for the writer; past this `record` waits (never drops)
MAX_UIDS = 1000  # instance UIDs kept per aggregated record (counts are exact beyond it)
BATCH = 1000

# What the resolver answers for a study: (patient ID, patient name) or None.
Resolver = Callable[[str], "tuple[str, str] | None"]
# What it answers for instances: SOP Instance UID -> SOP Class UID.
ClassResolver = Callable[[Iterable[str]], "dict[str, str]"]


@dataclass
class _Bucket:
    kind: str  # "stored" | "retrieved"
    who: Principal
    study: str
    patient: str | None
    address: str
    aet: str
    session: str
    outcome: str
    first: str = field(default_factory=ev.now_iso)
    last: str = ""
    n_instances: int = 0
    n_frames: int = 0
    sops: dict[str, str] = field(default_factory=dict)  # sop -> class ("" unknown), bounded
    n_sops: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=dict)


def _principal_participant(who: Principal | str, address: str, aet: str, roles: list[ev.Code],
                           requestor: bool = True) -> Participant:
    if isinstance(who, str):
        return Participant(who, who, requestor, address, aet, roles)
    return Participant(who.id, who.name, requestor, address or who.address, aet, roles, sorted(who.roles))


class Audit:
    """The audit API of the archive. Cheap to call from any thread; never raises into a caller."""

    enabled = True

    def __init__(self, trail: Trail, *, source_id: str = "PATHPACS", site_id: str = "", flush_seconds: float = 60.0,
                 resolve: Resolver | None = None, resolve_classes: ClassResolver | None = None) -> None:
        self.trail = trail
        self.source_id = source_id
        self.site_id = site_id
        self.flush_seconds = flush_seconds
        self.resolve = resolve
        self.resolve_classes = resolve_classes
        self.host = socket.gethostname()
        self._queue: "queue.Queue[AuditEvent | None | threading.Event]" = queue.Queue(MAX_QUEUED)
        self._buckets: dict[tuple, _Bucket] = {}
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._flusher: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self.forwarder = None  # archive.audit.syslog.Forwarder, started by `serve`
        self.written = 0
        self.failures = 0

    # -- the archive as a participant --------------------------------------------------------------
    def _archive(self, roles: list[ev.Code]) -> Participant:
        return Participant(f"{self.source_id}@{self.host}", self.source_id, False, self.host, self.source_id, roles,
                           [])

    def _event(self, kind: str, event_id: ev.Code, action: str, outcome: int = ev.SUCCESS, **kw: Any) -> AuditEvent:
        return AuditEvent(kind, event_id, action, outcome, source_id=self.source_id, site_id=self.site_id, **kw)

    def _study_objects(self, study: str | None, patient: str | None, sop_classes: dict[str, int] | None = None,
                       instances: list[str] | None = None, detail: dict[str, str] | None = None,
                       lifecycle: str = "") -> list[ParticipantObject]:
        out = []
        if study:
            out.append(ParticipantObject(study, ev.SYSTEM_OBJECT, ev.ROLE_REPORT, ev.ID_STUDY,
                                         sop_classes=dict(sop_classes or {}), instances=list(instances or []),
                                         detail=dict(detail or {}), lifecycle=lifecycle))
        if patient:
            out.append(ParticipantObject(patient, ev.PERSON, ev.ROLE_PATIENT, ev.ID_PATIENT))
        return out

    # -- events ----------------------------------------------------------------------------------
    def stored(self, who: Principal, study: str | None, patient: str | None, sop_class: str, sop: str,
               address: str = "", aet: str = "", outcome: str = "success", *, session: str = "",
               reason: str = "") -> None:
        """An instance received (C-STORE, STOW-RS, import): aggregated per sender, study and session."""
        with self._lock:
            b, new = self._bucket("stored", who, study or "", patient, address, aet, session, outcome)
            b.n_instances += 1
            self._add_sop(b, sop, sop_class)
            if reason:
                b.reasons[reason[:200]] = b.reasons.get(reason[:200], 0) + 1
        if new:
            self._ensure_started()

    def retrieved(self, who: Principal, study: str, patient: str | None = None, n_instances: int = 0,
                  n_frames: int = 0, address: str = "", aet: str = "", session: str = "", *,
                  sop: str | None = None, sop_class: str = "", destination: str = "") -> None:
        """Instances or frames sent to a reader (WADO, rendered, C-GET, C-MOVE): aggregated per
        user, study and session; one record per flush window. Cheap: the frame path calls it."""
        with self._lock:
            b, new = self._bucket("retrieved", who, study, patient, address, aet, session, "success")
            b.n_instances += n_instances
            b.n_frames += n_frames
            if sop is not None:
                self._add_sop(b, sop, sop_class)
            if destination:
                b.detail["destination"] = destination
        if new:
            self._ensure_started()

    def _bucket(self, kind: str, who: Principal, study: str, patient: str | None, address: str, aet: str,
                session: str, outcome: str) -> tuple[_Bucket, bool]:
        """The counters of (kind, user, study, session, address, outcome); called under the lock."""
        key = (kind, who.id, study, session, address, outcome)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(kind, who, study, patient, address, aet, session, outcome)
            return b, True
        if patient and not b.patient:
            b.patient = patient
        return b, False

    @staticmethod
    def _add_sop(b: _Bucket, sop: str, sop_class: str) -> None:
        if sop in b.sops:
            if sop_class and not b.sops[sop]:
                b.sops[sop] = sop_class
            return
        b.n_sops += 1
        if len(b.sops) < MAX_UIDS:
            b.sops[sop] = sop_class

    def queried(self, who: Principal, level: str, keys_text: str, address: str = "", aet: str = "",
                n_results: int = 0, *, study: str | None = None, patient: str | None = None,
                model: str = "1.2.840.10008.5.1.4.1.2.2.1", outcome: str = "success", reason: str = "",
                via: str = "") -> None:
        """A C-FIND or QIDO-RS search (the query text in ParticipantObjectQuery)."""
        query = ParticipantObject(model, ev.SYSTEM_OBJECT, ev.ROLE_REPORT, ev.ID_SOP_CLASS, query=keys_text[:4096],
                                  detail={"QueryRetrieveLevel": level, "results": str(n_results)})
        objs = [query] + self._study_objects(study, patient)
        self.record(self._event("queried", ev.QUERY, "E", ev.OUTCOMES.get(outcome, 4), outcome_text=reason,
                                participants=[_principal_participant(who, address, aet, [ev.ROLE_SOURCE]),
                                              self._archive([ev.ROLE_DESTINATION])],
                                objects=objs, detail={"level": level, "results": n_results, "via": via}))

    def moved(self, study: str, sops: list[str], from_tier: str, to_tier: str, *, who: Principal | None = None,
              patient: str | None = None) -> None:
        """Instances moved between storage tiers (DICOM Instances Accessed, Update)."""
        parts = [self._archive([ev.ROLE_APPLICATION])]
        if who is not None:
            parts.insert(0, _principal_participant(who, "", "", [ev.ROLE_LAUNCHER]))
        self.record(self._event("moved", ev.INSTANCES_ACCESSED, "U", participants=parts,
                                objects=self._study_objects(study, patient, {}, sops[:MAX_UIDS],
                                                            {"from_tier": from_tier, "to_tier": to_tier}),
                                detail={"instances": len(sops), "from_tier": from_tier, "to_tier": to_tier}))

    def deleted(self, kind: str, who: Principal, study: str, patient: str | None, sops: list[str],
                reason: str = "", outcome: str = "success") -> None:
        """kind: "rejected" (IOCM reject), "restored" (undo a reject), "purged" (every copy removed)."""
        if kind not in ("rejected", "restored", "purged"):
            raise ValueError(f"unknown deletion kind {kind!r}")
        event_id, action = (ev.STUDY_DELETED, "D") if kind == "purged" else (ev.INSTANCES_ACCESSED,
                                                                               "D" if kind == "rejected" else "U")
        self.record(self._event(kind, event_id, action, ev.OUTCOMES.get(outcome, 4),
                                outcome_text=reason if outcome != "success" else "",
                                participants=[_principal_participant(who, "", "", [ev.ROLE_LAUNCHER]),
                                              self._archive([ev.ROLE_APPLICATION])],
                                objects=self._study_objects(study, patient, {}, sops[:MAX_UIDS],
                                                            {"reason": reason} if reason else {},
                                                            "14" if kind == "purged" else ""),
                                detail={"instances": len(sops), "reason": reason}))

    def exported(self, who: Principal, study: str, patient: str | None, sops: list[str], destination: str,
                 outcome: str = "success", reason: str = "") -> None:
        """Instances sent out of the archive's control (a consultation send, a de-identified export)."""
        self.record(self._event("exported", ev.EXPORT, "R", ev.OUTCOMES.get(outcome, 4), outcome_text=reason,
                                participants=[_principal_participant(who, "", "", [ev.ROLE_LAUNCHER]),
                                              self._archive([ev.ROLE_SOURCE]),
                                              Participant(destination, destination, False, "", "", [ev.ROLE_DESTINATION])],
                                objects=self._study_objects(study, patient, {}, sops[:MAX_UIDS]),
                                detail={"instances": len(sops), "destination": destination}))

    def association_rejected(self, calling_aet: str, address: str, reason: str, called_aet: str = "") -> None:
        """A DIMSE association refused (unknown AE, wrong called AE, limits): a Security Alert."""
        self.record(self._event("association rejected", ev.SECURITY_ALERT, "E", ev.MINOR_FAILURE, outcome_text=reason,
                                types=[ev.NODE_AUTHENTICATION],
                                participants=[Participant(calling_aet or "-", calling_aet, True, address, calling_aet,
                                                          [ev.ROLE_SOURCE]), self._archive([ev.ROLE_DESTINATION])],
                                objects=[ParticipantObject(f"{calling_aet}@{address}", ev.SYSTEM_OBJECT,
                                                           ev.ROLE_SECURITY_RESOURCE, ev.ID_NODE,
                                                           detail={"called_aet": called_aet} if called_aet else {})],
                                detail={"reason": reason, "calling_aet": calling_aet, "called_aet": called_aet}))

    def login(self, who_or_name: Principal | str, address: str, success: bool, method: str, reason: str = "") -> None:
        """A user authentication (token, OIDC, pages login), successful or not."""
        self.record(self._event("login", ev.USER_AUTHENTICATION, "E", ev.SUCCESS if success else ev.MINOR_FAILURE,
                                outcome_text=reason, types=[ev.LOGIN],
                                participants=[_principal_participant(who_or_name, address, "", []),
                                              self._archive([ev.ROLE_APPLICATION])],
                                detail={"method": method, "success": success}))

    SECURITY_TYPES = {"token created": ev.USER_SECURITY_ATTRIBUTES_CHANGED,
                      "token revoked": ev.USER_SECURITY_ATTRIBUTES_CHANGED,
                      "roles changed": ev.SECURITY_ROLES_CHANGED, "configuration": ev.SECURITY_CONFIGURATION,
                      "restricted function": ev.USE_OF_RESTRICTED_FUNCTION,
                      "forbidden": ev.USE_OF_RESTRICTED_FUNCTION}

    def security(self, kind: str, who: Principal | str, detail: dict[str, Any] | None = None, *,
                 address: str = "", subject: str = "", outcome: str = "success") -> None:
        """A Security Alert: "token created", "token revoked", "roles changed", "configuration",
        "forbidden" (a refused use of a right). `subject`: the token or user concerned."""
        detail = dict(detail or {})
        objs = []
        if subject:
            objs.append(ParticipantObject(subject, ev.SYSTEM_OBJECT, ev.ROLE_SECURITY_RESOURCE, ev.ID_USER,
                                          detail={k: str(v) for k, v in detail.items()}))
        self.record(self._event(kind, ev.SECURITY_ALERT, "E", ev.OUTCOMES.get(outcome, 4),
                                types=[self.SECURITY_TYPES.get(kind, ev.SECURITY_CONFIGURATION)],
                                participants=[_principal_participant(who, address, "", []),
                                              self._archive([ev.ROLE_APPLICATION])],
                                objects=objs, detail={"what": kind, **detail}))

    def application(self, kind: str, detail: dict[str, Any] | None = None) -> None:
        """The archive started (with its configuration) or stopped."""
        if kind not in ("start", "stop"):
            raise ValueError(f"unknown application event {kind!r}")
        launcher = Participant(_os_user(), _os_user(), True, self.host, "", [ev.ROLE_LAUNCHER])
        self.record(self._event(f"application {kind}", ev.APPLICATION_ACTIVITY, "E",
                                types=[ev.APPLICATION_START if kind == "start" else ev.APPLICATION_STOP],
                                participants=[self._archive([ev.ROLE_APPLICATION]), launcher],
                                detail=dict(detail or {})))

    def audit_log_used(self, what: str, who: Principal | str | None = None) -> None:
        """The trail itself was read (pathpacs audit, audit verify): recorded like any access."""
        self.record(self.audit_log_event(what, who))

    def audit_log_event(self, what: str, who: Principal | str | None = None) -> AuditEvent:
        user = who if who is not None else _os_user()
        return self._event("audit log used", ev.AUDIT_LOG_USED, "R",
                           participants=[_principal_participant(user, "", "", [])],
                           objects=[ParticipantObject(str(self.trail.dir), ev.SYSTEM_OBJECT,
                                                      ev.ROLE_SECURITY_RESOURCE, ev.ID_URI,
                                                      name="audit trail", query=what)],
                           detail={"what": what})

    # -- queue, writer, flusher ------------------------------------------------------------------
    def record(self, event: AuditEvent) -> None:
        """Queue one event for the writer (blocks only when MAX_QUEUED are waiting)."""
        if self._closed:
            self._write([event])  # after close (a late handler): written at once
            return
        self._ensure_started()
        self._queue.put(event)

    def _ensure_started(self) -> None:
        if self._writer is not None or self._closed:
            return
        with self._start_lock:
            if self._writer is not None:
                return
            self._flusher = threading.Thread(target=self._flush_loop, name="audit-flush", daemon=True)
            writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
            writer.start()
            self._flusher.start()
            self._writer = writer

    def _write_loop(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            batch: list[AuditEvent] = []
            waiters: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                else:
                    batch.append(item)
                if len(batch) >= BATCH:
                    break
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for w in waiters:
                w.set()
            if stop:
                return

    def _write(self, batch: list[AuditEvent]) -> None:
        for e in batch:
            self._complete(e)
        items = [(e.time, e.to_dict()) for e in batch]
        delay = 0.1
        while True:
            try:
                self.trail.append(items)
                self.written += len(items)
                if self.forwarder is not None:
                    self.forwarder.wake()
                return
            except OSError as exc:
                # a full or failing disk: keep the records and try again (never drop one)
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.error("cannot write the audit trail in %s (%s); retrying", self.trail.dir, exc)
                time.sleep(delay)
                delay = min(5.0, delay * 2)

    def _complete(self, e: AuditEvent) -> None:
        """Off the request path: the patient of a study the caller did not know."""
        if self.resolve is None:
            return
        have = set(e.patients)
        for study in e.studies:
            if have:
                break
            try:
                got = self.resolve(study)
            except Exception:
                got = None
            if got and got[0]:
                e.objects.append(ParticipantObject(got[0], ev.PERSON, ev.ROLE_PATIENT, ev.ID_PATIENT, name=got[1]))
                have.add(got[0])

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush_buckets()

    def flush_buckets(self, session: str | None = None) -> None:
        """Turn aggregated reads and stores into records (all, or one session's)."""
        with self._lock:
            if session is None:
                taken, self._buckets = list(self._buckets.values()), {}
            else:
                keys = [k for k in self._buckets if k[3] == session]
                taken = [self._buckets.pop(k) for k in keys]
        for b in taken:
            self._queue_put(self._bucket_event(b))

    def _queue_put(self, e: AuditEvent) -> None:
        if self._closed or self._writer is None:
            self._write([e])
        else:
            self._queue.put(e)

    def _bucket_event(self, b: _Bucket) -> AuditEvent:
        unknown = [s for s, c in b.sops.items() if not c]
        if unknown and self.resolve_classes is not None:
            try:
                b.sops.update({s: c for s, c in self.resolve_classes(unknown).items() if c})
            except Exception:
                pass
        classes: dict[str, int] = {}
        for c in b.sops.values():
            if c:  # SOPClass elements name real UIDs only; the counts are in the detail too
                classes[c] = classes.get(c, 0) + 1
        detail: dict[str, Any] = {"instances": b.n_instances, "frames": b.n_frames, "distinct_instances": b.n_sops,
                                  "first": b.first, "last": ev.now_iso(), "session": b.session, **b.detail}
        if b.reasons:
            detail["reasons"] = b.reasons
        outcome = ev.OUTCOMES.get(b.outcome, ev.MINOR_FAILURE)
        text = "; ".join(b.reasons) if b.reasons else ("" if outcome == ev.SUCCESS else b.outcome)
        if b.kind == "stored":
            parts = [_principal_participant(b.who, b.address, b.aet, [ev.ROLE_SOURCE]),
                     self._archive([ev.ROLE_DESTINATION])]
            action = "C"
        else:
            parts = [self._archive([ev.ROLE_SOURCE]),
                     _principal_participant(b.who, b.address, b.aet, [ev.ROLE_DESTINATION])]
            action = "R"
            if b.detail.get("destination"):
                parts.append(Participant(b.detail["destination"], b.detail["destination"], False, "",
                                         b.detail["destination"], [ev.ROLE_DESTINATION]))
        return self._event(b.kind, ev.INSTANCES_TRANSFERRED, action, outcome, outcome_text=text[:1000],
                           time=b.first, participants=parts,
                           objects=self._study_objects(b.study, b.patient, classes, list(b.sops)),
                           detail=detail)

    def end_session(self, session: str) -> None:
        """A session ended (a DIMSE association released or aborted): its counts become records."""
        if self._buckets:
            self.flush_buckets(session)

    def flush(self, timeout: float = 30.0) -> None:
        """Everything recorded so far is on disk when this returns (aggregates included)."""
        self.flush_buckets()
        if self._writer is None or self._closed:
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        self.flush_buckets()
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(60)
        self._closed = True
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None

    def status(self) -> dict[str, Any]:
        """Counters for `pathpacs stats` and `pathpacs audit status`."""
        from .syslog import read_status

        seq, _ = self.trail.head()
        out: dict[str, Any] = {"records": seq, "bytes": self.trail.size(), "path": str(self.trail.dir)}
        fwd = read_status(self.trail.dir)
        if fwd:
            out["forwarding"] = fwd
        return out


class NullAudit(Audit):
    """`[audit] enabled = false`: the same API, recording nothing."""

    enabled = False

    def __init__(self) -> None:  # no trail, no threads
        self.forwarder = None
        self.source_id, self.site_id, self.host = "", "", ""
        self._closed = True

    def record(self, event: AuditEvent) -> None:
        pass

    def stored(self, *a: Any, **k: Any) -> None:
        pass

    def retrieved(self, *a: Any, **k: Any) -> None:
        pass

    def flush_buckets(self, session: str | None = None) -> None:
        pass

    def end_session(self, session: str) -> None:
        pass

    def flush(self, timeout: float = 30.0) -> None:
        pass

    def close(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"enabled": False}


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid {os.getuid()}"
