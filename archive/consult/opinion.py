"""The opinion SR: a consultant's answer (or decline) as a Comprehensive SR, and its reader.

Written at the consultant in the case's study (the UIDs the consultant has), sent back to the
requester, mapped back there to the original UIDs (archive.consult.answers). Any DICOM reader
shows it by meaning: the title is LOINC 60570-9 "Pathology Consult note", the items are the
concepts of archive.consult.codes. Regions drawn on a slide are SCOORD items (pixel
coordinates) SELECTED FROM an IMAGE item naming the slide's VOLUME instance, each inferred
into a TEXT item carrying its label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from . import codes
from ..metadata import header_dataset

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SR_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
    COMPREHENSIVE_SR, "1.2.840.10008.5.1.4.1.1.88.34",
})
SOURCE_IMAGE = Code("121112", "DCM", "Source of Measurement")
GRAPHIC_TYPES = ("POINT", "POLYLINE", "POLYGON", "MULTIPOINT")
MANUFACTURER = "pathpacs"


@dataclass(frozen=True)
class Region:
    """A mark on a slide: pixel coordinates (column, row; 1-based frame-independent total
    pixel matrix of the VOLUME instance) of a POINT, POLYLINE, POLYGON or MULTIPOINT."""

    sop_instance_uid: str
    graphic_type: str
    points: tuple[tuple[float, float], ...]
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image
    label: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"sop_instance_uid": self.sop_instance_uid, "sop_class_uid": self.sop_class_uid,
                "graphic_type": self.graphic_type, "points": [list(p) for p in self.points],
                "label": self.label}


@dataclass(frozen=True)
class ConsultOpinion:
    """What an opinion (or decline) SR says."""

    consultation_id: str
    consultant: str
    text: str
    study_uid: str
    sop_instance_uid: str
    declined: str | None = None  # the reason, when the document is a decline
    accepted: str | None = None  # when the consultant accepted the case (ISO time), if said
    request_sop_uid: str | None = None  # the request SR it answers
    regions: tuple[Region, ...] = field(default_factory=tuple)

    @property
    def kind(self) -> str:
        """"declined", "answered" (an opinion), or "accepted" (a notice that the case was
        accepted, carrying only the acceptance time)."""
        if self.declined is not None:
            return "declined"
        return "answered" if self.text or self.regions else "accepted"

    def as_dict(self) -> dict[str, Any]:
        return {"consultation_id": self.consultation_id, "consultant": self.consultant, "text": self.text,
                "study_uid": self.study_uid, "sop_instance_uid": self.sop_instance_uid,
                "declined": self.declined, "accepted": self.accepted, "request_sop_uid": self.request_sop_uid,
                "regions": [r.as_dict() for r in self.regions]}


def _evidence_header(ds: Dataset) -> Dataset:
    """highdicom reads the patient and study module from the first evidence item: give it
    every attribute it asks for (empty when the case has none)."""
    out = Dataset()
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
               "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "IssuerOfPatientID", "SpecificCharacterSet"):
        if kw in ds:
            setattr(out, kw, ds.data_element(kw).value)
        elif kw not in ("IssuerOfPatientID", "SpecificCharacterSet"):
            setattr(out, kw, "")
    return out


def opinion_sr(evidence: Sequence[Dataset], *, consultation_id: str, consultant: str, text: str = "",
               declined: str | None = None, accepted: str | None = None,
               regions: Sequence[Region] = (), request: Dataset | None = None,
               institution: str | None = None, series_uid: str | None = None,
               sop_uid: str | None = None) -> Dataset:
    """A Comprehensive SR answering consultation `consultation_id` in the study of `evidence`
    (headers of the case's instances: at least one, and every slide a region is drawn on).
    `declined` makes it a decline (the reason); `request` is the request SR it answers. With
    neither text nor `declined`, only `accepted`: a notice that the case was accepted."""
    from highdicom.sr import (CompositeContentItem, ContainerContentItem, ComprehensiveSR,
                              DateTimeContentItem, ImageContentItem, PnameContentItem, ScoordContentItem,
                              TextContentItem)

    if not evidence:
        raise ValueError("an opinion needs the case's study (no instance given)")
    if declined is None and not text.strip() and not (accepted and not regions):
        raise ValueError("an opinion needs a text")
    study = str(evidence[0].StudyInstanceUID)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    items: list[Any] = [
        TextContentItem(codes.CONSULTATION_ID, consultation_id, relationship_type="CONTAINS"),
        PnameContentItem(codes.CONSULTANT, _pname(consultant), relationship_type="CONTAINS"),
    ]
    if accepted:
        items.append(DateTimeContentItem(codes.ACCEPTED, _dt(accepted), relationship_type="CONTAINS"))
    if declined is not None:
        items.append(TextContentItem(codes.DECLINED, declined.strip() or "declined", relationship_type="CONTAINS"))
    if text.strip():
        items.append(TextContentItem(codes.OPINION_TEXT, text.strip(), relationship_type="CONTAINS"))
    for r in regions:
        if r.graphic_type not in GRAPHIC_TYPES:
            raise ValueError(f"region graphic type {r.graphic_type!r} is not one of {', '.join(GRAPHIC_TYPES)}")
        if not r.points or (r.graphic_type == "POINT" and len(r.points) != 1) or \
                (r.graphic_type in ("POLYLINE", "POLYGON") and len(r.points) < 2):
            raise ValueError(f"a {r.graphic_type} region needs {'one point' if r.graphic_type == 'POINT' else 'points'}")
        if r.sop_instance_uid not in by_uid:
            raise ValueError(f"region on {r.sop_instance_uid}: not an instance of the case")
        # VOLUME: the points are in the total pixel matrix of the slide, not in one tile
        scoord = ScoordContentItem(codes.REGION, r.graphic_type, np.array(r.points, dtype=float),
                                   pixel_origin_interpretation="VOLUME", relationship_type="INFERRED FROM")
        scoord.ContentSequence = [ImageContentItem(SOURCE_IMAGE, r.sop_class_uid, r.sop_instance_uid,
                                                   relationship_type="SELECTED FROM")]
        label = TextContentItem(codes.REGION, r.label or "region", relationship_type="CONTAINS")
        label.ContentSequence = [scoord]
        items.append(label)
    if request is not None:
        items.append(CompositeContentItem(codes.REQUEST, str(request.SOPClassUID), str(request.SOPInstanceUID),
                                          relationship_type="CONTAINS"))
    root = ContainerContentItem(codes.OPINION_TITLE)
    root.ContentSequence = items
    ev = [_evidence_header(ds) for ds in evidence]
    if request is not None and str(request.SOPInstanceUID) not in by_uid:
        ev.append(_evidence_header(request))
    sr = ComprehensiveSR(
        evidence=ev, content=root, series_instance_uid=series_uid or generate_uid(), series_number=990,
        sop_instance_uid=sop_uid or generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, institution_name=institution,
        series_description="Consultation decline" if declined is not None else
        "Consultation opinion" if text.strip() else "Consultation accepted")
    assert str(sr.StudyInstanceUID) == study
    return sr


def _pname(text: str) -> str:
    text = (text or "consultant").strip()
    return text if "^" in text else text.replace(",", " ") + "^"  # one component: the whole name


def _dt(iso: str) -> datetime:
    t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return t.astimezone(timezone.utc).replace(tzinfo=None, microsecond=0)


# -- reading -----------------------------------------------------------------------------------

def _code(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", ""))


def _is(item: Dataset, code: Code) -> bool:
    return _code(item) == (code.value, code.scheme_designator)


def _text(item: Dataset) -> str:
    vt = item.get("ValueType")
    if vt == "TEXT":
        return str(item.get("TextValue", ""))
    if vt == "PNAME":
        return str(item.get("PersonName", "")).replace("^", " ").strip()
    if vt == "DATETIME":
        return str(item.get("DateTime", ""))
    return ""


def title_of(doc: "Dataset | Mapping[str, Any]") -> tuple[str, str] | None:
    """(code value, scheme) of an SR document's title, or None (cheap: no content walk)."""
    try:
        return _code(header_dataset(doc))
    except Exception:
        return None


def consultation_id_of(doc: "Dataset | Mapping[str, Any]") -> str | None:
    """The consultation id an SR document carries (a request or an opinion), or None."""
    try:
        ds = header_dataset(doc)
    except Exception:
        return None
    for item in ds.get("ContentSequence", []):
        if _is(item, codes.CONSULTATION_ID):
            return _text(item) or None
    return None


def _region(item: Dataset) -> Region | None:
    for scoord in item.get("ContentSequence", []):
        if scoord.get("ValueType") != "SCOORD":
            continue
        data = [float(v) for v in scoord.get("GraphicData", [])]
        points = tuple((data[i], data[i + 1]) for i in range(0, len(data) - 1, 2))
        for img in scoord.get("ContentSequence", []):
            ref = img.get("ReferencedSOPSequence")
            if img.get("ValueType") == "IMAGE" and ref:
                return Region(str(ref[0].ReferencedSOPInstanceUID), str(scoord.get("GraphicType", "")), points,
                              str(ref[0].ReferencedSOPClassUID), _text(item))
    return None


def read_opinion(doc: "Dataset | Mapping[str, Any]") -> ConsultOpinion | None:
    """The opinion (or decline) an SR document holds; None when it is no consultation answer
    (another title, or no consultation id)."""
    try:
        ds = header_dataset(doc)
    except Exception:
        return None
    if _code(ds) != (codes.OPINION_TITLE.value, codes.OPINION_TITLE.scheme_designator):
        return None
    cid = consultant = text = ""
    declined = accepted = request = None
    regions: list[Region] = []
    for item in ds.get("ContentSequence", []):
        if _is(item, codes.CONSULTATION_ID):
            cid = _text(item)
        elif _is(item, codes.CONSULTANT):
            consultant = _text(item)
        elif _is(item, codes.OPINION_TEXT):
            text = _text(item)
        elif _is(item, codes.DECLINED):
            declined = _text(item)
        elif _is(item, codes.ACCEPTED):
            accepted = _iso(_text(item))
        elif _is(item, codes.REGION):
            r = _region(item)
            if r is not None:
                regions.append(r)
        elif _is(item, codes.REQUEST) and item.get("ReferencedSOPSequence"):
            request = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    if not cid:
        return None
    return ConsultOpinion(cid, consultant, text, str(ds.get("StudyInstanceUID", "")),
                          str(ds.get("SOPInstanceUID", "")), declined, accepted, request, tuple(regions))


def _iso(dt: str) -> str | None:
    try:
        t = datetime.strptime(dt[:14], "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return t.replace(tzinfo=timezone.utc).isoformat(timespec="seconds")
