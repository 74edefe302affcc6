"""Deletion that cannot go wrong: IHE IOCM reject, restore, and a delayed, resumable purge.

reject   marks instances rejected in the index (Index.reject) and stores a Key Object Selection
         rejection note (archive.rejection_note) in their study through the normal ingest path.
         Rejected instances (and the notes) are hidden from everyone without `sees_rejected`
         (QIDO, C-FIND, WADO, C-GET, C-MOVE: `Visibility`), and stay on their tiers.
restore  removes the marks (the note stays, hidden, and is purged in its time).
purge    for marks older than `[deletion] purge_after_days`: refused under legal hold or
         retention (archive.retention); otherwise the intent is recorded first (Index.begin_purge),
         then every copy on every tier is deleted (an immutable tier's copies are left to expire and
         listed), then the records and marks go in one transaction per instance. A rerun after a
         crash finishes what an intent names; meanwhile the instance is hidden from everyone.
         A purged study stored again is a new, visible study: nothing of the old one is left.

Visibility: an in-memory set of hidden SOP Instance UIDs with per-series and per-study counts,
reloaded when the index's generation counter moves (another process, e.g. the CLI, rejected):
one small LMDB read and a set lookup per frame request.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Iterable

from storage_tiers import BlobError, StoreUnavailable

from . import metadata as md
from .access import SYSTEM, Principal
from .records import BlobRef, InstanceRecord
from .rejection_note import RETENTION_EXPIRED, REASONS, build, read
from .retention import RetentionRules
from .status import ArchiveError, InvalidRequest, NotFound, Retained

if TYPE_CHECKING:
    from .service import Archive

log = logging.getLogger("pathpacs.deletion")
LEVELS = ("study", "series", "instance")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _parse(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class Visibility:
    """What is hidden from principals that do not see rejected objects, kept in memory."""

    # Other processes' changes (the CLI, other HTTP workers) are seen within this; this
    # process's own changes at once (`invalidate`). Reading the generation on every frame
    # request cost 15% of in-process frames/s; once per REFRESH_S costs nothing measurable.
    REFRESH_S = 0.25

    def __init__(self, index) -> None:
        self.index = index
        self.gen = -1
        self.sops: frozenset[str] = frozenset()  # rejected or being purged
        self.purging: frozenset[str] = frozenset()  # hidden from everyone
        self.by_series: dict[str, int] = {}
        self.by_study: dict[str, int] = {}
        self.purging_series: dict[str, int] = {}
        self.purging_study: dict[str, int] = {}
        self._lock = threading.Lock()
        self._checked = -1e9

    def invalidate(self) -> None:
        self._checked = -1e9

    def current(self) -> "Visibility":
        now = time.monotonic()
        if now - self._checked < self.REFRESH_S:
            return self
        self._checked = now
        gen = self.index.rejection_generation()
        if gen != self.gen:
            with self._lock:
                gen, marks, purging = self.index.rejections()
                by_series: dict[str, int] = {}
                by_study: dict[str, int] = {}
                purging_series: dict[str, int] = {}
                purging_study: dict[str, int] = {}
                for sop, m in marks.items():
                    by_series[m["series"]] = by_series.get(m["series"], 0) + 1
                    by_study[m["study"]] = by_study.get(m["study"], 0) + 1
                    if sop in purging:
                        purging_series[m["series"]] = purging_series.get(m["series"], 0) + 1
                        purging_study[m["study"]] = purging_study.get(m["study"], 0) + 1
                self.sops, self.purging = frozenset(marks) | frozenset(purging), frozenset(purging)
                self.by_series, self.by_study = by_series, by_study
                self.purging_series, self.purging_study, self.gen = purging_series, purging_study, gen
        return self

    def counts(self, who: Principal) -> tuple[frozenset[str], dict[str, int], dict[str, int]]:
        """(hidden sops, hidden per series, hidden per study) for `who`."""
        if who.sees_rejected:
            return self.purging, self.purging_series, self.purging_study
        return self.sops, self.by_series, self.by_study

    def hidden(self, sop: str, who: Principal) -> bool:
        """The frame path's check: a set lookup after one generation read."""
        v = self.current()
        if sop not in v.sops:  # the common case: one set lookup
            return False
        return sop in v.purging if who.sees_rejected else True


@dataclass
class PurgeReport:
    purged: list[tuple[str, str]] = field(default_factory=list)  # (study, sop)
    versions: int = 0  # replaced versions purged
    refused: list[str] = field(default_factory=list)  # one line per study refused
    left_to_expire: list[tuple[str, str]] = field(default_factory=list)  # (tier, key) on immutable tiers
    bytes: int = 0


class Deletion:
    """Reject, restore and purge over one Archive (`Archive.deletion`)."""

    def __init__(self, arc: "Archive") -> None:
        self.arc = arc
        self.visibility = Visibility(arc.index)
        self.retention = RetentionRules(arc)

    @property
    def index(self):
        return self.arc.index

    def _changed(self, value):
        """After a write of marks or intents: this process sees it at once."""
        self.visibility.invalidate()
        return value

    def is_rejected(self, sop: str) -> bool:
        return sop in self.visibility.current().sops

    # -- reject / restore ------------------------------------------------------------------
    def _under(self, level: str, uid: str) -> list[InstanceRecord]:
        if level not in LEVELS:
            raise InvalidRequest(f"level must be one of {', '.join(LEVELS)}")
        if level == "instance":
            rec = self.index.instance(uid)
            if rec is None:
                raise NotFound(f"instance {uid} not found")
            return [rec]
        if level == "series":
            se = self.index.series(uid)
            if se is None:
                raise NotFound(f"series {uid} not found")
            return self.index.instances_of_series(uid)
        return self.arc.instances_under(uid)

    def _check_hold(self, study: str, what: str) -> None:
        if self.index.flags(study).get("hold"):
            raise Retained(f"{what} refused: study {study} is under legal hold (pathpacs tier release --study)")

    def reject(self, level: str, uid: str, reason_code: str, who: Principal = SYSTEM,
               study: str | None = None) -> tuple[int, str | None]:
        """Reject a study, series or instance (`study`: it must lie in this study, else
        NotFound). Returns (instances newly rejected, the rejection note's SOP Instance UID).
        Retained under legal hold, and for reason 113039 under retention."""
        if reason_code not in REASONS:
            raise InvalidRequest(f"{reason_code!r} is not a CID 7011 rejection reason")
        recs = self._under(level, uid)
        if study is not None and any(r.study != study for r in recs):
            raise NotFound(f"{level} {uid} not found in study {study}")
        vis = self.visibility.current()
        recs = [r for r in recs if r.sop not in vis.sops]
        if not recs:
            return 0, None
        st_uid = recs[0].study
        self._check_hold(st_uid, "reject")
        if reason_code == RETENTION_EXPIRED:
            self.retention.check(st_uid, "reject (data retention policy expired)")
        st = self.index.study(st_uid)
        patient = self.index.patient(recs[0].patient)
        assert self.arc.staging is not None, "reject needs a writable archive"
        path = self.arc.staging.path()
        note = build(reason_code, recs, st.attrs if st else {}, patient.attrs if patient else {}, path,
                     aet=self.arc.config.aet)
        result = self.arc.ingest(path, take_ownership=True, origin="reject", calling_aet=self.arc.config.aet)
        if not result.ok:
            raise ArchiveError(f"cannot store the rejection note: {result.reason}")
        n = self._mark(recs, reason_code, who, note)
        self.arc.audit.deleted("rejected", who, st_uid, self._patient_id(st_uid), [r.sop for r in recs], reason_code)
        log.info("%s rejected %d instances of study %s (%s), note %s", who.name, n, st_uid, reason_code, note)
        return n, note

    def _mark(self, recs: list[InstanceRecord], code: str, who: Principal, note: str) -> int:
        now = _now().isoformat(timespec="milliseconds")
        marks = {r.sop: {"study": r.study, "series": r.series, "code": code, "time": now, "who": who.name,
                         "note": note} for r in recs}
        note_rec = self.index.instance(note)
        if note_rec is not None:  # the note is hidden like what it rejects, and purged with it
            marks[note] = {"study": note_rec.study, "series": note_rec.series, "code": code, "time": now,
                           "who": who.name, "note": "self"}
        return self._changed(self.index.reject(marks)) - (1 if note_rec is not None else 0)

    def honour_note(self, sop: str, who: Principal) -> int:
        """A received rejection note (stored already): reject what it references in its study.
        Returns how many instances were rejected (0 when it is not a note)."""
        metas = self.index.metadata([sop])
        if not metas:
            return 0
        import json

        note = read(json.loads(metas[0]))
        if note is None:
            return 0
        recs = [r for s in note.sops if (r := self.index.instance(s)) is not None and r.study == note.study]
        vis = self.visibility.current()
        recs = [r for r in recs if r.sop not in vis.sops]
        if not recs:
            return 0
        self._check_hold(note.study, "reject")
        if note.code == RETENTION_EXPIRED:
            self.retention.check(note.study, "reject (data retention policy expired)")
        n = self._mark(recs, note.code, who, sop)
        self.arc.audit.deleted("rejected", who, note.study, self._patient_id(note.study), [r.sop for r in recs],
                               f"{note.code} (rejection note {sop})")
        log.info("%s rejected %d instances of study %s by a received note %s", who.name, n, note.study, sop)
        return n

    def _patient_id(self, study: str) -> str | None:
        """The Patient ID of a study, for its audit record (read before a purge removes it)."""
        rec = self.index.study(study)
        return md.first_value(rec.attrs, "00100020") if rec is not None else None

    def restore(self, level: str, uid: str, who: Principal = SYSTEM, study: str | None = None) -> int:
        """Undo a reject before purge; returns how many instances are visible again."""
        marks = self.index.rejections()[1]
        if level == "instance":
            sops = [uid] if uid in marks and marks[uid]["note"] != "self" else []
            if not sops and self.index.instance(uid) is None:
                raise NotFound(f"instance {uid} not found")
        else:
            key = "series" if level == "series" else "study"
            if level not in LEVELS:
                raise InvalidRequest(f"level must be one of {', '.join(LEVELS)}")
            sops = [s for s, m in marks.items() if m[key] == uid and m["note"] != "self"]
            if not sops and (self.index.series(uid) if level == "series" else self.index.study(uid)) is None:
                raise NotFound(f"{level} {uid} not found")
        if study is not None and any(marks[s]["study"] != study for s in sops):
            raise NotFound(f"{level} {uid} not found in study {study}")
        n = self._changed(self.index.unreject(sops))
        for st_uid in sorted({marks[s]["study"] for s in sops}):
            self.arc.audit.deleted("restored", who, st_uid, self._patient_id(st_uid),
                                   [s for s in sops if marks[s]["study"] == st_uid])
        log.info("%s restored %d instances (%s %s)", who.name, n, level, uid)
        return n

    def restore_replaced(self, sop: str, who: Principal = SYSTEM) -> str:
        """Make the newest version a replace kept the current one again (the current one is
        kept in its turn). Returns the restored version's sha256."""
        from .dicomfile import parse_file
        from .ingest import describe

        versions = self.index.versions(sop)
        if not versions:
            raise NotFound(f"instance {sop} has no replaced version")
        v = versions[-1]
        old: InstanceRecord = v["record"]
        with self.arc.instance_file(old, "restore") as path:
            new = describe(path, parse_file(path), old.sha256, old.size, old.blob, calling_aet=old.calling_aet,
                           origin=old.origin, received=old.received)
        self.index.add_instance(new, replace=True, who=who.name)
        for c in v["copies"]:
            self.index.add_copy(sop, c)
        self._changed(self.index.drop_version(v["key"]))
        self.arc.audit.deleted("restored", who, old.study, self._patient_id(old.study), [sop], "replaced version")
        return old.sha256

    # -- purge -----------------------------------------------------------------------------
    def purge(self, *, dry_run: bool = False, now: datetime | None = None, who: Principal = SYSTEM) -> PurgeReport:
        """Purge every reject older than purge_after_days (and finish purges a crash
        interrupted). Studies under legal hold or retention are refused, one line each."""
        now = now or _now()
        report = PurgeReport()
        if not dry_run:
            self._finish(self.index.purges(), report)
        cutoff = now - timedelta(days=self.arc.config.purge_after_days)
        marks = self.index.rejections()[1]
        by_study: dict[str, list[str]] = {}
        for sop, m in marks.items():
            if _parse(m["time"]) <= cutoff:
                by_study.setdefault(m["study"], []).append(sop)
        for study, sops in sorted(by_study.items()):
            try:
                self._check_hold(study, "purge")
                self.retention.check(study, "purge", today=now.date())
            except Retained as exc:
                report.refused.append(exc.reason)
                continue
            intents = {}
            for sop in sops:
                rec = self.index.instance(sop)
                if rec is None:
                    continue
                blobs = [rec.blob] + self.index.copies(sop)
                intents[sop] = {"kind": "instance", "sop": sop, "study": study, "blobs": [list(b) for b in blobs]}
                report.bytes += rec.size
            if dry_run:
                report.purged += [(study, s) for s in intents]
                continue
            self._changed(self.index.begin_purge(intents))
            self.arc.audit.deleted("purged", who, study, self._patient_id(study), list(intents),
                                   f"rejected more than {self.arc.config.purge_after_days:g} days ago")
            self._finish(intents, report)
        for v in self.index.versions():
            if _parse(v["time"]) > cutoff:
                continue
            rec: InstanceRecord = v["record"]
            try:
                self._check_hold(rec.study, "purge")
            except Retained as exc:
                report.refused.append(exc.reason)
                continue
            report.versions += 1
            report.bytes += rec.size
            if dry_run:
                continue
            key = f"version:{v['key']}"
            intent = {"kind": "version", "sop": rec.sop, "version": v["key"],
                      "blobs": [list(b) for b in [rec.blob] + v["copies"]]}
            self._changed(self.index.begin_purge({key: intent}))
            self._finish({key: intent}, report)
        return report

    def _finish(self, intents: dict, report: PurgeReport) -> None:
        for key, intent in intents.items():
            for tier, blob_key in intent["blobs"]:
                self._delete(BlobRef(tier, blob_key), report)
            if self._changed(self.index.finish_purge(key)) and intent["kind"] == "instance":
                if (intent.get("study"), intent["sop"]) not in report.purged:
                    report.purged.append((intent.get("study", ""), intent["sop"]))

    def _delete(self, blob: BlobRef, report: PurgeReport) -> None:
        store = self.arc.tiers.get(blob.tier)
        if store is None:
            raise ArchiveError(f"purge: tier {blob.tier} is not configured; copy {blob.key} is still there")
        if getattr(store, "immutable", False):
            report.left_to_expire.append((blob.tier, blob.key))
            return
        try:
            store.delete(blob.key)
        except (StoreUnavailable, BlobError, OSError) as exc:
            raise ArchiveError(f"purge stopped: cannot delete {blob.key} on {blob.tier} ({exc}); "
                               "run pathpacs purge again to finish") from exc

    def rejected(self) -> list[tuple[str, dict]]:
        """Every mark, for listing."""
        return sorted(self.index.rejections()[1].items(), key=lambda kv: kv[1]["time"])


def visible(recs: Iterable[InstanceRecord], hidden: frozenset[str]) -> list[InstanceRecord]:
    return [r for r in recs if r.sop not in hidden]
