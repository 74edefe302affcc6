"""The one ingest function. C-STORE, STOW-RS, `pathpacs import` and conversions all reach it
through `Archive.ingest`.

Order of work (DESIGN.md invariant 1):
  bytes -> a staging file (storage_tiers.staging; sha256 while writing)
  -> parse header + frame table (archive.dicomfile) -> validate -> build metadata, frame CRCs
  -> pending mark (so a crash after placing the blob is swept) -> the blob put to its tier
     (a rename on the same filesystem, durable) -> one index transaction with the instance,
     its parents and its frame table.
Success is returned only after that commit. Every outcome other than "stored" or "replaced"
removes what it wrote, at once: the staged copy is gone when ingest returns.

Replacement (`on_conflict = "replace"`) never overwrites in place and never deletes: the
SOP Instance UID names one object, so an index keyed by it holds one current version; the one
it replaces is moved, record and blobs, to the index's kept versions (rejected, visible to no
one, restorable by an administrator, removed by `pathpacs purge` after purge_after_days).
No rejection note is written for it: a KOS names instances by SOP Instance UID, which the new
version carries too, so a note honoured by another archive would reject the new version.
Storing again a UID that is rejected (not yet purged) with other bytes is refused: restore it
or purge it first (the same bytes are a duplicate and stay rejected).
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
from .access import SYSTEM, Principal
from .dicomfile import DicomFileError, ParsedFile, parse_file
from .fixity import scan, sha256_of
from .index import NewInstance
from .records import BlobRef, InstanceRecord
from .status import DIMSE_STATUS_OF, DimseStatus, ErrorKind, Outcome, out_of_space

if TYPE_CHECKING:
    from .service import Archive

log = logging.getLogger("pathpacs.ingest")
CHUNK = 1 << 20


@dataclass
class IngestResult:
    outcome: Outcome
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    reason: str | None = None
    kind: ErrorKind | None = None  # why it was rejected
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome.ok

    @property
    def dimse_status(self) -> DimseStatus:
        """The C-STORE answer (PS3.4 B.2.3): success, or what the rejection's kind maps to."""
        if self.outcome.ok:
            return DimseStatus.SUCCESS
        return DIMSE_STATUS_OF[self.kind or ErrorKind.INTERNAL]


class Rejected(Exception):
    def __init__(self, reason: str, kind: ErrorKind = ErrorKind.CANNOT_UNDERSTAND) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def rejected(reason: str, kind: ErrorKind) -> IngestResult:
    return IngestResult(Outcome.REJECTED, reason=reason, kind=kind)


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
    who: Principal = SYSTEM,
) -> IngestResult:
    """Store one DICOM Part 10 instance durably, or refuse it with a reason. Never raises
    for bad input; the IngestResult says what happened (and the DIMSE status to answer).

    take_ownership: `source` is a file we may move (same filesystem: no copy); it is gone
    when ingest returns, whatever the outcome (stored, duplicate, refused, error).
    sha256: the digest of an owned file already computed while it was written.
    who: the caller; refused (FORBIDDEN) unless it may store this object in this study."""
    staged: Path | None = None
    owned = Path(source) if take_ownership and isinstance(source, (str, Path)) else None
    try:
        try:
            staged, sha, size = _stage(arc, source, take_ownership, sha256)
        except OSError as exc:
            if out_of_space(exc):
                raise Rejected("out of disk space", ErrorKind.OUT_OF_SPACE)
            raise Rejected(f"cannot receive data: {exc.strerror or exc}", ErrorKind.OUT_OF_SPACE)
        try:
            parsed = parse_file(staged)
        except DicomFileError as exc:
            raise Rejected(str(exc), ErrorKind.CANNOT_UNDERSTAND)
        mapped = _consult_answer(arc, parsed)  # an answer to our consultation joins the original case
        if mapped is not None:
            staged.unlink(missing_ok=True)
            staged, sha, size = _copy(arc, [mapped])
            parsed = parse_file(staged)
        if who is not SYSTEM:
            _check_may_store(who, parsed)
        result, placed = _commit(arc, staged, parsed, sha, size, expected_sop_class, expected_study,
                                 calling_aet, origin)
        if placed:
            staged = None
        return result
    except Rejected as rej:
        log.warning("rejected instance from %s (%s): %s", calling_aet or origin, origin, rej.reason)
        return rejected(rej.reason, rej.kind)
    except Exception as exc:  # the server keeps serving whatever happens
        if out_of_space(exc):
            log.warning("rejected instance from %s (%s): out of disk space (%s)", calling_aet or origin, origin, exc)
            return rejected("out of disk space", ErrorKind.OUT_OF_SPACE)
        log.exception("ingest failed")
        return rejected("internal error while storing (logged)", ErrorKind.INTERNAL)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)
        if owned is not None and owned != staged:
            owned.unlink(missing_ok=True)


def _consult_answer(arc: "Archive", parsed: ParsedFile) -> bytes | None:
    """The Part 10 bytes of a consultation answer mapped back to the original case
    (archive.consult.answers), or None for anything else (SR classes only: cheap otherwise)."""
    from .consult.opinion import SR_SOP_CLASSES

    if str(parsed.dataset.get("SOPClassUID", "")) not in SR_SOP_CLASSES:
        return None
    from io import BytesIO

    from .consult.answers import map_back

    try:
        ds = map_back(arc, parsed.dataset)
    except Exception:  # stored as it came rather than refused
        log.exception("cannot map a consultation answer back")
        return None
    if ds is None:
        return None
    ds.file_meta = parsed.file_meta
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _check_may_store(who: Principal, parsed: ParsedFile) -> None:
    sop_class = str(parsed.dataset.get("SOPClassUID", ""))
    study = str(parsed.dataset.get("StudyInstanceUID", ""))
    if not who.may_store(sop_class, study):
        what = ("outside its studies" if who.studies is not None and study not in who.studies
                else f"of SOP Class {sop_class[:64]}")
        raise Rejected(f"{who.name} may not store objects {what}", ErrorKind.FORBIDDEN)


def describe(path: Path, parsed: ParsedFile, sha: str, size: int, blob: BlobRef, *,
             expected_sop_class: str | None = None, expected_study: str | None = None,
             calling_aet: str = "", origin: str = "import", received: str | None = None) -> NewInstance:
    """Everything the index records about one parsed file stored as `blob`: validated UIDs,
    DICOM JSON metadata, bulk values, frame layout and CRC32C. Rejected for bad input.
    Ingest and `pathpacs index rebuild` both build their records here."""
    ds = parsed.dataset
    sop = ds.get("SOPInstanceUID")
    sop_class = ds.get("SOPClassUID")
    study = ds.get("StudyInstanceUID")
    series = ds.get("SeriesInstanceUID")
    for name, value in (("SOP Instance UID", sop), ("SOP Class UID", sop_class),
                        ("Study Instance UID", study), ("Series Instance UID", series)):
        if not value:
            raise Rejected(f"missing {name}")
        if not _valid_uid(str(value)):
            raise Rejected(f"invalid {name} {str(value)[:80]!r}")
    sop, sop_class, study, series = str(sop), str(sop_class), str(study), str(series)
    if expected_sop_class and sop_class != expected_sop_class:
        raise Rejected(f"SOP Class {sop_class} does not match the presentation context {expected_sop_class}",
                       ErrorKind.MISMATCH)
    meta_sop = parsed.file_meta.get("MediaStorageSOPInstanceUID")
    if meta_sop and str(meta_sop) != sop:
        raise Rejected("file meta SOP Instance UID differs from the data set's", ErrorKind.MISMATCH)
    if expected_study and study != expected_study:
        raise Rejected(f"Study Instance UID {study} differs from the requested study {expected_study}",
                       ErrorKind.MISMATCH)
    if "Rows" in ds and parsed.pixel_offset is None and not parsed.deflated:
        raise Rejected("image has no pixel data (truncated?)")

    try:
        doc, bulk = md.dataset_json(ds, study, series, sop, parsed.pixel_offset is not None or
                                    (parsed.deflated and "Rows" in ds))
    except Exception as exc:
        raise Rejected(f"cannot encode the data set: {exc}")

    layout: list[list[tuple[int, int]]] = []
    crcs: list[int] = []
    if parsed.frames:
        layout = [[(f.offset, f.length) for f in fr] for fr in parsed.frames]
        with open(path, "rb") as fh:  # one sequential read of the pixel data (page cache)
            _, _, crcs = scan(fh, layout, start=layout[0][0][0], want_sha=False)
    pid = md.first_value(doc, "00100020") or ""
    issuer = md.first_value(doc, "00100021") or ""
    patient = f"{pid}^{issuer}" if pid else f"~{md.first_value(doc, '00100010') or ''}"
    rec = InstanceRecord(
        sop=sop, sop_class=sop_class, study=study, series=series, patient=patient,
        ts=str(parsed.transfer_syntax), blob=blob, size=size, sha256=sha,
        received=received or datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        calling_aet=calling_aet, origin=origin, n_frames=len(parsed.frames),
        encapsulated=parsed.encapsulated, pixel_offset=parsed.pixel_offset,
        attrs=md.subset(doc, md.INSTANCE_TAGS),
    )
    return NewInstance(rec, layout, crcs, md.dumps(doc), bulk, md.subset(doc, md.PATIENT_TAGS),
                       md.subset(doc, md.STUDY_TAGS), md.subset(doc, md.SERIES_TAGS))


def _commit(
    arc: "Archive", staged: Path, parsed: ParsedFile, sha: str, size: int,
    expected_sop_class: str | None, expected_study: str | None, calling_aet: str, origin: str,
) -> tuple[IngestResult, bool]:
    """Validate, place and record one staged file; (result, whether the file was placed)."""
    tier = arc.ingest_tier
    blob = BlobRef(tier.name, uuid.uuid4().hex)
    new = describe(staged, parsed, sha, size, blob, expected_sop_class=expected_sop_class,
                   expected_study=expected_study, calling_aet=calling_aet, origin=origin)
    rec = new.record
    sop, sop_class, study, series = rec.sop, rec.sop_class, rec.study, rec.series
    replace = arc.config.on_conflict == "replace"
    result = IngestResult(Outcome.STORED, sop, sop_class, study, series, size=size)

    existing = arc.index.instance(sop)
    if existing is not None:  # decided before placing anything: no copy made for a duplicate
        if existing.sha256 == sha:
            result.outcome = Outcome.DUPLICATE
            return result, False
        if not replace:
            raise Rejected(f"SOP Instance {sop} is already stored with different content", ErrorKind.CONFLICT)
        if arc.deletion.is_rejected(sop):
            raise Rejected(f"SOP Instance {sop} was rejected: restore or purge it before storing it again",
                           ErrorKind.CONFLICT)

    arc.index.add_pending(blob, arc.pending_session())  # "node/session@time": whose sweep may remove it
    try:
        tier.put_file(staged, blob.key, owned=True)
    except BaseException:
        tier.delete(blob.key)  # in case it was placed before the failure
        arc.index.clear_pending(blob)
        raise
    try:
        added = arc.index.add_instance(new, replace=replace, session=arc.staging.session,
                                       who=calling_aet or origin)
    except BaseException:
        # The record did not commit: the blob is invisible; remove it now (or the sweep will).
        try:
            tier.delete(blob.key)
            arc.index.clear_pending(blob)
        except Exception:
            pass
        raise
    if added.outcome in (Outcome.DUPLICATE, Outcome.REJECTED):  # another writer got there first
        tier.delete(blob.key)
        arc.index.clear_pending(blob)
        if added.outcome is Outcome.REJECTED:
            raise Rejected(f"SOP Instance {sop} is already stored with different content", ErrorKind.CONFLICT)
        result.outcome = Outcome.DUPLICATE
        return result, True
    if added.previous is not None:
        # Kept, not deleted: the old version stays on its tiers as a rejected version (only
        # administrators see it: `pathpacs restore --instance UID --replaced` brings it back)
        # until a purge; audited as a reject of the old version.
        prev = added.previous
        arc.audit.deleted("rejected", SYSTEM, prev.study, None, [sop],
                          f"replaced by new content (on_conflict = replace; old sha256 {prev.sha256})")
        log.info("replaced %s (old sha256 %s kept as a rejected version)", sop, added.previous.sha256)
        result.outcome = Outcome.REPLACED
    return result, True
