"""`pathpacs index rebuild`: the index is not a single point of loss.

Every blob is a complete DICOM Part 10 file, so the whole index (hierarchy, query keys, frame
tables with CRC32C, metadata, bulk values, locations, copies) can be recreated from the blobs on
every configured tier. The new index is written beside the old one and swapped in only when it
is complete; the old one is kept as `index.old-<time>` (or was already gone).

When an instance is found on several tiers, the copy on the tier listed first in the config
(the ingest tier first) is the primary and the others become its recorded copies. What can't
be read as DICOM is reported and left where it is. What the blobs cannot tell is lost: access
times, pinned/hold flags and fixity history; the received time becomes the file's time (or the
rebuild's, on object storage).
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .dicomfile import DicomFileError, parse_file
from .index import LmdbIndex
from .ingest import Rejected, describe
from .records import BlobRef
from .status import Unavailable
from storage_tiers import StoreUnavailable

if TYPE_CHECKING:
    from .service import Archive

log = logging.getLogger("pathpacs.rebuild")
BATCH = 200


@dataclass
class RebuildReport:
    instances: int = 0
    copies: int = 0
    unreadable: list[str] = field(default_factory=list)
    tiers: dict[str, int] = field(default_factory=dict)


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(4 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def rebuild(arc: "Archive", progress: Callable[[int], None] | None = None) -> RebuildReport:
    """Rebuild `arc`'s index from its tiers into DATA/index.rebuild, then swap it in."""
    report = RebuildReport()
    target = arc.data_dir / "index.rebuild"
    shutil.rmtree(target, ignore_errors=True)
    new_index = LmdbIndex(target, map_size=arc.config.lmdb_map_size_gb << 30)
    order = [arc.ingest_tier.name] + [n for n in arc.tiers if n != arc.ingest_tier.name]
    primaries: dict[str, str] = {}  # sop -> blob key of the primary
    pending = []
    extra_copies: list[tuple[str, BlobRef]] = []
    try:
        for tier_name in order:
            store = arc.tiers[tier_name]
            n_tier = 0
            try:
                listing = list(store.list())
            except StoreUnavailable as exc:  # never swap in an index missing a whole tier
                raise Unavailable(f"tier {tier_name} cannot be listed ({exc}): the index was not rebuilt") from None
            for info in listing:
                blob = BlobRef(tier_name, info.key)
                new = _describe_blob(arc, blob, report)
                if progress:
                    progress(info.size)
                if new is None:
                    continue
                n_tier += 1
                sop = new.record.sop
                if sop in primaries:
                    extra_copies.append((sop, blob))
                    continue
                primaries[sop] = info.key
                pending.append(new)
                if len(pending) >= BATCH:
                    report.instances += new_index.add_instances(pending)
                    pending = []
            report.tiers[tier_name] = n_tier
        if pending:
            report.instances += new_index.add_instances(pending)
        for sop, blob in extra_copies:
            if new_index.add_copy(sop, blob):
                report.copies += 1
    except BaseException:
        new_index.close()
        shutil.rmtree(target, ignore_errors=True)
        raise
    new_index.close()
    _swap(arc, target)
    return report


def _describe_blob(arc: "Archive", blob: BlobRef, report: RebuildReport):
    store = arc.tiers[blob.tier]
    local = store.local_path(blob.key)
    tmp = None
    try:
        if local is None:  # object storage: a staging copy to parse
            tmp = arc.staging.path(".rebuild")
            with store.open(blob.key) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 4 << 20)
            path = tmp
            received = datetime.now(timezone.utc)
        else:
            path = local
            received = datetime.fromtimestamp(local.stat().st_mtime, timezone.utc)
        sha, size = _sha256(path)
        parsed = parse_file(path)
        return describe(path, parsed, sha, size, blob, origin="rebuild",
                        received=received.isoformat(timespec="milliseconds"))
    except (DicomFileError, Rejected) as exc:
        report.unreadable.append(f"{blob.tier}/{blob.key}: {getattr(exc, 'reason', None) or exc}")
        return None
    except Exception as exc:  # a store error: say which blob, go on
        report.unreadable.append(f"{blob.tier}/{blob.key}: {type(exc).__name__}: {exc}")
        return None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _swap(arc: "Archive", target: Path) -> None:
    """Put the rebuilt index in place of the archive's (closed first, reopened after)."""
    current = Path(arc.config.index_path or arc.data_dir / "index")  # [index] path: a shared LMDB directory
    arc.index.close()
    if current.exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        current.rename(current.with_name(f"{current.name}.old-{stamp}"))
    target.rename(current)
    arc.reopen_index()
