"""What happens to stored instances over their years: moves between tiers, lifecycle rules,
recalls, replicas, fixity checks and repairs.

A move never loses anything. It is journalled first (Index.move_begin), then the bytes are
copied to the destination, re-hashed there (sha256 against the one recorded at ingest), the
instance's location switched in one index transaction (Index.move_switch), and only then is
the source deleted. A crash at any step is resolved at the next start (`recover`): before the
switch, the copy is deleted and the source stays; after it, the source is deleted. Readers
racing a switch look the instance up again (Archive.read_located), so no read fails.

Replicas are further verified copies on other tiers (`[[replicas]]`), recorded beside the
primary (Index.add_copy); a read of a damaged primary is served from a good replica, and
`repair` rewrites a bad or missing copy from a good one.
"""
from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from storage_tiers import BlobError, BlobNotFound, StoreUnavailable

from .fixity import CHUNK
from .query import Key, match_doc, study_doc, tag_hex, vr_of
from .records import BlobRef, InstanceRecord, StudyRecord
from .status import ArchiveError, ErrorKind, InvalidRequest, NotFound, Unavailable

if TYPE_CHECKING:
    from .service import Archive

log = logging.getLogger("pathpacs.lifecycle")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class MoveFailed(ArchiveError):
    """A move did not happen; the instance is where it was, intact."""

    kind = ErrorKind.INTERNAL


@dataclass
class Report:
    """What a batch operation did (moves, repairs, verification)."""

    done: int = 0
    bytes: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def add_problem(self, text: str) -> None:
        self.problems.append(text)


class Lifecycle:
    """Moves, rules, recalls, replicas, fixity and repair over one Archive."""

    def __init__(self, arc: "Archive") -> None:
        self.arc = arc
        self.index = arc.index
        self._recalls: set[str] = set()
        self._recall_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- moving one instance ------------------------------------------------------------------
    def _copy(self, rec: InstanceRecord, src: BlobRef, dst: BlobRef,
              hook: Callable[[str], None] | None = None) -> None:
        """Stream src's bytes to dst, in bounded memory, then re-hash dst: MoveFailed (and
        dst removed) unless it holds exactly the bytes recorded at ingest."""
        source, dest = self.arc.tier(src.tier), self.arc.tier(dst.tier)
        local = source.local_path(src.key)
        try:
            if local is not None:
                dest.put_file(local, dst.key, owned=False)
            else:
                with source.open(src.key) as fh:
                    dest.put_stream(dst.key, iter(lambda: fh.read(CHUNK), b""))
        except (StoreUnavailable, BlobError, OSError) as exc:
            self._remove_quietly(dst)
            raise MoveFailed(f"copy of {rec.sop} to {dst.tier} failed: {exc}") from exc
        if hook:
            hook("copied")
        problem = self.arc.check_copy(rec, dst)
        if problem is not None:
            self._remove_quietly(dst)
            raise MoveFailed(f"the copy of {rec.sop} on {dst.tier} does not verify: {problem}")

    def _remove_quietly(self, blob: BlobRef) -> None:
        try:
            self.arc.tier(blob.tier).delete(blob.key)
        except Exception as exc:  # an immutable tier refuses; a stopped one cannot
            log.warning("could not remove %s from %s: %s", blob.key, blob.tier, exc)

    def move(self, rec: InstanceRecord, to_tier: str, *, hook: Callable[[str], None] | None = None) -> bool:
        """Move one instance's primary copy to `to_tier`: copy -> verify -> switch -> delete.
        Returns False when there was nothing to do (already there, or it changed meanwhile).
        hook(step) is called after "copied", "verified" and "switched" (the kill -9 tests stop
        the process there)."""
        if rec.blob.tier == to_tier:
            return False
        if to_tier not in self.arc.tiers:
            raise InvalidRequest(f"no tier named {to_tier!r}")
        src = rec.blob
        # a replica already on the destination becomes the primary: no copy needed
        existing = next((c for c in self.index.copies(rec.sop) if c.tier == to_tier), None)
        dst = existing or BlobRef(to_tier, uuid.uuid4().hex)
        self.index.move_begin(rec.sop, src, dst, self.arc.pending_session())
        if existing is None:
            try:
                self._copy(rec, src, dst, hook)
            except MoveFailed:
                self.index.move_end(rec.sop)
                raise
        elif self.arc.check_copy(rec, dst) is not None:
            self.index.move_end(rec.sop)
            raise MoveFailed(f"the replica of {rec.sop} on {to_tier} does not verify")
        if hook:
            hook("verified")
        if not self.index.move_switch(rec.sop, src, dst):
            if existing is None:
                self._remove_quietly(dst)
            self.index.move_end(rec.sop)
            return False
        if hook:
            hook("switched")
        self._remove_quietly(src)
        self.index.move_end(rec.sop)
        self.index.set_verified(rec.sop, to_tier, _iso(_now()))
        log.info("moved %s from %s to %s", rec.sop, src.tier, to_tier)
        return True

    def recover(self) -> tuple[int, int]:
        """Finish or roll back the moves a crash interrupted; (rolled back, finished)."""
        back = forward = 0
        staging = self.arc.staging
        for sop, src, dst, state, session in self.index.moves():
            if staging is None:  # read-only: resolve nothing another process may be doing
                continue
            if session and not self.arc.cluster.may_remove(session, staging.session_alive):
                continue  # another live process (of this node or a live node) is doing this move
            rec = self.index.instance(sop)
            kept = set(self.index.copies(sop)) | ({rec.blob} if rec is not None else set())
            if rec is not None and rec.blob == dst:  # switched: the source is garbage
                forward += 1
                if src not in kept:
                    self._remove_quietly(src)
            else:  # not switched: the copy is garbage, the source is still the instance
                back += 1
                if dst not in kept:
                    self._remove_quietly(dst)
            self.index.move_end(sop)
        if back or forward:
            log.info("interrupted moves: %d rolled back, %d finished", back, forward)
        return back, forward

    # -- studies and series ----------------------------------------------------------------------
    def instances(self, *, study: str | None = None, series: str | None = None) -> list[InstanceRecord]:
        if series is not None:
            se = self.index.series(series)
            if se is None:
                raise NotFound(f"series {series} not found")
            return self.index.instances_of_series(series)
        if study is not None:
            return self.arc.instances_under(study)
        return list(self.index.instances())

    def move_all(self, recs: Iterable[InstanceRecord], to_tier: str, *,
                 progress: Callable[[int], None] | None = None, dry_run: bool = False,
                 hook: Callable[[str], None] | None = None) -> Report:
        report = Report()
        moved: dict[tuple[str, str], list[str]] = {}  # (study, from tier) -> SOPs: one audit record each
        try:
            self._move_all(recs, to_tier, report, moved, progress, dry_run, hook)
        finally:
            for (study, from_tier), sops in moved.items():
                self.arc.audit.moved(study, sops, from_tier, to_tier)
        return report

    def _move_all(self, recs, to_tier: str, report: Report, moved: dict[tuple[str, str], list[str]],
                  progress, dry_run: bool, hook) -> None:
        for rec in recs:
            if rec.blob.tier == to_tier:
                report.skipped += 1
                continue
            if self.index.flags(rec.study).get("pinned"):
                report.skipped += 1
                continue
            if dry_run:
                report.done += 1
                report.bytes += rec.size
                continue
            try:
                if self.move(rec, to_tier, hook=hook):
                    report.done += 1
                    report.bytes += rec.size
                    moved.setdefault((rec.study, rec.blob.tier), []).append(rec.sop)
            except ArchiveError as exc:
                report.add_problem(f"{rec.sop}: {exc.reason}")
            if progress:
                progress(rec.size)

    # -- rules --------------------------------------------------------------------------------
    def _rule_keys(self, match: dict[str, str]) -> list[Key]:
        """C-FIND keys of a rule's match, matched against the study: Modality (a series
        attribute) is matched against ModalitiesInStudy, as a study-level C-FIND does."""
        keys = []
        for name, value in match.items():
            tag = tag_hex(name)
            if tag == "00080060":
                tag = "00080061"
            keys.append(Key(tag, vr_of(tag), [value] if value else None))
        return keys

    def due(self, now: datetime | None = None) -> Iterator[tuple[StudyRecord, str, str, list[InstanceRecord]]]:
        """(study, from tier, to tier, its instances on that tier) for every rule now due."""
        now = now or _now()
        rules = [(r, self._rule_keys(r.match)) for r in self.arc.config.rules]
        if not rules:
            return
        for st in self.index.studies():
            if not st.tiers:
                continue
            if self.index.flags(st.uid).get("pinned"):
                continue
            doc = None
            accessed = _parse(self.index.study_access(st.uid))
            for rule, keys in rules:
                if st.tiers.get(rule.from_tier, 0) <= 0:
                    continue
                recs = [r for r in self.arc.instances_under(st.uid) if r.blob.tier == rule.from_tier]
                if not recs:
                    continue
                received = max((_parse(r.received) for r in recs), default=None) or now
                if rule.after_days_since_received is not None and \
                        now - received < timedelta(days=rule.after_days_since_received):
                    continue
                if rule.after_days_since_access is not None:
                    last = max(t for t in (accessed, received) if t is not None)
                    if now - last < timedelta(days=rule.after_days_since_access):
                        continue
                if keys:
                    doc = doc or study_doc(st)
                    if not match_doc(doc, keys):
                        continue
                yield st, rule.from_tier, rule.to_tier, recs
                break  # one move per study per pass; the next pass applies the next rule

    def apply(self, *, dry_run: bool = False, progress: Callable[[int], None] | None = None) -> Report:
        """Apply every due rule once (a study moves at most one step per pass)."""
        report = Report()
        for st, src, dst, recs in list(self.due()):
            r = self.move_all(recs, dst, progress=progress, dry_run=dry_run)
            report.done += r.done
            report.bytes += r.bytes
            report.skipped += r.skipped
            report.problems += r.problems
            if dry_run and r.done:
                report.add_problem(f"would move study {st.uid}: {r.done} instances, {r.bytes} bytes, {src} -> {dst}")
        return report

    # -- recall -----------------------------------------------------------------------------------
    def recall(self, study: str, progress: Callable[[int], None] | None = None) -> Report:
        """Bring a study back to the ingest tier."""
        return self.move_all(self.arc.instances_under(study), self.arc.ingest_tier.name, progress=progress)

    def recall_later(self, study: str) -> None:
        """recall_on_access: queue a background recall (reads meanwhile come from where the
        data is)."""
        with self._recall_lock:
            if study in self._recalls:
                return
            self._recalls.add(study)
        threading.Thread(target=self._recall_bg, args=(study,), name="recall", daemon=True).start()

    def _recall_bg(self, study: str) -> None:
        try:
            r = self.recall(study)
            log.info("recalled study %s on access: %d instances back on %s", study, r.done, self.arc.ingest_tier.name)
        except Exception:
            log.exception("recall of %s failed", study)
        finally:
            with self._recall_lock:
                self._recalls.discard(study)

    # -- replicas ---------------------------------------------------------------------------------
    def replicate(self, *, now: datetime | None = None, only_due: bool = True,
                  progress: Callable[[int], None] | None = None) -> Report:
        """Make the copies `[[replicas]]` ask for. only_due: only instances received longer ago
        than half their window (the rest get theirs on a later pass, within the window)."""
        now = now or _now()
        report = Report()
        for rep in self.arc.config.replicas:
            if rep.tier not in self.arc.tiers:
                continue
            for rec in self.index.instances():
                if rec.blob.tier not in rep.of or rec.blob.tier == rep.tier:
                    continue
                if any(c.tier == rep.tier for c in self.index.copies(rec.sop)):
                    continue
                received = _parse(rec.received) or now
                if only_due and now - received < timedelta(minutes=rep.within_minutes / 2):
                    continue
                try:
                    self.make_copy(rec, rep.tier)
                    report.done += 1
                    report.bytes += rec.size
                except ArchiveError as exc:
                    report.add_problem(f"{rec.sop}: {exc.reason}")
                if progress:
                    progress(rec.size)
        return report

    def make_copy(self, rec: InstanceRecord, tier: str) -> BlobRef:
        """A verified further copy of the instance on `tier`, recorded."""
        dst = BlobRef(tier, uuid.uuid4().hex)
        self._copy(rec, rec.blob, dst)
        if not self.index.add_copy(rec.sop, dst):
            self._remove_quietly(dst)
            raise NotFound(f"instance {rec.sop} is gone")
        self.index.set_verified(rec.sop, tier, _iso(_now()))
        return dst

    # -- fixity and repair ---------------------------------------------------------------------------
    def copies_of(self, rec: InstanceRecord) -> list[BlobRef]:
        return [rec.blob] + self.index.copies(rec.sop)

    def verify(self, recs: Iterable[InstanceRecord], *, tier: str | None = None, sample: float | None = None,
               progress: Callable[[int], None] | None = None, max_bytes_per_s: float | None = None) -> Report:
        """Re-hash every copy (on `tier` only, or a random `sample` fraction of instances);
        the problems name each missing or altered copy."""
        report = Report()
        budget = _Throttle(max_bytes_per_s)
        rng = random.Random()
        for rec in recs:
            if sample is not None and rng.random() >= sample:
                continue
            for blob in self.copies_of(rec):
                if tier is not None and blob.tier != tier:
                    continue
                problem = self.arc.check_copy(rec, blob)
                budget.spent(rec.size)
                report.done += 1
                report.bytes += rec.size
                if problem is None:
                    self.index.set_verified(rec.sop, blob.tier, _iso(_now()))
                else:
                    role = "primary" if blob == rec.blob else "replica"
                    report.add_problem(f"{problem}: {rec.sop} ({role} copy {blob.key} on {blob.tier})")
                    if not problem.startswith("tier "):
                        self.arc.damage(rec.sop, blob, problem, "verify")
            if progress:
                progress(rec.size)
        return report

    def repair(self, recs: Iterable[InstanceRecord], progress: Callable[[int], None] | None = None) -> Report:
        """Restore every bad or missing copy from a good one (hash-checked); the problems say
        what could not be repaired."""
        report = Report()
        for rec in recs:
            copies = self.copies_of(rec)
            states = {b: self.arc.check_copy(rec, b) for b in copies}
            good = [b for b, p in states.items() if p is None]
            bad = [b for b, p in states.items() if p is not None and not p.startswith("tier ")]
            for b, p in states.items():
                if p is not None and p.startswith("tier "):
                    report.add_problem(f"{rec.sop}: copy on {b.tier} not checked ({p})")
            if not bad:
                if progress:
                    progress(rec.size)
                continue
            if not good:
                report.add_problem(f"{rec.sop}: no intact copy left to repair from ({', '.join(states[b] or '' for b in bad)})")
                continue
            for b in bad:
                try:
                    self._rewrite(rec, good[0], b)
                    report.done += 1
                    report.bytes += rec.size
                    log.warning("repaired %s: copy on %s rewritten from %s", rec.sop, b.tier, good[0].tier)
                except ArchiveError as exc:
                    report.add_problem(f"{rec.sop}: cannot repair the copy on {b.tier}: {exc.reason}")
            if progress:
                progress(rec.size)
        return report

    def _rewrite(self, rec: InstanceRecord, good: BlobRef, bad: BlobRef) -> None:
        """Replace a bad copy with a verified copy of a good one, under a new key, switching
        the record (primary: the journalled move machinery; replica: the copies table)."""
        fresh = BlobRef(bad.tier, uuid.uuid4().hex)
        self._copy(rec, good, fresh)
        if bad == rec.blob:
            self.index.move_begin(rec.sop, bad, fresh, self.arc.pending_session())
            if not self.index.move_switch(rec.sop, bad, fresh):
                self._remove_quietly(fresh)
                self.index.move_end(rec.sop)
                raise MoveFailed(f"{rec.sop} changed while it was repaired")
            self._remove_quietly(bad)
            self.index.move_end(rec.sop)
        else:
            self.index.drop_copy(rec.sop, bad.tier)
            self.index.add_copy(rec.sop, fresh)
            self._remove_quietly(bad)
        self.index.set_verified(rec.sop, bad.tier, _iso(_now()))

    def fixity_pass(self, stop: threading.Event | None = None) -> Report:
        """The scheduled check: copies not verified for fixity.every_days are re-hashed, at
        most fixity.max_mb_per_s, so it never starves serving."""
        cfg = self.arc.config
        cutoff = _now() - timedelta(days=cfg.fixity_every_days)
        due = []
        for rec in self.index.instances():
            if stop is not None and stop.is_set():
                break
            last = _parse(self.index.verified(rec.sop, rec.blob.tier)) or _parse(rec.received)
            if last is None or last < cutoff:
                due.append(rec)
        return self.verify(due, max_bytes_per_s=cfg.fixity_max_mb_per_s * 1e6)

    # -- the background worker of `serve` ----------------------------------------------------------
    def start(self) -> None:
        """Rules, replicas and fixity on their schedules, in one background thread."""
        if self._thread is not None or not self.arc.config.background:
            return
        self.arc.on_access = self.recall_later
        self._thread = threading.Thread(target=self._run, name="lifecycle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        cfg = self.arc.config
        next_rules = next_fixity = next_replicas = 0.0
        replica_every = min([60.0] + [r.within_minutes * 60 / 4 for r in cfg.replicas])
        rules_every = cfg.rules_every_minutes * 60
        while not self._stop.wait(min(5.0, replica_every)):
            now = time.monotonic()
            try:
                # each pass once across the cluster: under a lease (archive.cluster), and not
                # again until its period passed since any node finished it; a node that did
                # not get it asks again after a lease's time (a killed holder's lease expires)
                if cfg.replicas and now >= next_replicas:
                    next_replicas = now + self._leased("replicas", replica_every, self._replicas_pass)
                if cfg.rules and now >= next_rules:
                    next_rules = now + self._leased("rules", rules_every, self._rules_pass)
                if now >= next_fixity:
                    next_fixity = now + self._leased("fixity", 3600.0, self._fixity_pass)
            except Exception:
                log.exception("lifecycle pass failed; retrying later")

    def _leased(self, name: str, every: float, run: Callable[[], None]) -> float:
        """Run one periodic pass if this node gets its cluster lease; returns the seconds until
        this node asks again."""
        lease = self.arc.config.lease_seconds
        with self.arc.cluster.leases.hold(f"lifecycle.{name}", lease, every=every * 0.9) as mine:
            if not mine:
                return min(every, lease)
            log.info("lifecycle pass (%s) on node %s", _PASS_NAMES.get(name, name), self.arc.cluster.node)
            run()
        return every

    def _replicas_pass(self) -> None:
        r = self.replicate()
        if r.done or r.problems:
            log.info("replicas: %d made, %d problems%s", r.done, len(r.problems),
                     f" ({r.problems[0]})" if r.problems else "")

    def _rules_pass(self) -> None:
        r = self.apply()
        if r.done or r.problems:
            log.info("lifecycle rules: %d instances moved (%d bytes), %d problems", r.done, r.bytes,
                     len(r.problems))

    def _fixity_pass(self) -> None:
        r = self.fixity_pass(self._stop)
        if r.problems:
            log.error("fixity: %d copies failed their check (pathpacs repair)", len(r.problems))


_PASS_NAMES = {"fixity": "scheduled copy checks"}  # log words (tests look for "fixity" as damage)


class _Throttle:
    """Sleeps so that work stays under a byte rate (None: no limit)."""

    def __init__(self, per_s: float | None) -> None:
        self.per_s = per_s
        self.t0 = time.monotonic()
        self.n = 0

    def spent(self, n: int) -> None:
        if not self.per_s:
            return
        self.n += n
        ahead = self.n / self.per_s - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(min(ahead, 5.0))
