"""Consultation jobs: a case (or an answer) to send to a partner, persisted in the index so it
survives a restart or a dropped link, claimed with a lease so one process runs it.

A job record lives in the "consult" table under its id; its instances in "consult_items" under
`job \\0 order \\0 sop` (so a prefix scan gives them in sending order), each pending, confirmed,
excluded (left out of a de-identified set) or failed. A confirmed instance is never sent again.
States: queued -> sending -> verifying -> done | failed | cancelled. The runner is `sender.py`.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pydicom.uid import generate_uid

from . import codes
from ..access import SYSTEM, Forbidden, Principal
from ..metadata import header_dataset, int_value, string_values
from ..status import ArchiveError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from ..service import Archive

log = logging.getLogger("pathpacs.consult")

JOBS, ITEMS = "consult", "consult_items"
KINDS = ("request", "answer")
PRIORITY_RANK = {"frozen": 0, "urgent": 1, "routine": 2}
ACTIVE = ("queued", "sending", "verifying")
FINAL = ("done", "failed", "cancelled")
LEASE_SECONDS = 180.0  # at least; see Consultations.lease_seconds
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # the request SR's class
REQUEST_SR = "request SR"  # an item's `what` for the request document


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def item_key(job_id: str, order: int, sop: str) -> str:
    return f"{job_id}\0{order:06d}\0{sop}"


class Conflict(ArchiveError):
    """An operation the job's state does not allow (retry a running job, cancel a done one)."""

    def __init__(self, reason: str) -> None:
        from ..status import ErrorKind

        super().__init__(reason, ErrorKind.CONFLICT)


def deid_module():
    """archive.deid (part DEID); InvalidRequest when this build has no de-identification."""
    try:
        from .. import deid
    except ImportError as exc:
        raise InvalidRequest("de-identification (archive.deid) is not available in this build") from exc
    return deid


def consent_check(archive: "Archive", study: str, purpose: str) -> dict | None:
    """The consent record a send needs (archive.consent, part SHARE); None when not required."""
    try:
        from ..consent import Consents
    except ImportError:
        if archive.config.consultation.require_consent:
            raise InvalidRequest("consultation.require_consent is set but consent records are not "
                                 "available in this build") from None
        return None
    return Consents(archive).require(study, purpose)


def _image_kind(meta: dict) -> str:
    """VOLUME, LABEL, OVERVIEW, THUMBNAIL for WSI; '' for other classes."""
    values = string_values(meta.get("00080008"))
    for v in values[2:3]:
        return v.upper()
    return ""


def _has_pixels(meta: dict) -> bool:
    return any(t in meta for t in ("7FE00010", "7FE00008", "7FE00009"))


def order_instances(entries: list[dict], priority: str) -> list[dict]:
    """Sending order. `frozen`: metadata-only objects, then OVERVIEW/THUMBNAIL/LABEL images, then
    pyramid levels by TotalPixelMatrixColumns ascending (so the consultant can open the slide at
    a low level while level 0 follows, last). Otherwise the natural order: Series Number, then
    Instance Number."""
    if priority != "frozen":
        return sorted(entries, key=lambda e: (e["series_number"], e["instance_number"], e["n"]))

    def rank(e: dict) -> tuple:
        if not e["pixels"]:
            return (0, 0, e["n"])
        if e["image"] in ("OVERVIEW", "THUMBNAIL", "LABEL"):
            return (1, e["columns"], e["n"])
        return (2, e["columns"] or 1 << 30, e["n"])

    return sorted(entries, key=rank)


INHERITED_OWNER = "PATHPACS_CONSULT_OWNER"  # the lease owner an exec'd `consult send --wait` keeps


def _alive(owner: str, node: str | None = None) -> bool:
    """Whether a lease's owner (node:pid:session) may still run: False only for a process of
    this node (`node`, default the host name) that is gone (killed -9, crashed), whose job is
    then taken over at once instead of when its lease runs out. Another node's owner counts as
    alive until its lease expires (nodes of one machine have one host name, not one node name)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != (node or socket.gethostname()) or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Consultations:
    """The jobs of this archive (`Archive.consultations`): enqueue with checks, look up, run."""

    def __init__(self, archive: "Archive") -> None:
        self.archive = archive
        self.index = archive.index
        self.node = archive.config.node()  # cluster.node, else the host name
        me = f"{self.node}:{os.getpid()}:"
        # `consult send --wait` re-executes itself (same pid) holding the job's lease: the new
        # image takes over that owner, so no other process's worker takes the job in between
        inherited = os.environ.pop(INHERITED_OWNER, "")
        self.owner = inherited if inherited.startswith(me) else me + uuid.uuid4().hex[:8]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def cfg(self):
        return self.archive.config

    # -- enqueue -------------------------------------------------------------------------------
    def send(self, study_uid: str, partner: str, *, expert: str | None = None, deidentify: bool = False,
             question: str = "", priority: str = "routine", physician: str = "", who: Principal = SYSTEM,
             kind: str = "request", instances: Iterable[str] | None = None) -> str:
        """Check and enqueue a job; returns its id. ArchiveError (NotFound, InvalidRequest,
        Forbidden) with one line saying what is wrong."""
        if kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}")
        p = self.cfg.partners.get(partner)
        if p is None:
            known = ", ".join(sorted(self.cfg.partners)) or "none configured"
            raise NotFound(f"no partner {partner!r} (partners: {known})")
        if priority not in PRIORITY_RANK:
            raise InvalidRequest(f"priority must be routine, urgent or frozen, not {priority!r}")
        if expert:
            if expert not in {e.id for e in p.experts}:
                known = ", ".join(e.id for e in p.experts) or "none listed"
                raise InvalidRequest(f"partner {partner} has no expert {expert!r} (experts: {known})")
        if len(question) > 10000 or len(physician) > 200:
            raise InvalidRequest("question (10000) or physician (200 characters) too long")
        self.archive.check_visible(who, study_uid)
        if who.deidentified and not deidentify:  # a research view never sends identity out
            raise Forbidden(f"{who.name} sees de-identified views only and may send a case de-identified only")
        recs = self.archive.instances_under(study_uid, who=who)  # NotFound for an unknown study
        if instances is not None:
            wanted = set(instances)
            recs = [r for r in recs if r.sop in wanted]
            missing = wanted - {r.sop for r in recs}
            if missing:
                raise NotFound(f"instance {sorted(missing)[0]} not found in study {study_uid}")
        if kind == "request":
            consent = consent_check(self.archive, study_uid, "consult")
        else:
            consent = None
        deid = deid_module() if deidentify else None
        job_id = secrets.token_hex(6)  # hex: never starts with '-', which a CLI would read as an option
        metas = self.index.metadata([r.sop for r in recs]) if recs else []
        entries = []
        for n, (rec, raw) in enumerate(zip(recs, metas)):
            meta = json.loads(raw) if raw else {}
            entries.append({"sop": rec.sop, "sop_class": rec.sop_class, "series": rec.series, "size": rec.size,
                            "image": _image_kind(meta), "columns": int_value(meta, "00480006", 0),
                            "pixels": _has_pixels(meta) or rec.n_frames > 0, "n": n, "meta": meta,
                            "series_number": int_value(meta, "00200011", 0),
                            "instance_number": int_value(meta, "00200013", 0)})
        excluded: dict[str, str] = {}
        if kind == "request":  # earlier consultations' requests and opinions stay here
            for e in entries:
                if codes.is_consultation_document(e["meta"]):
                    excluded[e["sop"]] = "a document of an earlier consultation"
        if deid is not None:
            d = deid.Deidentifier(deid.DeidOptions.from_config(self.cfg), deid.UidMap(self.index, job_id))
            for e in entries:
                if e["sop"] in excluded:
                    continue
                why = d.excluded(e["meta"])
                if why:
                    excluded[e["sop"]] = why
                    continue
                try:  # refused before anything leaves: never silently left out
                    d.check(header_dataset(e["meta"]))
                except deid.DeidError as exc:
                    raise InvalidRequest(f"instance {e['sop']} cannot be de-identified: {exc}") from None
        ordered = order_instances(entries, priority)
        items: dict[str, dict] = {}
        order = 0
        sr_uid = sr_series = None
        if kind == "request":
            sr_uid, sr_series = generate_uid(), generate_uid()
            items[item_key(job_id, order, sr_uid)] = {"sop": sr_uid, "what": REQUEST_SR, "state": "pending",
                                                       "size": 0, "attempts": 0, "sop_class": COMPREHENSIVE_SR}
        for e in ordered:
            order += 1
            state = "excluded" if e["sop"] in excluded else "pending"
            items[item_key(job_id, order, e["sop"])] = {
                "sop": e["sop"], "what": e["image"] or ("instance" if e["pixels"] else "document"),
                "state": state, "size": e["size"], "attempts": 0, "sop_class": e["sop_class"],
                **({"reason": excluded[e["sop"]]} if state == "excluded" else {})}
        to_send = [i for i in items.values() if i["state"] == "pending"]
        if not [i for i in to_send if i.get("what") != REQUEST_SR]:
            raise InvalidRequest(f"study {study_uid} has nothing to send"
                                 + (" once de-identified (every instance is excluded)" if excluded else ""))
        job = {
            "id": job_id, "kind": kind, "study": study_uid, "partner": partner, "expert": expert or "",
            "priority": priority, "question": question, "physician": physician, "deidentify": bool(deidentify),
            "state": "queued", "created": now_iso(), "started": None, "finished": None,
            "instances_total": len(to_send), "instances_sent": 0,
            "bytes_total": sum(i["size"] for i in to_send), "bytes_sent": 0,
            "excluded": len(excluded), "attempts": 0, "error": None, "last_error": None,
            "who": {"id": who.id, "name": who.name, "via": who.via},
            "request_sr": sr_uid, "request_series": sr_series, "partner_study": None,
            "consent": (consent or {}).get("id") if isinstance(consent, dict) else None,
            "route": None, "verified": None, "lease": None,
        }
        self.index.put_records(ITEMS, items)
        if kind == "request":
            from .sender import request_document

            try:
                job["request_document"] = request_document(self, job)
            except Exception as exc:  # noqa: BLE001 - a case whose headers make no request
                for key in items:
                    self.index.delete_record(ITEMS, key)
                raise InvalidRequest(f"cannot build the request document of study {study_uid}: {exc}") from None
        self.index.put_record(JOBS, job_id, job)
        log.info("consultation job %s queued: %s study %s to %s (%d instances, %s)", job_id, kind, study_uid,
                 partner, len(to_send), priority)
        self._wake.set()
        return job_id

    # -- look up -------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict:
        rec = self.index.record(JOBS, job_id) if job_id else None
        if rec is None:
            raise NotFound(f"no consultation job {job_id!r} (see pathpacs consult list)")
        return rec

    def jobs(self, who: Principal = SYSTEM) -> list[dict]:
        """Every job (of studies `who` may see), newest first."""
        out = [j for _, j in self.index.records(JOBS) if who.sees(j.get("study"))]
        return sorted(out, key=lambda j: j.get("created") or "", reverse=True)

    def items(self, job_id: str) -> list[tuple[str, dict]]:
        return list(self.index.records(ITEMS, job_id + "\0"))

    # -- state changes ---------------------------------------------------------------------------
    def cancel(self, job_id: str) -> dict:
        def change(old: dict | None) -> dict | None:
            if old is None:
                return None
            if old["state"] in FINAL:
                raise Conflict(f"job {job_id} is {old['state']}: nothing to cancel")
            return {**old, "state": "cancelled", "finished": now_iso(), "lease": None}

        self.job(job_id)
        return self.index.update_record(JOBS, job_id, change)  # type: ignore[return-value]

    def retry(self, job_id: str) -> dict:
        """A failed or cancelled job queued again: its confirmed instances stay confirmed."""
        def change(old: dict | None) -> dict | None:
            if old is None:
                return None
            if old["state"] not in ("failed", "cancelled"):
                raise Conflict(f"job {job_id} is {old['state']}: only a failed or cancelled job is retried")
            return {**old, "state": "queued", "error": None, "finished": None, "lease": None, "verified": None}

        self.job(job_id)
        for key, item in self.items(job_id):
            if item["state"] == "failed":
                self.index.put_record(ITEMS, key, {**item, "state": "pending", "attempts": 0})
        job = self.index.update_record(JOBS, job_id, change)
        self._wake.set()
        return job  # type: ignore[return-value]

    def claim(self, job_id: str) -> dict | None:
        """Take the job's lease (one transaction): when it is active and nobody holds a live
        lease on it (expired, or its process on this host is gone). None when another process
        runs it or it is not active."""
        got: list[dict] = []

        def change(old: dict | None) -> dict | None:
            if old is None or old["state"] not in ACTIVE:
                return old
            lease = old.get("lease")
            if lease and lease["owner"] != self.owner and lease["until"] > time.time() and _alive(lease["owner"], self.node):
                return old
            new = {**old, "lease": {"owner": self.owner, "until": time.time() + self.lease_seconds(old)}}
            if old["state"] == "queued":
                new["state"] = "sending"
                new["started"] = old.get("started") or now_iso()
            got.append(new)
            return new

        self.index.update_record(JOBS, job_id, change)
        return got[0] if got else None

    def update(self, job_id: str, **fields: Any) -> dict:
        """Change fields of a job this process holds; raises `Lost` when the lease was lost or
        the job was cancelled meanwhile (the runner then stops)."""
        from .sender import Lost

        lost: list[str] = []

        def change(old: dict | None) -> dict | None:
            if old is None:
                lost.append("deleted")
                return None
            lease = old.get("lease") or {}
            if old["state"] == "cancelled":
                lost.append("cancelled")
                return old
            if lease.get("owner") != self.owner:
                lost.append("taken over by " + str(lease.get("owner")))
                return old
            new = {**old, **fields}
            if new["state"] in FINAL:
                new["lease"] = None
            else:
                new["lease"] = {"owner": self.owner, "until": time.time() + self.lease_seconds(old)}
            return new

        new = self.index.update_record(JOBS, job_id, change)
        if lost:
            raise Lost(f"job {job_id} {lost[0]}")
        return new  # type: ignore[return-value]

    def lease_seconds(self, job: dict) -> float:
        """Longer than the partner's timeout: a slow answer never loses the lease."""
        p = self.cfg.partners.get(job.get("partner", ""))
        return max(LEASE_SECONDS, 2 * (p.timeout if p else 60.0) + 30)

    # -- running ---------------------------------------------------------------------------------
    def pending(self) -> list[dict]:
        """Active jobs in queue order: frozen, urgent, routine; oldest first."""
        active = [j for _, j in self.index.records(JOBS) if j.get("state") in ACTIVE]
        return sorted(active, key=lambda j: (PRIORITY_RANK.get(j.get("priority"), 9), j.get("created") or ""))

    def run_pending(self, progress: Callable[[dict, int], None] | None = None,
                    only: str | None = None) -> int:
        """The worker's step: run every active job this process can claim, in queue order.
        Returns how many jobs ran."""
        from .sender import run_job

        ran = 0
        for job in self.pending():
            if self._stop.is_set():
                break
            if only is not None and job["id"] != only:
                continue
            claimed = self.claim(job["id"])
            if claimed is None:
                continue
            run_job(self, claimed, progress=progress, stop=self._stop)
            ran += 1
        return ran

    def start(self) -> None:
        """The background worker of `serve`: one thread, queued jobs in queue order."""
        if self._thread is not None or not getattr(self.cfg, "background", True):
            return
        from . import documents  # noqa: F401  highdicom loaded now, not when a frozen case waits for it

        self._thread = threading.Thread(target=self._run, name="consult-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except BaseException:  # the worker outlives any job's failure (one that is a bug included)
                log.exception("consultation worker step failed; retried in a few seconds")
            self._wake.wait(2.0)
            self._wake.clear()


