"""The consultant's inbox: received consultation requests, accepted, declined or answered.

A request SR arriving by any route (STOW, C-STORE, import) makes an inbox record ("inbox"
table, keyed by the consultation id the requester gave it): `on_stored` is called by
`Archive.ingest` for every stored SR and never makes an ingest fail. An opinion SR stored in a
case of the inbox (written with `answer`, by the viewer, or by any DICOM client by STOW) is
sent back to the requester through `Consultations.send(kind="answer")`; so is a decline.

States: new -> accepted -> answered, or new|accepted -> declined (with the reason). Accepting
also tells the requester: a notice SR (the opinion document with only the acceptance time).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import shlex
import subprocess
import threading
import urllib.request
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from pydicom import Dataset

from ..access import SYSTEM, Principal
from ..metadata import header_dataset
from ..status import ArchiveError, ErrorKind, NotFound
from .opinion import COMPREHENSIVE_SR, GRAPHIC_TYPES, SR_SOP_CLASSES, Region, opinion_sr, read_opinion

if TYPE_CHECKING:
    from ..ingest import IngestResult
    from ..service import Archive

log = logging.getLogger("pathpacs.consult.inbox")
TABLE = "inbox"
NOTIFY_TIMEOUT = 30.0
WEBHOOK_TIMEOUT = 10.0


class InboxConflict(ArchiveError):
    """The case is not in a state that allows this (declined, already answered)."""

    kind = ErrorKind.CONFLICT


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def partner_of(archive: "Archive", requester: str) -> str | None:
    """The `[partners.NAME]` a request's REQUESTER text names (case-insensitive), or None."""
    wanted = requester.strip().lower()
    for name in archive.config.partners:
        if name.lower() == wanted:
            return name
    return None


# -- the ingest hook -------------------------------------------------------------------------------

def on_stored(archive: "Archive", result: "IngestResult", who: Principal = SYSTEM) -> None:
    """After an SR was stored: a request joins the inbox; an opinion answers a case of the inbox
    (sent back) or one of our own requests (archive.consult.answers). Never raises."""
    if result.sop_class_uid not in SR_SOP_CLASSES or not result.sop_instance_uid:
        return
    try:
        raw = archive.index.metadata([result.sop_instance_uid])
        if not raw:
            return
        doc = json.loads(raw[0])
        from .documents import read_request

        req = read_request(doc)
        if req is not None:
            _received(archive, req)
            return
        op = read_opinion(doc)
        if op is None:
            return
        if archive.index.record(TABLE, op.consultation_id) is not None:
            _answered_here(archive, op, who)
        else:
            from .answers import answer_arrived

            answer_arrived(archive, op)
    except Exception:  # an ingest never fails because of the inbox
        log.exception("consultation hook failed for SR %s", result.sop_instance_uid)


def _received(archive: "Archive", req) -> None:
    partner = partner_of(archive, req.requester)
    created: list[dict] = []

    def add(old: dict | None) -> dict:
        if old is not None:
            return old
        rec = {
            "id": req.consultation_id, "consultation_id": req.consultation_id, "requester": req.requester,
            "partner": partner, "unknown_partner": partner is None, "institution": req.institution,
            "physician": req.physician, "expert": req.expert, "priority": req.priority,
            "question": req.question, "study": req.study_uid, "request_sop": req.sop_uid,
            "received": now(), "state": "new", "accepted": None, "declined": None, "reason": None,
            "answered": None, "answer_sop": None, "answer_job": None, "consultant": None, "who": None,
            "note": "" if partner is not None else "unknown partner: answers cannot be sent automatically",
        }
        created.append(rec)
        return rec

    archive.index.update_record(TABLE, req.consultation_id, add)
    if created:
        rec = created[0]
        log.info("consultation %s received from %s (%s, %s): study %s", rec["id"], rec["requester"],
                 rec["partner"] or "unknown partner", rec["priority"], rec["study"])
        notify(archive, rec)


def _answered_here(archive: "Archive", op, who: Principal) -> None:
    """An opinion (or decline) stored in one of our inbox's cases: record it and send it back.
    Only in the case's own study (a copy of an old answer travelling inside another case is not
    an answer) and only once (a case already answered or declined keeps its answer)."""
    t = now()
    case = archive.index.record(TABLE, op.consultation_id) or {}
    if case.get("study") != op.study_uid:
        log.info("opinion SR %s names consultation %s but is in study %s, not the case's: not an answer",
                 op.sop_instance_uid, op.consultation_id, op.study_uid)
        return
    if case.get("state") in ("answered", "declined"):
        log.warning("consultation %s is already %s: opinion SR %s stored, not sent", op.consultation_id,
                    case["state"], op.sop_instance_uid)
        return
    if op.kind == "accepted" and case.get("accept_sop"):
        return  # the requester was told once

    changed: list[bool] = []

    def mark(old: dict | None) -> dict | None:
        if old is None or old.get("state") in ("answered", "declined"):
            return old  # answered meanwhile: the first answer stays
        changed.append(True)
        new = dict(old)
        if op.kind == "accepted":
            new.update(state="accepted", accepted=new.get("accepted") or t, accept_sop=op.sop_instance_uid)
            return new
        if op.declined is not None:
            new.update(state="declined", declined=new.get("declined") or t, reason=op.declined)
        else:
            new.update(state="answered", answered=t, accepted=new.get("accepted") or t)
        new.update(answer_sop=op.sop_instance_uid, consultant=op.consultant or new.get("consultant"))
        return new

    rec = archive.index.update_record(TABLE, op.consultation_id, mark)
    if rec is None or not changed:
        return
    if rec.get("partner") is None:
        log.warning("consultation %s answered, but its requester %r is no configured partner: not sent back",
                    rec["id"], rec.get("requester"))
        return
    try:
        job = archive.consultations.send(rec["study"], rec["partner"], kind="answer",
                                         instances=[op.sop_instance_uid], who=SYSTEM)
    except ArchiveError as exc:
        reason = exc.reason
        log.error("consultation %s: the answer cannot be queued for %s: %s", rec["id"], rec["partner"], reason)
        archive.index.update_record(TABLE, rec["id"], lambda o: o and {**o, "note": f"answer not sent: {reason}"})
        return
    field = "accept_job" if op.kind == "accepted" else "answer_job"
    archive.index.update_record(TABLE, rec["id"], lambda o: o and {**o, field: job, "note": ""})
    log.info("consultation %s: %s queued for %s (job %s)", rec["id"],
             {"accepted": "acceptance", "declined": "decline"}.get(op.kind, "opinion"), rec["partner"], job)


# -- the consultant's actions ----------------------------------------------------------------------

class Inbox:
    """The inbox of one archive: list, accept, decline, answer (CLI, /api/consult/inbox, viewer)."""

    def __init__(self, archive: "Archive") -> None:
        self.archive = archive

    def list(self, who: Principal = SYSTEM) -> list[dict]:
        """Every case `who` may see, newest first."""
        out = [rec for _, rec in self.archive.index.records(TABLE) if who.sees(rec.get("study"))]
        return sorted(out, key=lambda r: r.get("received") or "", reverse=True)

    def get(self, case_id: str, who: Principal = SYSTEM) -> dict:
        rec = self.archive.index.record(TABLE, case_id) if case_id else None
        if rec is None or not who.sees(rec.get("study")):
            raise NotFound(f"no consultation {case_id[:80]} in the inbox")
        return rec

    def for_study(self, study: str, who: Principal = SYSTEM) -> list[dict]:
        return [r for r in self.list(who) if r.get("study") == study]

    def _may_answer(self, rec: dict, who: Principal) -> None:
        if not who.may_store(COMPREHENSIVE_SR, rec.get("study")):
            raise_forbidden(who, "answer consultations")

    def accept(self, case_id: str, who: Principal = SYSTEM, notice: bool = True) -> dict:
        """Accept the case; `notice`: tell the requester (an SR carrying the acceptance time,
        stored in the case and sent back like an answer), so its job shows "accepted" at once."""
        rec = self.get(case_id, who)
        self._may_answer(rec, who)
        t = now()

        def change(old: dict | None) -> dict | None:
            if old is None:
                return None
            if old["state"] in ("declined", "answered"):
                raise InboxConflict(f"consultation {case_id} is already {old['state']}")
            if old["state"] == "accepted":
                return old
            return {**old, "state": "accepted", "accepted": t, "who": who.name}

        out = self.archive.index.update_record(TABLE, case_id, change) or rec
        if notice and not out.get("accept_sop") and out.get("partner") is not None:
            self._store(out, opinion_sr(self._evidence(out, ()), consultation_id=out["consultation_id"],
                                        consultant=who.name if who is not SYSTEM else self._consultant(),
                                        accepted=out["accepted"], request=self._request(out),
                                        institution=self.archive.config.consultation.institution), who)
            out = self.get(case_id, who)
        return out

    def decline(self, case_id: str, reason: str, who: Principal = SYSTEM) -> dict:
        """Decline with a reason: a decline SR is stored in the case and sent back."""
        reason = (reason or "").strip()
        if not reason:
            raise ValueError("a decline needs a reason")
        rec = self.get(case_id, who)
        self._may_answer(rec, who)
        if rec["state"] in ("declined", "answered"):
            raise InboxConflict(f"consultation {case_id} is already {rec['state']}")
        self._store(rec, opinion_sr(self._evidence(rec, ()), consultation_id=rec["consultation_id"],
                                    consultant=who.name if who is not SYSTEM else self._consultant(),
                                    declined=reason, accepted=rec.get("accepted"), request=self._request(rec),
                                    institution=self.archive.config.consultation.institution), who)
        return self.get(case_id, who)

    def answer(self, case_id: str, text: str, regions: Sequence[Region] = (), who: Principal = SYSTEM,
               consultant: str | None = None) -> dict:
        """Write the opinion: an SR stored in the case (then sent back by the ingest hook)."""
        if not (text or "").strip():
            raise ValueError("an opinion needs a text")
        rec = self.get(case_id, who)
        self._may_answer(rec, who)
        if rec["state"] in ("declined", "answered"):
            raise InboxConflict(f"consultation {case_id} is already {rec['state']}")
        if rec["state"] == "new":
            self.accept(case_id, who, notice=False)  # the answer carries the acceptance time
            rec = self.get(case_id, who)
        sr = opinion_sr(self._evidence(rec, regions), consultation_id=rec["consultation_id"],
                        consultant=consultant or (who.name if who is not SYSTEM else self._consultant()),
                        text=text, accepted=rec.get("accepted"), regions=regions, request=self._request(rec),
                        institution=self.archive.config.consultation.institution)
        self._store(rec, sr, who)
        return self.get(case_id, who)

    def pixel_points(self, sop: str, slide_points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
        """Slide coordinates (mm; the viewer's marks) as (column, row) of the image's total pixel
        matrix (highdicom's transformer, from the image's orientation, origin and spacing)."""
        from highdicom.spatial import ReferenceToPixelTransformer

        ds = self._header(sop)
        if ds is None:
            raise ValueError(f"region on {sop[:64]}: no such instance")
        try:
            tr = ReferenceToPixelTransformer.for_image(ds, for_total_pixel_matrix=True, round_output=False)
            pts = np.array([list(p) + [0.0] * (3 - len(p)) for p in slide_points], dtype=float)
            out = tr(pts)
        except (AttributeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"region on {sop[:64]}: slide coordinates cannot be mapped ({exc})") from None
        return [(round(float(p[0]), 2), round(float(p[1]), 2)) for p in out]

    # -- helpers
    def _consultant(self) -> str:
        return self.archive.config.consultation.institution or self.archive.config.consultation_name()

    def _header(self, sop: str) -> Dataset | None:
        raw = self.archive.index.metadata([sop])
        if not raw:
            return None
        return header_dataset(raw[0])

    def _request(self, rec: dict) -> Dataset | None:
        return self._header(rec["request_sop"]) if rec.get("request_sop") else None

    def _evidence(self, rec: dict, regions: Sequence[Region]) -> list[Dataset]:
        """Headers of the case: the request SR (or any instance) first, then every slide a region
        is drawn on (each must be an instance of the case's study)."""
        out: list[Dataset] = []
        first = self._request(rec)
        if first is None:
            raw = self.archive.index.metadata_under(rec["study"]) or []
            if not raw:
                raise NotFound(f"study {rec['study']} of consultation {rec['id']} is not here")
            first = header_dataset(raw[0])
        out.append(first)
        for r in regions:
            ds = self._header(r.sop_instance_uid)
            if ds is None or str(ds.StudyInstanceUID) != rec["study"]:
                raise ValueError(f"region on {r.sop_instance_uid[:64]}: not an instance of the case")
            if all(str(d.SOPInstanceUID) != r.sop_instance_uid for d in out):
                out.append(ds)
        return out

    def _store(self, rec: dict, sr: Dataset, who: Principal) -> None:
        from io import BytesIO

        buf = BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        result = self.archive.ingest(iter([buf.getvalue()]), origin="consult", who=SYSTEM)
        self.archive.audit.stored(who, rec["study"], None, result.sop_class_uid or "", result.sop_instance_uid or "",
                                  outcome="success" if result.ok else "minor failure", session="consultation answer",
                                  reason=result.reason or "")
        if not result.ok:
            raise ArchiveError(f"the answer could not be stored: {result.reason}")


def regions_from(data: object, to_pixels=None):
    """Regions from parsed JSON (the CLI file, the HTTP body); ValueError naming what is wrong.
    A region may give `slide_points` ([x, y, z] in mm, the viewer's marks) instead of pixel
    `points`: `to_pixels(sop, slide_points)` converts them (the archive knows the slide's geometry)."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError("regions must be a list")
    out = []
    for n, r in enumerate(data, 1):
        try:
            sop = str(r["sop_instance_uid"])
            kind = str(r.get("graphic_type", "POLYLINE")).upper()
            if "points" not in r and "slide_points" in r and to_pixels is not None:
                points = tuple(to_pixels(sop, [[float(c) for c in p[:3]] for p in r["slide_points"]]))
            else:
                points = tuple((float(p[0]), float(p[1])) for p in r["points"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise ValueError(f"region {n}: give sop_instance_uid and points [[x, y], ...]") from None
        if kind not in GRAPHIC_TYPES:
            raise ValueError(f"region {n}: graphic_type must be one of {', '.join(GRAPHIC_TYPES)}")
        if not points:
            raise ValueError(f"region {n}: no points")
        out.append(Region(sop, kind, points, str(r.get("sop_class_uid") or "1.2.840.10008.5.1.4.1.1.77.1.6"),
                          str(r.get("label") or "")[:64]))
    return out


def raise_forbidden(who: Principal, what: str) -> None:
    from ..access import Forbidden

    raise Forbidden(f"{who.name} ({', '.join(sorted(who.roles)) or 'no role'}) may not {what}")


# -- notifications (off the ingest path) ----------------------------------------------------------

_queue: "queue.SimpleQueue[tuple[Any, dict]] | None" = None
_lock = threading.Lock()
_pending = 0  # queued or running notifications: a CLI process (import) waits for them at exit
_idle = threading.Condition(_lock)
DRAIN_SECONDS = NOTIFY_TIMEOUT + WEBHOOK_TIMEOUT + 5


def notify(archive: "Archive", rec: dict) -> None:
    """Queue the notifications of a new case ([consultation] notify_command and/or webhook)."""
    c = archive.config.consultation
    if not c.notify_command and not c.webhook:
        return
    global _queue, _pending
    with _lock:
        if _queue is None:
            _queue = queue.SimpleQueue()
            threading.Thread(target=_notifier, name="consult-notify", daemon=True).start()
            atexit.register(_drain)
        _pending += 1
    _queue.put((c, rec))


def _drain(timeout: float = DRAIN_SECONDS) -> None:
    """At interpreter exit: let queued notifications finish (bounded), so a case received by a
    short-lived process (`pathpacs import` of a request) is still announced."""
    with _idle:
        _idle.wait_for(lambda: _pending == 0, timeout)


def case_environment(rec: dict) -> dict[str, str]:
    """The case's fields as PATHPACS_CONSULT_* variables for the notify command."""
    fields = ("id", "requester", "partner", "institution", "physician", "expert", "priority", "question",
              "study", "received")
    return {f"PATHPACS_CONSULT_{f.upper()}": str(rec.get(f) or "") for f in fields}


def _notifier() -> None:
    global _pending
    assert _queue is not None
    while True:
        c, rec = _queue.get()
        try:
            _notify_one(c, rec)
        finally:
            with _idle:
                _pending -= 1
                _idle.notify_all()


def _notify_one(c, rec: dict) -> None:
    """Run the notify command and post the webhook of one case; errors are logged."""
    if c.notify_command:
        try:
            argv = shlex.split(c.notify_command)
            res = subprocess.run(argv, env={**os.environ, **case_environment(rec)}, timeout=NOTIFY_TIMEOUT,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                log.error("notify_command for consultation %s exited %d: %s", rec["id"], res.returncode,
                          (res.stderr or res.stdout).strip()[:300])
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            log.error("notify_command for consultation %s failed: %s", rec["id"], exc)
    if c.webhook:
        try:
            body = json.dumps({"event": "consultation received", "case": rec}).encode()
            req = urllib.request.Request(c.webhook, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=WEBHOOK_TIMEOUT) as resp:
                resp.read(1 << 16)
        except Exception as exc:  # noqa: BLE001 - logged, never raised into the archive
            log.error("webhook for consultation %s failed: %s", rec["id"], exc)
