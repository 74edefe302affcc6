"""The index: everything the archive knows about its instances, as domain operations.

A `typing.Protocol`, so a second backend (PostgreSQL, for several nodes) implements the same
operations; the LMDB backend (archive.index.lmdb) is the embedded default, archive.index.postgresql
the shared one (several nodes; every write one transaction, safe from many processes at once). Nothing outside a
backend sees a transaction, a cursor or a database name. Reads return typed records
(archive.records); no read holds the index open after it returns (iterators read in batches).

Query candidate selection is the backend's (LMDB: key ranges; SQL: WHERE clauses); PS3.4
matching of the candidates is backend-independent (archive.query).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from ..records import (BlobRef, Frames, InstanceRecord, PatientRecord, SeriesRecord, Stats,
                       StudyRecord)
from ..status import Outcome

# Tables of JSON records that modules above the index keep through the generic record
# operations: consultation jobs and their per-instance state, the inbox of received requests,
# UID maps of de-identification, consent records, share links; the nodes of a cluster (heartbeats)
# and the cluster-wide leases of background work (archive.cluster). A module adds its table here.
RECORD_TABLES = ("consult", "consult_items", "inbox", "uidmap", "consents", "shares", "commitments",
                 "nodes", "leases")


@dataclass(frozen=True)
class NewInstance:
    """Everything ingest built for one instance, committed in one transaction."""

    record: InstanceRecord
    frames: list[list[tuple[int, int]]]  # fragments per frame ([] when the instance has none)
    crcs: list[int]  # per frame; None: not known yet (a migrated older table): queued for the checksum pass
    metadata: bytes  # DICOM JSON (BulkDataURIs relative to metadata.BASE_TOKEN)
    bulk: Mapping[str, bytes]
    patient_attrs: Mapping[str, Any]
    study_attrs: Mapping[str, Any]
    series_attrs: Mapping[str, Any]


@dataclass(frozen=True)
class AddResult:
    """What `add_instance` did: STORED, DUPLICATE (same sha256: nothing written), REPLACED
    (`previous` is no longer the instance: it is kept, blob and copies, as a rejected version
    (`versions`) until a purge) or REJECTED (same UID, other bytes, and replace was not
    allowed: nothing written)."""

    outcome: Outcome
    previous: InstanceRecord | None = None


@dataclass(frozen=True)
class FixityEvent:
    time: str
    sop: str
    blob: BlobRef
    what: str
    source: str


class Index(Protocol):
    readonly: bool

    def close(self) -> None: ...

    # -- lookups ------------------------------------------------------------------
    def instance(self, sop: str) -> InstanceRecord | None: ...
    def series(self, uid: str) -> SeriesRecord | None: ...
    def study(self, uid: str) -> StudyRecord | None: ...
    def patient(self, key: str) -> PatientRecord | None: ...

    def frames(self, sop: str, numbers: Sequence[int]) -> Frames | None:
        """Location and slots of the requested 1-based frames (None entries when out of
        range); None when the instance has no frame table. The frame path: keep it cheap."""

    def all_frames(self, sop: str) -> Frames | None:
        """Every frame's fragments (migration, checks)."""

    def metadata(self, sops: Sequence[str]) -> list[bytes]:
        """Stored DICOM JSON of each instance that exists, in order, read together."""

    def metadata_under(self, study: str, series: str | None = None) -> list[bytes] | None:
        """Stored DICOM JSON of every instance of a study (or one series of it), read together;
        None when the study (or the series in that study) is not there."""

    def bulk(self, sop: str, path: str) -> bytes | None: ...

    def forget(self, sop: str) -> None:
        """Drop whatever this process caches of `sop` (location, frame table): called when a
        read of its blob found it moved or gone, before one retry with a fresh lookup. A
        backend that caches nothing (LMDB: its reads are the memory map) does nothing."""

    # -- hierarchy ----------------------------------------------------------------
    def series_of_study(self, study: str) -> list[SeriesRecord]: ...
    def instances_of_series(self, series: str) -> list[InstanceRecord]: ...
    def studies_of_patient(self, patient: str) -> list[StudyRecord]: ...
    def patients(self) -> Iterator[PatientRecord]:
        """Every patient, in key order."""
    def studies(self) -> Iterator[StudyRecord]:
        """Every study."""
    def instances(self) -> Iterator[InstanceRecord]:
        """Every instance."""

    def candidates(self, level: str, keys: Sequence[Any], *, study: str | None = None,
                   series: str | None = None, fuzzy: bool = False, order: str | None = None) -> Iterator[Any]:
        """Records of `level` ("PATIENT", "STUDY", "SERIES", "IMAGE") that may match `keys`
        (archive.query.Key), limited to `study`/`series` when given: a superset of the matches,
        narrowed with the backend's own indexes; archive.query does the exact matching.
        `order` ("date" oldest first, "-date" newest first; STUDY level only): studies in order of
        StudyDate, StudyTime, UID, those without a date last, so a caller can page the sorted result."""

    def stats(self) -> Stats: ...

    # -- writes ---------------------------------------------------------------------
    def add_instance(self, new: NewInstance, *, replace: bool) -> AddResult:
        """Add one instance with its parents in one transaction, and clear its blob's pending
        mark; see AddResult for what happens when the SOP Instance UID is already there."""

    def add_instances(self, news: "Iterable[NewInstance]") -> int:
        """Add many new instances in one transaction (rebuilds, bulk loads); existing UIDs are
        left alone. Returns how many were added."""

    def add_pending(self, blob: BlobRef, session: str) -> None:
        """A blob is about to be placed before its record commits: a crash sweep removes it
        unless a record references it."""

    def clear_pending(self, blob: BlobRef) -> None: ...
    def pending(self) -> list[tuple[BlobRef, str]]: ...
    def blob_referenced(self, blob: BlobRef) -> bool: ...

    # -- tiers --------------------------------------------------------------------------
    def move_begin(self, sop: str, src: BlobRef, dst: BlobRef, session: str) -> None:
        """Journal a move before its copy starts (resolved at the next start after a crash)."""
    def move_switch(self, sop: str, src: BlobRef, dst: BlobRef) -> bool:
        """Point the instance at `dst` in one transaction, if it is still at `src`."""
    def move_end(self, sop: str) -> None: ...
    def moves(self) -> list[tuple[str, BlobRef, BlobRef, str, str]]:
        """Journal entries: (sop, src, dst, state "copying"|"switched", session)."""
    def add_copy(self, sop: str, blob: BlobRef) -> bool:
        """Record a further, verified copy (a replica) of an instance."""
    def drop_copy(self, sop: str, tier: str) -> BlobRef | None: ...
    def copies(self, sop: str) -> list[BlobRef]: ...
    def touch_study(self, study: str, when: str) -> None: ...
    def study_access(self, study: str) -> str | None: ...
    def set_flags(self, study: str, **flags: bool) -> dict[str, bool]:
        """pinned (never moves), hold (legal hold: never deleted, never off its replicas)."""
    def flags(self, study: str) -> dict[str, bool]: ...
    def set_verified(self, sop: str, tier: str, when: str) -> None: ...
    def verified(self, sop: str, tier: str) -> str | None: ...
    def put_token(self, token_id: str, record: dict) -> None:
        """Create or update an API token's record (archive.tokens: a hash, roles, scope, expiry)."""
    def token(self, token_id: str) -> dict | None: ...
    def tokens(self) -> list[dict]: ...
    def backup(self, directory: "Path") -> "Path":
        """A consistent copy of the index while it is in use."""

    # -- generic records of the modules above the index (consultation, de-identification,
    # consent): JSON objects by key in one of RECORD_TABLES; every call is one transaction ----
    def put_record(self, table: str, key: str, record: dict) -> None: ...
    def put_records(self, table: str, records: Mapping[str, dict]) -> None:
        """Several records of one table in one transaction."""
    def record(self, table: str, key: str) -> dict | None: ...
    def update_record(self, table: str, key: str,
                      change: Callable[[dict | None], dict | None]) -> dict | None:
        """Read-modify-write in one transaction (`change` returns the new record, or None to
        delete it): how a job is claimed or a state moves without a lost update."""
    def delete_record(self, table: str, key: str) -> bool: ...
    def records(self, table: str, prefix: str = "") -> Iterator[tuple[str, dict]]:
        """(key, record) of a table in key order, those whose key starts with `prefix`."""

    # -- rejection (IOCM) and purge: archive.deletion ------------------------------------------
    def reject(self, marks: Mapping[str, Mapping[str, Any]]) -> int:
        """Mark instances rejected (sop -> {"study", "series", "code", "time", "who", "note"}),
        in one transaction; an instance already rejected keeps its first mark. Returns how many
        were marked."""
    def unreject(self, sops: Sequence[str]) -> int:
        """Remove rejection marks (restore), except of instances a purge has begun on."""
    def rejection_generation(self) -> int:
        """A counter every change of the marks or purge intents moves (cheap: one key)."""
    def rejections(self) -> tuple[int, dict[str, dict], set[str]]:
        """(generation, every mark by sop, the sops a purge has begun on), read together."""
    def versions(self, sop: str | None = None) -> list[dict]:
        """Versions kept by a replace: {"key", "record": InstanceRecord, "copies": [BlobRef],
        "time" (when replaced), "who"}."""
    def drop_version(self, key: str) -> bool: ...
    def begin_purge(self, intents: Mapping[str, Mapping[str, Any]]) -> None:
        """Record purge intents (key -> {"kind": "instance"|"version", "sop", "version"?,
        "blobs": [[tier, key], ...]}) before any copy is deleted."""
    def purges(self) -> dict[str, dict]: ...
    def finish_purge(self, key: str) -> bool:
        """Remove the records of a purged instance or version and its intent, in one
        transaction (parents updated, or removed when empty)."""

    # -- fixity and migrations -----------------------------------------------------------
    def checksum_todo(self, limit: int) -> list[str]: ...
    def checksum_todo_count(self) -> int: ...
    def set_frame_checksums(self, sop: str, blob: BlobRef, crcs: list[int] | None,
                            damaged: str | None = None) -> bool: ...
    def record_fixity(self, event: FixityEvent) -> None: ...
    def fixity_events(self) -> list[FixityEvent]: ...

    # -- moving an index to another backend (archive.index.migrate) ---------------------------
    def bulk_values(self, sop: str) -> dict[str, bytes]:
        """Every bulk value of an instance by its path (what `bulk(sop, path)` answers)."""
    def put_version(self, entry: Mapping[str, Any]) -> bool:
        """Keep a replaced version as another index holds it (a `versions()` entry: its "key",
        record, copies, time, who), its blobs marked referenced; False when that key is there."""
