"""The embedded index (LMDB): hierarchy, query keys, frame tables, precomputed metadata.

An instance is visible if and only if its record is committed here. Every write is one
LMDB transaction; LMDB is multi-process safe, so the CLI can work beside a running server.

Databases (all keys are UTF-8):
  inst      sop -> JSON instance record (blob, tier, sha256, size, study, series, ...)
  frames    sop -> frame table: JSON header line + packed little-endian (offset, length) u64 pairs
  meta      sop -> DICOM JSON metadata (bytes, BulkDataURIs start with metadata.BASE_TOKEN)
  bulk      sop \\0 path -> bulk value bytes
  study     study -> JSON study record (attrs, counts, modalities)
  series    series -> JSON series record
  patient   patient key -> JSON patient record
  study_series   study \\0 series -> ''
  series_inst    series \\0 sop -> ''
  patient_study  patient \\0 study -> ''
  study_idx      TAG=value \\0 study -> ''  (PatientID, AccessionNumber, StudyDate, lower-cased PatientName)
  pending        blob key -> session (blob placed, record not yet committed)
  blob           blob key -> sop (which instance a blob belongs to)
  state          misc keys (schema version)
  todo_crc       sop -> ''  (frame tables still without CRC32C: schema 3 migration, resumable)
  fixity         ISO time \\0 sop -> JSON fixity event (damage found by a read, verify or migration)
"""
from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import lmdb

from . import metadata as md

DB_NAMES = [
    "inst", "frames", "meta", "bulk", "study", "series", "patient", "study_series",
    "series_inst", "patient_study", "study_idx", "pending", "blob", "state", "todo_crc", "fixity",
]
INDEXED_STUDY_TAGS = {"00100020": "PatientID", "00080050": "AccessionNumber", "00080020": "StudyDate",
                      "00100010": "PatientName"}
CASE_FOLDED_TAGS = {"00100010"}  # person names match case-insensitively: indexed lower-cased


def index_values(tag: str, attrs: dict) -> list[str]:
    values = md.string_values(attrs.get(tag)) or [""]
    return [v.lower() for v in values] if tag in CASE_FOLDED_TAGS else values
SEP = b"\x00"
SCHEMA = 3  # bump when the layout changes; Index migrates on open (see _migrate)


def _k(*parts: str) -> bytes:
    return SEP.join(p.encode() for p in parts)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class FrameLocation:
    blob: str
    tier: str
    transfer_syntax: str
    fragments: list[tuple[int, int]]
    crc: int | None = None  # CRC32C of the frame's bytes; None in a table not yet migrated


# Frame table format (value of the `frames` database):
#   one JSON header line {"blob", "tier", "ts", "n", "single", "v"[, "damaged"]} + "\n" + body
#   v 1 (schema <= 2): single -> n x <QQ (offset, length); else JSON [[[off, len], ...], ...]
#   v 2 (schema 3):    single -> n x <QQI (offset, length, crc32c); else JSON {"f": frames, "c": crcs}
# "damaged" (a reason) marks a v1 table whose blob failed its sha256 when checksums were added:
# its frames are refused, never served unchecked.
_QQ = struct.Struct("<QQ")
_QQI = struct.Struct("<QQI")


def pack_frames(blob: str, tier: str, ts: str, frames: list[list[tuple[int, int]]],
                crcs: list[int] | None = None, damaged: str | None = None) -> bytes:
    single = all(len(f) == 1 for f in frames)
    head: dict[str, Any] = {"blob": blob, "tier": tier, "ts": ts, "n": len(frames), "single": single,
                            "v": 2 if crcs is not None else 1}
    if damaged:
        head["damaged"] = damaged
    if crcs is None:
        body = b"".join(_QQ.pack(f[0][0], f[0][1]) for f in frames) if single else _dumps(frames)
    elif single:
        body = b"".join(_QQI.pack(f[0][0], f[0][1], c) for f, c in zip(frames, crcs))
    else:
        body = _dumps({"f": frames, "c": crcs})
    return _dumps(head) + b"\n" + body


class FrameTable:
    """The header of one instance's frame table: where its blob is and how many frames."""

    __slots__ = ("blob", "tier", "ts", "n", "checked", "damaged")

    def __init__(self, blob: str, tier: str, ts: str, n: int, checked: bool = False,
                 damaged: str | None = None) -> None:
        self.blob, self.tier, self.ts, self.n = blob, tier, ts, n
        self.checked = checked  # frames carry CRC32C
        self.damaged = damaged


def read_frame_table(buf, numbers) -> tuple[FrameTable, list[list[tuple[int, int]] | None], list[int | None]]:
    """Parse a packed frame table (bytes or LMDB buffer): its header, the fragments of each
    1-based frame in `numbers` (None when out of range) and their CRC32C (None when the
    table predates checksums). Only the slots asked for are read."""
    head_end = bytes(buf[:512]).find(b"\n")
    if head_end < 0:
        head_end = bytes(buf).index(b"\n")
    head = json.loads(bytes(buf[:head_end]))
    checked = head.get("v", 1) >= 2
    table = FrameTable(head["blob"], head["tier"], head["ts"], head["n"], checked, head.get("damaged"))
    n = head["n"]
    out: list[list[tuple[int, int]] | None] = []
    crcs: list[int | None] = []
    base = head_end + 1
    if head["single"] and checked:
        for k in numbers:
            if 1 <= k <= n:
                off, length, crc = _QQI.unpack_from(buf, base + 20 * (k - 1))
                out.append([(off, length)])
                crcs.append(crc)
            else:
                out.append(None)
                crcs.append(None)
    elif head["single"]:
        for k in numbers:
            out.append([_QQ.unpack_from(buf, base + 16 * (k - 1))] if 1 <= k <= n else None)
            crcs.append(None)
    else:
        body = json.loads(bytes(buf[base:]))
        frames, all_crcs = (body["f"], body["c"]) if checked else (body, None)
        for k in numbers:
            ok = 1 <= k <= n
            out.append([tuple(x) for x in frames[k - 1]] if ok else None)
            crcs.append(all_crcs[k - 1] if ok and all_crcs is not None else None)
    return table, out, crcs


def all_fragments(buf) -> list[list[tuple[int, int]]]:
    """Every frame's fragments of a packed table (for migration and checks)."""
    head_end = bytes(buf[:512]).find(b"\n")
    head = json.loads(bytes(buf[:head_end]))
    _, frags, _ = read_frame_table(buf, range(1, head["n"] + 1))
    return [f for f in frags if f is not None]


def out_of_space(exc: BaseException) -> bool:
    """True when `exc` means the index (or a file) ran out of disk space or map size."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if isinstance(exc, lmdb.MapFullError):
        return True
    if isinstance(exc, lmdb.Error):
        text = str(exc).lower()
        return "no space left" in text or "quota" in text or "file too large" in text
    return False


class Index:
    """Thin typed layer over the LMDB environment."""

    def __init__(self, path: Path, map_size: int = 1 << 40, readonly: bool = False) -> None:
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        self.env = lmdb.open(
            str(path), map_size=map_size, max_dbs=len(DB_NAMES) + 2, max_readers=1024,
            readonly=readonly, readahead=False, lock=True, create=not readonly,
        )
        self.db = {}
        for name in DB_NAMES:
            try:
                self.db[name] = self.env.open_db(name.encode(), create=not readonly)
            except lmdb.NotFoundError:  # read-only open of an archive older than this table
                continue
        if not readonly:
            self._migrate()

    def _migrate(self) -> None:
        """Bring an index written by an older release up to SCHEMA (records are always kept)."""
        with self.write() as txn:
            raw = txn.get(b"schema", db=self.db["state"])
            version = int(raw) if raw else (1 if txn.stat(self.db["study"])["entries"] else SCHEMA)
            if version < 2:  # 2: PatientName joined the study key index
                txn.drop(self.db["study_idx"], delete=False)
                for study, rec in list(self.iter_records("study", txn)):
                    for tag in INDEXED_STUDY_TAGS:
                        for v in index_values(tag, rec["attrs"]):
                            txn.put(_k(f"{tag}={v}", study), b"", db=self.db["study_idx"])
            if version < 3:  # 3: CRC32C per frame; tables gain them in Archive.add_frame_checksums
                cur = txn.cursor(db=self.db["frames"])
                for key, val in cur.iternext():
                    head = json.loads(bytes(val[:bytes(val[:512]).find(b"\n")]))
                    if head.get("v", 1) < 2 and not head.get("damaged"):
                        txn.put(key, b"", db=self.db["todo_crc"])
            if raw is None or version != SCHEMA:  # releases up to schema 2 never wrote it for new archives
                txn.put(b"schema", str(SCHEMA).encode(), db=self.db["state"])

    def close(self) -> None:
        self.env.close()

    def read(self) -> lmdb.Transaction:
        return self.env.begin()

    def write(self) -> lmdb.Transaction:
        return self.env.begin(write=True)

    # -- single lookups --------------------------------------------------
    def _json(self, txn: lmdb.Transaction, db: str, key: str) -> dict | None:
        raw = txn.get(key.encode(), db=self.db[db])
        return None if raw is None else json.loads(raw)

    def _record(self, db: str, key: str, txn: lmdb.Transaction | None) -> dict | None:
        if txn is None:
            with self.read() as t:
                return self._json(t, db, key)
        return self._json(txn, db, key)

    def instance(self, sop: str, txn: lmdb.Transaction | None = None) -> dict | None:
        return self._record("inst", sop, txn)

    def study(self, uid: str, txn: lmdb.Transaction | None = None) -> dict | None:
        return self._record("study", uid, txn)

    def series(self, uid: str, txn: lmdb.Transaction | None = None) -> dict | None:
        return self._record("series", uid, txn)

    def patient(self, key: str, txn: lmdb.Transaction | None = None) -> dict | None:
        return self._record("patient", key, txn)

    def locate_frames(self, sop: str, numbers
                      ) -> tuple[FrameTable, list[list[tuple[int, int]] | None], list[int | None]] | None:
        """(table header, fragments per requested frame or None, their CRC32C) straight from
        the memory map; None when the instance has no frame table."""
        with self.env.begin(buffers=True) as t:
            buf = t.get(sop.encode(), db=self.db["frames"])
            return None if buf is None else read_frame_table(buf, numbers)

    def frame(self, sop: str, number: int) -> FrameLocation | None:
        located = self.locate_frames(sop, [number])
        if located is None or located[1][0] is None:
            return None
        table, [frags], [crc] = located
        return FrameLocation(table.blob, table.tier, table.ts, frags, crc)

    def frame_table(self, sop: str, txn: lmdb.Transaction | None = None) -> bytes | None:
        if txn is None:
            with self.read() as t:
                return t.get(sop.encode(), db=self.db["frames"])
        return txn.get(sop.encode(), db=self.db["frames"])

    # -- frame checksum migration (schema 3) and fixity events -------------------------
    def checksum_todo(self, limit: int | None = None) -> list[str]:
        """Instances whose frame tables still lack CRC32C (oldest archives first)."""
        if "todo_crc" not in self.db:
            return []
        with self.read() as t:
            cur = t.cursor(db=self.db["todo_crc"])
            out = []
            for key in cur.iternext(keys=True, values=False):
                out.append(key.decode())
                if limit is not None and len(out) >= limit:
                    break
            return out

    def checksum_todo_count(self) -> int:
        if "todo_crc" not in self.db:
            return 0
        with self.read() as t:
            return t.stat(self.db["todo_crc"])["entries"]

    def set_frame_checksums(self, sop: str, blob: str, crcs: list[int] | None, damaged: str | None = None) -> bool:
        """Rewrite a v1 frame table with CRCs (or mark it damaged) if the instance still has
        that blob; always drops `sop` from the to-do list. False when nothing was rewritten."""
        with self.write() as txn:
            txn.delete(sop.encode(), db=self.db["todo_crc"])
            raw = txn.get(sop.encode(), db=self.db["frames"])
            if raw is None:
                return False
            table, _, _ = read_frame_table(raw, [])
            if table.blob != blob or table.checked:
                return False
            frames = all_fragments(raw)
            txn.put(sop.encode(), pack_frames(table.blob, table.tier, table.ts, frames, crcs, damaged),
                    db=self.db["frames"])
            return True

    def record_fixity(self, sop: str, blob: str, tier: str, what: str, source: str) -> None:
        """Persist a fixity event: damage found by a frame read, a stream, verify or migration."""
        if "fixity" not in self.db or self.readonly:
            return
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        event = {"time": now, "sop": sop, "blob": blob, "tier": tier, "what": what, "source": source}
        with self.write() as txn:
            txn.put(_k(now, sop), _dumps(event), db=self.db["fixity"])

    def fixity_events(self) -> list[dict]:
        if "fixity" not in self.db:
            return []
        with self.read() as t:
            return [json.loads(v) for _k2, v in t.cursor(db=self.db["fixity"]).iternext()]

    def metadata(self, sop: str, txn: lmdb.Transaction | None = None) -> bytes | None:
        if txn is None:
            with self.read() as t:
                return t.get(sop.encode(), db=self.db["meta"])
        return txn.get(sop.encode(), db=self.db["meta"])

    def bulk(self, sop: str, path: str) -> bytes | None:
        with self.read() as t:
            return t.get(_k(sop, path), db=self.db["bulk"])

    # -- iteration -------------------------------------------------------
    def _children(self, txn: lmdb.Transaction, db: str, parent: str) -> Iterator[str]:
        prefix = parent.encode() + SEP
        cur = txn.cursor(db=self.db[db])
        if not cur.set_range(prefix):
            return
        for key in cur.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                break
            yield key[len(prefix):].decode()

    def series_of_study(self, study: str, txn: lmdb.Transaction) -> list[str]:
        return list(self._children(txn, "study_series", study))

    def instances_of_series(self, series: str, txn: lmdb.Transaction) -> list[str]:
        return list(self._children(txn, "series_inst", series))

    def studies_of_patient(self, patient: str, txn: lmdb.Transaction) -> list[str]:
        return list(self._children(txn, "patient_study", patient))

    def iter_records(self, db: str, txn: lmdb.Transaction) -> Iterator[tuple[str, dict]]:
        cur = txn.cursor(db=self.db[db])
        for key, val in cur.iternext():
            yield key.decode(), json.loads(val)

    def patients_with_id(self, txn: lmdb.Transaction, pid: str) -> list[tuple[str, dict]]:
        """Patient records whose Patient ID is `pid` (any issuer): keys are "ID^issuer"."""
        prefix = f"{pid}^".encode()
        cur = txn.cursor(db=self.db["patient"])
        out = []
        if cur.set_range(prefix):
            for key, val in cur.iternext():
                if not key.startswith(prefix):
                    break
                out.append((key.decode(), json.loads(val)))
        return out

    def studies_by_key(
        self, txn: lmdb.Transaction, tag: str, lo: str, hi: str | None = None, prefix: bool = False
    ) -> set[str]:
        """Studies whose indexed `tag` equals lo, starts with lo (prefix), or lies in [lo, hi]."""
        base = f"{tag}=".encode()
        start = base + lo.encode() + (b"" if prefix or hi is not None else SEP)
        cur = txn.cursor(db=self.db["study_idx"])
        out: set[str] = set()
        if not cur.set_range(start):
            return out
        for key in cur.iternext(keys=True, values=False):
            if not key.startswith(base):
                break
            value, _, study = key[len(base):].partition(SEP)
            if hi is not None:
                if value.decode() > hi:
                    break
            elif prefix:
                if not value.startswith(lo.encode()):
                    break
            elif value != lo.encode():
                break
            out.add(study.decode())
        return out

    # -- writes ----------------------------------------------------------
    def add_pending(self, blob: str, session: str) -> None:
        with self.write() as t:
            t.put(blob.encode(), session.encode(), db=self.db["pending"])

    def clear_pending(self, blob: str, txn: lmdb.Transaction | None = None) -> None:
        if txn is None:
            with self.write() as t:
                t.delete(blob.encode(), db=self.db["pending"])
        else:
            txn.delete(blob.encode(), db=self.db["pending"])

    def pending(self) -> list[tuple[str, str]]:
        with self.read() as t:
            cur = t.cursor(db=self.db["pending"])
            return [(k.decode(), v.decode()) for k, v in cur.iternext()]

    def blob_referenced(self, blob: str) -> bool:
        with self.read() as t:
            return t.get(blob.encode(), db=self.db["blob"]) is not None

    def put_instance(
        self,
        txn: lmdb.Transaction,
        rec: dict,
        frames: bytes | None,
        meta: bytes,
        bulk: dict[str, bytes],
        patient_attrs: dict,
        study_attrs: dict,
        series_attrs: dict,
    ) -> None:
        """Add one instance (which must not exist) and update its parents, in `txn`."""
        sop, study, series, patient = rec["sop"], rec["study"], rec["series"], rec["patient"]
        db = self.db
        txn.put(sop.encode(), _dumps(rec), db=db["inst"])
        txn.put(rec["blob"].encode(), sop.encode(), db=db["blob"])
        if frames is not None:
            txn.put(sop.encode(), frames, db=db["frames"])
        txn.put(sop.encode(), meta, db=db["meta"])
        for path, value in bulk.items():
            txn.put(_k(sop, path), value, db=db["bulk"])
        txn.put(_k(series, sop), b"", db=db["series_inst"])

        srec = self._json(txn, "series", series)
        if srec is None:
            srec = {"attrs": series_attrs, "study": study, "n_instances": 0, "bytes": 0,
                    "sop_classes": []}
            txn.put(_k(study, series), b"", db=db["study_series"])
            new_series = True
        else:
            new_series = False
        srec["n_instances"] += 1
        srec["bytes"] += rec["size"]
        if rec["sop_class"] not in srec["sop_classes"]:
            srec["sop_classes"].append(rec["sop_class"])
        txn.put(series.encode(), _dumps(srec), db=db["series"])

        strec = self._json(txn, "study", study)
        if strec is None:
            strec = {"attrs": study_attrs, "patient": patient, "n_series": 0, "n_instances": 0,
                     "bytes": 0, "modalities": [], "sop_classes": []}
            txn.put(_k(patient, study), b"", db=db["patient_study"])
            for tag in INDEXED_STUDY_TAGS:
                for v in index_values(tag, study_attrs):
                    txn.put(_k(f"{tag}={v}", study), b"", db=db["study_idx"])
            new_study = True
        else:
            new_study = False
        strec["n_series"] += int(new_series)
        strec["n_instances"] += 1
        strec["bytes"] += rec["size"]
        modality = md.first_value(series_attrs, "00080060")
        if modality and modality not in strec["modalities"]:
            strec["modalities"].append(modality)
        if rec["sop_class"] not in strec["sop_classes"]:
            strec["sop_classes"].append(rec["sop_class"])
        strec["updated"] = rec["received"]
        txn.put(study.encode(), _dumps(strec), db=db["study"])

        prec = self._json(txn, "patient", patient)
        if prec is None:
            prec = {"attrs": patient_attrs, "n_studies": 0}
        prec["n_studies"] += int(new_study)
        txn.put(patient.encode(), _dumps(prec), db=db["patient"])

    def remove_instance(self, txn: lmdb.Transaction, sop: str) -> dict | None:
        """Remove one instance and prune empty parents, in `txn`. Returns its record."""
        db = self.db
        rec = self._json(txn, "inst", sop)
        if rec is None:
            return None
        study, series, patient = rec["study"], rec["series"], rec["patient"]
        txn.delete(sop.encode(), db=db["inst"])
        txn.delete(rec["blob"].encode(), db=db["blob"])
        txn.delete(sop.encode(), db=db["frames"])
        txn.delete(sop.encode(), db=db["todo_crc"])
        txn.delete(sop.encode(), db=db["meta"])
        cur = txn.cursor(db=db["bulk"])
        prefix = sop.encode() + SEP
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                if not cur.delete():
                    break
        txn.delete(_k(series, sop), db=db["series_inst"])
        srec = self._json(txn, "series", series)
        series_gone = False
        if srec is not None:
            srec["n_instances"] -= 1
            srec["bytes"] -= rec["size"]
            if srec["n_instances"] <= 0:
                txn.delete(series.encode(), db=db["series"])
                txn.delete(_k(study, series), db=db["study_series"])
                series_gone = True
            else:
                txn.put(series.encode(), _dumps(srec), db=db["series"])
        strec = self._json(txn, "study", study)
        if strec is not None:
            strec["n_instances"] -= 1
            strec["bytes"] -= rec["size"]
            strec["n_series"] -= int(series_gone)
            if series_gone:
                strec["modalities"] = sorted({
                    m for s in self.series_of_study(study, txn)
                    for m in md.string_values((self._json(txn, "series", s) or {"attrs": {}})["attrs"].get("00080060"))
                })
            if strec["n_instances"] <= 0:
                txn.delete(study.encode(), db=db["study"])
                txn.delete(_k(patient, study), db=db["patient_study"])
                for tag in INDEXED_STUDY_TAGS:
                    for v in index_values(tag, strec["attrs"]):
                        txn.delete(_k(f"{tag}={v}", study), db=db["study_idx"])
                prec = self._json(txn, "patient", patient)
                if prec is not None:
                    prec["n_studies"] -= 1
                    if prec["n_studies"] <= 0:
                        txn.delete(patient.encode(), db=db["patient"])
                    else:
                        txn.put(patient.encode(), _dumps(prec), db=db["patient"])
            else:
                txn.put(study.encode(), _dumps(strec), db=db["study"])
        return rec
