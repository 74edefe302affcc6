"""The consultation documents as DICOM Comprehensive SR (highdicom): the request sent with a
case, and (part RECV) the opinion sent back.

They travel with the case, in its study, so a partner running any DICOM archive receives the
question, the requesting hospital and physician, the chosen expert and the priority in a
standard form; the concepts come from `codes` (one table for writer and reader).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import highdicom as hd
from pydicom import Dataset
from pydicom.uid import generate_uid

from . import codes
from ..metadata import header_dataset

REQUEST_SERIES_NUMBER = 9901  # the request SR is in its own series of the case's study
MANUFACTURER = "pathpacs"
logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs each module it copies at INFO


@dataclass(frozen=True)
class ConsultRequest:
    """What a received request SR says (`read_request`)."""

    consultation_id: str
    requester: str
    institution: str
    physician: str
    expert: str
    priority: str  # routine | urgent | frozen
    question: str
    study_uid: str
    series_uid: str = ""
    sop_uid: str = ""


def _headers(study_datasets_or_header: Dataset | Mapping[str, Any] | Iterable[Dataset | Mapping[str, Any]]
             ) -> list[Dataset]:
    if isinstance(study_datasets_or_header, (Dataset, Mapping)):
        return [header_dataset(study_datasets_or_header)]
    out = [header_dataset(d) for d in study_datasets_or_header]
    if not out:
        raise ValueError("a request SR needs at least one instance header of the case")
    return out


def request_sr(study_datasets_or_header: Dataset | Mapping[str, Any] | Iterable[Dataset | Mapping[str, Any]], *,
               consultation_id: str, requester: str, institution: str = "", physician: str = "",
               expert: str = "", priority: str = "routine", question: str = "",
               sop_instance_uid: str | None = None, series_instance_uid: str | None = None) -> Dataset:
    """A Comprehensive SR in the case's study (patient and study attributes from the given
    headers, which are listed as the evidence of the request). Empty fields are left out."""
    if priority not in codes.PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(codes.PRIORITIES)}, not {priority!r}")
    evidence = _headers(study_datasets_or_header)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[Any] = [
        hd.sr.TextContentItem(codes.CONSULTATION_ID, consultation_id, relationship_type=contains),
        hd.sr.TextContentItem(codes.REQUESTER, requester, relationship_type=contains),
    ]
    if institution:
        items.append(hd.sr.TextContentItem(codes.REQUESTING_INSTITUTION, institution, relationship_type=contains))
    if physician:
        items.append(hd.sr.PnameContentItem(codes.REQUESTING_PHYSICIAN, physician, relationship_type=contains))
    if expert:
        items.append(hd.sr.TextContentItem(codes.REQUESTED_EXPERT, expert, relationship_type=contains))
    items.append(hd.sr.CodeContentItem(codes.PRIORITY, codes.PRIORITIES[priority], relationship_type=contains))
    if question:
        items.append(hd.sr.TextContentItem(codes.CLINICAL_QUESTION, question, relationship_type=contains))
    root = hd.sr.ContainerContentItem(codes.REQUEST_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=root,
        series_instance_uid=series_instance_uid or generate_uid(), series_number=REQUEST_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, institution_name=institution or None,
    )
    sr.SeriesDescription = "Consultation request"
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: a question in Chinese, names copied from any charset
    return sr


def _code_of(item: Dataset, attr: str = "ConceptNameCodeSequence") -> tuple[str, str] | None:
    seq = getattr(item, attr, None)
    if not seq:
        return None
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def _key(code: Any) -> tuple[str, str]:
    return code.value, code.scheme_designator


def read_request(ds_or_dicom_json: Dataset | Mapping[str, Any]) -> ConsultRequest | None:
    """The request a document carries; None when it is no consultation request (another SR,
    another title, or not an SR at all)."""
    try:
        ds = header_dataset(ds_or_dicom_json)
    except Exception:  # noqa: BLE001 - a malformed document is no request
        return None
    if _code_of(ds) != _key(codes.REQUEST_TITLE) or getattr(ds, "ValueType", "") != "CONTAINER":
        return None
    found: dict[tuple[str, str], str] = {}
    priorities = {_key(c): name for name, c in codes.PRIORITIES.items()}
    for item in getattr(ds, "ContentSequence", []):
        name = _code_of(item)
        if name is None:
            continue
        vt = getattr(item, "ValueType", "")
        if vt == "TEXT":
            found[name] = str(getattr(item, "TextValue", ""))
        elif vt == "PNAME":
            found[name] = str(getattr(item, "PersonName", ""))
        elif vt == "CODE":
            value = _code_of(item, "ConceptCodeSequence")
            found[name] = priorities.get(value, "") if value else ""
    cid = found.get(_key(codes.CONSULTATION_ID))
    if not cid:
        return None
    return ConsultRequest(
        consultation_id=cid,
        requester=found.get(_key(codes.REQUESTER), ""),
        institution=found.get(_key(codes.REQUESTING_INSTITUTION), ""),
        physician=found.get(_key(codes.REQUESTING_PHYSICIAN), ""),
        expert=found.get(_key(codes.REQUESTED_EXPERT), ""),
        priority=found.get(_key(codes.PRIORITY), "") or "routine",
        question=found.get(_key(codes.CLINICAL_QUESTION), ""),
        study_uid=str(getattr(ds, "StudyInstanceUID", "")),
        series_uid=str(getattr(ds, "SeriesInstanceUID", "")),
        sop_uid=str(getattr(ds, "SOPInstanceUID", "")),
    )
