"""Build, once at ingest, everything the query and retrieve paths answer from.

- the instance's DICOM JSON metadata (PS3.18 F.2), with binary values above a threshold
  replaced by BulkDataURIs and Pixel Data never inline; URIs start with BASE_TOKEN, which
  the web layer replaces with its absolute base URL per request;
- the bulk values themselves, stored in the index so BulkDataURIs resolve without parsing;
- the patient/study/series/instance attribute subsets used for C-FIND and QIDO.
"""
from __future__ import annotations

import base64
import json
from typing import Any, Mapping

from pydicom.dataset import Dataset

BASE_TOKEN = "@@PATHPACS_BASE@@"
BULK_THRESHOLD = 1024
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}

# Attributes kept per query level (keywords); a record holds the DICOM JSON of these.
PATIENT_KEYS = [
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "OtherPatientIDsSequence", "EthnicGroup", "PatientComments",
]
STUDY_KEYS = PATIENT_KEYS + [
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyDescription", "ReferringPhysicianName", "IssuerOfAccessionNumberSequence",
    "PatientAge", "PatientSize", "PatientWeight", "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence", "TimezoneOffsetFromUTC",
]
SERIES_KEYS = [
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SeriesTime", "BodyPartExamined", "Laterality", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "RequestAttributesSequence", "Manufacturer",
    "ManufacturerModelName", "InstitutionName", "StationName", "OperatorsName",
    "FrameOfReferenceUID",
]
INSTANCE_KEYS = [
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
    "ImageType", "ContentDate", "ContentTime", "AcquisitionDateTime", "BitsAllocated",
    "SamplesPerPixel", "PhotometricInterpretation", "TotalPixelMatrixRows",
    "TotalPixelMatrixColumns", "TotalPixelMatrixFocalPlanes", "DimensionOrganizationType",
    "ContainerIdentifier", "SpecimenLabelInImage", "BurnedInAnnotation", "LossyImageCompression",
    "ConceptNameCodeSequence", "CompletionFlag", "VerificationFlag", "ObservationDateTime",
    "ContentLabel", "ContentDescription", "PresentationCreationDate",
]


def _tag_hex(keyword: str) -> str | None:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return None if tag is None else f"{tag:08X}"


PATIENT_TAGS = [t for t in map(_tag_hex, PATIENT_KEYS) if t]
STUDY_TAGS = [t for t in map(_tag_hex, STUDY_KEYS) if t]
SERIES_TAGS = [t for t in map(_tag_hex, SERIES_KEYS) if t]
INSTANCE_TAGS = [t for t in map(_tag_hex, INSTANCE_KEYS) if t]


def header_dataset(doc: "Dataset | Mapping[str, Any] | bytes | str") -> Dataset:
    """Stored DICOM JSON (a mapping, or its bytes) as a pydicom Dataset of the header: bulk
    values (out of line behind BulkDataURIs) read as empty; a Dataset as it is. What the
    consultation documents and the de-identification checks read an instance's attributes from."""
    if isinstance(doc, Dataset):
        return doc
    if isinstance(doc, (bytes, bytearray, str)):
        doc = json.loads(doc)
    return Dataset.from_json(dict(doc), bulk_data_uri_handler=lambda *_: b"")


def instance_path(study: str, series: str, sop: str) -> str:
    return f"/studies/{study}/series/{series}/instances/{sop}"


def dataset_json(
    ds: Dataset, study: str, series: str, sop: str, has_pixels: bool, pixel_vr: str = "OB"
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """DICOM JSON of the header, plus {bulk path: bytes} for values moved out of line."""
    doc = ds.to_json_dict(bulk_data_threshold=1 << 62)
    bulk: dict[str, bytes] = {}
    base = f"{BASE_TOKEN}{instance_path(study, series, sop)}/bulkdata/"
    _externalise(doc, "", base, bulk)
    if has_pixels:
        doc["7FE00010"] = {"vr": pixel_vr, "BulkDataURI": f"{BASE_TOKEN}{instance_path(study, series, sop)}/frames"}
    return doc, bulk


def _externalise(doc: dict[str, Any], prefix: str, base: str, bulk: dict[str, bytes]) -> None:
    for tag, el in doc.items():
        if "InlineBinary" in el:
            raw = base64.b64decode(el["InlineBinary"])
            if len(raw) > BULK_THRESHOLD:
                path = f"{prefix}{tag}"
                bulk[path] = raw
                del el["InlineBinary"]
                el["BulkDataURI"] = base + path
        elif el.get("vr") == "SQ":
            for i, item in enumerate(el.get("Value", [])):
                _externalise(item, f"{prefix}{tag}/{i}/", base, bulk)


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def subset(doc: dict[str, Any], tags: list[str]) -> dict[str, Any]:
    return {t: doc[t] for t in tags if t in doc}


def first_value(doc: dict[str, Any], tag: str) -> Any:
    el = doc.get(tag)
    if not el:
        return None
    vals = el.get("Value")
    if not vals:
        return None
    v = vals[0]
    if isinstance(v, dict) and "Alphabetic" in v:
        return v["Alphabetic"]
    return v


def string_values(el: dict[str, Any] | None) -> list[str]:
    """Values of a JSON element as strings (person names by their Alphabetic group)."""
    if not el:
        return []
    out = []
    for v in el.get("Value", []) or []:
        if isinstance(v, dict):
            out.append(str(v.get("Alphabetic", "")))
        else:
            out.append(str(v))
    return out


def name_groups(el: dict[str, Any] | None) -> list[str]:
    """Every component group of a person name (Alphabetic, Ideographic, Phonetic): a name
    written "Wang^Xiaodong=王^小东" is found by either spelling (PS3.5 6.2.1)."""
    if not el:
        return []
    out = []
    for v in el.get("Value", []) or []:
        if isinstance(v, dict):
            out.extend(str(v[g]) for g in ("Alphabetic", "Ideographic", "Phonetic") if v.get(g))
        elif v:
            out.append(str(v))
    return out


def int_value(doc: dict[str, Any], tag: str, default: int = 0) -> int:
    """The first value of a JSON element as an int (IS, US, UL...), `default` if none or not a number."""
    v = first_value(doc, tag)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return int(float(v))
        except (TypeError, ValueError):
            return default


def float_value(doc: dict[str, Any], tag: str) -> float | None:
    v = first_value(doc, tag)
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def sequence_items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    """The items of a sequence element (empty when absent)."""
    el = doc.get(tag)
    return [item or {} for item in ((el or {}).get("Value") or [])]
