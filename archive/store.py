"""The Archive: one object that owns the data directory (index + blob tiers).

Protocol layers (archive.dimse, dicomweb) and the CLI talk to this, never to LMDB or the
tiers directly. Opening an Archive sweeps what crashed writers left behind.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from storage_tiers import BlobError, BlobNotFound, FilesystemStore, Staging

from .config import Config
from .fixity import DamagedData, crc32c, scan, sha256_of
from .index import FrameLocation, FrameTable, Index, all_fragments
from .ingest import IngestResult, ingest

log = logging.getLogger("pathpacs.archive")


@dataclass
class Stats:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int
    by_tier: dict[str, int] = field(default_factory=dict)


class ArchiveNotFound(Exception):
    """A read-only open of a data directory that holds no archive."""


class Archive:
    def __init__(self, config: Config, readonly: bool = False) -> None:
        """readonly: for verbs that only look (ls, stats, verify): nothing is created or swept,
        and a directory without an archive is ArchiveNotFound instead of a new empty archive."""
        self.config = config
        data = Path(config.data_dir)
        self.readonly = readonly
        if readonly:
            if not (data / "index" / "data.mdb").is_file():
                raise ArchiveNotFound(f"no archive in {data}")
        else:
            data.mkdir(parents=True, exist_ok=True)
        self.data_dir = data
        self.index = Index(data / "index", map_size=config.lmdb_map_size_gb << 30, readonly=readonly)
        self.hot = FilesystemStore(data / "hot", name="hot", readonly=readonly)
        self.staging = None if readonly else Staging(data / "hot" / "tmp")
        self._tiers = {"hot": self.hot}
        self._reported: set[tuple[str, str]] = set()
        if not readonly:
            self.sweep()

    @classmethod
    def open(cls, data_dir: Path, config: Config | None = None) -> "Archive":
        cfg = config or Config()
        cfg.data_dir = Path(data_dir)
        return cls(cfg)

    @property
    def tmp_dir(self) -> Path:
        """A private scratch directory on the hot tier's filesystem (renames are free)."""
        return self.staging.dir

    def tier(self, name: str) -> FilesystemStore:
        return self._tiers[name]

    def close(self) -> None:
        self.hot.close()
        if self.staging is not None:
            self.staging.close()
        self.index.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- crash recovery ----------------------------------------------------
    def sweep(self) -> None:
        """Remove temp dirs of dead writers and blobs placed but never committed."""
        n_tmp = self.staging.sweep()
        for tier in self._tiers.values():
            tier.sweep_incoming()
        n_orphans = 0
        for blob, session in self.index.pending():
            if self.staging.session_alive(session):
                continue
            if not self.index.blob_referenced(blob):
                for tier in self._tiers.values():
                    tier.delete(blob)
                n_orphans += 1
            self.index.clear_pending(blob)
        if n_tmp or n_orphans:
            log.info("swept %d stale temp dirs and %d uncommitted blobs", n_tmp, n_orphans)

    # -- ingest ------------------------------------------------------------
    def ingest_file(self, path: Path, *, take_ownership: bool = False, source: str = "import",
                    calling_aet: str = "", expected_sop_class: str | None = None) -> IngestResult:
        return ingest(self, Path(path), take_ownership=take_ownership, origin=source,
                      calling_aet=calling_aet, expected_sop_class=expected_sop_class)

    # -- reading -----------------------------------------------------------
    def read_frame(self, sop: str, loc: FrameLocation) -> bytes:
        """One frame's stored bytes, checked against its CRC32C (DamagedData if they differ)."""
        table = FrameTable(loc.blob, loc.tier, loc.transfer_syntax, 0, loc.crc is not None)
        return self.read_frames(sop, table, [loc.fragments], [loc.crc])[0]

    def read_frames(self, sop: str, table: FrameTable, frags: list[list[tuple[int, int]]],
                    crcs: list[int | None]) -> list[bytes]:
        """Stored bytes of frames located in `table`, each checked against the CRC32C recorded
        at ingest. Missing, short or altered bytes raise DamagedData (and a fixity event)."""
        if table.damaged:
            raise self.damage(sop, table.blob, table.tier, table.damaged, "frame read")
        tier = self._tiers[table.tier]
        out = []
        try:
            for f, crc in zip(frags, crcs):
                if len(f) == 1:
                    data = tier.read_range(table.blob, f[0][0], f[0][1])
                else:
                    data = b"".join(tier.read_range(table.blob, o, n) for o, n in f)
                if crc is not None and crc32c(data) != crc:
                    raise self.damage(sop, table.blob, table.tier, "a frame failed its CRC32C", "frame read")
                out.append(data)
        except BlobError as exc:
            cur = self.index.instance(sop)
            if cur is None or cur["blob"] != table.blob or cur["tier"] != table.tier:
                # replaced or moved while we read: not damage; the caller locates it again
                raise DamagedData(sop, "blob replaced while reading")
            what = "blob missing" if isinstance(exc, BlobNotFound) else "blob shorter than its frame table"
            raise self.damage(sop, table.blob, table.tier, what, "frame read")
        return out

    def damage(self, sop: str, blob: str, tier: str, what: str, source: str) -> DamagedData:
        """Log and persist a fixity event (once per instance and problem in this process);
        returns the DamagedData to raise. Never blocks the caller on the index write."""
        key = (sop, what)
        if key not in self._reported:
            self._reported.add(key)
            log.error("fixity: instance %s (blob %s in %s): %s, found by %s", sop, blob, tier, what, source)
            if not self.readonly:
                threading.Thread(target=self._record, args=(sop, blob, tier, what, source),
                                 daemon=True, name="fixity-event").start()
        return DamagedData(sop, what)

    def _record(self, sop: str, blob: str, tier: str, what: str, source: str) -> None:
        try:
            self.index.record_fixity(sop, blob, tier, what, source)
        except Exception:
            log.exception("cannot record fixity event for %s", sop)

    def open_instance(self, sop: str) -> BinaryIO:
        rec = self.index.instance(sop)
        if rec is None:
            raise KeyError(sop)
        return self._tiers[rec["tier"]].open(rec["blob"])

    def instance_path(self, sop: str) -> Path | None:
        """Local path of an instance's blob when its tier is a filesystem."""
        rec = self.index.instance(sop)
        if rec is None:
            return None
        tier = self._tiers[rec["tier"]]
        return tier.path_of(rec["blob"]) if hasattr(tier, "path_of") else None

    # -- fixity --------------------------------------------------------------
    def check_instance(self, rec: dict) -> str | None:
        """Re-hash one blob now; None when intact, else what is wrong."""
        tier = self._tiers.get(rec["tier"])
        if tier is None:
            return f"unknown tier {rec['tier']}"
        try:
            fh = tier.open(rec["blob"])
        except BlobNotFound:
            return "missing"
        with fh:
            digest, size = sha256_of(fh)
        if size != rec["size"]:
            return f"size mismatch ({size} bytes, {rec['size']} recorded)"
        if digest != rec["sha256"]:
            return "sha256 mismatch"
        return None

    def iter_instances(self) -> Iterator[dict]:
        with self.index.read() as txn:
            recs = [rec for _sop, rec in self.index.iter_records("inst", txn)]
        yield from recs

    # -- schema 3: frame checksums for archives written before them ------------------------
    def checksums_pending(self) -> int:
        return self.index.checksum_todo_count()

    def add_frame_checksums(self, progress=None, stop: threading.Event | None = None) -> tuple[int, int]:
        """Give every frame table written before CRC32C existed its checksums, from bytes first
        proven intact: each blob is re-read once, its sha256 compared with the one recorded at
        ingest, and only then are the frames' CRCs (computed in the same pass) recorded. A blob
        that fails is marked damaged (its frames are refused) and logged as a fixity event.
        Resumable: the to-do list lives in the index. Returns (done, damaged)."""
        done = damaged = 0
        while not (stop is not None and stop.is_set()):
            batch = self.index.checksum_todo(limit=64)
            if not batch:
                break
            for sop in batch:
                if stop is not None and stop.is_set():
                    break
                rec = self.index.instance(sop)
                raw = self.index.frame_table(sop)
                if rec is None or raw is None:
                    self.index.set_frame_checksums(sop, "", None)
                    continue
                frames = all_fragments(raw)
                problem = None
                crcs: list[int] | None = None
                try:
                    with self._tiers[rec["tier"]].open(rec["blob"]) as fh:
                        sha, size, crcs = scan(fh, frames)
                    if size != rec["size"]:
                        problem = f"size mismatch ({size} bytes, {rec['size']} recorded)"
                    elif sha != rec["sha256"]:
                        problem = "sha256 mismatch"
                except BlobNotFound:
                    problem = "blob missing"
                except KeyError:
                    problem = f"unknown tier {rec['tier']}"
                if problem is None:
                    self.index.set_frame_checksums(sop, rec["blob"], crcs)
                else:
                    damaged += 1
                    self.index.set_frame_checksums(sop, rec["blob"], None, damaged=problem)
                    self.damage(sop, rec["blob"], rec["tier"], problem, "checksum migration")
                done += 1
                if progress is not None:
                    progress(rec["size"])
        return done, damaged

    def stats(self) -> Stats:
        with self.index.read() as txn:
            by_tier: dict[str, int] = {}
            total = 0
            n = 0
            for _sop, rec in self.index.iter_records("inst", txn):
                by_tier[rec["tier"]] = by_tier.get(rec["tier"], 0) + rec["size"]
                total += rec["size"]
                n += 1
            counts = {db: txn.stat(self.index.db[db])["entries"] for db in ("patient", "study", "series")}
        return Stats(counts["patient"], counts["study"], counts["series"], n, total, by_tier)
