"""The Archive: one object that owns the data directory (index + blob tiers).

Protocol layers (archive.dimse, dicomweb) and the CLI talk to this, never to LMDB or the
tiers directly. Opening an Archive sweeps what crashed writers left behind.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from storage_tiers import BlobNotFound, FilesystemStore

from .config import Config
from .index import Index, FrameLocation
from .ingest import IngestResult, ingest, sha256_of

log = logging.getLogger("pathpacs.archive")


@dataclass
class Stats:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int
    by_tier: dict[str, int] = field(default_factory=dict)


class Archive:
    def __init__(self, config: Config) -> None:
        self.config = config
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.data_dir = data
        self.index = Index(data / "index", map_size=config.lmdb_map_size_gb << 30)
        self.hot = FilesystemStore(data / "hot", name="hot")
        self._tiers = {"hot": self.hot}
        self.sweep()

    @classmethod
    def open(cls, data_dir: Path, config: Config | None = None) -> "Archive":
        cfg = config or Config()
        cfg.data_dir = Path(data_dir)
        return cls(cfg)

    @property
    def tmp_dir(self) -> Path:
        """A private scratch directory on the hot tier's filesystem (renames are free)."""
        return self.hot.tmp_dir

    def tier(self, name: str) -> FilesystemStore:
        return self._tiers[name]

    def close(self) -> None:
        self.hot.close()
        self.index.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- crash recovery ----------------------------------------------------
    def sweep(self) -> None:
        """Remove temp dirs of dead writers and blobs placed but never committed."""
        n_tmp = self.hot.sweep_tmp()
        n_orphans = 0
        for blob, session in self.index.pending():
            if self.hot.session_alive(session):
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
    def read_frame(self, loc: FrameLocation) -> bytes:
        tier = self._tiers[loc.tier]
        if len(loc.fragments) == 1:
            off, length = loc.fragments[0]
            return tier.read_range(loc.blob, off, length)
        return b"".join(tier.read_range(loc.blob, o, n) for o, n in loc.fragments)

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
