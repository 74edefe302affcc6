"""`pathpacs index migrate --to postgresql`: an archive's whole index from LMDB into PostgreSQL.

Through the Index protocol only: the source is read with the LMDB backend (opened read-only, so
it is left exactly as it was: the admin's fallback), the target written with the PostgreSQL one.
No blob is read: every `NewInstance` is rebuilt from what the source holds (record, frame table
with its CRC32C, metadata, bulk values) with the attributes of its source patient, study and
series records, which ingest made from the first instance of each (`md.subset` of its DICOM
JSON, archive.ingest.describe); instances are added study by study in the order they were
received, so each study's "updated" time and modality order come out as they were.

Resumable: instances already in the target are skipped (a study whose counts already match is
skipped whole) and everything after them is an idempotent upsert (copies, flags, access and
verified times, tokens, records, rejection marks, kept versions, fixity events not there yet,
purge intents; a table without CRC32C joins the checksum
queue as it is added), so a migration killed at any point is finished by running
it again. At the end both sides are counted (`counts`) and must agree.

Refused while the source is in use: a live process with a staging session, blobs pending a
record or moves in the journal mean a server is (or was, uncleanly) running on it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .. import metadata as md
from ..records import InstanceRecord, StudyRecord
from .base import RECORD_TABLES, Index, NewInstance

BATCH = 200  # instances per target transaction
RECORD_BATCH = 1000


class MigrationRefused(Exception):
    """The source cannot be migrated now (in use); the message says why, in one line."""


@dataclass
class MigrationReport:
    added: int = 0  # instances added by this run
    skipped: int = 0  # already in the target (an earlier, interrupted run)
    source: dict[str, int] = field(default_factory=dict)
    target: dict[str, int] = field(default_factory=dict)

    @property
    def mismatches(self) -> list[str]:
        return [f"{k}: source {self.source.get(k, 0)}, target {self.target.get(k, 0)}"
                for k in self.source.keys() | self.target.keys() if self.source.get(k, 0) != self.target.get(k, 0)]


def check_idle(source: Index | None, staging_root: Path) -> None:
    """Refuse (MigrationRefused) while a process uses the archive or work is in flight (source
    None: only whether a process uses it, before an older index's layout is brought up to date)."""
    from storage_tiers.staging import Staging

    if staging_root.is_dir():
        probe = Staging(staging_root)
        try:
            alive = probe.others_alive()
        finally:
            probe.close()
        if alive:
            raise MigrationRefused("another pathpacs process (a server?) is using this archive: stop the server first")
    if source is None:
        return
    pending, moves = source.pending(), source.moves()
    if pending or moves:
        raise MigrationRefused(
            f"{len(pending)} blobs pending and {len(moves)} tier moves in flight: stop the server first "
            "(a server that was killed resolves them when started and stopped once)")


def migrate(source: Index, target: Index, *, batch: int = BATCH,
            progress: Callable[[int], None] | None = None,
            phase: Callable[[str], None] | None = None) -> MigrationReport:
    """Copy everything `source` holds into `target`, then count both (see the module doc).
    `progress(n)` is called with instances done; `phase(text)` names each later step."""
    report = MigrationReport()
    say = phase or (lambda _text: None)
    _instances(source, target, batch, report, progress)
    say("copies and verified times")
    _copies(source, target)
    say("study flags and access times")
    for st in source.studies():
        flags = source.flags(st.uid)
        if flags:
            target.set_flags(st.uid, **flags)
        when = source.study_access(st.uid)
        if when:
            target.touch_study(st.uid, when)
    say("tokens and records")
    for tok in source.tokens():
        target.put_token(tok["id"], tok)
    for table in RECORD_TABLES:
        _records(source, target, table)
    say("rejections, kept versions, purge intents, fixity")
    _gen, marks, _purging = source.rejections()
    if marks:
        target.reject(marks)
    for version in source.versions():
        target.put_version(version)
    intents = source.purges()
    if intents:
        target.begin_purge(intents)
    seen = {_event_key(e) for e in target.fixity_events()}
    for event in source.fixity_events():
        if _event_key(event) not in seen:
            target.record_fixity(event)
    say("counting both indexes")
    report.source = counts(source)
    report.target = counts(target)
    return report


def _event_key(e) -> tuple:
    return (e.time, e.sop, e.what, tuple(e.blob))


def _instances(source: Index, target: Index, batch: int, report: MigrationReport,
               progress: Callable[[int], None] | None) -> None:
    """Every instance, study by study, in batches of `batch` per target transaction."""
    pending: list[NewInstance] = []
    damaged: list[tuple[InstanceRecord, str]] = []
    patients: dict[str, dict] = {}

    def flush() -> None:
        if pending:
            report.added += target.add_instances(pending)
            for rec, reason in damaged:  # a table refused since its blob failed its sha256
                target.set_frame_checksums(rec.sop, rec.blob, None, reason)
            if progress:
                progress(len(pending))
            pending.clear()
            damaged.clear()

    for study in source.studies():
        done = target.study(study.uid)
        if done is not None and (done.n_instances, done.bytes) == (study.n_instances, study.bytes):
            report.skipped += study.n_instances
            if progress:
                progress(study.n_instances)
            continue
        for rec, series_attrs in _received_order(source, study):
            if done is not None and target.instance(rec.sop) is not None:  # a study begun before: resume
                report.skipped += 1
                if progress:
                    progress(1)
                continue
            new, reason = _new_instance(source, rec, study, series_attrs, patients)
            pending.append(new)
            if reason:
                damaged.append((rec, reason))
            if len(pending) >= batch:
                flush()
    flush()


def _received_order(source: Index, study: StudyRecord) -> list[tuple[InstanceRecord, dict]]:
    """A study's instances with their series attributes, in the order they were received."""
    out = []
    for se in source.series_of_study(study.uid):
        out.extend((rec, dict(se.attrs)) for rec in source.instances_of_series(se.uid))
    return sorted(out, key=lambda item: (item[0].received, item[0].sop))


def _new_instance(source: Index, rec: InstanceRecord, study: StudyRecord, series_attrs: dict,
                  patients: dict[str, dict]) -> tuple[NewInstance, str | None]:
    """What ingest built for `rec`, rebuilt from the source index (no blob read); and the
    damage reason of its frame table, if it has one."""
    meta = source.metadata([rec.sop])
    doc_bytes = meta[0] if meta else md.dumps({})
    if rec.patient not in patients:
        prec = source.patient(rec.patient)
        if len(patients) > 10_000:
            patients.clear()
        patients[rec.patient] = (dict(prec.attrs) if prec is not None
                                 else md.subset(json.loads(doc_bytes), md.PATIENT_TAGS))
    frames: list[list[tuple[int, int]]] = []
    crcs: list[int] | None = []
    reason = None
    table = source.all_frames(rec.sop)
    if table is not None:
        frames = [list(f) for f in table.fragments if f is not None]
        crcs = [int(c) for c in table.crcs] if table.table.checked else None  # type: ignore[arg-type]
        reason = table.table.damaged
    new = NewInstance(rec, frames, crcs, doc_bytes, source.bulk_values(rec.sop),  # type: ignore[arg-type]
                      patients[rec.patient], dict(study.attrs), series_attrs)
    return new, reason


def _copies(source: Index, target: Index) -> None:
    """Replicas and the times each copy last verified intact (idempotent: safe to repeat)."""
    for rec in source.instances():
        copies = source.copies(rec.sop)
        have = set(target.copies(rec.sop)) if copies else set()
        for blob in copies:
            if blob not in have:
                target.add_copy(rec.sop, blob)
        for tier in {rec.blob.tier, *(c.tier for c in copies)}:
            when = source.verified(rec.sop, tier)
            if when:
                target.set_verified(rec.sop, tier, when)


def _records(source: Index, target: Index, table: str) -> None:
    chunk: dict[str, dict] = {}
    for key, rec in source.records(table):
        chunk[key] = rec
        if len(chunk) >= RECORD_BATCH:
            target.put_records(table, chunk)
            chunk = {}
    if chunk:
        target.put_records(table, chunk)


def counts(index: Index) -> dict[str, int]:
    """What the end-of-migration check compares: the hierarchy, frames, bytes, copies and every
    other kind of record an index holds."""
    s = index.stats()
    out = {"patients": s.patients, "studies": s.studies, "series": s.series, "instances": s.instances,
           "bytes": s.bytes}
    frames = copies = verified = 0
    for rec in index.instances():
        if rec.n_frames:
            table = index.all_frames(rec.sop)
            frames += len(table.fragments) if table is not None else 0
        blobs = index.copies(rec.sop)
        copies += len(blobs)
        verified += sum(index.verified(rec.sop, t) is not None for t in {rec.blob.tier, *(b.tier for b in blobs)})
    out.update(frames=frames, copies=copies, verified=verified)
    out["flagged studies"] = sum(bool(index.flags(st.uid)) for st in index.studies())
    out["tokens"] = len(index.tokens())
    for table in RECORD_TABLES:
        out[f"records {table}"] = sum(1 for _ in index.records(table))
    out["rejected"] = len(index.rejections()[1])
    out["kept versions"] = len(index.versions())
    out["purge intents"] = len(index.purges())
    out["fixity events"] = len(index.fixity_events())
    out["checksum todo"] = index.checksum_todo_count()
    return out


def summary(report: MigrationReport) -> Iterable[str]:
    """The counts, one line each, as the CLI prints them."""
    for key, n in report.target.items():
        yield f"{key:<22} {n}"
