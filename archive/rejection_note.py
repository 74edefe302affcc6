"""IHE IOCM rejection notes: Key Object Selection Documents whose title is a PS3.16 CID 7011 code.

`build` writes the note a reject stores in the rejected objects' study (PS3.3 A.35.4, the Key
Object Selection Document IOD; TID 2010 content: the title, then one IMAGE or COMPOSITE item per
rejected instance), with pydicom. `read` recognises a received note from its DICOM JSON (stored
metadata), so STOW and C-STORE senders that may reject have it honoured.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as Seq
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from . import metadata as md
from .records import InstanceRecord

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"

# PS3.16 CID 7011 "Rejected for Quality Reasons" and friends (scheme DCM), with short names.
REASONS: dict[str, tuple[str, str]] = {
    "113001": ("quality", "Rejected for Quality Reasons"),
    "113037": ("safety", "Rejected for Patient Safety Reasons"),
    "113038": ("worklist", "Incorrect Modality Worklist Entry"),
    "113039": ("retention", "Data Retention Policy Expired"),
}
RETENTION_EXPIRED = "113039"
_BY_NAME = {name: code for code, (name, _m) in REASONS.items()}

# SOP classes whose references are IMAGE content items (the rest are COMPOSITE).
_NON_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.66",
                       "1.2.840.10008.5.1.4.1.1.91.", "1.2.840.10008.5.1.4.1.1.11.")


def reason_code(text: str) -> str:
    """A CID 7011 code from its value (113001) or short name (quality, safety, worklist,
    retention); ValueError naming the choices otherwise."""
    t = text.strip().lower()
    if t in REASONS:
        return t
    if t in _BY_NAME:
        return _BY_NAME[t]
    choices = ", ".join(f"{c} ({n})" for c, (n, _m) in REASONS.items())
    raise ValueError(f"{text[:40]!r} is not a rejection reason (PS3.16 CID 7011: {choices})")


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return c


def build(code: str, rejected: Sequence[InstanceRecord], study_attrs: Mapping[str, Any],
          patient_attrs: Mapping[str, Any], out: Path, aet: str = "PATHPACS") -> str:
    """Write the rejection note for `rejected` (one study) to `out`; returns its SOP Instance UID."""
    meaning = REASONS[code][1]
    study = rejected[0].study
    now = datetime.now(timezone.utc)
    ds = Dataset()
    for attrs in (patient_attrs, study_attrs):  # Patient and General Study modules, as stored
        for tag, el in attrs.items():
            if tag in md_keep:
                ds.update(Dataset.from_json({tag: el}))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    sop = generate_uid()
    ds.StudyInstanceUID = study
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = sop
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # Key Object Document Series
    ds.Modality = "KO"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9999
    ds.SeriesDescription = "Rejection note"
    ds.ReferencedPerformedProcedureStepSequence = Seq()
    # General Equipment
    ds.Manufacturer = "pathpacs"
    # Key Object Document
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    by_series: dict[str, list[InstanceRecord]] = {}
    for rec in rejected:
        by_series.setdefault(rec.series, []).append(rec)
    series_items = []
    for series, recs in by_series.items():
        se = Dataset()
        se.SeriesInstanceUID = series
        se.ReferencedSOPSequence = Seq([_ref(r) for r in recs])
        series_items.append(se)
    st = Dataset()
    st.StudyInstanceUID = study
    st.ReferencedSeriesSequence = Seq(series_items)
    ds.CurrentRequestedProcedureEvidenceSequence = Seq([st])
    # SR Document Content (TID 2010): the title, then every rejected object
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Seq([_code(code, meaning)])
    ds.ContinuityOfContent = "SEPARATE"
    tpl = Dataset()
    tpl.MappingResource = "DCMR"
    tpl.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = Seq([tpl])
    items = []
    for rec in rejected:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "COMPOSITE" if rec.sop_class.startswith(_NON_IMAGE_PREFIXES) else "IMAGE"
        item.ReferencedSOPSequence = Seq([_ref(rec)])
        items.append(item)
    ds.ContentSequence = Seq(items)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = KOS_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.SourceApplicationEntityTitle = aet[:16]
    ds.file_meta = meta
    ds.save_as(out, enforce_file_format=True)
    return sop


md_keep = {"00100010", "00100020", "00100021", "00100030", "00100040", "00080020", "00080030", "00080090",
           "00200010", "00080050", "00081030"}


def _ref(rec: InstanceRecord) -> Dataset:
    r = Dataset()
    r.ReferencedSOPClassUID = rec.sop_class
    r.ReferencedSOPInstanceUID = rec.sop
    return r


@dataclass(frozen=True)
class ReceivedNote:
    code: str
    sops: tuple[str, ...]  # the referenced instances, as the note lists them
    study: str


def read(doc: Mapping[str, Any]) -> ReceivedNote | None:
    """A rejection note's reason and references from an instance's DICOM JSON; None when the
    instance is not a KOS titled with a CID 7011 code."""
    if md.first_value(doc, "00080016") != KOS_SOP_CLASS:
        return None
    title = md.first_value(doc, "0040A043")
    if not isinstance(title, dict):
        return None
    code = md.first_value(title, "00080100")
    if md.first_value(title, "00080102") != "DCM" or code not in REASONS:
        return None
    sops: list[str] = []
    study = md.first_value(doc, "0020000D") or ""
    for st in (doc.get("0040A375") or {}).get("Value") or []:
        for se in (st.get("00081115") or {}).get("Value") or []:
            for ref in (se.get("00081199") or {}).get("Value") or []:
                uid = md.first_value(ref, "00081155")
                if uid:
                    sops.append(str(uid))
    return ReceivedNote(str(code), tuple(sops), str(study))
