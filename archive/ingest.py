"""The one ingest function. C-STORE, STOW-RS, `pathpacs import` and converters all call it.

Order of work (DESIGN.md invariant 1):
  bytes -> temp file in the hot tier's session dir (sha256 while writing)
  -> parse header + frame table (archive.dicomfile) -> validate -> build metadata
  -> pending record (so a crash after the rename is swept) -> fsync + atomic rename
  -> one LMDB transaction with the instance, its parents and the frame table.
Success is returned only after that commit. Every failure removes what it wrote.
"""
from __future__ import annotations

import errno
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterable

from pydicom.uid import UID

from . import metadata as md
from .dicomfile import DicomFileError, ParsedFile, parse_file
from .fixity import scan, sha256_of
from .index import out_of_space, pack_frames

if TYPE_CHECKING:
    from .store import Archive

log = logging.getLogger("pathpacs.ingest")
CHUNK = 1 << 20

# DIMSE status codes used for C-STORE answers (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_REFUSED = 0x0111  # Duplicate SOP Instance (PS3.7 C.5): refused, different bytes
PROCESSING_FAILURE = 0x0110


@dataclass
class IngestResult:
    status: str  # "stored" | "duplicate" | "replaced" | "rejected"
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    reason: str | None = None
    dimse_status: int = SUCCESS
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status in {"stored", "duplicate", "replaced"}


class Rejected(Exception):
    def __init__(self, reason: str, dimse_status: int = CANNOT_UNDERSTAND) -> None:
        super().__init__(reason)
        self.reason = reason
        self.dimse_status = dimse_status


def _valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and UID(value).is_valid


def _hash_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return sha256_of(fh)[0]


def _stage(arc: "Archive", source: Path | BinaryIO | Iterable[bytes], take_ownership: bool,
           sha256: str | None = None) -> tuple[Path, str, int]:
    """Put the incoming bytes in a staging file we own; return (path, sha256, size)."""
    if isinstance(source, (str, Path)):
        source = Path(source)
        if take_ownership:
            dest = arc.staging.path()
            try:
                os.rename(source, dest)
                return dest, sha256 or _hash_file(dest), dest.stat().st_size
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
        with open(source, "rb") as fh:
            staged = _copy(arc, _chunks(fh))
        if take_ownership:  # another filesystem: copied, and the file was ours to remove
            source.unlink(missing_ok=True)
        return staged
    if hasattr(source, "read"):
        return _copy(arc, _chunks(source))  # type: ignore[arg-type]
    return _copy(arc, source)  # type: ignore[arg-type]


def _chunks(fh: BinaryIO) -> Iterable[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk


def _copy(arc: "Archive", chunks: Iterable[bytes]) -> tuple[Path, str, int]:
    spool = arc.staging.spool()
    try:
        for chunk in chunks:
            spool.write(chunk)
            if spool.error is not None:
                raise spool.error
        done = spool.finish()
        if done.error is not None:
            raise done.error
    except BaseException:
        spool.discard()
        raise
    return done.path, done.sha256, done.size


def ingest(
    arc: "Archive",
    source: Path | BinaryIO | Iterable[bytes],
    *,
    take_ownership: bool = False,
    expected_sop_class: str | None = None,
    expected_study: str | None = None,
    calling_aet: str = "",
    origin: str = "import",
    sha256: str | None = None,
) -> IngestResult:
    """Store one DICOM Part 10 instance durably, or refuse it with a reason. Never raises
    for bad input; the returned IngestResult carries the DIMSE status to answer with.

    take_ownership: `source` is a file we may move (same filesystem: no copy); it is gone
    when ingest returns, whatever the outcome (stored, duplicate, refused, error).
    sha256: the digest of an owned file already computed while it was written.

    The staged copy is removed on every path except the one where the tier adopted it."""
    staged: Path | None = None
    owned = Path(source) if take_ownership and isinstance(source, (str, Path)) else None
    try:
        try:
            staged, sha, size = _stage(arc, source, take_ownership, sha256)
        except OSError as exc:
            if out_of_space(exc):
                raise Rejected("out of disk space", OUT_OF_RESOURCES)
            raise Rejected(f"cannot receive data: {exc.strerror or exc}", OUT_OF_RESOURCES)
        try:
            parsed = parse_file(staged)
        except DicomFileError as exc:
            raise Rejected(str(exc), CANNOT_UNDERSTAND)
        result, adopted = _commit(arc, staged, parsed, sha, size, expected_sop_class, expected_study,
                                  calling_aet, origin)
        if adopted:
            staged = None
        return result
    except Rejected as rej:
        log.warning("rejected instance from %s (%s): %s", calling_aet or origin, origin, rej.reason)
        return IngestResult("rejected", reason=rej.reason, dimse_status=rej.dimse_status)
    except Exception as exc:  # the server keeps serving whatever happens
        if out_of_space(exc):
            log.warning("rejected instance from %s (%s): out of disk space (%s)", calling_aet or origin, origin, exc)
            return IngestResult("rejected", reason="out of disk space", dimse_status=OUT_OF_RESOURCES)
        log.exception("ingest failed")
        return IngestResult("rejected", reason="internal error while storing (logged)",
                            dimse_status=PROCESSING_FAILURE)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
        if owned is not None and owned != staged:
            owned.unlink(missing_ok=True)


def _commit(
    arc: "Archive", staged: Path, parsed: ParsedFile, sha: str, size: int,
    expected_sop_class: str | None, expected_study: str | None, calling_aet: str, origin: str,
) -> tuple[IngestResult, bool]:
    """Validate, place and record one staged file; (result, whether the tier adopted the file)."""
    ds = parsed.dataset
    sop = ds.get("SOPInstanceUID")
    sop_class = ds.get("SOPClassUID")
    study = ds.get("StudyInstanceUID")
    series = ds.get("SeriesInstanceUID")
    for name, value in (("SOP Instance UID", sop), ("SOP Class UID", sop_class),
                        ("Study Instance UID", study), ("Series Instance UID", series)):
        if not value:
            raise Rejected(f"missing {name}", CANNOT_UNDERSTAND)
        if not _valid_uid(str(value)):
            raise Rejected(f"invalid {name} {str(value)!r}", CANNOT_UNDERSTAND)
    sop, sop_class, study, series = str(sop), str(sop_class), str(study), str(series)
    if expected_sop_class and sop_class != expected_sop_class:
        raise Rejected(
            f"SOP Class {sop_class} does not match the presentation context {expected_sop_class}",
            DATASET_MISMATCH,
        )
    meta_sop = parsed.file_meta.get("MediaStorageSOPInstanceUID")
    if meta_sop and str(meta_sop) != sop:
        raise Rejected("file meta SOP Instance UID differs from the data set's", DATASET_MISMATCH)
    if expected_study and study != expected_study:
        raise Rejected(f"Study Instance UID {study} differs from the requested study {expected_study}", DATASET_MISMATCH)
    if "Rows" in ds and parsed.pixel_offset is None and not parsed.deflated:
        raise Rejected("image has no pixel data (truncated?)", CANNOT_UNDERSTAND)

    try:
        doc, bulk = md.dataset_json(ds, study, series, sop, parsed.pixel_offset is not None or
                                    (parsed.deflated and "Rows" in ds))
    except Exception as exc:
        raise Rejected(f"cannot encode the data set: {exc}", CANNOT_UNDERSTAND)

    ts = str(parsed.transfer_syntax)
    blob = uuid.uuid4().hex
    frames = None
    if parsed.frames:
        layout = [[(f.offset, f.length) for f in fr] for fr in parsed.frames]
        with open(staged, "rb") as fh:  # one sequential read of the pixel data (page cache)
            _, _, crcs = scan(fh, layout, start=layout[0][0][0], want_sha=False)
        frames = pack_frames(blob, arc.hot.name, ts, layout, crcs)
    pid = md.first_value(doc, "00100020") or ""
    issuer = md.first_value(doc, "00100021") or ""
    patient = f"{pid}^{issuer}" if pid else f"~{md.first_value(doc, '00100010') or ''}"
    rec = {
        "sop": sop, "sop_class": sop_class, "study": study, "series": series, "patient": patient,
        "ts": ts, "blob": blob, "tier": arc.hot.name, "size": size, "sha256": sha,
        "received": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "calling_aet": calling_aet, "origin": origin, "n_frames": len(parsed.frames),
        "encapsulated": parsed.encapsulated, "pixel_offset": parsed.pixel_offset,
        "attrs": md.subset(doc, md.INSTANCE_TAGS),
    }
    meta_bytes = md.dumps(doc)
    base = IngestResult("stored", sop, sop_class, study, series, size=size)

    existing = arc.index.instance(sop)
    if existing is not None:
        outcome = _same_sop(arc, existing, sha, base)
        if outcome is not None:
            return outcome, False

    arc.index.add_pending(blob, arc.staging.session)
    try:
        arc.hot.put_file(staged, blob, owned=True)
    except BaseException:
        arc.hot.delete(blob)  # in case the rename happened before the failure
        arc.index.clear_pending(blob)
        raise
    replaced: dict | None = None
    try:
        with arc.index.write() as txn:
            current = arc.index.instance(sop, txn)
            if current is not None:
                outcome = _same_sop(arc, current, sha, base)
                if outcome is not None:
                    arc.index.clear_pending(blob, txn)
                    arc.hot.delete(blob)
                    return outcome, True
                replaced = arc.index.remove_instance(txn, sop)
            arc.index.put_instance(
                txn, rec, frames, meta_bytes, bulk,
                md.subset(doc, md.PATIENT_TAGS), md.subset(doc, md.STUDY_TAGS),
                md.subset(doc, md.SERIES_TAGS),
            )
            arc.index.clear_pending(blob, txn)
    except BaseException:
        # The record did not commit: the blob is invisible; remove it now (or the sweep will).
        try:
            arc.hot.delete(blob)
            arc.index.clear_pending(blob)
        except Exception:
            pass
        raise
    # (a Rejected raised by _same_sop inside the transaction aborts it; the blob goes above)
    if replaced is not None:
        arc.tier(replaced["tier"]).delete(replaced["blob"])
        log.info("replaced %s (old sha256 %s)", sop, replaced["sha256"])
        base.status = "replaced"
    return base, True


def _same_sop(arc: "Archive", existing: dict, sha: str, base: IngestResult) -> IngestResult | None:
    """Decide what a second copy of a SOP Instance UID means; None = go on and replace."""
    if existing["sha256"] == sha:
        base.status = "duplicate"
        return base
    if arc.config.on_conflict == "replace":
        return None
    raise Rejected(
        f"SOP Instance {base.sop_instance_uid} is already stored with different content",
        DUPLICATE_REFUSED,
    )
