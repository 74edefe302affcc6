"""Exports: a set of studies as Part 10 files with a DICOMDIR (PS3.10 media), optionally
de-identified.

The DICOMDIR is pydicom's `FileSet` (its directory records, file IDs and writer). FileSet
reads and rewrites every instance it is given whole, which a 2 GB slide must not be, so it is
given each instance's header only and the real file (streamed: as stored, or de-identified
with pixel data as stored) replaces the stub at the file ID it chose. Every instance is checked
before the first byte is written, so a set with one instance that cannot be de-identified
fails as a whole and leaves nothing behind.
"""
from __future__ import annotations

import io
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pydicom
from pydicom.fileset import FileSet

from .access import SYSTEM, Principal
from .deid import DeidError, Deidentifier, DeidOptions, UidMap
from .records import InstanceRecord
from .status import ArchiveError, InvalidRequest

MAX_HEADER = 64 << 20


class ExportError(ArchiveError):
    """An export that cannot be done (the reason says why); nothing was written."""

    kind = InvalidRequest.kind


@dataclass
class ExportResult:
    context: str  # the UidMap context of a de-identified export ("" otherwise)
    written: list[str] = field(default_factory=list)  # SOP Instance UIDs as written
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (original SOP, why)
    bytes: int = 0


def _header(arc, rec: InstanceRecord) -> pydicom.Dataset:
    """The stored header (everything before Pixel Data), read alone."""
    n = rec.pixel_offset if rec.pixel_offset is not None else rec.size
    if n > MAX_HEADER:
        raise ExportError(f"instance {rec.sop}: header of {n} bytes is too large")
    with arc.open_instance(rec) as fh:
        data = fh.read(n)
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise ExportError(f"instance {rec.sop}: header cannot be parsed: {exc}") from exc


class Export:
    """One export of `recs` into `out` (an empty or new directory)."""

    def __init__(self, arc, recs: list[InstanceRecord], out: Path, *, deidentify: bool = False,
                 options: DeidOptions | None = None, who: Principal = SYSTEM) -> None:
        self.arc, self.recs, self.out, self.who = arc, recs, out, who
        self.context = f"export-{secrets.token_hex(8)}" if deidentify else ""
        self.deid = (Deidentifier(options or DeidOptions.from_config(arc.config), UidMap(arc.index, self.context))
                     if deidentify else None)

    def plan(self) -> tuple[list[tuple[InstanceRecord, pydicom.Dataset]], list[tuple[str, str]]]:
        """(instance, header as it will be written) for each instance, and what is left out;
        ExportError for one that cannot be exported (before anything is written)."""
        todo, excluded = [], []
        for rec in self.recs:
            if self.deid is not None:
                why = self.deid.excluded(rec)
                if why:
                    excluded.append((rec.sop, why))
                    continue
            head = _header(self.arc, rec)
            if self.deid is not None:
                try:
                    head = self.deid.dataset(head)
                except DeidError as exc:
                    raise ExportError(f"instance {rec.sop} cannot be de-identified: {exc.reason}") from exc
            todo.append((rec, head))
        if not todo:
            raise ExportError("nothing to export" + (f" ({len(excluded)} instances left out: "
                                                       f"{excluded[0][1]}, ...)" if excluded else ""))
        return todo, excluded

    def _chunks(self, rec: InstanceRecord) -> Iterator[bytes]:
        if self.deid is not None:
            return self.deid.instance_chunks(self.arc, rec)
        return self.arc.instance_chunks(rec, source="export")

    def run(self, progress: Callable[[int], None] | None = None) -> ExportResult:
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ExportError(f"{self.out} is not an empty directory (an export never merges into one)")
        todo, excluded = self.plan()
        result = ExportResult(self.context, excluded=excluded)
        self.out.mkdir(parents=True, exist_ok=True)
        spool = self.out / ".pathpacs-export"
        spool.mkdir()
        try:
            fs = FileSet()
            staged: dict[str, Path] = {}
            for rec, head in todo:
                part = spool / f"{len(staged):08d}.dcm"
                with open(part, "wb") as fh:
                    for chunk in self._chunks(rec):
                        fh.write(chunk)
                        result.bytes += len(chunk)
                        if progress:
                            progress(len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    fs.add(head)  # the header alone: FileSet writes a stub we replace
                except (ValueError, KeyError, AttributeError) as exc:
                    raise ExportError(f"instance {rec.sop}: no DICOMDIR record for it: {exc}") from exc
                staged[str(head.SOPInstanceUID)] = part
                result.written.append(str(head.SOPInstanceUID))
            fs.write(self.out)
            for inst in fs:
                os.replace(staged[inst.SOPInstanceUID], self.out / inst.FileID)
        except BaseException:
            for child in self.out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        studies = sorted({r.study for r, _ in todo})
        for study in studies:
            sops = [r.sop for r, _ in todo if r.study == study]
            self.arc.audit.exported(self.who, study, None, sops, f"file://{self.out.resolve()}"
                                    + (" (de-identified)" if self.deid else ""))
        return result


def select(arc, studies: list[str], query: list[tuple[str, str]]) -> list[InstanceRecord]:
    """The instances of the given studies, or of the studies a C-FIND-style query matches."""
    from .query import Key, tag_hex, vr_of

    uids = list(studies)
    if query:
        keys = []
        for name, value in query:
            tag = tag_hex(name)
            keys.append(Key(tag, vr_of(tag), [value]))
        uids += [r.study for r in arc.search("STUDY", keys) if r.study]
    recs: dict[str, InstanceRecord] = {}
    for uid in dict.fromkeys(uids):
        for rec in arc.instances_under(uid):
            recs.setdefault(rec.sop, rec)
    return list(recs.values())
