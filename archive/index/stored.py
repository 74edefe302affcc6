"""The stored layout both index backends share: which study attributes are indexed and how,
and the JSON of the instance, series, study and patient records (LMDB values, PostgreSQL jsonb),
so an index migrated from one backend to the other holds the same records."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import metadata as md
from ..records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord

if TYPE_CHECKING:
    from .base import NewInstance

INDEXED_STUDY_TAGS = {"00100020": "PatientID", "00080050": "AccessionNumber", "00080020": "StudyDate",
                      "00100010": "PatientName"}
CASE_FOLDED_TAGS = {"00100010"}  # person names match case-insensitively: indexed lower-cased
T_STUDY_UID, T_SERIES_UID, T_SOP_UID = "0020000D", "0020000E", "00080018"
T_PATIENT_ID, T_ACCESSION, T_STUDY_DATE, T_PATIENT_NAME = "00100020", "00080050", "00080020", "00100010"
T_STUDY_TIME = "00080030"
ORDERS = ("date", "-date")  # study orders a backend walks (Index.candidates `order`)


def index_values(tag: str, attrs: dict) -> list[str]:
    """The values a study is indexed under for `tag` (person names: every component group,
    lower-cased; "" when it has none)."""
    if tag in CASE_FOLDED_TAGS:
        return [v.lower() for v in md.name_groups(attrs.get(tag))] or [""]
    return md.string_values(attrs.get(tag)) or [""]


def stored_instance(rec: InstanceRecord) -> dict:
    """The instance record as stored: without its location (tier, key, syntax: kept apart)."""
    d = rec.to_json()
    for k in ("blob", "tier", "ts"):
        d.pop(k)
    return d


def instance_record(d: dict, tier: str, key: str, ts: str) -> InstanceRecord:
    return InstanceRecord.from_json({**d, "tier": tier, "blob": key, "ts": ts})


def series_record(uid: str, d: dict) -> SeriesRecord:
    return SeriesRecord(uid, d["study"], d["attrs"], d["n_instances"], d["bytes"], tuple(d["sop_classes"]),
                        d.get("tiers") or {})


def study_record(uid: str, d: dict) -> StudyRecord:
    return StudyRecord(uid, d["patient"], d["attrs"], d["n_series"], d["n_instances"], d["bytes"],
                       tuple(d["modalities"]), tuple(d["sop_classes"]), d.get("updated", ""), d.get("tiers") or {})


def patient_record(key: str, d: dict) -> PatientRecord:
    return PatientRecord(key, d["attrs"], d["n_studies"])


def count_tier(rec: dict, tier: str, delta: int) -> None:
    """A series' or study's count of instances on `tier` ("tiers": {name: n}), moved by `delta`."""
    counts = rec.setdefault("tiers", {})
    counts[tier] = counts.get(tier, 0) + delta
    if counts[tier] <= 0:
        del counts[tier]


# -- what adding one instance does to its parents (both backends, one rule) ----------------------

def new_series_record(new: "NewInstance") -> dict:
    return {"attrs": dict(new.series_attrs), "study": new.record.study, "n_instances": 0, "bytes": 0,
            "sop_classes": []}


def new_study_record(new: "NewInstance") -> dict:
    return {"attrs": dict(new.study_attrs), "patient": new.record.patient, "n_series": 0, "n_instances": 0,
            "bytes": 0, "modalities": [], "sop_classes": []}


def new_patient_record(new: "NewInstance") -> dict:
    return {"attrs": dict(new.patient_attrs), "n_studies": 0}


def count_in_series(srec: dict, new: "NewInstance") -> None:
    """A series record after `new` joined it."""
    rec = new.record
    srec["n_instances"] += 1
    srec["bytes"] += rec.size
    count_tier(srec, rec.blob.tier, 1)
    if rec.sop_class not in srec["sop_classes"]:
        srec["sop_classes"].append(rec.sop_class)


def count_in_study(strec: dict, new: "NewInstance", new_series: bool) -> None:
    """A study record after `new` joined it (new_series: its series is new to the study)."""
    rec = new.record
    strec["n_series"] += int(new_series)
    strec["n_instances"] += 1
    strec["bytes"] += rec.size
    count_tier(strec, rec.blob.tier, 1)
    modality = md.first_value(new.series_attrs, "00080060")
    if modality and modality not in strec["modalities"]:
        strec["modalities"].append(modality)
    if rec.sop_class not in strec["sop_classes"]:
        strec["sop_classes"].append(rec.sop_class)
    strec["updated"] = rec.received
