"""The embedded index backend: LMDB (one memory-mapped file, multi-process safe, no setup).

An instance is visible if and only if its record is committed here. Every write is one LMDB
transaction; the CLI can work beside a running server. Reads are short: iterators read in
batches, each in its own transaction, so nothing holds the map open while a client is answered.

Databases (keys UTF-8):
  inst      sop -> JSON instance record (archive.records.InstanceRecord without its location)
  loc       sop -> "tier\\0key\\0transfer syntax": where the bytes are, recorded once
  frames    sop -> frame table (archive.index.frametable)
  meta      sop -> DICOM JSON metadata (BulkDataURIs start with metadata.BASE_TOKEN)
  bulk      sop \\0 path -> bulk value bytes
  study     study -> JSON study record      series  series -> JSON series record
  patient   patient key -> JSON patient record
  study_series   study \\0 series -> ''     series_inst   series \\0 sop -> ''
  patient_study  patient \\0 study -> ''
  study_idx      TAG=value \\0 study -> ''  (PatientID, AccessionNumber, StudyDate, lower-cased PatientName)
  pending        blob key -> JSON {"session", "tier"} (placed, record not committed yet)
  blob           blob key -> sop (which instance a blob belongs to)
  state          schema version
  todo_crc       sop -> ''  (frame tables still without CRC32C; schema 3 migration, resumable)
  fixity         ISO time \\0 sop -> JSON fixity event
  copies         sop \\0 tier -> JSON {"key", "created"}: further copies (replicas) of an instance
  moves          sop -> JSON move journal entry {"src", "dst", "state", "session", "time"}
  access         study -> ISO time of the last access (written at most once per interval)
  flags          study -> JSON {"pinned", "hold"}
  verified       sop \\0 tier -> ISO time the copy on that tier last re-hashed intact
  tokens         token id -> JSON API token record (sha256 of the secret, roles, studies, expiry,
                 revoked): a new table, created empty on open, so no schema change
  rejected       sop -> JSON rejection mark {"study", "series", "code", "time", "who", "note"}
                 (IOCM reject: hidden from all but administrators until restored or purged;
                 "note" is the SOP Instance UID of the rejection note, or "self" for a note)
  versions       sop \\0 time \\0 id -> JSON {"record", "copies", "time", "who"}: a version replaced
                 by on_conflict = "replace", kept (rejected) on its tiers until purged
  purges         key -> JSON purge intent {"kind": "instance"|"version", "sop", "blobs"}: written
                 before any copy is deleted, removed with the records (a rerun finishes it)
  state "rejected_gen": a counter bumped by every change of `rejected`/`purges` (processes
                 refresh their in-memory set of hidden UIDs when it moves)
  consult, consult_items, inbox, uidmap, consents, shares (base.RECORD_TABLES): key -> JSON record
                 of the consultation, de-identification and consent modules, through the generic
                 record operations (`put_record`, `update_record`, `records`...): new tables,
                 created empty on open, so no schema change
Study and series records count their instances per tier ("tiers": {name: n}) for availability.
Schema history: 1 the first; 2 PatientName joined study_idx; 3 CRC32C per frame; 4 the location
(tier, key, syntax) moved out of the instance record and the frame table into `loc`; 5 tier counts
in study and series records, copies, moves, access, flags, verified; 6 every component group of
PatientName (Alphabetic, Ideographic, Phonetic) in study_idx. (`rejected`, `versions` and
`purges` came without a schema step: they are new, empty tables created on open; no record of an
older archive changes.)
"""
from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lmdb

from .. import metadata as md
from ..records import (BlobRef, Frames, FrameTable, InstanceRecord, PatientRecord, SeriesRecord, Stats,
                       StudyRecord)
from ..status import SPACE_CHECKS, Outcome, out_of_space  # noqa: F401  (re-exported)
from . import frametable
from .base import RECORD_TABLES, AddResult, FixityEvent, NewInstance
from .stored import (CASE_FOLDED_TAGS, INDEXED_STUDY_TAGS, ORDERS, T_ACCESSION, T_PATIENT_ID,  # noqa: F401
                     T_PATIENT_NAME, T_SERIES_UID, T_SOP_UID, T_STUDY_DATE, T_STUDY_TIME, T_STUDY_UID,
                     count_tier, index_values, patient_record, series_record, stored_instance, study_record,
                     count_in_series, count_in_study, new_patient_record, new_series_record, new_study_record)

log = logging.getLogger("pathpacs.index")

DB_NAMES = [
    "inst", "loc", "frames", "meta", "bulk", "study", "series", "patient", "study_series",
    "series_inst", "patient_study", "study_idx", "pending", "blob", "state", "todo_crc", "fixity",
    "copies", "moves", "access", "flags", "verified", "tokens", "rejected", "versions", "purges",
] + list(RECORD_TABLES)
SEP = b"\x00"
SCHEMA = 6
BATCH = 512  # records per read transaction when iterating
FIRST_BATCH = 16

SORT_IN_MEMORY = 500  # narrowed to at most this many studies: read and sort them, no index walk


def _k(*parts: str) -> bytes:
    return SEP.join(p.encode() for p in parts)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _lmdb_out_of_space(exc: BaseException) -> bool:
    """LMDB's ways of saying its disk or its map is full."""
    if isinstance(exc, lmdb.MapFullError):
        return True
    if isinstance(exc, lmdb.Error):
        text = str(exc).lower()
        return "no space left" in text or "quota" in text or "file too large" in text
    return False


SPACE_CHECKS.append(_lmdb_out_of_space)


def _pack_loc(blob: BlobRef, ts: str) -> bytes:
    return f"{blob.tier}\0{blob.key}\0{ts}".encode()


def _unpack_loc(raw) -> tuple[BlobRef, str]:
    tier, key, ts = bytes(raw).decode().split("\0")
    return BlobRef(tier, key), ts


# -- record <-> stored JSON -----------------------------------------------------------------

def _instance_json(rec: InstanceRecord) -> bytes:
    return _dumps(stored_instance(rec))


def _instance(raw, loc) -> InstanceRecord:
    d = json.loads(raw)
    if loc is not None:
        blob, ts = _unpack_loc(loc)
        d["tier"], d["blob"], d["ts"] = blob.tier, blob.key, ts
    return InstanceRecord.from_json(d)


def _study_date(rec: StudyRecord) -> str:
    return str(md.first_value(rec.attrs, T_STUDY_DATE) or "")


def _date_order(rec: StudyRecord) -> tuple[str, str, str]:
    return _study_date(rec), str(md.first_value(rec.attrs, T_STUDY_TIME) or "").replace(":", ""), rec.uid


class LmdbIndex:
    """The Index protocol (archive.index.base) over one LMDB environment."""

    def __init__(self, path: Path, map_size: int = 1 << 40, readonly: bool = False) -> None:
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        self.env = lmdb.open(
            str(path), map_size=map_size, max_dbs=len(DB_NAMES) + 2, max_readers=1024,
            readonly=readonly, readahead=False, lock=True, create=not readonly,
        )
        self.db: dict[str, Any] = {}
        for name in DB_NAMES:
            try:
                self.db[name] = self.env.open_db(name.encode(), create=not readonly)
            except lmdb.NotFoundError:  # read-only open of an archive older than this table
                continue
        if not readonly:
            self._migrate()
        self._frames_db = self.db.get("frames")
        self._loc_db = self.db.get("loc")

    SCHEMA = SCHEMA

    def close(self) -> None:
        self.env.close()

    def schema_version(self) -> int:
        """The layout this index was written in (SCHEMA once an open by this release migrated it)."""
        return self._schema()

    # -- schema migrations ------------------------------------------------------------------
    def _schema(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(b"schema", db=self.db["state"]) if "state" in self.db else None
            if raw:
                return int(raw)
            return 1 if "study" in self.db and txn.stat(self.db["study"])["entries"] else SCHEMA

    def _set_schema(self, txn, version: int) -> None:
        txn.put(b"schema", str(version).encode(), db=self.db["state"])

    def _migrate(self) -> None:
        """Bring an index written by an older release up to SCHEMA, step by step, each step
        recorded when done (a crash resumes at the step it was in; every step is idempotent).
        Records are always kept."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"schema", db=self.db["state"])
            version = int(raw) if raw else (1 if txn.stat(self.db["study"])["entries"] else SCHEMA)
            if raw is None:  # releases up to schema 2 never wrote it for a new archive
                self._set_schema(txn, version)
        if version < 2:  # 2: PatientName joined the study key index
            with self.env.begin(write=True) as txn:
                txn.drop(self.db["study_idx"], delete=False)
                for study, d in self._iter_json(txn, "study"):
                    for tag in INDEXED_STUDY_TAGS:
                        for v in index_values(tag, d["attrs"]):
                            txn.put(_k(f"{tag}={v}", study), b"", db=self.db["study_idx"])
                self._set_schema(txn, 2)
        if version < 3:  # 3: CRC32C per frame; tables gain them in Archive.add_frame_checksums
            with self.env.begin(write=True) as txn:
                for key, val in txn.cursor(db=self.db["frames"]).iternext():
                    head = frametable.head(val)
                    if not head.checked and not head.damaged:
                        txn.put(key, b"", db=self.db["todo_crc"])
                self._set_schema(txn, 3)
        if version < 4:  # 4: the location is recorded once, in `loc`
            n = self._split_locations()
            with self.env.begin(write=True) as txn:
                self._set_schema(txn, 4)
            if n:
                log.info("index: recorded the location of %d instances once (schema 4)", n)
        if version < 5:  # 5: per-tier counts in study and series records
            self._count_tiers()
            with self.env.begin(write=True) as txn:
                self._set_schema(txn, 5)
        if version < 6:  # 6: every component group of PatientName in study_idx (ideographic names)
            with self.env.begin(write=True) as txn:
                for study, d in self._iter_json(txn, "study"):
                    for v in index_values(T_PATIENT_NAME, d["attrs"]):
                        txn.put(_k(f"{T_PATIENT_NAME}={v}", study), b"", db=self.db["study_idx"])
                self._set_schema(txn, 6)

    def _count_tiers(self) -> None:
        """Recompute every study's and series' instance count per tier from `loc`."""
        with self.env.begin(write=True) as txn:
            series_counts: dict[str, dict[str, int]] = {}
            study_counts: dict[str, dict[str, int]] = {}
            for key, val in txn.cursor(db=self.db["inst"]).iternext():
                d = json.loads(val)
                loc = txn.get(key, db=self.db["loc"])
                tier = _unpack_loc(loc)[0].tier if loc is not None else d.get("tier", "hot")
                for counts, uid in ((series_counts, d["series"]), (study_counts, d["study"])):
                    c = counts.setdefault(uid, {})
                    c[tier] = c.get(tier, 0) + 1
            for db, counts in (("series", series_counts), ("study", study_counts)):
                for uid, c in counts.items():
                    rec = self._get_json(txn, db, uid)
                    if rec is not None:
                        rec["tiers"] = c
                        txn.put(uid.encode(), _dumps(rec), db=self.db[db])

    def _split_locations(self) -> int:
        done = 0
        last = b""
        while True:
            with self.env.begin(write=True) as txn:
                cur = txn.cursor(db=self.db["inst"])
                if not (cur.set_range(last) if last else cur.first()):
                    return done
                batch = 0
                for key, val in cur.iternext():
                    if key == last:
                        continue
                    d = json.loads(val)
                    if "blob" in d:
                        txn.put(key, _pack_loc(BlobRef(d.pop("tier"), d.pop("blob")), d.pop("ts")), db=self.db["loc"])
                        txn.put(key, _dumps(d), db=self.db["inst"])
                        table = txn.get(key, db=self.db["frames"])
                        if table is not None:
                            head, frags, crcs = frametable.read_all(table)
                            txn.put(key, frametable.pack(frags, crcs if head.checked else None, head.damaged),
                                    db=self.db["frames"])
                        done += 1
                    last = key
                    batch += 1
                    if batch >= 2000:
                        break
                else:
                    return done

    # -- small helpers ----------------------------------------------------------------------
    def _get_json(self, txn, db: str, key: str) -> dict | None:
        raw = txn.get(key.encode(), db=self.db[db])
        return None if raw is None else json.loads(raw)

    def _iter_json(self, txn, db: str) -> Iterator[tuple[str, dict]]:
        for key, val in txn.cursor(db=self.db[db]).iternext():
            yield key.decode(), json.loads(val)

    def _children(self, txn, db: str, parent: str) -> list[str]:
        prefix = parent.encode() + SEP
        cur = txn.cursor(db=self.db[db])
        out = []
        if cur.set_range(prefix):
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                out.append(key[len(prefix):].decode())
        return out

    def _batched(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of `db` (keys starting with `prefix`), BATCH at a time, each batch in
        its own read transaction: no transaction is open between yields."""
        for batch in self._batches(db, prefix):
            yield from batch

    def _batches(self, db: str, prefix: bytes = b"") -> Iterator[list[tuple[bytes, bytes]]]:
        last: bytes | None = None
        size = FIRST_BATCH  # small first: a search with a limit stops early; then up to BATCH
        while True:
            batch: list[tuple[bytes, bytes]] = []
            with self.env.begin() as txn:
                cur = txn.cursor(db=self.db[db])
                found = cur.set_range(last) if last is not None else (cur.set_range(prefix) if prefix else cur.first())
                if not found:
                    return
                for key, val in cur.iternext():
                    if last is not None and key == last:
                        continue
                    if prefix and not key.startswith(prefix):
                        break
                    batch.append((key, val))
                    if len(batch) >= size:
                        break
            if not batch:
                return
            yield batch
            if len(batch) < size:
                return
            last = batch[-1][0]
            size = min(size * 2, BATCH)

    def _inst(self, txn, sop: str) -> InstanceRecord | None:
        raw = txn.get(sop.encode(), db=self.db["inst"])
        if raw is None:
            return None
        return _instance(raw, txn.get(sop.encode(), db=self.db["loc"]) if "loc" in self.db else None)

    # -- lookups ----------------------------------------------------------------------------
    def instance(self, sop: str) -> InstanceRecord | None:
        with self.env.begin() as txn:
            return self._inst(txn, sop)

    def series(self, uid: str) -> SeriesRecord | None:
        with self.env.begin() as txn:
            d = self._get_json(txn, "series", uid)
        return None if d is None else series_record(uid, d)

    def study(self, uid: str) -> StudyRecord | None:
        with self.env.begin() as txn:
            d = self._get_json(txn, "study", uid)
        return None if d is None else study_record(uid, d)

    def patient(self, key: str) -> PatientRecord | None:
        with self.env.begin() as txn:
            d = self._get_json(txn, "patient", key)
        return None if d is None else patient_record(key, d)

    def _table(self, txn, sop: str, buf, head: frametable.TableHead) -> FrameTable | None:
        if head.legacy:  # a read-only open of an archive not migrated yet
            return FrameTable(BlobRef(head.legacy["tier"], head.legacy["blob"]), head.legacy["ts"], head.n,
                              head.checked, head.damaged)
        loc = txn.get(sop.encode(), db=self.db["loc"])
        if loc is None:
            return None
        blob, ts = _unpack_loc(loc)
        return FrameTable(blob, ts, head.n, head.checked, head.damaged)

    def frames(self, sop: str, numbers: Sequence[int]) -> Frames | None:
        # The frame path: two gets from the memory map in one read transaction, no JSON.
        key = sop.encode()
        with self.env.begin(buffers=True) as txn:
            buf = txn.get(key, db=self._frames_db)
            if buf is None:
                return None
            head, frags, crcs = frametable.read(buf, numbers)
            if head.legacy:
                table = self._table(txn, sop, buf, head)
            else:
                loc = txn.get(key, db=self._loc_db)
                if loc is None:
                    return None
                tier, bkey, ts = bytes(loc).decode().split("\0")
                table = FrameTable(BlobRef(tier, bkey), ts, head.n, head.checked, head.damaged)
        return None if table is None else Frames(table, tuple(numbers), frags, crcs)

    def all_frames(self, sop: str) -> Frames | None:
        with self.env.begin(buffers=True) as txn:
            buf = txn.get(sop.encode(), db=self.db["frames"])
            if buf is None:
                return None
            head, frags, crcs = frametable.read_all(buf)
            table = self._table(txn, sop, buf, head)
        return None if table is None else Frames(table, tuple(range(1, head.n + 1)), frags, crcs)

    def metadata(self, sops: Sequence[str]) -> list[bytes]:
        out = []
        with self.env.begin() as txn:
            for sop in sops:
                raw = txn.get(sop.encode(), db=self.db["meta"])
                if raw is not None:
                    out.append(raw)
        return out

    def metadata_under(self, study: str, series: str | None = None) -> list[bytes] | None:
        """Stored metadata of every instance of a study (or of one series of it), read in one
        transaction from the hierarchy keys; None when the study/series is not there."""
        meta = self.db["meta"]
        with self.env.begin() as txn:
            if series is not None:
                d = self._get_json(txn, "series", series)
                if d is None or d["study"] != study:
                    return None
                series_list = [series]
            else:
                if txn.get(study.encode(), db=self.db["study"]) is None:
                    return None
                series_list = self._children(txn, "study_series", study)
            out = []
            for se in series_list:
                for sop in self._children(txn, "series_inst", se):
                    raw = txn.get(sop.encode(), db=meta)
                    if raw is not None:
                        out.append(raw)
            return out

    def bulk(self, sop: str, path: str) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(_k(sop, path), db=self.db["bulk"])

    # -- hierarchy --------------------------------------------------------------------------
    def forget(self, sop: str) -> None:
        """Nothing cached: every lookup reads the memory map."""

    def series_of_study(self, study: str) -> list[SeriesRecord]:
        with self.env.begin() as txn:
            out = []
            for uid in self._children(txn, "study_series", study):
                d = self._get_json(txn, "series", uid)
                if d is not None:
                    out.append(series_record(uid, d))
            return out

    def instances_of_series(self, series: str) -> list[InstanceRecord]:
        with self.env.begin() as txn:
            out = []
            for sop in self._children(txn, "series_inst", series):
                rec = self._inst(txn, sop)
                if rec is not None:
                    out.append(rec)
            return out

    def studies_of_patient(self, patient: str) -> list[StudyRecord]:
        with self.env.begin() as txn:
            out = []
            for uid in self._children(txn, "patient_study", patient):
                d = self._get_json(txn, "study", uid)
                if d is not None:
                    out.append(study_record(uid, d))
            return out

    def patients(self) -> Iterator[PatientRecord]:
        for key, val in self._batched("patient"):
            yield patient_record(key.decode(), json.loads(val))

    def studies(self) -> Iterator[StudyRecord]:
        for key, val in self._batched("study"):
            yield study_record(key.decode(), json.loads(val))

    def _all_series(self) -> Iterator[SeriesRecord]:
        for key, val in self._batched("series"):
            yield series_record(key.decode(), json.loads(val))

    def instances(self) -> Iterator[InstanceRecord]:
        for batch in self._batches("inst"):
            with self.env.begin() as txn:
                locs = [txn.get(k, db=self.db["loc"]) if "loc" in self.db else None for k, _v in batch]
            for (_k2, val), loc in zip(batch, locs):
                yield _instance(val, loc)

    def stats(self) -> Stats:
        by_tier: dict[str, int] = {}
        total = n = 0
        for rec in self.instances():
            by_tier[rec.blob.tier] = by_tier.get(rec.blob.tier, 0) + rec.size
            total += rec.size
            n += 1
        with self.env.begin() as txn:
            counts = {db: txn.stat(self.db[db])["entries"] for db in ("patient", "study", "series")}
        return Stats(counts["patient"], counts["study"], counts["series"], n, total, by_tier)

    # -- query candidate selection (the LMDB planner) ------------------------------------------
    def candidates(self, level: str, keys: Sequence[Any], *, study: str | None = None,
                   series: str | None = None, fuzzy: bool = False, order: str | None = None) -> Iterator[Any]:
        from ..query import STUDY_LEVEL_TAGS, uid_list  # the planner reads PS3.4 keys

        bykey = {k.tag: k for k in keys}
        if order is not None and order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        if level == "PATIENT":
            yield from self._patient_candidates(bykey)
        elif level == "STUDY" and order is not None:
            yield from self._studies_by_date(bykey, study, fuzzy, descending=order == "-date")
        elif level == "STUDY":
            yield from self._study_candidates(bykey, study, fuzzy)
        elif level == "SERIES":
            uids = [series] if series else uid_list(bykey, T_SERIES_UID)
            if uids is not None:
                for rec in self._lookup_series(uids):
                    if study is None or rec.study == study:
                        yield rec
            elif study is not None:
                yield from self.series_of_study(study)
            elif any(k.tag in STUDY_LEVEL_TAGS and not k.universal for k in keys):
                for st in self._study_candidates(bykey, None, fuzzy):
                    yield from self.series_of_study(st.uid)
            else:
                yield from self._all_series()
        else:
            uids = uid_list(bykey, T_SOP_UID)
            if uids is not None:
                for rec in self._lookup_instances(uids):
                    if (study is None or rec.study == study) and (series is None or rec.series == series):
                        yield rec
                return
            series_uids = [series] if series else uid_list(bykey, T_SERIES_UID)
            if series_uids is None:
                studies = [study] if study else uid_list(bykey, T_STUDY_UID)
                if studies is None:
                    studies = [s.uid for s in self._study_candidates(bykey, None, fuzzy)]
                for st in studies:
                    for se in self.series_of_study(st):
                        yield from self.instances_of_series(se.uid)
                return
            for se_rec in self._lookup_series(series_uids):
                if study is None or se_rec.study == study:
                    yield from self.instances_of_series(se_rec.uid)

    def _lookup_series(self, uids: Sequence[str]) -> list[SeriesRecord]:
        with self.env.begin() as txn:
            return [series_record(u, d) for u in uids if (d := self._get_json(txn, "series", u)) is not None]

    def _lookup_instances(self, uids: Sequence[str]) -> list[InstanceRecord]:
        with self.env.begin() as txn:
            return [r for u in uids if (r := self._inst(txn, u)) is not None]

    def _patient_candidates(self, bykey: dict) -> Iterator[PatientRecord]:
        from ..query import single_exact

        pid = single_exact(bykey, T_PATIENT_ID)
        if pid is None:
            yield from self.patients()
            return
        for key, val in self._batched("patient", f"{pid}^".encode()):
            yield patient_record(key.decode(), json.loads(val))

    def _study_candidates(self, bykey: dict, study: str | None, fuzzy: bool) -> Iterator[StudyRecord]:
        from ..query import RANGE_VRS, uid_list

        uids = [study] if study else uid_list(bykey, T_STUDY_UID)
        if uids is None:
            found = self._other_study_keys(bykey, fuzzy, patterns=False)
            if found is None:
                k = bykey.get(T_STUDY_DATE)
                if k is not None and not k.universal and k.values and len(k.values) == 1 and k.vr in RANGE_VRS:
                    q = k.values[0]
                    if "-" in q:
                        lo, hi = q.split("-", 1)
                        found = self._studies_by_key(T_STUDY_DATE, lo, hi or "99999999")
                    else:
                        found = self._studies_by_key(T_STUDY_DATE, q)
            if found is None:
                found = self._name_pattern(bykey, fuzzy)
            if found is None:
                yield from self.studies()
                return
            uids = sorted(found)
        i, step = 0, FIRST_BATCH
        while i < len(uids):
            with self.env.begin() as txn:
                batch = [study_record(u, d) for u in uids[i:i + step] if (d := self._get_json(txn, "study", u)) is not None]
            yield from batch
            i += step
            step = min(step * 2, BATCH)

    def _other_study_keys(self, bykey: dict, fuzzy: bool, patterns: bool = True) -> set[str] | None:
        """The studies an indexed key other than the date narrows the search to (patient ID,
        accession, a name or name prefix; with `patterns` also any other name pattern, by a scan
        of the name keys), or None when no such key is given."""
        from ..query import single_exact

        for tag in (T_PATIENT_ID, T_ACCESSION, T_PATIENT_NAME):
            if tag == T_PATIENT_NAME and fuzzy:
                continue  # fuzzy matches any name component: not an index prefix
            fold = str.lower if tag in CASE_FOLDED_TAGS else str
            v = single_exact(bykey, tag)
            if v is not None:
                return self._studies_by_key(tag, fold(v))
            k = bykey.get(tag)
            if k is not None and not k.universal and k.values and len(k.values) == 1:
                q = k.values[0]
                stem = re.split(r"[*?]", q, maxsplit=1)[0]
                if stem and q.endswith("*") and "?" not in q and q.count("*") == 1:
                    return self._studies_by_key(tag, fold(stem), prefix=True)
        return self._name_pattern(bykey, fuzzy) if patterns else None

    def _name_pattern(self, bykey: dict, fuzzy: bool) -> set[str] | None:
        """Studies whose indexed PatientName may match a wildcard pattern without a usable prefix
        (`*xiao*`, `sm?th`): a scan of the lower-cased name keys of study_idx only, matched as
        bytes with the pattern's literal pieces (C string searches, no decoding, no study record
        read), so the cost is the number of studies' names, not of their records. A superset:
        '?' is taken as '*', and both sides are lower-cased as the index is (final sigma as
        sigma); archive.query matches exactly afterwards. None when no such key is given."""
        k = bykey.get(T_PATIENT_NAME)
        if fuzzy or k is None or k.universal or not k.values or len(k.values) != 1:
            return None
        q = k.values[0]
        if "*" not in q and "?" not in q:
            return None
        pieces = [p.encode() for p in q.lower().replace("ς", "σ").replace("?", "*").split("*")]
        first, last, middle = pieces[0], pieces[-1], [p for p in pieces[1:-1] if p]
        least = sum(len(p) for p in pieces)
        base = f"{T_PATIENT_NAME}=".encode()
        n = len(base)
        sigma, final = "σ".encode(), "ς".encode()
        out: set[str] = set()
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["study_idx"])
            if not cur.set_range(base):
                return out
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(base):
                    break
                cut = key.index(SEP, n)
                value = key[n:cut]
                if final in value:
                    value = value.replace(final, sigma)
                if len(value) < least or not value.startswith(first) or not value.endswith(last):
                    continue
                pos, stop = len(first), len(value) - len(last)
                for piece in middle:
                    i = value.find(piece, pos, stop)
                    if i < 0:
                        break
                    pos = i + len(piece)
                else:
                    out.add(key[cut + 1:].decode())
        return out

    def _studies_by_date(self, bykey: dict, study: str | None, fuzzy: bool, *,
                         descending: bool) -> Iterator[StudyRecord]:
        """Study candidates in date order (see Index.candidates). A few candidates (UIDs named,
        or a patient ID, accession or name narrowing to at most SORT_IN_MEMORY studies) are read
        and sorted; otherwise the StudyDate keys of study_idx are walked in order (keys only, in
        batches, within the query's date range) and a study record is read only when its turn
        comes, so a first page costs the same at any archive size."""
        from ..query import RANGE_VRS, uid_list

        uids = [study] if study else uid_list(bykey, T_STUDY_UID)
        found = set(uids) if uids is not None else self._other_study_keys(bykey, fuzzy)
        if found is not None and len(found) <= SORT_IN_MEMORY:
            with self.env.begin() as txn:
                recs = [study_record(u, d) for u in found if (d := self._get_json(txn, "study", u)) is not None]
            dated = sorted((r for r in recs if _study_date(r)), key=_date_order, reverse=descending)
            yield from dated
            yield from sorted((r for r in recs if not _study_date(r)), key=lambda r: r.uid)
            return
        lo, hi = "", None
        k = bykey.get(T_STUDY_DATE)
        if k is not None and not k.universal and k.values and len(k.values) == 1 and k.vr in RANGE_VRS:
            q = k.values[0]
            lo, hi = q.split("-", 1) if "-" in q else (q, q)
            hi = hi or None
            lo = lo or "0"  # a date key never matches a study without a date
        undated: list[str] = []
        group: list[str] = []
        group_date = None
        for value, uid in self._date_keys(lo, hi, descending):
            if found is not None and uid not in found:
                continue
            if not value:
                undated.append(uid)
                continue
            if value != group_date and group:
                yield from self._dated_group(group, descending)
                group = []
            group_date = value
            group.append(uid)
        if group:
            yield from self._dated_group(group, descending)
        for i in range(0, len(undated), BATCH):
            with self.env.begin() as txn:
                batch = [study_record(u, d) for u in sorted(undated)[i:i + BATCH]
                         if (d := self._get_json(txn, "study", u)) is not None]
            yield from batch

    def _dated_group(self, uids: list[str], descending: bool) -> list[StudyRecord]:
        """The studies of one date, by StudyTime then UID."""
        with self.env.begin() as txn:
            recs = [study_record(u, d) for u in uids if (d := self._get_json(txn, "study", u)) is not None]
        return sorted(recs, key=_date_order, reverse=descending)

    def _date_keys(self, lo: str, hi: str | None, descending: bool) -> Iterator[tuple[str, str]]:
        """(StudyDate, study) from study_idx for dates in [lo, hi] (hi compared on its own
        precision, as query range matching does), ascending or descending; batches of keys, each
        batch in its own read transaction."""
        base = f"{T_STUDY_DATE}=".encode()
        lo_b = base + lo.encode()
        hi_b = base + (hi.encode() if hi is not None else b"") + b"\xff"  # exclusive
        last: bytes | None = None
        size = FIRST_BATCH * 4
        while True:
            batch: list[bytes] = []
            with self.env.begin() as txn:
                cur = txn.cursor(db=self.db["study_idx"])
                if descending:
                    start = last if last is not None else hi_b
                    ok = cur.prev() if cur.set_range(start) else cur.last()
                    keys = cur.iterprev(keys=True, values=False) if ok else iter(())
                else:
                    ok = cur.set_range(last if last is not None else lo_b)
                    keys = cur.iternext(keys=True, values=False) if ok else iter(())
                for key in keys:
                    if key == last:
                        continue
                    if key < lo_b or key >= hi_b:
                        break
                    batch.append(key)
                    if len(batch) >= size:
                        break
            for key in batch:
                value, _, uid = key[len(base):].partition(SEP)
                yield value.decode(), uid.decode()
            if len(batch) < size:
                return
            last = batch[-1]
            size = min(size * 2, 4096)

    def _studies_by_key(self, tag: str, lo: str, hi: str | None = None, prefix: bool = False) -> set[str]:
        """Studies whose indexed `tag` equals lo, starts with lo (prefix), or lies in [lo, hi]."""
        base = f"{tag}=".encode()
        start = base + lo.encode() + (b"" if prefix or hi is not None else SEP)
        out: set[str] = set()
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["study_idx"])
            if not cur.set_range(start):
                return out
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(base):
                    break
                value, _, uid = key[len(base):].partition(SEP)
                if hi is not None:
                    if value.decode() > hi:
                        break
                elif prefix:
                    if not value.startswith(lo.encode()):
                        break
                elif value != lo.encode():
                    break
                out.add(uid.decode())
        return out

    # -- writes -----------------------------------------------------------------------------
    def add_pending(self, blob: BlobRef, session: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(blob.key.encode(), _dumps({"session": session, "tier": blob.tier}), db=self.db["pending"])

    def clear_pending(self, blob: BlobRef) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(blob.key.encode(), db=self.db["pending"])

    def pending(self) -> list[tuple[BlobRef, str]]:
        out = []
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.db["pending"]).iternext():
                raw = bytes(v)
                if raw.startswith(b"{"):
                    d = json.loads(raw)
                    out.append((BlobRef(d.get("tier", "hot"), k.decode()), d["session"]))
                else:  # schema <= 3: the session alone, and the blob was on the hot tier
                    out.append((BlobRef("hot", k.decode()), raw.decode()))
        return out

    def blob_referenced(self, blob: BlobRef) -> bool:
        with self.env.begin() as txn:
            return txn.get(blob.key.encode(), db=self.db["blob"]) is not None

    def add_instance(self, new: NewInstance, *, replace: bool, session: str = "", who: str = "") -> AddResult:
        rec = new.record
        with self.env.begin(write=True) as txn:
            current = self._inst(txn, rec.sop)
            if current is not None:
                if current.sha256 == rec.sha256:
                    return AddResult(Outcome.DUPLICATE, current)
                if not replace:
                    return AddResult(Outcome.REJECTED, current)
                self._keep_version(txn, current, who)
            self._put(txn, new)
            txn.delete(rec.blob.key.encode(), db=self.db["pending"])
        return AddResult(Outcome.REPLACED if current is not None else Outcome.STORED, current)

    def add_instances(self, news) -> int:
        """Add many new instances in one transaction (index rebuilds, bulk loads); an instance
        already there is left as it is. Returns how many were added."""
        n = 0
        with self.env.begin(write=True) as txn:
            for new in news:
                if txn.get(new.record.sop.encode(), db=self.db["inst"]) is None:
                    self._put(txn, new)
                    n += 1
        return n

    def _put(self, txn, new: NewInstance) -> None:
        rec = new.record
        sop, study, series, patient = rec.sop, rec.study, rec.series, rec.patient
        db = self.db
        txn.put(sop.encode(), _instance_json(rec), db=db["inst"])
        txn.put(sop.encode(), _pack_loc(rec.blob, rec.ts), db=db["loc"])
        txn.put(rec.blob.key.encode(), sop.encode(), db=db["blob"])
        if new.frames:
            txn.put(sop.encode(), frametable.pack(new.frames, new.crcs), db=db["frames"])
            if new.crcs is None:  # a migrated table without CRC32C yet: the checksum pass adds them
                txn.put(sop.encode(), b"", db=db["todo_crc"])
        txn.put(sop.encode(), new.metadata, db=db["meta"])
        for path, value in new.bulk.items():
            txn.put(_k(sop, path), value, db=db["bulk"])
        txn.put(_k(series, sop), b"", db=db["series_inst"])

        srec = self._get_json(txn, "series", series)
        new_series = srec is None
        if srec is None:
            srec = new_series_record(new)
            txn.put(_k(study, series), b"", db=db["study_series"])
        count_in_series(srec, new)
        txn.put(series.encode(), _dumps(srec), db=db["series"])

        strec = self._get_json(txn, "study", study)
        new_study = strec is None
        if strec is None:
            strec = new_study_record(new)
            txn.put(_k(patient, study), b"", db=db["patient_study"])
            for tag in INDEXED_STUDY_TAGS:
                for v in index_values(tag, strec["attrs"]):
                    txn.put(_k(f"{tag}={v}", study), b"", db=db["study_idx"])
        count_in_study(strec, new, new_series)
        txn.put(study.encode(), _dumps(strec), db=db["study"])

        prec = self._get_json(txn, "patient", patient)
        if prec is None:
            prec = new_patient_record(new)
        prec["n_studies"] += int(new_study)
        txn.put(patient.encode(), _dumps(prec), db=db["patient"])

    def _remove(self, txn, sop: str) -> None:
        """Remove one instance and prune empty parents."""
        db = self.db
        rec = self._inst(txn, sop)
        if rec is None:
            return
        study, series, patient = rec.study, rec.series, rec.patient
        for name in ("inst", "loc", "frames", "todo_crc", "meta", "moves"):
            txn.delete(sop.encode(), db=db[name])
        for name in ("copies", "verified"):
            cur = txn.cursor(db=db[name])
            prefix = sop.encode() + SEP
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break
        txn.delete(rec.blob.key.encode(), db=db["blob"])
        cur = txn.cursor(db=db["bulk"])
        prefix = sop.encode() + SEP
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                if not cur.delete():
                    break
        txn.delete(_k(series, sop), db=db["series_inst"])
        srec = self._get_json(txn, "series", series)
        series_gone = False
        if srec is not None:
            srec["n_instances"] -= 1
            srec["bytes"] -= rec.size
            count_tier(srec, rec.blob.tier, -1)
            if srec["n_instances"] <= 0:
                txn.delete(series.encode(), db=db["series"])
                txn.delete(_k(study, series), db=db["study_series"])
                series_gone = True
            else:
                txn.put(series.encode(), _dumps(srec), db=db["series"])
        strec = self._get_json(txn, "study", study)
        if strec is None:
            return
        strec["n_instances"] -= 1
        strec["bytes"] -= rec.size
        count_tier(strec, rec.blob.tier, -1)
        strec["n_series"] -= int(series_gone)
        if series_gone:
            strec["modalities"] = sorted({
                m for s in self._children(txn, "study_series", study)
                for m in md.string_values((self._get_json(txn, "series", s) or {"attrs": {}})["attrs"].get("00080060"))
            })
        if strec["n_instances"] <= 0:
            patient = strec.get("patient", patient)  # the study's patient (an instance may name another)
            txn.delete(study.encode(), db=db["study"])
            txn.delete(_k(patient, study), db=db["patient_study"])
            for tag in INDEXED_STUDY_TAGS:
                for v in index_values(tag, strec["attrs"]):
                    txn.delete(_k(f"{tag}={v}", study), db=db["study_idx"])
            prec = self._get_json(txn, "patient", patient)
            if prec is not None:
                prec["n_studies"] -= 1
                if prec["n_studies"] <= 0:
                    txn.delete(patient.encode(), db=db["patient"])
                else:
                    txn.put(patient.encode(), _dumps(prec), db=db["patient"])
        else:
            txn.put(study.encode(), _dumps(strec), db=db["study"])

    # -- tiers: moves, copies, access, flags, fixity times (schema 5) -------------------------
    def move_begin(self, sop: str, src: BlobRef, dst: BlobRef, session: str) -> None:
        """Journal a move before any byte is copied: a crash leaves an entry the next start
        resolves (before the switch: the copy is deleted; after: the source is)."""
        entry = {"src": list(src), "dst": list(dst), "state": "copying", "session": session, "time": _now()}
        with self.env.begin(write=True) as txn:
            txn.put(sop.encode(), _dumps(entry), db=self.db["moves"])

    def move_switch(self, sop: str, src: BlobRef, dst: BlobRef) -> bool:
        """Point the instance at `dst` (in one transaction with its tier counts and the
        journal), if it is still at `src`. False: it moved or changed meanwhile."""
        with self.env.begin(write=True) as txn:
            rec = self._inst(txn, sop)
            if rec is None or rec.blob != src:
                return False
            txn.put(sop.encode(), _pack_loc(dst, rec.ts), db=self.db["loc"])
            txn.delete(src.key.encode(), db=self.db["blob"])
            txn.put(dst.key.encode(), sop.encode(), db=self.db["blob"])
            for db, uid in (("series", rec.series), ("study", rec.study)):
                d = self._get_json(txn, db, uid)
                if d is not None:
                    count_tier(d, src.tier, -1)
                    count_tier(d, dst.tier, 1)
                    txn.put(uid.encode(), _dumps(d), db=self.db[db])
            entry = self._get_json(txn, "moves", sop)
            if entry is not None:
                entry["state"] = "switched"
                txn.put(sop.encode(), _dumps(entry), db=self.db["moves"])
            txn.delete(_k(sop, dst.tier), db=self.db["copies"])  # it is the primary now
            return True

    def move_end(self, sop: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(sop.encode(), db=self.db["moves"])

    def moves(self) -> list[tuple[str, BlobRef, BlobRef, str, str]]:
        """Journal entries: (sop, src, dst, state, session)."""
        out = []
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.db["moves"]).iternext():
                d = json.loads(v)
                out.append((k.decode(), BlobRef(*d["src"]), BlobRef(*d["dst"]), d["state"], d["session"]))
        return out

    def add_copy(self, sop: str, blob: BlobRef) -> bool:
        """Record a further (verified) copy of an instance; False if the instance is gone."""
        with self.env.begin(write=True) as txn:
            if txn.get(sop.encode(), db=self.db["inst"]) is None:
                return False
            txn.put(_k(sop, blob.tier), _dumps({"key": blob.key, "created": _now()}), db=self.db["copies"])
            txn.put(blob.key.encode(), sop.encode(), db=self.db["blob"])
            return True

    def drop_copy(self, sop: str, tier: str) -> BlobRef | None:
        with self.env.begin(write=True) as txn:
            raw = txn.get(_k(sop, tier), db=self.db["copies"])
            if raw is None:
                return None
            blob = BlobRef(tier, json.loads(raw)["key"])
            txn.delete(_k(sop, tier), db=self.db["copies"])
            txn.delete(blob.key.encode(), db=self.db["blob"])
            return blob

    def copies(self, sop: str) -> list[BlobRef]:
        prefix = sop.encode() + SEP
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.db["copies"])
            if cur.set_range(prefix):
                for k, v in cur.iternext():
                    if not k.startswith(prefix):
                        break
                    out.append(BlobRef(k[len(prefix):].decode(), json.loads(v)["key"]))
        return out

    def touch_study(self, study: str, when: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(study.encode(), when.encode(), db=self.db["access"])

    def study_access(self, study: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(study.encode(), db=self.db["access"])
        return None if raw is None else raw.decode()

    def set_flags(self, study: str, **flags: bool) -> dict[str, bool]:
        with self.env.begin(write=True) as txn:
            d = self._get_json(txn, "flags", study) or {}
            d.update(flags)
            d = {k: v for k, v in d.items() if v}
            if d:
                txn.put(study.encode(), _dumps(d), db=self.db["flags"])
            else:
                txn.delete(study.encode(), db=self.db["flags"])
            return d

    def flags(self, study: str) -> dict[str, bool]:
        with self.env.begin() as txn:
            return self._get_json(txn, "flags", study) or {}

    def set_verified(self, sop: str, tier: str, when: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(_k(sop, tier), when.encode(), db=self.db["verified"])

    def verified(self, sop: str, tier: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(_k(sop, tier), db=self.db["verified"])
        return None if raw is None else raw.decode()

    # -- API tokens (archive.tokens: records hold a hash of the secret, never the secret) -----
    def put_token(self, token_id: str, record: dict) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(token_id.encode(), _dumps(record), db=self.db["tokens"])

    def token(self, token_id: str) -> dict | None:
        if "tokens" not in self.db:  # read-only open of an archive older than tokens
            return None
        with self.env.begin() as txn:
            return self._get_json(txn, "tokens", token_id)

    def tokens(self) -> list[dict]:
        if "tokens" not in self.db:
            return []
        return [json.loads(v) for _k2, v in self._batched("tokens")]

    # -- generic records of the modules above the index (base.RECORD_TABLES) -----------------
    def _table_db(self, table: str):
        if table not in RECORD_TABLES:
            raise KeyError(f"no record table {table!r}")
        return self.db.get(table)

    def put_record(self, table: str, key: str, record: dict) -> None:
        self.put_records(table, {key: record})

    def put_records(self, table: str, records: Mapping[str, dict]) -> None:
        db = self._table_db(table)
        with self.env.begin(write=True) as txn:
            for key, record in records.items():
                txn.put(key.encode(), _dumps(record), db=db)

    def record(self, table: str, key: str) -> dict | None:
        db = self._table_db(table)
        if db is None:  # read-only open of an archive older than this table
            return None
        with self.env.begin() as txn:
            raw = txn.get(key.encode(), db=db)
        return None if raw is None else json.loads(raw)

    def update_record(self, table: str, key: str, change) -> dict | None:
        db = self._table_db(table)
        with self.env.begin(write=True) as txn:
            raw = txn.get(key.encode(), db=db)
            new = change(None if raw is None else json.loads(raw))
            if new is None:
                if raw is not None:
                    txn.delete(key.encode(), db=db)
            else:
                txn.put(key.encode(), _dumps(new), db=db)
        return new

    def delete_record(self, table: str, key: str) -> bool:
        db = self._table_db(table)
        with self.env.begin(write=True) as txn:
            return txn.delete(key.encode(), db=db)

    def records(self, table: str, prefix: str = "") -> Iterator[tuple[str, dict]]:
        if self._table_db(table) is None:
            return
        for k, v in self._batched(table, prefix.encode()):
            yield bytes(k).decode(), json.loads(v)

    def backup(self, directory: Path) -> Path:
        """A consistent copy of the index while it is in use (LMDB's own copy, compacted)."""
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise FileExistsError(f"{directory} is not empty")
        self.env.copy(str(directory), compact=True)
        return directory / "data.mdb"

    # -- frame checksum migration (schema 3) and fixity events -----------------------------
    def checksum_todo(self, limit: int) -> list[str]:
        if "todo_crc" not in self.db:
            return []
        with self.env.begin() as txn:
            out = []
            for key in txn.cursor(db=self.db["todo_crc"]).iternext(keys=True, values=False):
                out.append(key.decode())
                if len(out) >= limit:
                    break
            return out

    def checksum_todo_count(self) -> int:
        if "todo_crc" not in self.db:
            return 0
        with self.env.begin() as txn:
            return txn.stat(self.db["todo_crc"])["entries"]

    def set_frame_checksums(self, sop: str, blob: BlobRef, crcs: list[int] | None,
                            damaged: str | None = None) -> bool:
        with self.env.begin(write=True) as txn:
            txn.delete(sop.encode(), db=self.db["todo_crc"])
            raw = txn.get(sop.encode(), db=self.db["frames"])
            loc = txn.get(sop.encode(), db=self.db["loc"])
            if raw is None or loc is None:
                return False
            head, frags, _ = frametable.read_all(raw)
            if _unpack_loc(loc)[0] != blob or head.checked:
                return False
            txn.put(sop.encode(), frametable.pack(frags, crcs, damaged), db=self.db["frames"])
            return True

    def record_fixity(self, event: FixityEvent) -> None:
        if "fixity" not in self.db or self.readonly:
            return
        d = {"time": event.time, "sop": event.sop, "blob": event.blob.key, "tier": event.blob.tier,
             "what": event.what, "source": event.source}
        with self.env.begin(write=True) as txn:
            txn.put(_k(event.time, event.sop), _dumps(d), db=self.db["fixity"])

    def fixity_events(self) -> list[FixityEvent]:
        if "fixity" not in self.db:
            return []
        with self.env.begin() as txn:
            out = []
            for _key, v in txn.cursor(db=self.db["fixity"]).iternext():
                d = json.loads(v)
                out.append(FixityEvent(d["time"], d["sop"], BlobRef(d["tier"], d["blob"]), d["what"], d["source"]))
            return out

    # -- moving an index to another backend (archive.index.migrate) -------------------------
    def bulk_values(self, sop: str) -> dict[str, bytes]:
        prefix = sop.encode() + SEP
        return {bytes(k[len(prefix):]).decode(): bytes(v) for k, v in self._batched("bulk", prefix)}

    def put_version(self, entry: Mapping[str, Any]) -> bool:
        rec = entry["record"]
        d = {"record": rec.to_json() if isinstance(rec, InstanceRecord) else dict(rec),
             "copies": [list(c) for c in entry["copies"]], "time": entry["time"], "who": entry.get("who", "")}
        with self.env.begin(write=True) as txn:
            if txn.get(entry["key"].encode(), db=self.db["versions"]) is not None:
                return False
            txn.put(entry["key"].encode(), _dumps(d), db=self.db["versions"])
            for blob_key in [d["record"]["blob"]] + [c[1] for c in d["copies"]]:  # never swept
                txn.put(blob_key.encode(), d["record"]["sop"].encode(), db=self.db["blob"])
            self._bump(txn)
            return True

    # -- rejection (IOCM), replaced versions, purge intents ---------------------------------
    def _bump(self, txn) -> None:
        raw = txn.get(b"rejected_gen", db=self.db["state"])
        txn.put(b"rejected_gen", str(int(raw or 0) + 1).encode(), db=self.db["state"])

    def _keep_version(self, txn, current: InstanceRecord, who: str) -> None:
        """The replaced instance, kept whole (record, location, copies) as a rejected version;
        its frame table, metadata and bulk values go with the record (restore re-reads the blob)."""
        copies = []
        cur = txn.cursor(db=self.db["copies"])
        prefix = current.sop.encode() + SEP
        if cur.set_range(prefix):
            for k, v in cur.iternext():
                if not k.startswith(prefix):
                    break
                copies.append([k[len(prefix):].decode(), json.loads(v)["key"]])
        now = _now()
        entry = {"record": current.to_json(), "copies": copies, "time": now, "who": who}
        self._remove(txn, current.sop)
        key = _k(current.sop, now, uuid.uuid4().hex[:8])
        txn.put(key, _dumps(entry), db=self.db["versions"])
        for blob_key in [current.blob.key] + [c[1] for c in copies]:  # still referenced: never swept
            txn.put(blob_key.encode(), current.sop.encode(), db=self.db["blob"])
        self._bump(txn)

    def reject(self, marks: Mapping[str, Mapping[str, Any]]) -> int:
        if not marks:
            return 0
        n = 0
        with self.env.begin(write=True) as txn:
            for sop, mark in marks.items():
                if txn.get(sop.encode(), db=self.db["inst"]) is None:
                    continue
                if txn.get(sop.encode(), db=self.db["rejected"]) is not None:
                    continue  # the first reject stands (its time counts for purge)
                txn.put(sop.encode(), _dumps(dict(mark)), db=self.db["rejected"])
                n += 1
            self._bump(txn)
        return n

    def unreject(self, sops: Sequence[str]) -> int:
        n = 0
        with self.env.begin(write=True) as txn:
            for sop in sops:
                if txn.get(sop.encode(), db=self.db["purges"]) is not None:
                    continue  # a purge under way is finished, never undone half-way
                n += bool(txn.delete(sop.encode(), db=self.db["rejected"]))
            self._bump(txn)
        return n

    def rejection_generation(self) -> int:
        if "rejected" not in self.db:
            return 0
        with self.env.begin() as txn:
            raw = txn.get(b"rejected_gen", db=self.db["state"])
        return int(raw or 0)

    def rejections(self) -> tuple[int, dict[str, dict], set[str]]:
        if "rejected" not in self.db:
            return 0, {}, set()
        with self.env.begin() as txn:
            gen = int(txn.get(b"rejected_gen", db=self.db["state"]) or 0)
            marks = {k.decode(): json.loads(v) for k, v in txn.cursor(db=self.db["rejected"]).iternext()}
            purging = {json.loads(v)["sop"] for _k2, v in txn.cursor(db=self.db["purges"]).iternext()
                       if json.loads(v)["kind"] == "instance"}
        return gen, marks, purging

    def versions(self, sop: str | None = None) -> list[dict]:
        if "versions" not in self.db:
            return []
        out = []
        prefix = b"" if sop is None else sop.encode() + SEP
        for k, v in self._batched("versions", prefix):
            d = json.loads(v)
            d["key"] = k.decode()
            d["record"] = InstanceRecord.from_json(d["record"])
            d["copies"] = [BlobRef(*c) for c in d["copies"]]
            out.append(d)
        return out

    def drop_version(self, key: str) -> bool:
        """Forget a kept version (restored as the current one, or purged); its blob keys too."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(key.encode(), db=self.db["versions"])
            if raw is None:
                return False
            d = json.loads(raw)
            for blob_key in [d["record"]["blob"]] + [c[1] for c in d["copies"]]:
                cur = self._inst(txn, d["record"]["sop"])
                if cur is None or cur.blob.key != blob_key:
                    txn.delete(blob_key.encode(), db=self.db["blob"])
            txn.delete(key.encode(), db=self.db["versions"])
            self._bump(txn)
            return True

    def begin_purge(self, intents: Mapping[str, Mapping[str, Any]]) -> None:
        with self.env.begin(write=True) as txn:
            for key, intent in intents.items():
                txn.put(key.encode(), _dumps(dict(intent)), db=self.db["purges"])
            self._bump(txn)

    def purges(self) -> dict[str, dict]:
        if "purges" not in self.db:
            return {}
        with self.env.begin() as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=self.db["purges"]).iternext()}

    def finish_purge(self, key: str) -> bool:
        """In one transaction: the records of a purged instance (parents updated or removed
        when empty, its rejection mark, copies, access time and flags of a study left empty) or
        of a purged version, and the purge intent."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(key.encode(), db=self.db["purges"])
            if raw is None:
                return False
            intent = json.loads(raw)
            sop = intent["sop"]
            if intent["kind"] == "instance":
                rec = self._inst(txn, sop)
                self._remove(txn, sop)
                txn.delete(sop.encode(), db=self.db["rejected"])
                if rec is not None and txn.get(rec.study.encode(), db=self.db["study"]) is None:
                    txn.delete(rec.study.encode(), db=self.db["access"])
                if rec is not None:  # an instance whose Patient ID differs from its study's left a record
                    prec = self._get_json(txn, "patient", rec.patient)
                    if prec is not None and prec["n_studies"] <= 0 and not self._children(txn, "patient_study", rec.patient):
                        txn.delete(rec.patient.encode(), db=self.db["patient"])
            else:
                vraw = txn.get(intent["version"].encode(), db=self.db["versions"])
                if vraw is not None:
                    d = json.loads(vraw)
                    cur = self._inst(txn, sop)
                    for blob_key in [d["record"]["blob"]] + [c[1] for c in d["copies"]]:
                        if cur is None or cur.blob.key != blob_key:
                            txn.delete(blob_key.encode(), db=self.db["blob"])
                    txn.delete(intent["version"].encode(), db=self.db["versions"])
            txn.delete(key.encode(), db=self.db["purges"])
            self._bump(txn)
            return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
