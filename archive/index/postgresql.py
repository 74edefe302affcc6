"""The shared index backend: PostgreSQL (several pathpacs nodes over one database).

The same domain operations as the embedded backend (archive.index.lmdb, the reference), over
psycopg 3 and a connection pool. Every write is one transaction; nothing outside this module
sees a connection, a transaction or a cursor. Iterators read in keyset-paged batches (16 rows
first, doubling to 512), each batch in its own short transaction, so a caller that stops early
reads little and nothing holds a connection between yields.

Concurrency. Writers on several connections, processes or nodes serialise on transaction-scoped
advisory locks (`pg_advisory_xact_lock(class, crc32(key))`), always taken in the order patient
(1) -> study (2) -> series (3) -> instance (4) -> the rest, so they cannot deadlock in the common
case; a rare deadlock or serialisation failure (a replace touching a second family) reruns the
whole transaction. Under those locks every read-modify-write of a study, series or patient row is
what LMDB's single writer does: the counts (instances, bytes, instances per tier) stay exact, a
parent row is never duplicated (primary keys, upserts), and one SOP Instance UID stored twice at
once yields STORED + DUPLICATE (same sha256) or STORED + REJECTED (other bytes, no replace).
`update_record` locks its key the same way (class 10): a real cross-process read-modify-write.

Instance writes are set-based (`_put_many`, for `add_instance` and the bulk `add_instances`
alike): one INSERT ... SELECT FROM unnest(arrays) ... ON CONFLICT DO NOTHING RETURNING sop for
the instance rows, one statement each for blobs, bulk values, the checksum queue and study_keys,
one SELECT and one upsert each for series, studies and patients, whatever the batch's size (up
to CHUNK_BYTES of rows per statement). The parents' records are computed in Python from the rows
really inserted, in batch order, exactly as one add after another (the index contract tests
compare). Arrays go in binary format: text arrays' escaping cost half the time. A row per
statement ran bulk loads at ~1,700 instances/s on the 2-core test machine (100k in 59 s);
set-based, 10,000-13,000/s (100k in 7.5-10 s). One-statement reads run in autocommit
(`_tx(single=True)`): no BEGIN and COMMIT round trips.

Loss of the database (refused, dropped mid-query, pool exhausted past `POOL_TIMEOUT`) raises
archive.status.Unavailable (HTTP 503, DIMSE 0xA700); the failed transaction is rolled back, so
nothing is half-written, and the pool's connection check reconnects on the next call.

The frame path keeps an in-process LRU (`FRAME_CACHE` instances) of sop -> (location, frame
table): a location's frame table never changes (CRCs added by `set_frame_checksums` drop the
entry here), a move or replace gives a new location. Entries are dropped by `forget` (the
Archive's retry when a blob is gone), by this process's `move_switch`/`finish_purge`/replace, and
all of them whenever `rejection_generation` moves (checked at most every 0.5 s from `frames`):
a replace, reject or purge on any node bumps it.

Schema (version in `pathpacs_schema`; created and migrated on open unless read-only, each step
one transaction under `pg_advisory_xact_lock(11, 0)` so nodes starting together do not race):
  patients   key PK -> rec jsonb {"attrs", "n_studies"}
  studies    uid PK, patient, study_date, study_time (colons removed; '' when absent),
             rec jsonb (the LMDB study record: attrs, counts, modalities, sop_classes, tiers);
             btree (study_date, study_time, uid) for date order, (patient, uid)
  study_keys (tag, value, study) PK: PatientID, AccessionNumber, StudyDate and every lower-cased
             PatientName component group (stored.index_values), value COLLATE "C" so the btree
             serves prefix LIKE; a side table, as LMDB's study_idx, so multi-valued keys match
  series     uid PK, study, rec jsonb ; btree (study, uid)
  instances  sop PK, series, study, tier, blob_key, ts, size, sha256, rec jsonb (the instance
             record without its location), frames bytea (archive.index.frametable v3),
             meta bytea (DICOM JSON, BulkDataURIs relative to metadata.BASE_TOKEN);
             btree (series, sop), (study)
  bulk       (sop, path) PK -> value bytea
  blobs      blob key PK -> sop (which instance a blob, copy or kept version belongs to)
  state      name PK -> value bigint ("rejected_gen")
  kv         (space, key bytea) PK -> val bytea (compact JSON): the small tables of LMDB under
             the same names and keys (keys may hold NUL, which text and jsonb refuse): pending,
             moves, access, flags, verified, tokens, rejected, versions, purges, fixity, todo_crc,
             copies, and every base.RECORD_TABLES table
Keys are COLLATE "C" (byte order, as LMDB). jsonb refuses U+0000: NULs in the record attribute
subsets are dropped (the stored metadata keeps every byte).
Schema history: 1 the first.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from .. import metadata as md
from ..records import (BlobRef, Frames, FrameTable, InstanceRecord, PatientRecord, SeriesRecord, Stats,
                       StudyRecord)
from ..status import Outcome, Unavailable
from . import frametable
from .base import RECORD_TABLES, AddResult, FixityEvent, NewInstance
from .stored import (INDEXED_STUDY_TAGS, ORDERS, T_ACCESSION, T_PATIENT_ID, T_PATIENT_NAME, T_SERIES_UID,
                     T_SOP_UID, T_STUDY_DATE, T_STUDY_TIME, T_STUDY_UID, count_tier, index_values,
                     instance_record, patient_record, series_record, stored_instance, study_record,
                     count_in_series, count_in_study, new_patient_record, new_series_record, new_study_record)

log = logging.getLogger("pathpacs.index")

SCHEMA = 1
BATCH = 512
FIRST_BATCH = 16
FRAME_CACHE = 20_000  # instances whose location and frame table the frame path keeps
GEN_CHECK = 0.5  # seconds between checks of the rejection generation from the frame path
POOL_TIMEOUT = 5.0  # seconds to wait for a connection before the database counts as gone
RETRIES = 6
LOCK_BUCKETS = 256  # advisory lock ids per hierarchy class (see _lock_id)
CHUNK_BYTES = 64 << 20  # at most this much row data per set-based INSERT of a bulk load
RECONNECT = 1.0  # the pool gives up reconnecting in the background this soon: the next call tries afresh

L_PATIENT, L_STUDY, L_SERIES, L_INSTANCE, L_FLAGS, L_RECORD, L_SCHEMA = 1, 2, 3, 4, 5, 10, 11
SEP = "\0"

SCHEMA_STEPS: dict[int, list[str]] = {1: [
    """CREATE TABLE IF NOT EXISTS patients (key text COLLATE "C" PRIMARY KEY, rec jsonb NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS studies (uid text COLLATE "C" PRIMARY KEY, patient text COLLATE "C" NOT NULL,
         study_date text COLLATE "C" NOT NULL DEFAULT '', study_time text COLLATE "C" NOT NULL DEFAULT '',
         rec jsonb NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date, study_time, uid)",
    "CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient, uid)",
    """CREATE TABLE IF NOT EXISTS study_keys (tag text NOT NULL, value text COLLATE "C" NOT NULL,
         study text COLLATE "C" NOT NULL, PRIMARY KEY (tag, value, study))""",
    "CREATE INDEX IF NOT EXISTS study_keys_study ON study_keys (study)",
    """CREATE TABLE IF NOT EXISTS series (uid text COLLATE "C" PRIMARY KEY, study text COLLATE "C" NOT NULL,
         rec jsonb NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS series_study ON series (study, uid)",
    """CREATE TABLE IF NOT EXISTS instances (sop text COLLATE "C" PRIMARY KEY, series text COLLATE "C" NOT NULL,
         study text COLLATE "C" NOT NULL, tier text NOT NULL, blob_key text NOT NULL, ts text NOT NULL,
         size bigint NOT NULL, sha256 text NOT NULL, rec jsonb NOT NULL, frames bytea, meta bytea)""",
    "CREATE INDEX IF NOT EXISTS instances_series ON instances (series, sop)",
    "CREATE INDEX IF NOT EXISTS instances_study ON instances (study)",
    """CREATE TABLE IF NOT EXISTS bulk (sop text COLLATE "C" NOT NULL, path text COLLATE "C" NOT NULL,
         value bytea NOT NULL, PRIMARY KEY (sop, path))""",
    """CREATE TABLE IF NOT EXISTS blobs (key text COLLATE "C" PRIMARY KEY, sop text NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS state (name text PRIMARY KEY, value bigint NOT NULL)",
    "INSERT INTO state VALUES ('rejected_gen', 0) ON CONFLICT DO NOTHING",
    """CREATE TABLE IF NOT EXISTS kv (space text NOT NULL, key bytea NOT NULL, val bytea NOT NULL,
         PRIMARY KEY (space, key))""",
]}
TABLES = ("patients", "studies", "study_keys", "series", "instances", "bulk", "blobs", "state", "kv")


def _lock_id(cls: int, key: str) -> int:
    """A signed 32-bit id of `key` for pg_advisory_xact_lock(class, id). Hierarchy keys fall
    into LOCK_BUCKETS buckets per class, so a bulk load of many studies holds a bounded number
    of locks (PostgreSQL's lock table is max_locks_per_transaction x max_connections); a shared
    bucket only makes two writers that need not wait for each other wait."""
    h = zlib.crc32(key.encode())
    if cls in (L_PATIENT, L_STUDY, L_SERIES, L_INSTANCE):
        return h % LOCK_BUCKETS
    return h - (1 << 31)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _jdumps(obj: Any) -> str:
    """JSON for a jsonb column: jsonb refuses U+0000 (DICOM padding): dropped from the subset."""
    text = json.dumps(obj, separators=(",", ":"))
    return text.replace("\\u0000", "") if "\\u0000" in text else text


def _jb(obj: Any) -> Jsonb:
    return Jsonb(obj, dumps=_jdumps)


def _b(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode()


def _after(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with `prefix` (None: none)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")




def _unavailable(exc: BaseException) -> Unavailable:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return Unavailable(f"index database unavailable: {text}")


def schema_exists(dsn: str) -> bool:
    """Whether the database at `dsn` holds a pathpacs index (its schema table, with a version)."""
    try:
        with psycopg.connect(dsn, connect_timeout=int(POOL_TIMEOUT), autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('pathpacs_schema')").fetchone()[0] is None:
                return False
            return conn.execute("SELECT count(*) FROM pathpacs_schema").fetchone()[0] > 0
    except psycopg.OperationalError as exc:
        raise _unavailable(exc) from exc


def _chunks(rows: Sequence[Any], weigh: Callable[[Any], int]) -> Iterator[list]:
    """`rows` in consecutive runs of at most CHUNK_BYTES (by `weigh`; at least one row each):
    one statement's arrays stay far below PostgreSQL's 1 GB message however large a batch."""
    limit = CHUNK_BYTES
    chunk: list = []
    size = 0
    for row in rows:
        w = weigh(row)
        if chunk and size + w > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += w
    if chunk:
        yield chunk


INST_COLS = "sop, rec, tier, blob_key, ts"
INST_SELECT = f"SELECT {INST_COLS} FROM instances"


def _inst_row(row) -> InstanceRecord:
    return instance_record(row[1], row[2], row[3], row[4])


class _Cursor(psycopg.Cursor):
    """A cursor that remembers the advisory locks its transaction holds (no second round trip)."""

    locked: set | None = None


class PostgresIndex:
    """The Index protocol (archive.index.base) over one PostgreSQL database."""

    def __init__(self, dsn: str, *, readonly: bool = False, pool_size: int = 16) -> None:
        self.readonly = readonly
        self.dsn = dsn
        kwargs: dict[str, Any] = {"autocommit": False, "cursor_factory": _Cursor}
        if readonly:
            kwargs["options"] = "-c default_transaction_read_only=on"
        self.pool = ConnectionPool(dsn, min_size=1, max_size=max(1, pool_size), timeout=POOL_TIMEOUT,
                                   kwargs=kwargs, check=ConnectionPool.check_connection, open=False,
                                   name="pathpacs-index", reconnect_timeout=RECONNECT)
        try:
            self.pool.open(wait=True, timeout=POOL_TIMEOUT)
        except PoolTimeout as exc:
            self.pool.close()
            raise Unavailable(f"index database unavailable: no connection to {_safe_dsn(dsn)} "
                              f"within {POOL_TIMEOUT:.0f} s") from exc
        self._cache: OrderedDict[str, tuple[str, str, str, bytes]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._gen = -1
        self._gen_at = 0.0
        try:
            if not readonly:
                self._migrate()
            elif not self._has_schema():
                raise Unavailable("index database has no pathpacs schema (no archive there)")
        except BaseException:
            self.pool.close()
            raise

    def close(self) -> None:
        self.pool.close()

    # -- connections and transactions ---------------------------------------------------
    @contextmanager
    def _tx(self, retryable: bool = False, single: bool = False) -> Iterator[psycopg.Cursor]:
        """One transaction on a pooled connection (committed at the end, rolled back on any
        error); loss of the database becomes Unavailable (a deadlock or serialisation failure
        too, unless the caller reruns the transaction: `retryable`). `single`: the caller runs
        one read statement, in autocommit (its own snapshot all the same): no BEGIN and COMMIT
        round trips, which were half the cost of a point read."""
        try:
            with self.pool.connection() as conn:
                if not single:
                    with conn.cursor() as cur:
                        yield cur
                    return
                conn.autocommit = True
                try:
                    with conn.cursor() as cur:
                        yield cur
                finally:
                    try:
                        conn.autocommit = False
                    except psycopg.Error:  # broken: never back into the pool as autocommit
                        conn.close()
        except pg_errors.TransactionRollback as exc:
            if retryable:
                raise
            raise _unavailable(exc) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise _unavailable(exc) from exc

    def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(cur, *args) in one transaction, again (a few times) after a deadlock or a
        serialisation failure: fn is rerun whole, so it must only act through `cur`."""
        for attempt in range(RETRIES):
            try:
                with self._tx(retryable=True) as cur:
                    cur.locked = set()
                    return fn(cur, *args)
            except pg_errors.TransactionRollback as exc:
                if attempt == RETRIES - 1:
                    raise _unavailable(exc) from exc
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._tx(single=True) as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        with self._tx(single=True) as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def _lock(self, cur, cls: int, key: str) -> None:
        self._lock_all(cur, [(cls, key)])

    @staticmethod
    def _lock_all(cur, locks: Iterable[tuple[int, str]]) -> None:
        """Transaction advisory locks in the global order (class, then id), in one statement;
        those this transaction holds already are skipped."""
        held = cur.locked if cur.locked is not None else set()
        todo = sorted({(cls, _lock_id(cls, key)) for cls, key in locks} - held)
        if not todo:
            return
        held.update(todo)
        cur.execute("SELECT pg_advisory_xact_lock(c, k) FROM unnest(%s::int4[], %s::int4[]) AS t(c, k)",
                    ([c for c, _ in todo], [k for _, k in todo])).fetchall()

    # -- schema ---------------------------------------------------------------------------
    def _has_schema(self) -> bool:
        row = self._one("SELECT to_regclass('pathpacs_schema') IS NOT NULL")
        if not row or not row[0]:
            return False
        return bool(self._one("SELECT count(*) FROM pathpacs_schema")[0])

    def _migrate(self) -> None:
        """Create the schema, or bring an older one up to SCHEMA, one step per transaction,
        each under the schema lock (several nodes opening one database at once: one does the
        step, the others find it done)."""
        for step in sorted(SCHEMA_STEPS):
            def run(cur, step=step):
                cur.execute("SELECT pg_advisory_xact_lock(%s, 0)", (L_SCHEMA,))
                cur.execute("CREATE TABLE IF NOT EXISTS pathpacs_schema (version int NOT NULL)")
                row = cur.execute("SELECT max(version) FROM pathpacs_schema").fetchone()
                version = row[0] or 0
                if version > SCHEMA:
                    raise Unavailable(f"index database has schema {version}, newer than this release's "
                                      f"{SCHEMA}: upgrade pathpacs")
                if version >= step:
                    return
                for sql in SCHEMA_STEPS[step]:
                    cur.execute(sql)
                cur.execute("DELETE FROM pathpacs_schema")
                cur.execute("INSERT INTO pathpacs_schema VALUES (%s)", (step,))
                log.debug("index: PostgreSQL schema %d", step)
            self._write(run)

    # -- the small key/value tables (kv) -------------------------------------------------
    @staticmethod
    def _kv_get(cur, space: str, key: str | bytes) -> bytes | None:
        row = cur.execute("SELECT val FROM kv WHERE space = %s AND key = %s", (space, _b(key))).fetchone()
        return None if row is None else bytes(row[0])

    @staticmethod
    def _kv_put(cur, space: str, key: str | bytes, val: bytes) -> None:
        cur.execute("INSERT INTO kv VALUES (%s, %s, %s) ON CONFLICT (space, key) DO UPDATE SET val = EXCLUDED.val",
                    (space, _b(key), val))

    @staticmethod
    def _kv_del(cur, space: str, key: str | bytes) -> bool:
        cur.execute("DELETE FROM kv WHERE space = %s AND key = %s", (space, _b(key)))
        return cur.rowcount > 0

    @staticmethod
    def _range_sql(prefix: bytes) -> tuple[str, list]:
        if not prefix:
            return "", []
        end = _after(prefix)
        if end is None:
            return " AND key >= %s", [prefix]
        return " AND key >= %s AND key < %s", [prefix, end]

    def _kv_prefix(self, cur, space: str, prefix: bytes) -> list[tuple[bytes, bytes]]:
        cond, params = self._range_sql(prefix)
        cur.execute(f"SELECT key, val FROM kv WHERE space = %s{cond} ORDER BY key", [space, *params])
        return [(bytes(k), bytes(v)) for k, v in cur.fetchall()]

    def _kv_del_prefix(self, cur, space: str, prefix: bytes) -> None:
        cond, params = self._range_sql(prefix)
        cur.execute(f"DELETE FROM kv WHERE space = %s{cond}", [space, *params])

    def _kv_batched(self, space: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        cond, params = self._range_sql(prefix)
        last: bytes | None = None
        size = FIRST_BATCH
        while True:
            after = "" if last is None else " AND key > %s"
            rows = self._read(f"SELECT key, val FROM kv WHERE space = %s{cond}{after} ORDER BY key LIMIT %s",
                              [space, *params, *([] if last is None else [last]), size])
            for k, v in rows:
                yield bytes(k), bytes(v)
            if len(rows) < size:
                return
            last = bytes(rows[-1][0])
            size = min(size * 2, BATCH)

    def _kv_all(self, space: str) -> list[tuple[bytes, bytes]]:
        with self._tx() as cur:
            return self._kv_prefix(cur, space, b"")

    def _paged(self, select: str, where: str, params: Sequence[Any], key: str) -> Iterator[tuple]:
        """Rows of `select` + WHERE `where`, by `key` (the last column), keyset-paged."""
        last = None
        size = FIRST_BATCH
        while True:
            cond = where + ("" if last is None else f" AND {key} > %s")
            rows = self._read(f"{select} WHERE {cond} ORDER BY {key} LIMIT %s",
                              [*params, *([] if last is None else [last]), size])
            yield from rows
            if len(rows) < size:
                return
            last = rows[-1][-1]
            size = min(size * 2, BATCH)

    # -- lookups ----------------------------------------------------------------------------
    @staticmethod
    def _inst(cur, sop: str) -> InstanceRecord | None:
        row = cur.execute(f"{INST_SELECT} WHERE sop = %s", (sop,)).fetchone()
        return None if row is None else _inst_row(row)

    def instance(self, sop: str) -> InstanceRecord | None:
        with self._tx(single=True) as cur:
            return self._inst(cur, sop)

    def series(self, uid: str) -> SeriesRecord | None:
        row = self._one("SELECT rec FROM series WHERE uid = %s", (uid,))
        return None if row is None else series_record(uid, row[0])

    def study(self, uid: str) -> StudyRecord | None:
        row = self._one("SELECT rec FROM studies WHERE uid = %s", (uid,))
        return None if row is None else study_record(uid, row[0])

    def patient(self, key: str) -> PatientRecord | None:
        row = self._one("SELECT rec FROM patients WHERE key = %s", (key,))
        return None if row is None else patient_record(key, row[0])

    def _located(self, sop: str) -> tuple[str, str, str, bytes] | None:
        """(tier, blob key, syntax, frame table) of `sop`, from the cache or the database."""
        now = time.monotonic()
        if now - self._gen_at > GEN_CHECK:
            gen = self.rejection_generation()
            with self._cache_lock:
                if gen != self._gen:
                    self._cache.clear()
                    self._gen = gen
                self._gen_at = now
        with self._cache_lock:
            hit = self._cache.get(sop)
            if hit is not None:
                self._cache.move_to_end(sop)
                return hit
        row = self._one("SELECT tier, blob_key, ts, frames FROM instances WHERE sop = %s", (sop,))
        if row is None or row[3] is None:
            return None
        entry = (row[0], row[1], row[2], bytes(row[3]))
        with self._cache_lock:
            self._cache[sop] = entry
            if len(self._cache) > FRAME_CACHE:
                self._cache.popitem(last=False)
        return entry

    def frames(self, sop: str, numbers: Sequence[int]) -> Frames | None:
        entry = self._located(sop)
        if entry is None:
            return None
        tier, key, ts, buf = entry
        head, frags, crcs = frametable.read(buf, numbers)
        return Frames(FrameTable(BlobRef(tier, key), ts, head.n, head.checked, head.damaged), tuple(numbers),
                      frags, crcs)

    def all_frames(self, sop: str) -> Frames | None:
        row = self._one("SELECT tier, blob_key, ts, frames FROM instances WHERE sop = %s", (sop,))
        if row is None or row[3] is None:
            return None
        head, frags, crcs = frametable.read_all(bytes(row[3]))
        table = FrameTable(BlobRef(row[0], row[1]), row[2], head.n, head.checked, head.damaged)
        return Frames(table, tuple(range(1, head.n + 1)), frags, crcs)

    def forget(self, sop: str) -> None:
        with self._cache_lock:
            self._cache.pop(sop, None)

    def _forget_all(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def metadata(self, sops: Sequence[str]) -> list[bytes]:
        if not sops:
            return []
        rows = dict(self._read("SELECT sop, meta FROM instances WHERE sop = ANY(%s)", (list(sops),)))
        return [bytes(rows[s]) for s in sops if s in rows and rows[s] is not None]

    def metadata_under(self, study: str, series: str | None = None) -> list[bytes] | None:
        with self._tx() as cur:
            if series is not None:
                row = cur.execute("SELECT study FROM series WHERE uid = %s", (series,)).fetchone()
                if row is None or row[0] != study:
                    return None
                cur.execute("SELECT meta FROM instances WHERE series = %s ORDER BY sop", (series,))
            else:
                if cur.execute("SELECT 1 FROM studies WHERE uid = %s", (study,)).fetchone() is None:
                    return None
                cur.execute("SELECT meta FROM instances WHERE study = %s ORDER BY series, sop", (study,))
            return [bytes(m) for (m,) in cur.fetchall() if m is not None]

    def bulk(self, sop: str, path: str) -> bytes | None:
        row = self._one("SELECT value FROM bulk WHERE sop = %s AND path = %s", (sop, path))
        return None if row is None else bytes(row[0])

    # -- hierarchy --------------------------------------------------------------------------
    def series_of_study(self, study: str) -> list[SeriesRecord]:
        return [series_record(u, d) for u, d in self._read("SELECT uid, rec FROM series WHERE study = %s ORDER BY uid",
                                                     (study,))]

    def instances_of_series(self, series: str) -> list[InstanceRecord]:
        return [_inst_row(r) for r in self._read(f"{INST_SELECT} WHERE series = %s ORDER BY sop", (series,))]

    def studies_of_patient(self, patient: str) -> list[StudyRecord]:
        return [study_record(u, d) for u, d in self._read("SELECT uid, rec FROM studies WHERE patient = %s ORDER BY uid",
                                                    (patient,))]

    def patients(self) -> Iterator[PatientRecord]:
        for d, key in self._paged("SELECT rec, key FROM patients", "TRUE", (), "key"):
            yield patient_record(key, d)

    def studies(self) -> Iterator[StudyRecord]:
        for d, uid in self._paged("SELECT rec, uid FROM studies", "TRUE", (), "uid"):
            yield study_record(uid, d)

    def _all_series(self) -> Iterator[SeriesRecord]:
        for d, uid in self._paged("SELECT rec, uid FROM series", "TRUE", (), "uid"):
            yield series_record(uid, d)

    def instances(self) -> Iterator[InstanceRecord]:
        for row in self._paged("SELECT rec, tier, blob_key, ts, sop FROM instances", "TRUE", (), "sop"):
            yield instance_record(row[0], row[1], row[2], row[3])

    def stats(self) -> Stats:
        with self._tx() as cur:
            counts = [cur.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("patients", "studies", "series")]
            by_tier = {t: int(s) for t, _n, s in
                       cur.execute("SELECT tier, count(*), coalesce(sum(size), 0) FROM instances GROUP BY tier")}
            n = cur.execute("SELECT count(*) FROM instances").fetchone()[0]
        return Stats(counts[0], counts[1], counts[2], n, sum(by_tier.values()), by_tier)

    # -- query candidate selection (pushed down to SQL) ------------------------------------
    def candidates(self, level: str, keys: Sequence[Any], *, study: str | None = None,
                   series: str | None = None, fuzzy: bool = False, order: str | None = None) -> Iterator[Any]:
        from ..query import STUDY_LEVEL_TAGS, single_exact, uid_list

        bykey = {k.tag: k for k in keys}
        if order is not None and order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        if level == "PATIENT":
            pid = single_exact(bykey, T_PATIENT_ID)
            if pid is None:
                yield from self.patients()
                return
            for d, key in self._paged("SELECT rec, key FROM patients", "key LIKE %s", [_like_escape(pid) + "^%"],
                                      "key"):
                yield patient_record(key, d)
        elif level == "STUDY":
            where, params = self._study_where(bykey, study, fuzzy)
            if order is None:
                for d, uid in self._paged("SELECT s.rec, s.uid FROM studies s", where, params, "s.uid"):
                    yield study_record(uid, d)
            else:
                yield from self._studies_by_date(where, params, descending=order == "-date")
        elif level == "SERIES":
            uids = [series] if series else uid_list(bykey, T_SERIES_UID)
            if uids is not None:
                cond, params = "se.uid = ANY(%s)", [uids]
                if study is not None:
                    cond, params = cond + " AND se.study = %s", params + [study]
            elif study is not None:
                cond, params = "se.study = %s", [study]
            elif any(k.tag in STUDY_LEVEL_TAGS and not k.universal for k in keys):
                where, sparams = self._study_where(bykey, None, fuzzy)
                cond, params = f"se.study IN (SELECT s.uid FROM studies s WHERE {where})", sparams
            else:
                cond, params = "TRUE", []
            for d, uid in self._paged("SELECT se.rec, se.uid FROM series se", cond, params, "se.uid"):
                yield series_record(uid, d)
        else:
            uids = uid_list(bykey, T_SOP_UID)
            conds: list[str] = []
            params = []
            if uids is not None:
                conds.append("i.sop = ANY(%s)")
                params.append(uids)
            if study is not None:
                conds.append("i.study = %s")
                params.append(study)
            if series is not None:
                conds.append("i.series = %s")
                params.append(series)
            if uids is None and series is None:
                series_uids = uid_list(bykey, T_SERIES_UID)
                if series_uids is not None:
                    conds.append("i.series = ANY(%s)")
                    params.append(series_uids)
                elif study is None:
                    where, sparams = self._study_where(bykey, None, fuzzy)
                    conds.append(f"i.study IN (SELECT s.uid FROM studies s WHERE {where})")
                    params.extend(sparams)
            for row in self._paged("SELECT i.rec, i.tier, i.blob_key, i.ts, i.sop FROM instances i",
                                   " AND ".join(conds) or "TRUE", params, "i.sop"):
                yield instance_record(row[0], row[1], row[2], row[3])

    def _study_where(self, bykey: dict, study: str | None, fuzzy: bool) -> tuple[str, list]:
        """A WHERE clause over `studies s` every match satisfies (a superset): UIDs, PatientID,
        AccessionNumber and PatientName exact or by pattern (name case-insensitively, any
        component group; ignored when fuzzy), a StudyDate value or range, ModalitiesInStudy."""
        from ..query import RANGE_VRS, uid_list

        conds: list[str] = []
        params: list[Any] = []
        uids = [study] if study else uid_list(bykey, T_STUDY_UID)
        if uids is not None:
            conds.append("s.uid = ANY(%s)")
            params.append(list(uids))
        for tag in (T_PATIENT_ID, T_ACCESSION, T_PATIENT_NAME):
            k = bykey.get(tag)
            if k is None or k.universal or not k.values or len(k.values) != 1 or (tag == T_PATIENT_NAME and fuzzy):
                continue
            q = k.values[0]
            if tag == T_PATIENT_NAME:
                q = q.lower().replace("ς", "σ")
            if "*" not in q and "?" not in q:
                if tag == T_PATIENT_NAME:
                    conds.append("s.uid IN (SELECT study FROM study_keys WHERE tag = %s AND replace(value, 'ς', 'σ') = %s)"
                                 if "σ" in q else "s.uid IN (SELECT study FROM study_keys WHERE tag = %s AND value = %s)")
                else:
                    conds.append("s.uid IN (SELECT study FROM study_keys WHERE tag = %s AND value = %s)")
                params += [tag, q]
                continue
            pattern = "".join("%" if c in "*?" else _like_escape(c) for c in q)
            if "σ" in q:
                conds.append("s.uid IN (SELECT study FROM study_keys WHERE tag = %s AND replace(value, 'ς', 'σ') LIKE %s)")
            else:
                conds.append("s.uid IN (SELECT study FROM study_keys WHERE tag = %s AND value LIKE %s)")
            params += [tag, pattern]
        k = bykey.get(T_STUDY_DATE)
        if k is not None and not k.universal and k.values and len(k.values) == 1 and k.vr in RANGE_VRS:
            q = k.values[0]
            if "-" in q:
                lo, hi = q.split("-", 1)
                conds.append("s.study_date >= %s AND s.study_date <= %s")
                params += [lo or "0", hi or "99999999"]
            elif "*" not in q and "?" not in q:
                conds.append("s.study_date = %s")
                params.append(q)
        k = bykey.get("00080061")
        if k is not None and not k.universal and k.values and all(v and "*" not in v and "?" not in v for v in k.values):
            conds.append("s.rec->'modalities' ?| %s")
            params.append(list(k.values))
        return " AND ".join(conds) or "TRUE", params

    def _studies_by_date(self, where: str, params: list, *, descending: bool) -> Iterator[StudyRecord]:
        """Dated studies by (StudyDate, StudyTime, UID), ascending or descending, keyset-paged
        over the studies_date index; then the undated ones by UID."""
        op, direction = ("<", "DESC") if descending else (">", "ASC")
        last: tuple | None = None
        size = FIRST_BATCH
        while True:
            cond = f"({where}) AND s.study_date <> ''"
            extra: list[Any] = []
            if last is not None:
                cond += f" AND (s.study_date, s.study_time, s.uid) {op} (%s, %s, %s)"
                extra = list(last)
            rows = self._read(
                f"SELECT s.rec, s.uid, s.study_date, s.study_time FROM studies s WHERE {cond} "
                f"ORDER BY s.study_date {direction}, s.study_time {direction}, s.uid {direction} LIMIT %s",
                [*params, *extra, size])
            for d, uid, _date, _time in rows:
                yield study_record(uid, d)
            if len(rows) < size:
                break
            last = (rows[-1][2], rows[-1][3], rows[-1][1])
            size = min(size * 2, BATCH)
        for d, uid in self._paged("SELECT s.rec, s.uid FROM studies s", f"({where}) AND s.study_date = ''", params,
                                  "s.uid"):
            yield study_record(uid, d)

    # -- writes -----------------------------------------------------------------------------
    def add_pending(self, blob: BlobRef, session: str) -> None:
        self._write(lambda cur: self._kv_put(cur, "pending", blob.key, _dumps({"session": session, "tier": blob.tier})))

    def clear_pending(self, blob: BlobRef) -> None:
        self._write(lambda cur: self._kv_del(cur, "pending", blob.key))

    def pending(self) -> list[tuple[BlobRef, str]]:
        out = []
        for k, v in self._kv_all("pending"):
            d = json.loads(v)
            out.append((BlobRef(d.get("tier", "hot"), k.decode()), d["session"]))
        return out

    def blob_referenced(self, blob: BlobRef) -> bool:
        return self._one("SELECT 1 FROM blobs WHERE key = %s", (blob.key,)) is not None

    def _family_locks(self, rec: InstanceRecord, study_patient: str | None = None) -> list[tuple[int, str]]:
        locks = [(L_PATIENT, rec.patient), (L_STUDY, rec.study), (L_SERIES, rec.series), (L_INSTANCE, rec.sop)]
        if study_patient and study_patient != rec.patient:
            locks.append((L_PATIENT, study_patient))
        return locks

    def _study_patient(self, cur, study: str) -> str | None:
        row = cur.execute("SELECT patient FROM studies WHERE uid = %s", (study,)).fetchone()
        return None if row is None else row[0]

    def add_instance(self, new: NewInstance, *, replace: bool, session: str = "", who: str = "") -> AddResult:
        rec = new.record

        def run(cur):
            current = self._inst(cur, rec.sop)
            locks = self._family_locks(rec, self._study_patient(cur, rec.study))
            if current is not None:
                locks += self._family_locks(current, self._study_patient(cur, current.study))
            self._lock_all(cur, locks)
            current = self._inst(cur, rec.sop)  # under the instance lock: the truth
            if current is not None:
                if current.sha256 == rec.sha256:
                    return AddResult(Outcome.DUPLICATE, current)
                if not replace:
                    return AddResult(Outcome.REJECTED, current)
                self._lock_all(cur, self._family_locks(current, self._study_patient(cur, current.study)))
                self._keep_version(cur, current, who)
            self._put(cur, new)
            self._kv_del(cur, "pending", rec.blob.key)
            return AddResult(Outcome.REPLACED if current is not None else Outcome.STORED, current)

        result = self._write(run)
        if result.outcome is Outcome.REPLACED:
            self.forget(rec.sop)
        return result

    def add_instances(self, news: Iterable[NewInstance]) -> int:
        batch = list(news)
        if not batch:
            return 0

        def run(cur):
            locks: list[tuple[int, str]] = []
            for new in batch:
                locks += self._family_locks(new.record)[:3]
            self._lock_all(cur, locks)
            return self._put_many(cur, batch)

        return self._write(run)

    def _put(self, cur, new: NewInstance) -> None:
        """Write one instance and update its parents (their locks held, the UID absent)."""
        self._put_many(cur, [new])

    def _put_many(self, cur, batch: Sequence[NewInstance]) -> int:
        """Write the instances whose SOP Instance UID is not there yet (the first of a UID the
        batch holds twice) and update their parents, set-based: a fixed number of statements
        per batch, whatever its size (a round trip per row made bulk loads ~1,000 instances/s).
        The parents' new records are computed here from the rows really inserted, in batch
        order, exactly as one `add_instance` after another would (their locks held)."""
        unique: dict[str, NewInstance] = {}
        for new in batch:
            unique.setdefault(new.record.sop, new)
        news = list(unique.values())
        rows = [(n.record, frametable.pack(n.frames, n.crcs) if n.frames else None, n.metadata) for n in news]
        added: set[str] = set()
        for chunk in _chunks(rows, lambda r: len(r[2]) + len(r[1] or b"") + 512):
            cur.execute(
                "INSERT INTO instances SELECT s, se, st, t, b, ts, sz, h, r::jsonb, f, m"
                " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::int8[],"
                " %b::text[], %b::text[], %b::bytea[], %b::bytea[]) AS u(s, se, st, t, b, ts, sz, h, r, f, m)"
                " ON CONFLICT (sop) DO NOTHING RETURNING sop",
                ([r.sop for r, _, _ in chunk], [r.series for r, _, _ in chunk], [r.study for r, _, _ in chunk],
                 [r.blob.tier for r, _, _ in chunk], [r.blob.key for r, _, _ in chunk], [r.ts for r, _, _ in chunk],
                 [r.size for r, _, _ in chunk], [r.sha256 for r, _, _ in chunk],
                 [_jdumps(stored_instance(r)) for r, _, _ in chunk], [f for _, f, _ in chunk],
                 [m for _, _, m in chunk]))
            added.update(row[0] for row in cur.fetchall())
        news = [n for n in news if n.record.sop in added]
        if not news:
            return 0
        todo = sorted(n.record.sop.encode() for n in news if n.frames and n.crcs is None)
        if todo:
            cur.execute("INSERT INTO kv SELECT 'todo_crc', k, '' FROM unnest(%b::bytea[]) AS u(k)"
                        " ON CONFLICT (space, key) DO UPDATE SET val = EXCLUDED.val", (todo,))
        blobs = sorted({n.record.blob.key: n.record.sop for n in news}.items())  # the last of a key wins
        cur.execute("INSERT INTO blobs SELECT * FROM unnest(%b::text[], %b::text[])"
                    " ON CONFLICT (key) DO UPDATE SET sop = EXCLUDED.sop",
                    ([k for k, _ in blobs], [s for _, s in blobs]))
        bulk = sorted((n.record.sop, path, value) for n in news for path, value in n.bulk.items())
        for chunk in _chunks(bulk, lambda r: len(r[2]) + 128):
            cur.execute("INSERT INTO bulk SELECT * FROM unnest(%b::text[], %b::text[], %b::bytea[])"
                        " ON CONFLICT (sop, path) DO UPDATE SET value = EXCLUDED.value",
                        ([r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk]))
        self._update_parents(cur, news)
        return len(news)

    @staticmethod
    def _recs(cur, table: str, key: str, keys: Iterable[str]) -> dict[str, dict]:
        cur.execute(f"SELECT {key}, rec FROM {table} WHERE {key} = ANY(%b::text[])", (sorted(set(keys)),))
        return {k: rec for k, rec in cur.fetchall()}

    def _update_parents(self, cur, news: Sequence[NewInstance]) -> None:
        """The series, study and patient records after adding `news` (each new, in this order)."""
        series = self._recs(cur, "series", "uid", (n.record.series for n in news))
        studies = self._recs(cur, "studies", "uid", (n.record.study for n in news))
        patients = self._recs(cur, "patients", "key", (n.record.patient for n in news))
        new_studies: list[str] = []
        for new in news:
            rec = new.record
            srec = series.get(rec.series)
            new_series = srec is None
            if srec is None:
                srec = series[rec.series] = new_series_record(new)
            count_in_series(srec, new)

            strec = studies.get(rec.study)
            new_study = strec is None
            if strec is None:
                strec = studies[rec.study] = new_study_record(new)
                new_studies.append(rec.study)
            count_in_study(strec, new, new_series)

            prec = patients.get(rec.patient)
            if prec is None:
                prec = patients[rec.patient] = new_patient_record(new)
            prec["n_studies"] += int(new_study)

        keys = sorted({(tag, v, study) for study in new_studies for tag in INDEXED_STUDY_TAGS
                       if tag != T_STUDY_DATE for v in index_values(tag, studies[study]["attrs"])})
        if keys:
            cur.execute("INSERT INTO study_keys SELECT * FROM unnest(%b::text[], %b::text[], %b::text[])"
                        " ON CONFLICT DO NOTHING", ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]))
        touched = sorted({n.record.series for n in news})
        cur.execute("INSERT INTO series SELECT u, s, r::jsonb FROM unnest(%b::text[], %b::text[], %b::text[])"
                    " AS t(u, s, r) ON CONFLICT (uid) DO UPDATE SET rec = EXCLUDED.rec",
                    (touched, [series[u]["study"] for u in touched], [_jdumps(series[u]) for u in touched]))
        touched = sorted({n.record.study for n in news})
        rows = [(u, studies[u]["patient"], str(md.first_value(studies[u]["attrs"], T_STUDY_DATE) or ""),
                 str(md.first_value(studies[u]["attrs"], T_STUDY_TIME) or "").replace(":", ""),
                 _jdumps(studies[u])) for u in touched]
        cur.execute("INSERT INTO studies SELECT u, p, d, t, r::jsonb"
                    " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[]) AS x(u, p, d, t, r)"
                    " ON CONFLICT (uid) DO UPDATE SET rec = EXCLUDED.rec", [list(c) for c in zip(*rows)])
        touched = sorted({n.record.patient for n in news})
        cur.execute("INSERT INTO patients SELECT k, r::jsonb FROM unnest(%b::text[], %b::text[]) AS x(k, r)"
                    " ON CONFLICT (key) DO UPDATE SET rec = EXCLUDED.rec",
                    (touched, [_jdumps(patients[k]) for k in touched]))

    def _remove(self, cur, sop: str) -> None:
        """Remove one instance and prune empty parents (their locks held)."""
        rec = self._inst(cur, sop)
        if rec is None:
            return
        study, series, patient = rec.study, rec.series, rec.patient
        cur.execute("DELETE FROM instances WHERE sop = %s", (sop,))
        for space in ("todo_crc", "moves"):
            self._kv_del(cur, space, sop)
        for space in ("copies", "verified"):
            self._kv_del_prefix(cur, space, (sop + SEP).encode())
        cur.execute("DELETE FROM blobs WHERE key = %s", (rec.blob.key,))
        cur.execute("DELETE FROM bulk WHERE sop = %s", (sop,))
        row = cur.execute("SELECT rec FROM series WHERE uid = %s", (series,)).fetchone()
        series_gone = False
        if row is not None:
            srec = row[0]
            srec["n_instances"] -= 1
            srec["bytes"] -= rec.size
            count_tier(srec, rec.blob.tier, -1)
            if srec["n_instances"] <= 0:
                cur.execute("DELETE FROM series WHERE uid = %s", (series,))
                series_gone = True
            else:
                cur.execute("UPDATE series SET rec = %s WHERE uid = %s", (_jb(srec), series))
        row = cur.execute("SELECT rec FROM studies WHERE uid = %s", (study,)).fetchone()
        if row is None:
            return
        strec = row[0]
        strec["n_instances"] -= 1
        strec["bytes"] -= rec.size
        count_tier(strec, rec.blob.tier, -1)
        strec["n_series"] -= int(series_gone)
        if series_gone:
            strec["modalities"] = sorted({
                m for (attrs,) in cur.execute("SELECT rec->'attrs' FROM series WHERE study = %s", (study,)).fetchall()
                for m in md.string_values((attrs or {}).get("00080060"))})
        if strec["n_instances"] <= 0:
            patient = strec.get("patient", patient)
            cur.execute("DELETE FROM studies WHERE uid = %s", (study,))
            cur.execute("DELETE FROM study_keys WHERE study = %s", (study,))
            row = cur.execute("SELECT rec FROM patients WHERE key = %s", (patient,)).fetchone()
            if row is not None:
                prec = row[0]
                prec["n_studies"] -= 1
                if prec["n_studies"] <= 0:
                    cur.execute("DELETE FROM patients WHERE key = %s", (patient,))
                else:
                    cur.execute("UPDATE patients SET rec = %s WHERE key = %s", (_jb(prec), patient))
        else:
            cur.execute("UPDATE studies SET rec = %s WHERE uid = %s", (_jb(strec), study))

    # -- tiers: moves, copies, access, flags, fixity times ------------------------------------
    def move_begin(self, sop: str, src: BlobRef, dst: BlobRef, session: str) -> None:
        entry = {"src": list(src), "dst": list(dst), "state": "copying", "session": session, "time": _now()}
        self._write(lambda cur: self._kv_put(cur, "moves", sop, _dumps(entry)))

    def move_switch(self, sop: str, src: BlobRef, dst: BlobRef) -> bool:
        def run(cur):
            rec = self._inst(cur, sop)
            if rec is None or rec.blob != src:
                return False
            self._lock_all(cur, [(L_STUDY, rec.study), (L_SERIES, rec.series), (L_INSTANCE, sop)])
            rec = self._inst(cur, sop)
            if rec is None or rec.blob != src:
                return False
            cur.execute("UPDATE instances SET tier = %s, blob_key = %s WHERE sop = %s", (dst.tier, dst.key, sop))
            cur.execute("DELETE FROM blobs WHERE key = %s", (src.key,))
            cur.execute("INSERT INTO blobs VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET sop = EXCLUDED.sop",
                        (dst.key, sop))
            for table, key, uid in (("series", "uid", rec.series), ("studies", "uid", rec.study)):
                row = cur.execute(f"SELECT rec FROM {table} WHERE {key} = %s", (uid,)).fetchone()
                if row is not None:
                    d = row[0]
                    count_tier(d, src.tier, -1)
                    count_tier(d, dst.tier, 1)
                    cur.execute(f"UPDATE {table} SET rec = %s WHERE {key} = %s", (_jb(d), uid))
            raw = self._kv_get(cur, "moves", sop)
            if raw is not None:
                entry = json.loads(raw)
                entry["state"] = "switched"
                self._kv_put(cur, "moves", sop, _dumps(entry))
            self._kv_del(cur, "copies", sop + SEP + dst.tier)
            return True

        done = self._write(run)
        self.forget(sop)
        return done

    def move_end(self, sop: str) -> None:
        self._write(lambda cur: self._kv_del(cur, "moves", sop))

    def moves(self) -> list[tuple[str, BlobRef, BlobRef, str, str]]:
        out = []
        for k, v in self._kv_all("moves"):
            d = json.loads(v)
            out.append((k.decode(), BlobRef(*d["src"]), BlobRef(*d["dst"]), d["state"], d["session"]))
        return out

    def add_copy(self, sop: str, blob: BlobRef) -> bool:
        def run(cur):
            self._lock(cur, L_INSTANCE, sop)
            if cur.execute("SELECT 1 FROM instances WHERE sop = %s", (sop,)).fetchone() is None:
                return False
            self._kv_put(cur, "copies", sop + SEP + blob.tier, _dumps({"key": blob.key, "created": _now()}))
            cur.execute("INSERT INTO blobs VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET sop = EXCLUDED.sop",
                        (blob.key, sop))
            return True

        return self._write(run)

    def drop_copy(self, sop: str, tier: str) -> BlobRef | None:
        def run(cur):
            raw = self._kv_get(cur, "copies", sop + SEP + tier)
            if raw is None:
                return None
            blob = BlobRef(tier, json.loads(raw)["key"])
            self._kv_del(cur, "copies", sop + SEP + tier)
            cur.execute("DELETE FROM blobs WHERE key = %s", (blob.key,))
            return blob

        return self._write(run)

    def copies(self, sop: str) -> list[BlobRef]:
        prefix = (sop + SEP).encode()
        with self._tx(single=True) as cur:
            rows = self._kv_prefix(cur, "copies", prefix)
        return [BlobRef(k[len(prefix):].decode(), json.loads(v)["key"]) for k, v in rows]

    def touch_study(self, study: str, when: str) -> None:
        self._write(lambda cur: self._kv_put(cur, "access", study, when.encode()))

    def study_access(self, study: str) -> str | None:
        with self._tx(single=True) as cur:
            raw = self._kv_get(cur, "access", study)
        return None if raw is None else raw.decode()

    def set_flags(self, study: str, **flags: bool) -> dict[str, bool]:
        def run(cur):
            self._lock(cur, L_FLAGS, study)
            raw = self._kv_get(cur, "flags", study)
            d = json.loads(raw) if raw else {}
            d.update(flags)
            d = {k: v for k, v in d.items() if v}
            if d:
                self._kv_put(cur, "flags", study, _dumps(d))
            else:
                self._kv_del(cur, "flags", study)
            return d

        return self._write(run)

    def flags(self, study: str) -> dict[str, bool]:
        with self._tx(single=True) as cur:
            raw = self._kv_get(cur, "flags", study)
        return json.loads(raw) if raw else {}

    def set_verified(self, sop: str, tier: str, when: str) -> None:
        self._write(lambda cur: self._kv_put(cur, "verified", sop + SEP + tier, when.encode()))

    def verified(self, sop: str, tier: str) -> str | None:
        with self._tx(single=True) as cur:
            raw = self._kv_get(cur, "verified", sop + SEP + tier)
        return None if raw is None else raw.decode()

    # -- API tokens ------------------------------------------------------------------------
    def put_token(self, token_id: str, record: dict) -> None:
        self._write(lambda cur: self._kv_put(cur, "tokens", token_id, _dumps(record)))

    def token(self, token_id: str) -> dict | None:
        with self._tx(single=True) as cur:
            raw = self._kv_get(cur, "tokens", token_id)
        return None if raw is None else json.loads(raw)

    def tokens(self) -> list[dict]:
        return [json.loads(v) for _k, v in self._kv_batched("tokens")]

    # -- generic records (base.RECORD_TABLES) --------------------------------------------------
    @staticmethod
    def _space(table: str) -> str:
        if table not in RECORD_TABLES:
            raise KeyError(f"no record table {table!r}")
        return "r:" + table

    def put_record(self, table: str, key: str, record: dict) -> None:
        self.put_records(table, {key: record})

    def put_records(self, table: str, records: Mapping[str, dict]) -> None:
        space = self._space(table)
        rows = [(space, key.encode(), _dumps(r)) for key, r in records.items()]

        def run(cur):
            cur.executemany("INSERT INTO kv VALUES (%s, %s, %s) ON CONFLICT (space, key) DO UPDATE SET val = EXCLUDED.val",
                            rows)

        if rows:
            self._write(run)

    def record(self, table: str, key: str) -> dict | None:
        space = self._space(table)
        with self._tx(single=True) as cur:
            raw = self._kv_get(cur, space, key)
        return None if raw is None else json.loads(raw)

    def update_record(self, table: str, key: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        """Read-modify-write under the key's advisory lock: no other process's update of this
        record interleaves (consultation claims and cluster leases rely on it)."""
        space = self._space(table)

        def run(cur):
            self._lock(cur, L_RECORD, space + SEP + key)
            raw = self._kv_get(cur, space, key)
            new = change(None if raw is None else json.loads(raw))
            if new is None:
                if raw is not None:
                    self._kv_del(cur, space, key)
            else:
                self._kv_put(cur, space, key, _dumps(new))
            return new

        return self._write(run)

    def delete_record(self, table: str, key: str) -> bool:
        space = self._space(table)
        return self._write(lambda cur: self._kv_del(cur, space, key))

    def records(self, table: str, prefix: str = "") -> Iterator[tuple[str, dict]]:
        for k, v in self._kv_batched(self._space(table), prefix.encode()):
            yield k.decode(), json.loads(v)

    def backup(self, directory: Path) -> Path:
        """A consistent dump of every table while the archive is in use: JSON lines
        {"table", "row"} (bytea base64-free: hex, as PostgreSQL writes it) from one REPEATABLE
        READ transaction. For a restorable copy of a production database use pg_dump."""
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise FileExistsError(f"{directory} is not empty")
        out = directory / "index.jsonl"
        try:
            with self.pool.connection() as conn, open(out, "w", encoding="utf-8") as f:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                f.write(json.dumps({"pathpacs_index": "postgresql", "schema": SCHEMA}) + "\n")
                for table in TABLES:
                    with conn.cursor(name=f"backup_{table}") as cur:
                        cur.itersize = 2000
                        cur.execute(f"SELECT row_to_json(t)::text FROM {table} t")
                        for (row,) in cur:
                            f.write(f'{{"table":"{table}","row":{row}}}\n')
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise _unavailable(exc) from exc
        return out

    # -- frame checksum migration and fixity events -------------------------------------------
    def checksum_todo(self, limit: int) -> list[str]:
        rows = self._read("SELECT key FROM kv WHERE space = 'todo_crc' ORDER BY key LIMIT %s", (limit,))
        return [bytes(k).decode() for (k,) in rows]

    def checksum_todo_count(self) -> int:
        return self._one("SELECT count(*) FROM kv WHERE space = 'todo_crc'")[0]

    def set_frame_checksums(self, sop: str, blob: BlobRef, crcs: list[int] | None,
                            damaged: str | None = None) -> bool:
        def run(cur):
            self._lock(cur, L_INSTANCE, sop)
            self._kv_del(cur, "todo_crc", sop)
            row = cur.execute("SELECT frames, tier, blob_key FROM instances WHERE sop = %s", (sop,)).fetchone()
            if row is None or row[0] is None:
                return False
            head, frags, _ = frametable.read_all(bytes(row[0]))
            if BlobRef(row[1], row[2]) != blob or head.checked:
                return False
            cur.execute("UPDATE instances SET frames = %s WHERE sop = %s", (frametable.pack(frags, crcs, damaged), sop))
            return True

        done = self._write(run)
        self.forget(sop)
        return done

    def record_fixity(self, event: FixityEvent) -> None:
        if self.readonly:
            return
        d = {"time": event.time, "sop": event.sop, "blob": event.blob.key, "tier": event.blob.tier,
             "what": event.what, "source": event.source}
        self._write(lambda cur: self._kv_put(cur, "fixity", event.time + SEP + event.sop, _dumps(d)))

    def fixity_events(self) -> list[FixityEvent]:
        out = []
        for _k, v in self._kv_batched("fixity"):
            d = json.loads(v)
            out.append(FixityEvent(d["time"], d["sop"], BlobRef(d["tier"], d["blob"]), d["what"], d["source"]))
        return out

    # -- moving an index to another backend (archive.index.migrate) -------------------------
    def bulk_values(self, sop: str) -> dict[str, bytes]:
        return {p: bytes(v) for p, v in self._read("SELECT path, value FROM bulk WHERE sop = %s ORDER BY path", (sop,))}

    def put_version(self, entry: Mapping[str, Any]) -> bool:
        rec = entry["record"]
        d = {"record": rec.to_json() if isinstance(rec, InstanceRecord) else dict(rec),
             "copies": [list(c) for c in entry["copies"]], "time": entry["time"], "who": entry.get("who", "")}

        def run(cur):
            if self._kv_get(cur, "versions", entry["key"]) is not None:
                return False
            self._kv_put(cur, "versions", entry["key"], _dumps(d))
            for blob_key in [d["record"]["blob"]] + [c[1] for c in d["copies"]]:  # never swept
                cur.execute("INSERT INTO blobs VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET sop = EXCLUDED.sop",
                            (blob_key, d["record"]["sop"]))
            self._bump(cur)
            return True

        return self._write(run)

    # -- rejection (IOCM), replaced versions, purge intents ---------------------------------
    @staticmethod
    def _bump(cur) -> None:
        cur.execute("UPDATE state SET value = value + 1 WHERE name = 'rejected_gen'")

    def _keep_version(self, cur, current: InstanceRecord, who: str) -> None:
        prefix = (current.sop + SEP).encode()
        copies = [[k[len(prefix):].decode(), json.loads(v)["key"]] for k, v in self._kv_prefix(cur, "copies", prefix)]
        now = _now()
        entry = {"record": current.to_json(), "copies": copies, "time": now, "who": who}
        self._remove(cur, current.sop)
        self._kv_put(cur, "versions", SEP.join((current.sop, now, uuid.uuid4().hex[:8])), _dumps(entry))
        for blob_key in [current.blob.key] + [c[1] for c in copies]:  # still referenced: never swept
            cur.execute("INSERT INTO blobs VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET sop = EXCLUDED.sop",
                        (blob_key, current.sop))
        self._bump(cur)

    def reject(self, marks: Mapping[str, Mapping[str, Any]]) -> int:
        if not marks:
            return 0

        def run(cur):
            n = 0
            for sop, mark in marks.items():
                if cur.execute("SELECT 1 FROM instances WHERE sop = %s", (sop,)).fetchone() is None:
                    continue
                cur.execute("INSERT INTO kv VALUES ('rejected', %s, %s) ON CONFLICT DO NOTHING",
                            (sop.encode(), _dumps(dict(mark))))
                n += cur.rowcount
            self._bump(cur)
            return n

        return self._write(run)

    def unreject(self, sops: Sequence[str]) -> int:
        def run(cur):
            n = 0
            for sop in sops:
                if self._kv_get(cur, "purges", sop) is not None:
                    continue
                n += self._kv_del(cur, "rejected", sop)
            self._bump(cur)
            return n

        return self._write(run)

    def rejection_generation(self) -> int:
        row = self._one("SELECT value FROM state WHERE name = 'rejected_gen'")
        return int(row[0]) if row else 0

    def rejections(self) -> tuple[int, dict[str, dict], set[str]]:
        with self._tx() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            gen = int(cur.execute("SELECT value FROM state WHERE name = 'rejected_gen'").fetchone()[0])
            marks = {k.decode(): json.loads(v) for k, v in self._kv_prefix(cur, "rejected", b"")}
            purging = {d["sop"] for _k, v in self._kv_prefix(cur, "purges", b"")
                       if (d := json.loads(v))["kind"] == "instance"}
        return gen, marks, purging

    def versions(self, sop: str | None = None) -> list[dict]:
        out = []
        prefix = b"" if sop is None else (sop + SEP).encode()
        for k, v in self._kv_batched("versions", prefix):
            d = json.loads(v)
            d["key"] = k.decode()
            d["record"] = InstanceRecord.from_json(d["record"])
            d["copies"] = [BlobRef(*c) for c in d["copies"]]
            out.append(d)
        return out

    def _drop_version_blobs(self, cur, d: dict) -> None:
        cur_rec = self._inst(cur, d["record"]["sop"])
        for blob_key in [d["record"]["blob"]] + [c[1] for c in d["copies"]]:
            if cur_rec is None or cur_rec.blob.key != blob_key:
                cur.execute("DELETE FROM blobs WHERE key = %s", (blob_key,))

    def drop_version(self, key: str) -> bool:
        def run(cur):
            raw = self._kv_get(cur, "versions", key)
            if raw is None:
                return False
            d = json.loads(raw)
            self._lock(cur, L_INSTANCE, d["record"]["sop"])
            self._drop_version_blobs(cur, d)
            self._kv_del(cur, "versions", key)
            self._bump(cur)
            return True

        return self._write(run)

    def begin_purge(self, intents: Mapping[str, Mapping[str, Any]]) -> None:
        def run(cur):
            for key, intent in intents.items():
                self._kv_put(cur, "purges", key, _dumps(dict(intent)))
            self._bump(cur)

        self._write(run)

    def purges(self) -> dict[str, dict]:
        return {k.decode(): json.loads(v) for k, v in self._kv_all("purges")}

    def finish_purge(self, key: str) -> bool:
        def run(cur):
            raw = self._kv_get(cur, "purges", key)
            if raw is None:
                return False
            intent = json.loads(raw)
            sop = intent["sop"]
            if intent["kind"] == "instance":
                rec = self._inst(cur, sop)
                if rec is not None:
                    self._lock_all(cur, self._family_locks(rec, self._study_patient(cur, rec.study)))
                    rec = self._inst(cur, sop)
                self._remove(cur, sop)
                self._kv_del(cur, "rejected", sop)
                if rec is not None and cur.execute("SELECT 1 FROM studies WHERE uid = %s", (rec.study,)).fetchone() is None:
                    self._kv_del(cur, "access", rec.study)
                if rec is not None:  # an instance whose Patient ID differs from its study's left a record
                    row = cur.execute("SELECT rec FROM patients WHERE key = %s", (rec.patient,)).fetchone()
                    if row is not None and row[0]["n_studies"] <= 0 and cur.execute(
                            "SELECT 1 FROM studies WHERE patient = %s LIMIT 1", (rec.patient,)).fetchone() is None:
                        cur.execute("DELETE FROM patients WHERE key = %s", (rec.patient,))
            else:
                vraw = self._kv_get(cur, "versions", intent["version"])
                if vraw is not None:
                    self._lock(cur, L_INSTANCE, sop)
                    self._drop_version_blobs(cur, json.loads(vraw))
                    self._kv_del(cur, "versions", intent["version"])
            self._kv_del(cur, "purges", key)
            self._bump(cur)
            return True

        done = self._write(run)
        self._forget_all()
        return done


def _safe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(dsn)
        return f"{d.get('host', 'localhost')}:{d.get('port', 5432)}/{d.get('dbname', '')}"
    except Exception:  # noqa: BLE001 - a message helper never fails the caller
        return "the configured database"
