"""Read-only index accessors tuned for the DICOMweb frame and metadata paths.

Owned by dicomweb (kept here so the web layer never touches LMDB databases by name
elsewhere). Nothing in this module writes; nothing parses a DICOM data set.
"""
from __future__ import annotations

from typing import Iterable

from .index import FrameTable, Index

def locate_frames(index: Index, sop: str, numbers: Iterable[int]
                  ) -> tuple[FrameTable, list[list[tuple[int, int]] | None], list[int | None]] | None:
    """See Index.locate_frames: reads only the header and 20 bytes per requested frame."""
    return index.locate_frames(sop, numbers)


def metadata_of(index: Index, sops: Iterable[str]) -> list[bytes]:
    """Precomputed DICOM JSON of each instance (missing ones skipped), one transaction."""
    out = []
    db = index.db["meta"]
    with index.read() as txn:
        for sop in sops:
            raw = txn.get(sop.encode(), db=db)
            if raw is not None:
                out.append(raw)
    return out


def series_metadata(index: Index, series: str, study: str | None = None) -> tuple[list[str], list[bytes]] | None:
    """(sops, metadata) of a series in one read transaction; None if the series is unknown
    (or belongs to another study than `study`)."""
    with index.read() as txn:
        rec = index.series(series, txn)
        if rec is None or (study is not None and rec["study"] != study):
            return None
        sops = index.instances_of_series(series, txn)
        db = index.db["meta"]
        metas = []
        for sop in sops:
            raw = txn.get(sop.encode(), db=db)
            if raw is not None:
                metas.append(raw)
        return sops, metas


def study_metadata(index: Index, study: str) -> tuple[list[str], list[bytes]] | None:
    with index.read() as txn:
        if index.study(study, txn) is None:
            return None
        sops: list[str] = []
        metas: list[bytes] = []
        db = index.db["meta"]
        for se in index.series_of_study(study, txn):
            for sop in index.instances_of_series(se, txn):
                raw = txn.get(sop.encode(), db=db)
                if raw is not None:
                    sops.append(sop)
                    metas.append(raw)
        return sops, metas


def instances_under(index: Index, study: str, series: str | None = None) -> list[dict] | None:
    """Instance records of a study (or one series of it); None when the resource is unknown."""
    with index.read() as txn:
        if series is not None:
            srec = index.series(series, txn)
            if srec is None or srec["study"] != study:
                return None
            series_list = [series]
        else:
            if index.study(study, txn) is None:
                return None
            series_list = index.series_of_study(study, txn)
        out = []
        for se in series_list:
            for sop in index.instances_of_series(se, txn):
                rec = index.instance(sop, txn)
                if rec is not None:
                    out.append(rec)
        return out
