"""The Archive: the one API of the archive for DIMSE, DICOMweb, the pages and the CLI.

It owns the data directory: the index (archive.index, a Protocol with an LMDB backend), the
blob tiers (storage_tiers.BlobStore, by name) and local staging. Protocol layers call these
methods and use the record types (archive.records) and errors (archive.status) they return;
none of them touches the index or a store. That makes this the one place where tier lookup
happens today and where authorization and audit will go.

`AsyncArchive` wraps it for the event loop: every call runs in an executor except frame reads
from a store whose ranged reads are local (`BlobStore.inline_reads`), which stay inline so the
frame path keeps its speed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

from storage_tiers import BlobError, BlobNotFound, BlobStore, FilesystemStore, Spool, Staging, StoreUnavailable

from .access import SYSTEM, Forbidden, Principal, Right
from .config import Config
from .fixity import crc32c, scan, sha256_of
from .index import FixityEvent, Index, index_exists, open_index
from .ingest import IngestResult, ingest
from .query import Key, QueryError, SearchResult, Searcher
from .records import BlobRef, Frames, FrameTable, InstanceRecord, PatientRecord, SeriesRecord, Stats, StudyRecord
from .rejection_note import KOS_SOP_CLASS
from .status import ArchiveError, Damaged, ErrorKind, NotFound, Outcome, Unavailable

log = logging.getLogger("pathpacs.archive")
CHUNK = 1 << 20


def build_tiers(cfg: Config, readonly: bool = False) -> dict[str, BlobStore]:
    """The stores of the configured tiers (zero config: one filesystem tier "hot" under
    DATA/hot). S3 tiers are not contacted here; `Archive.check_tiers` does that at start-up."""
    stores: dict[str, BlobStore] = {}
    for name, t in cfg.tier_configs().items():
        if t.path is not None:
            stores[name] = FilesystemStore(Path(t.path), name=name, readonly=readonly)
        else:
            from storage_tiers.s3 import S3Store

            s3 = dict(t.s3 or {})
            stores[name] = S3Store(name, immutable=t.immutable, retention_days=t.retention_days, **s3)
    return stores


AVAILABILITY_ORDER = {"ONLINE": 0, "NEARLINE": 1, "OFFLINE": 2}


class ArchiveNotFound(Exception):
    """A read-only open of a data directory that holds no archive."""


class Archive:
    def __init__(self, config: Config, readonly: bool = False,
                 tiers: dict[str, BlobStore] | None = None, ingest_tier: str = "hot") -> None:
        """readonly: for verbs that only look (ls, stats, verify): nothing is created or swept,
        and a directory without an archive is ArchiveNotFound instead of a new empty archive.
        tiers: the blob stores by name (default: one filesystem tier "hot" under the data
        directory); ingest_tier: where new instances go."""
        self.config = config
        data = Path(config.data_dir)
        self.readonly = readonly
        if readonly:
            if not index_exists(Path(config.index_path or data / "index"), backend=config.index_backend, dsn=config.index_dsn):
                raise ArchiveNotFound(f"no archive in {data}" if config.index_backend == "lmdb"
                                      else f"no archive in the PostgreSQL database of index.dsn")
        else:
            data.mkdir(parents=True, exist_ok=True)
        self.data_dir = data
        self.index: Index = self._open_index()
        self.tiers: dict[str, BlobStore] = tiers if tiers is not None else build_tiers(config, readonly)
        self.ingest_tier: BlobStore = self.tiers[config.ingest_tier if tiers is None else ingest_tier]
        tier_cfg = config.tier_configs()
        self._availability = {name: (tier_cfg[name].availability if name in tier_cfg else
                                     "ONLINE" if getattr(store, "inline_reads", False) else "NEARLINE")
                              for name, store in self.tiers.items()}
        self._recall_tiers = {n for n, t in tier_cfg.items() if t.recall_on_access and n in self.tiers}
        self._touched: dict[str, float] = {}
        self._touch_queue: "queue.SimpleQueue[str] | None" = None
        self.on_access: Callable[[str], None] | None = None  # the lifecycle's recall hook
        self.staging: Staging | None = None if readonly else Staging(data / "hot" / "tmp")
        self._reported: set[tuple[str, str]] = set()
        self._parents: OrderedDict[str, tuple[str, str, str]] = OrderedDict()  # sop -> (study, series, blob key)
        self._parents_lock = threading.Lock()
        from .authn import build as build_authenticator
        from .lifecycle import Lifecycle

        # who may do what: tokens live in the index, so every process sees a revocation
        self.authn = build_authenticator(config, self.index)
        self.tokens = self.authn.tokens
        self.lifecycle = Lifecycle(self)
        from .deletion import Deletion

        self.deletion = Deletion(self)  # reject / restore / purge, and what is hidden from whom

        from .audit import build_audit

        # who did what (archive.audit): stores, queries, reads, moves, deletions, logins
        self.audit = build_audit(config, self._audit_patient, self._audit_classes)
        if not readonly:
            self.sweep()
            self.lifecycle.recover()

    def reopen_index(self) -> None:
        """After the index directory was replaced (index rebuild)."""
        self.index = self._open_index()
        self.lifecycle.index = self.index
        if "_cluster" in self.__dict__:
            self._cluster.reindex(self.index)
        with self._parents_lock:
            self._parents.clear()

    def _open_index(self) -> Index:
        c = self.config
        return open_index(Path(c.index_path or self.data_dir / "index"), map_size_gb=c.lmdb_map_size_gb, readonly=self.readonly,
                          backend=c.index_backend, dsn=c.index_dsn, pool_size=c.index_pool_size)

    @classmethod
    def open(cls, data_dir: Path, config: Config | None = None, readonly: bool = False) -> "Archive":
        cfg = config or Config()
        cfg.data_dir = Path(data_dir)
        return cls(cfg, readonly=readonly)

    def _audit_patient(self, study: str) -> tuple[str, str] | None:
        """(Patient ID, name) of a study, for audit records (on the audit writer's thread)."""
        from .metadata import first_value

        st = self.index.study(study)
        pat = self.index.patient(st.patient) if st is not None else None
        if pat is None:
            return None
        name = first_value(pat.attrs, "00100010")
        if isinstance(name, dict):
            name = name.get("Alphabetic", "")
        return str(first_value(pat.attrs, "00100020") or ""), str(name or "")

    def _audit_classes(self, sops) -> dict[str, str]:
        """SOP Class UIDs of instances, for aggregated audit records."""
        out = {}
        for sop in sops:
            rec = self.index.instance(sop)
            if rec is not None:
                out[sop] = rec.sop_class
        return out

    # -- tiers: availability and access ---------------------------------------------------------
    def availability(self, counts: "Mapping[str, int] | str") -> str:
        """InstanceAvailability of data on a tier, or on several (the least available wins)."""
        if isinstance(counts, str):
            return self._availability.get(counts, "OFFLINE")
        worst = "ONLINE"
        for name, n in counts.items():
            a = self._availability.get(name, "OFFLINE")
            if n > 0 and AVAILABILITY_ORDER[a] > AVAILABILITY_ORDER[worst]:
                worst = a
        return worst

    def touch(self, study: str) -> None:
        """Record that a study was read: at most once per lifecycle.access_interval_minutes per
        study and process, written by a background thread (never on the request path)."""
        now = time.monotonic()
        last = self._touched.get(study)
        if last is not None and now - last < self.config.access_interval_minutes * 60:
            return
        self._touched[study] = now
        if len(self._touched) > 100_000:
            self._touched.clear()
        if self.readonly:
            return
        if self._touch_queue is None:
            self._touch_queue = queue.SimpleQueue()
            threading.Thread(target=self._touch_writer, name="access-times", daemon=True).start()
        self._touch_queue.put(study)

    def _touch_writer(self) -> None:
        q = self._touch_queue
        assert q is not None
        while True:
            study = q.get()
            try:
                self.index.touch_study(study, _now())
                if self._recall_tiers and self.on_access is not None:
                    st = self.index.study(study)
                    if st is not None and set(st.tiers) & self._recall_tiers:
                        self.on_access(study)
            except Exception:
                log.exception("cannot record the access time of study %s", study)

    def check_tiers(self) -> None:
        """At start-up: every store answers (an S3 bucket exists, an immutable one has Object
        Lock). Raises the store's error (one line naming the tier) when one does not."""
        for store in self.tiers.values():
            check = getattr(store, "check", None)
            if check is not None:
                check()

    def tier(self, name: str) -> BlobStore:
        try:
            return self.tiers[name]
        except KeyError:
            raise Damaged("?", f"unknown tier {name!r}") from None

    @property
    def consultations(self):
        """Consultation jobs (archive.consult.jobs.Consultations: send a case, its worker),
        built on first use."""
        got = self.__dict__.get("_consultations")
        if got is None:
            from .consult.jobs import Consultations

            got = self.__dict__.setdefault("_consultations", Consultations(self))
        return got

    @property
    def cluster(self):
        """This node among the nodes sharing the index (archive.cluster.Cluster: heartbeats,
        leases), built on first use."""
        got = self.__dict__.get("_cluster")
        if got is None:
            from .cluster import Cluster

            got = self.__dict__.setdefault("_cluster", Cluster(self.index, self.config.node(),
                                                               self.config.lease_seconds))
        return got

    def pending_session(self) -> str:
        """The session string of a pending blob or a move this process writes: its node and
        staging session (archive.cluster.session_tag), so only a sweep that may remove it does."""
        from .cluster import session_tag

        return session_tag(self.config.node(), self.staging.session if self.staging is not None else "")

    @property
    def tmp_dir(self) -> Path:
        """This process's staging directory (on the ingest tier's filesystem: renames are free)."""
        assert self.staging is not None, "a read-only archive has no staging"
        return self.staging.dir

    def spool(self, suffix: str = ".part") -> Spool:
        """A staging file for a receiver (STOW-RS part, C-STORE data set): hashed while written."""
        assert self.staging is not None, "a read-only archive has no staging"
        return self.staging.spool(suffix)

    def close(self) -> None:
        self.audit.close()  # aggregated reads and queued records reach the trail first
        for tier in self.tiers.values():
            tier.close()
        if self.staging is not None:
            self.staging.close()
        self.index.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- crash recovery ------------------------------------------------------------------
    def sweep(self) -> None:
        """Remove staging dirs of dead processes and blobs placed but never committed: this
        node's dead sessions' and those of nodes dead for longer than a lease, never a live
        node's (archive.cluster.Cluster.may_remove)."""
        assert self.staging is not None
        n_tmp = self.staging.sweep()
        for tier in self.tiers.values():
            sweep = getattr(tier, "sweep_incoming", None)
            if sweep is not None:
                sweep()
        n_orphans = 0
        for blob, session in self.index.pending():
            if not self.cluster.may_remove(session, self.staging.session_alive):
                continue
            if not self.index.blob_referenced(blob):
                store = self.tiers.get(blob.tier)
                for t in ([store] if store is not None else self.tiers.values()):
                    t.delete(blob.key)
                n_orphans += 1
            self.index.clear_pending(blob)
        if n_tmp or n_orphans:
            log.info("swept %d stale staging dirs and %d uncommitted blobs", n_tmp, n_orphans)

    # -- ingest --------------------------------------------------------------------------
    def ingest(self, source: Path | BinaryIO | Iterable[bytes], *, take_ownership: bool = False,
               expected_sop_class: str | None = None, expected_study: str | None = None,
               calling_aet: str = "", origin: str = "import", sha256: str | None = None,
               may_reject: bool = False, who: Principal = SYSTEM) -> IngestResult:
        """Store one instance (see archive.ingest): never raises for bad input; refused
        (FORBIDDEN) when `who` may not store it.
        may_reject: the sender may reject (an HTTP principal with Right.ADMIN, a DIMSE node
        allowed "reject"): a rejection note it sends (a KOS titled with a CID 7011 code) is
        honoured, the instances it references rejected. Otherwise a note is a plain KOS."""
        result = ingest(self, source, take_ownership=take_ownership, expected_sop_class=expected_sop_class,
                        expected_study=expected_study, calling_aet=calling_aet, origin=origin, sha256=sha256,
                        who=who)
        if may_reject and result.outcome is Outcome.STORED and result.sop_class_uid == KOS_SOP_CLASS:
            try:
                self.deletion.honour_note(result.sop_instance_uid, who)  # type: ignore[arg-type]
            except ArchiveError as exc:  # stored as a plain KOS; the reject itself was refused
                log.warning("rejection note %s not honoured: %s", result.sop_instance_uid, exc.reason)
                result.reason = f"rejection note not honoured: {exc.reason}"
        if result.outcome is Outcome.STORED and not self.readonly:
            from .consult import inbox  # consultation requests and answers (SR classes only; never raises)

            inbox.on_stored(self, result, who)
        return result

    def ingest_file(self, path: Path, *, take_ownership: bool = False, source: str = "import",
                    calling_aet: str = "", expected_sop_class: str | None = None,
                    may_reject: bool = False) -> IngestResult:
        result = self.ingest(Path(path), take_ownership=take_ownership, origin=source,
                             calling_aet=calling_aet, expected_sop_class=expected_sop_class,
                             may_reject=may_reject)
        from .audit import local_principal

        self.audit.stored(local_principal(), result.study_uid, None, result.sop_class_uid or "",
                          result.sop_instance_uid or "", "", calling_aet, "success" if result.ok else "minor failure",
                          session=f"{source} pid {os.getpid()}", reason=result.reason or "")
        return result

    # -- reject, restore, purge (archive.deletion) ---------------------------------------------
    def reject(self, level: str, uid: str, reason_code: str, who: Principal = SYSTEM,
               study: str | None = None) -> tuple[int, str | None]:
        """IOCM reject of a study, series or instance ("study" | "series" | "instance"):
        hidden from all but administrators, kept, a rejection note stored. Returns (instances
        rejected, the note's SOP Instance UID). Forbidden without Right.ADMIN; Retained under
        legal hold (and for 113039 under retention); NotFound when unknown."""
        who.require(Right.ADMIN, "reject instances")
        return self.deletion.reject(level, uid, reason_code, who, study=study)

    def restore(self, level: str, uid: str, who: Principal = SYSTEM, study: str | None = None) -> int:
        """Undo a reject before purge; returns how many instances are visible again."""
        who.require(Right.ADMIN, "restore rejected instances")
        return self.deletion.restore(level, uid, who, study=study)

    def purge(self, *, dry_run: bool = False, who: Principal = SYSTEM):
        """Remove for good what was rejected longer than purge_after_days ago (every copy on
        every tier, then the records): a PurgeReport; refused studies are listed in it."""
        who.require(Right.ADMIN, "purge rejected instances")
        return self.deletion.purge(dry_run=dry_run, who=who)

    def _hidden(self) -> frozenset[str]:
        return self.deletion.visibility.current().sops

    def study_hidden(self, st: StudyRecord, who: Principal) -> bool:
        """Whether every instance of a study is hidden from `who`."""
        return self.deletion.visibility.current().counts(who)[2].get(st.uid, 0) >= st.n_instances > 0

    # -- research views ------------------------------------------------------------------
    def view(self, who: Principal):
        """The de-identified view `who` reads through (archive.deid.views.ResearchView), or None
        for a principal that sees what is stored: the one question every read path asks."""
        if not who.deidentified:
            return None
        view = getattr(self, "_research_view", None)
        if view is None:
            from .deid.views import ResearchView

            view = self._research_view = ResearchView(self)
        return view

    # -- records -------------------------------------------------------------------------
    def instance(self, sop: str) -> InstanceRecord | None:
        return self.index.instance(sop)

    def study(self, uid: str) -> StudyRecord | None:
        return self.index.study(uid)

    def series(self, uid: str) -> SeriesRecord | None:
        return self.index.series(uid)

    def series_of_study(self, study: str) -> list[SeriesRecord]:
        return self.index.series_of_study(study)

    def instances_of_series(self, series: str) -> list[InstanceRecord]:
        return self.index.instances_of_series(series)

    def patients(self) -> Iterator[PatientRecord]:
        return self.index.patients()

    def studies(self) -> Iterator[StudyRecord]:
        return self.index.studies()

    def studies_of_patient(self, key: str) -> list[StudyRecord]:
        return self.index.studies_of_patient(key)

    def instances(self) -> Iterator[InstanceRecord]:
        return self.index.instances()

    def stats(self) -> Stats:
        return self.index.stats()

    def instance_in(self, study: str, series: str | None, sop: str, who: Principal = SYSTEM) -> InstanceRecord:
        """The instance `sop`, which must belong to `study` (and `series`) and be visible to
        `who`: else NotFound."""
        rec = self.index.instance(sop)
        if rec is None or rec.study != study or (series is not None and rec.series != series) \
                or self.deletion.visibility.hidden(sop, who) or (who.deidentified and self.view(who).hidden(rec)):
            where = f"series {series} of study {study}" if series else f"study {study}"
            raise NotFound(f"instance {sop} not found in {where}")
        return rec

    def instances_under(self, study: str, series: str | None = None, who: Principal = SYSTEM) -> list[InstanceRecord]:
        """Every instance of a study (or of one series of it) that `who` may see; NotFound
        when there is none."""
        if series is not None:
            se = self.index.series(series)
            if se is None or se.study != study:
                raise NotFound(f"series {series} of study {study} not found")
            recs = self.index.instances_of_series(series)
        else:
            if self.index.study(study) is None:
                raise NotFound(f"study {study} not found")
            recs = [i for se in self.index.series_of_study(study) for i in self.index.instances_of_series(se.uid)]
        vis = self.deletion.visibility.current()
        if vis.sops:
            hidden = vis.purging if who.sees_rejected else vis.sops
            recs = [r for r in recs if r.sop not in hidden]
            if not recs:
                raise NotFound(f"series {series} of study {study} not found" if series else f"study {study} not found")
        view = self.view(who)
        if view is not None:
            recs = view.visible(recs)
            if not recs:
                raise NotFound(f"series {series} of study {study} not found" if series else f"study {study} not found")
        return recs

    # -- query -----------------------------------------------------------------------------
    def search(self, level: str, keys: list[Key], *, study: str | None = None, series: str | None = None,
               fuzzy: bool = False, retrieve_aet: str | None = None,
               full_metadata: bool = False, who: Principal = SYSTEM,
               order: str | None = None) -> Iterator[SearchResult]:
        """PS3.4 matching at one level (QIDO and C-FIND alike); QueryError for a bad query.
        Only what `who` may see is answered: a scoped principal gets its studies alone.
        `order` ("date" | "-date", studies only): in study date order (the browser's sort)."""
        view = self.view(who)
        if view is not None:
            view.check_query(keys)
        searcher = Searcher(self.index, fuzzy=fuzzy, retrieve_aet=retrieve_aet,
                            full_instance_metadata=full_metadata, availability=self.availability, order=order)
        results = searcher.search(level, keys, study=study, series=series)
        vis = self.deletion.visibility.current()
        if vis.purging or (vis.sops and not who.sees_rejected):
            results = self._unrejected(results, who)
        if who.studies is not None:
            results = (r for r in results if who.sees(r.study))
        return results if view is None else view.results(results)

    def _unrejected(self, results: Iterator[SearchResult], who: Principal) -> Iterator[SearchResult]:
        """Search results without what `who` may not see (rejected objects; for administrators,
        objects a purge has begun on): instances by UID, series and studies when every
        instance in them is hidden (their counts less the hidden ones otherwise)."""
        from dataclasses import replace

        from . import metadata as md

        hidden, by_series, by_study = self.deletion.visibility.current().counts(who)
        for r in results:
            if r.level == "IMAGE":
                if r.sop in hidden:
                    continue
            elif r.level in ("SERIES", "STUDY"):
                tag, n_hidden = (("00201209", by_series.get(r.series or "", 0)) if r.level == "SERIES"
                                 else ("00201208", by_study.get(r.study or "", 0)))
                if n_hidden:
                    n = md.int_value(r.doc, tag, 0)
                    if n - n_hidden <= 0:
                        continue
                    r = replace(r, doc={**r.doc, tag: {"vr": "IS", "Value": [n - n_hidden]}})
            elif r.level == "PATIENT":
                studies = self.index.studies_of_patient(r.patient or "")
                if studies and all(by_study.get(st.uid, 0) >= st.n_instances for st in studies):
                    continue
            yield r

    def check_visible(self, who: Principal, study: str) -> None:
        """NotFound (never Forbidden: existence is not disclosed) when `study` is outside the
        scope of `who`."""
        if not who.sees(study):
            raise NotFound(f"study {study} not found")

    def retrieve_set(self, level: str, keys: list[Key], who: Principal = SYSTEM) -> list[InstanceRecord]:
        """The instances a C-GET/C-MOVE identifier covers (unique keys at `level` and above)
        that `who` may see."""
        keys = [k for k in keys if not k.universal]
        if not keys:
            raise QueryError("a retrieve needs at least one unique key")
        if who.deidentified:  # C-GET/C-MOVE send stored files: de-identified views are DICOMweb's
            raise Forbidden(f"{who.name} reads de-identified views, which are not sent over DIMSE")
        out: dict[str, InstanceRecord] = {}
        hidden = self.deletion.visibility.current().purging if who.sees_rejected else self._hidden()
        for r in self.search(level, keys, who=who):
            if r.level == "IMAGE":
                rec = self.index.instance(r.sop)  # type: ignore[arg-type]
                recs = [rec] if rec else []
            elif r.level == "SERIES":
                recs = self.index.instances_of_series(r.series)  # type: ignore[arg-type]
            elif r.level == "STUDY":
                recs = [i for se in self.index.series_of_study(r.study) for i in self.index.instances_of_series(se.uid)]  # type: ignore[arg-type]
            else:
                recs = [i for st in self.index.studies_of_patient(r.patient)  # type: ignore[arg-type]
                        for se in self.index.series_of_study(st.uid) for i in self.index.instances_of_series(se.uid)]
            for rec in recs:
                if rec.sop not in hidden:
                    out.setdefault(rec.sop, rec)
        view = self.view(who)
        return list(out.values()) if view is None else view.visible(list(out.values()))

    # -- metadata and bulk data -----------------------------------------------------------------
    def metadata(self, study: str, series: str | None = None, sop: str | None = None,
                 who: Principal = SYSTEM) -> list[bytes]:
        """Stored DICOM JSON of an instance, a series or a study (NotFound when unknown or
        hidden from `who`)."""
        view = self.view(who)
        if view is not None:  # de-identified, without the instances the view hides
            if sop is not None:
                self.instance_in(study, series, sop, who)
                return view.metadata(self.index.metadata([sop]))
            return view.metadata(self.index.metadata([r.sop for r in self.instances_under(study, series, who)]))
        if sop is not None:
            self.instance_in(study, series, sop, who)
            return self.index.metadata([sop])
        vis = self.deletion.visibility.current()
        if vis.sops and vis.by_study.get(study):  # some of this study is hidden: by UID
            return self.index.metadata([r.sop for r in self.instances_under(study, series, who)])
        metas = self.index.metadata_under(study, series)
        if metas is None:
            raise NotFound(f"series {series} of study {study} not found" if series else f"study {study} not found")
        return metas

    def instance_metadata(self, rec: InstanceRecord) -> bytes | None:
        got = self.index.metadata([rec.sop])
        return got[0] if got else None

    def bulk(self, study: str, series: str, sop: str, path: str, who: Principal = SYSTEM) -> bytes:
        self.instance_in(study, series, sop, who)
        value = self.index.bulk(sop, path)
        view = self.view(who)
        if value is not None and view is not None and not view.bulk_allowed(study, series, sop, path):
            value = None  # removed by de-identification: as if it did not exist
        if value is None:
            raise NotFound(f"no bulk data {path[:100]!r} in instance {sop}")
        return value

    # -- frames --------------------------------------------------------------------------------
    def frame_table(self, sop: str) -> FrameTable:
        located = self.index.frames(sop, [])
        if located is None:
            raise NotFound(f"instance {sop} has no frames")
        return located.table

    def check_parents(self, sop: str, study: str, series: str, blob: BlobRef) -> None:
        """NotFound unless `sop` is in `series` of `study`; remembered per blob (a replaced
        instance has a new blob, so nothing stale is ever trusted)."""
        p = self._parents.get(sop)  # a dict read is atomic; only inserts take the lock
        if p is not None and p[2] == blob.key and p[0] == study and p[1] == series:
            return
        rec = self.index.instance(sop)
        if rec is None or rec.study != study or rec.series != series:
            raise NotFound(f"instance {sop} not found in series {series} of study {study}")
        with self._parents_lock:
            self._parents[sop] = (rec.study, rec.series, rec.blob.key)
            while len(self._parents) > 50_000:
                self._parents.popitem(last=False)

    def locate_frames(self, sop: str, numbers: Sequence[int], *, study: str | None = None,
                      series: str | None = None, who: Principal = SYSTEM) -> Frames:
        """Where the requested frames (1-based) lie: one index read, no blob I/O. NotFound for
        an unknown instance (or one outside study/series, or hidden from `who`) or a frame
        out of range."""
        located = self.index.frames(sop, numbers)
        if self.deletion.visibility.hidden(sop, who):  # rejected: a generation read, a set lookup
            raise NotFound(f"instance {sop} not found")
        if who.deidentified and self.view(who).hidden(self.index.instance(sop)):  # LABEL, OVERVIEW
            raise NotFound(f"instance {sop} not found")
        if located is None:
            if self.index.instance(sop) is None:
                raise NotFound(f"instance {sop} not found")
            raise NotFound(f"instance {sop} has no frames")
        if study is not None:
            self.check_parents(sop, study, series or "", located.table.blob)
        for k, f in zip(numbers, located.fragments):
            if f is None:
                raise NotFound(f"frame {k} is out of range: instance {sop} has {located.table.n} frames")
        return located

    def forget(self, sop: str) -> None:
        """Caches are caches: drop what this process remembers of `sop` (the index backend's
        location and frame table, the parents check) before one fresh lookup, after a read
        found its blob moved or gone (another node moved or replaced it)."""
        self.index.forget(sop)
        with self._parents_lock:
            self._parents.pop(sop, None)

    def read_located(self, sop: str, located: Frames) -> tuple[FrameTable, list[bytes]]:
        """The stored bytes of located frames, each checked against its CRC32C (Damaged when
        they are not the bytes received); located again once if the blob moved meanwhile."""
        try:
            return located.table, self._read_frames(sop, located)
        except _Moved:
            self.forget(sop)
            again = self.index.frames(sop, located.numbers)
            if again is None:
                raise NotFound(f"instance {sop} not found")
            return again.table, self._read_frames(sop, again, retry=False)

    def frames(self, sop: str, numbers: Sequence[int], *, study: str | None = None,
               series: str | None = None, who: Principal = SYSTEM) -> tuple[FrameTable, list[bytes]]:
        """Locate and read frames (see locate_frames and read_located)."""
        return self.read_located(sop, self.locate_frames(sop, numbers, study=study, series=series, who=who))

    def _read_frames(self, sop: str, located: Frames, retry: bool = True) -> list[bytes]:
        table = located.table
        try:
            if table.damaged:
                raise self.damage(sop, table.blob, table.damaged, "frame read")
            return self._read_from(sop, table.blob, located)
        except Damaged:
            for copy in self.index.copies(sop):  # a good replica serves while the damage is reported
                try:
                    datas = self._read_from(sop, copy, located, report=False)
                    log.warning("frames of %s served from its copy on %s", sop, copy.tier)
                    return datas
                except (Damaged, Unavailable):
                    continue
            raise
        except _Gone as exc:
            self.forget(sop)  # a cached location may be stale: ask the index itself
            cur = self.index.instance(sop)
            if cur is None or cur.blob != table.blob:
                if retry:
                    raise _Moved() from exc
                raise NotFound(f"instance {sop} not found") from exc
            raise self.damage(sop, table.blob, exc.what, "frame read") from exc

    def _read_from(self, sop: str, blob: BlobRef, located: Frames, report: bool = True) -> list[bytes]:
        store = self.tier(blob.tier)
        out = []
        try:
            for f, crc in zip(located.fragments, located.crcs):
                if len(f) == 1:  # type: ignore[arg-type]
                    data = store.read_range(blob.key, f[0][0], f[0][1])  # type: ignore[index]
                else:
                    data = b"".join(store.read_range(blob.key, o, n) for o, n in f)  # type: ignore[union-attr]
                if crc is not None and crc32c(data) != crc:
                    if not report:
                        raise Damaged(sop, "a frame failed its CRC32C")
                    raise self.damage(sop, blob, "a frame failed its CRC32C", "frame read")
                out.append(data)
        except StoreUnavailable as exc:
            raise Unavailable(f"tier {blob.tier} is unavailable: {exc}") from exc
        except BlobError as exc:
            if not report:
                raise Damaged(sop, "copy unreadable") from exc
            raise _Gone("blob missing" if isinstance(exc, BlobNotFound) else "blob shorter than its frame table") from exc
        return out

    async def _read_from_async(self, sop: str, located: Frames) -> list[bytes]:
        """Frames from a store with native async ranged reads (object storage), concurrently,
        on the event loop: no thread waits on the network."""
        table = located.table
        if table.damaged:
            raise self.damage(sop, table.blob, table.damaged, "frame read")
        store = self.tier(table.blob.tier)

        async def one(f: list[tuple[int, int]]) -> bytes:
            parts = await asyncio.gather(*(store.read_range_async(table.blob.key, o, n) for o, n in f))  # type: ignore[attr-defined]
            return b"".join(parts)

        try:
            datas = await asyncio.gather(*(one(f) for f in located.fragments))  # type: ignore[arg-type]
        except StoreUnavailable as exc:
            raise Unavailable(f"tier {table.blob.tier} is unavailable: {exc}") from exc
        except BlobError:
            return await asyncio.get_running_loop().run_in_executor(None, self.read_located, sop, located)
        for data, crc in zip(datas, located.crcs):
            if crc is not None and crc32c(data) != crc:  # the slow path knows about replicas
                return await asyncio.get_running_loop().run_in_executor(None, self.read_located, sop, located)
        return list(datas)

    def all_frames(self, sop: str, batch: int = 256) -> Iterator[list[bytes]]:
        """Every frame, `batch` at a time, each checked (the Pixel Data bulk stream)."""
        n = self.frame_table(sop).n
        for start in range(1, n + 1, batch):
            yield self.frames(sop, list(range(start, min(n, start + batch - 1) + 1)))[1]

    # -- whole instances -------------------------------------------------------------------------
    def current(self, rec: InstanceRecord) -> InstanceRecord | None:
        """The instance's record now, if its blob moved since `rec` was read (a read racing a
        tier move or a replacement looks again instead of failing); None if it did not."""
        self.forget(rec.sop)
        now = self.index.instance(rec.sop)
        return now if now is not None and now.blob != rec.blob else None

    def check_blob(self, rec: InstanceRecord) -> InstanceRecord:
        """The record to read (`rec`, or the current one if the blob moved meanwhile), once its
        blob is there with its recorded size (cheap: no read); Damaged otherwise."""
        try:
            size = self.tier(rec.blob.tier).stat(rec.blob.key).size
        except StoreUnavailable as exc:
            raise Unavailable(f"tier {rec.blob.tier} is unavailable: {exc}") from exc
        except BlobNotFound:
            moved = self.current(rec)
            if moved is not None:
                return self.check_blob(moved)
            raise self.damage(rec.sop, rec.blob, "blob missing", "instance retrieve")
        if size != rec.size:
            raise self.damage(rec.sop, rec.blob, f"blob is {size} bytes, {rec.size} recorded", "instance retrieve")
        return rec

    def open_instance(self, rec: InstanceRecord) -> BinaryIO:
        """A sequential reader of the stored bytes (unchecked: see instance_chunks)."""
        try:
            return self.tier(rec.blob.tier).open(rec.blob.key)
        except StoreUnavailable as exc:
            raise Unavailable(f"tier {rec.blob.tier} is unavailable: {exc}") from exc
        except BlobNotFound:
            moved = self.current(rec)
            if moved is not None:  # the bytes are the same (same sha256), only elsewhere
                return self.open_instance(moved)
            raise self.damage(rec.sop, rec.blob, "blob missing", "instance read")

    def instance_chunks(self, rec: InstanceRecord, source: str = "instance retrieve",
                        who: Principal = SYSTEM) -> Iterator[bytes]:
        """The stored bytes in chunks, hashed on the way: Damaged is raised instead of the last
        chunk if they are not the bytes received (a sender then cuts its stream, so a client
        never gets a complete but wrong copy). A de-identified principal gets the
        de-identified instance (pixel data as stored; archive.deid.stream)."""
        import hashlib

        if who.deidentified:
            yield from self.view(who).chunks(rec)
            return

        h = hashlib.sha256()
        sent = 0
        with self.open_instance(rec) as fh:
            pending = fh.read(CHUNK)
            while pending:
                nxt = fh.read(CHUNK)
                h.update(pending)
                sent += len(pending)
                if sent > rec.size:
                    break
                if not nxt:  # the last chunk goes out only once the whole blob is proven
                    if sent == rec.size and h.hexdigest() == rec.sha256:
                        yield pending
                        return
                    break
                yield pending
                pending = nxt
        what = "sha256 mismatch" if sent == rec.size else f"blob is {sent}{'+' if sent > rec.size else ''} bytes, {rec.size} recorded"
        raise self.damage(rec.sop, rec.blob, what, source)

    @contextmanager
    def instance_file(self, rec: InstanceRecord, source: str = "instance send",
                      verify_later: bool = False) -> Iterator[Path]:
        """A local file with the instance's bytes, proven intact (sha256), for senders that need
        a file (pynetdicom C-STORE sub-operations). The store's own file when it has one, else a
        verified staging copy removed afterwards. verify_later: the caller hashes the store's
        own file while it reads it (and fails its send on a mismatch), so it is not read twice."""
        store = self.tier(rec.blob.tier)
        local = store.local_path(rec.blob.key)
        if local is not None:
            if not verify_later:
                problem = self.check(rec)
                if problem is not None:
                    raise self.damage(rec.sop, rec.blob, problem, source)
            yield local
            return
        assert self.staging is not None
        spool = self.staging.spool(".dcm")
        try:
            for chunk in self.instance_chunks(rec, source):
                spool.write(chunk)
            done = spool.finish()
            if done.error is not None:
                raise done.error
            yield done.path
        finally:
            spool.discard()

    # -- fixity ----------------------------------------------------------------------------------
    def check(self, rec: InstanceRecord) -> str | None:
        """Re-hash one blob now; None when intact, else what is wrong."""
        return self.check_copy(rec, rec.blob)

    def check_copy(self, rec: InstanceRecord, blob: BlobRef) -> str | None:
        """Re-hash one copy of an instance (its primary or a replica); None when intact."""
        store = self.tiers.get(blob.tier)
        if store is None:
            return f"unknown tier {blob.tier}"
        try:
            with store.open(blob.key) as fh:
                digest, size = sha256_of(fh)
        except StoreUnavailable:
            return f"tier {blob.tier} unavailable"
        except BlobNotFound:
            return "missing"
        if size != rec.size:
            return f"size mismatch ({size} bytes, {rec.size} recorded)"
        if digest != rec.sha256:
            return "sha256 mismatch"
        return None

    def damage(self, sop: str, blob: BlobRef, what: str, source: str) -> Damaged:
        """Log and persist a fixity event (once per instance and problem in this process);
        returns the Damaged error to raise. Never blocks the caller on the index write."""
        key = (sop, what)
        if key not in self._reported:
            self._reported.add(key)
            log.error("fixity: instance %s (blob %s in %s): %s, found by %s", sop, blob.key, blob.tier, what, source)
            if not self.readonly:
                event = FixityEvent(datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                                    sop, blob, what, source)
                threading.Thread(target=self._record, args=(event,), daemon=True, name="fixity-event").start()
        return Damaged(sop, what)

    def _record(self, event: FixityEvent) -> None:
        try:
            self.index.record_fixity(event)
        except Exception:
            log.exception("cannot record fixity event for %s", event.sop)

    def fixity_events(self) -> list[FixityEvent]:
        return self.index.fixity_events()

    # -- schema 3: frame checksums for archives written before them ----------------------------
    def checksums_pending(self) -> int:
        return self.index.checksum_todo_count()

    def add_frame_checksums(self, progress: Callable[[int], None] | None = None,
                            stop: threading.Event | None = None) -> tuple[int, int]:
        """Give every frame table written before CRC32C existed its checksums, from bytes first
        proven intact: each blob is re-read once, its sha256 compared with the one recorded at
        ingest, and only then are the frames' CRCs (computed in the same pass) recorded. A blob
        that fails is marked damaged (its frames are refused) and logged as a fixity event.
        Resumable: the to-do list lives in the index. Returns (done, damaged)."""
        done = damaged = 0
        while not (stop is not None and stop.is_set()):
            batch = self.index.checksum_todo(64)
            if not batch:
                break
            for sop in batch:
                if stop is not None and stop.is_set():
                    break
                rec = self.index.instance(sop)
                located = self.index.all_frames(sop)
                if rec is None or located is None:
                    self.index.set_frame_checksums(sop, BlobRef("", ""), None)
                    continue
                problem = None
                crcs: list[int] | None = None
                try:
                    with self.tier(rec.blob.tier).open(rec.blob.key) as fh:
                        sha, size, crcs = scan(fh, located.fragments)  # type: ignore[arg-type]
                    if size != rec.size:
                        problem = f"size mismatch ({size} bytes, {rec.size} recorded)"
                    elif sha != rec.sha256:
                        problem = "sha256 mismatch"
                except BlobNotFound:
                    problem = "blob missing"
                except Damaged:
                    problem = f"unknown tier {rec.blob.tier}"
                if problem is None:
                    self.index.set_frame_checksums(sop, rec.blob, crcs)
                else:
                    damaged += 1
                    self.index.set_frame_checksums(sop, rec.blob, None, damaged=problem)
                    self.damage(sop, rec.blob, problem, "checksum migration")
                done += 1
                if progress is not None:
                    progress(rec.size)
        return done, damaged


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _Gone(Exception):
    """A blob is missing or short under a read: moved/replaced (look again) or damaged."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _Moved(Exception):
    """A blob vanished under a read because its instance was moved or replaced: look again."""


class AsyncArchive:
    """The Archive for an event loop: blocking calls run on threads; frame reads from a store
    with local ranged reads (`inline_reads`) run inline, a pread being cheaper than a thread hop."""

    def __init__(self, arc: Archive, workers: int = 8) -> None:
        self.sync = arc
        self.config = arc.config
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="archive")
        self._search_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="search")

    async def run(self, fn: Callable, *args, **kwargs):
        """Any blocking archive work, on the archive's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    async def search_run(self, fn: Callable, *args, **kwargs):
        """Searches on their own threads: a slow one (a scan of a big index) never delays frame
        reads or other clients."""
        return await asyncio.get_running_loop().run_in_executor(self._search_pool, partial(fn, *args, **kwargs))

    async def frames(self, sop: str, numbers: Sequence[int], *, study: str | None = None,
                     series: str | None = None, who: Principal = SYSTEM) -> tuple[FrameTable, list[bytes]]:
        located = self.sync.locate_frames(sop, numbers, study=study, series=series, who=who)  # mmap lookup
        if study:
            self.sync.touch(study)
        store = self.sync.tiers.get(located.table.blob.tier)
        if store is not None and store.inline_reads and len(numbers) <= 16:
            return self.sync.read_located(sop, located)
        if store is not None and hasattr(store, "read_range_async"):
            timeout = float(getattr(store, "timeout", 30.0)) * 2
            try:
                async with asyncio.timeout(timeout):
                    return located.table, await self.sync._read_from_async(sop, located)
            except TimeoutError:
                raise Unavailable(f"tier {located.table.blob.tier} did not answer within {timeout:g} s")
        return await self.run(self.sync.read_located, sop, located)

    SMALL_SERIES = 32  # instances: metadata of a series this small is answered inline

    async def small(self, study: str, series: str | None, sop: str | None) -> bool:
        """Whether the metadata of this resource is small enough to answer on the event loop
        (an instance, or a series of at most SMALL_SERIES instances: one record lookup)."""
        if sop is not None:
            return True
        if series is None:
            return False
        rec = self.sync.index.series(series)
        return rec is not None and rec.n_instances <= self.SMALL_SERIES

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._search_pool.shutdown(wait=False, cancel_futures=True)
