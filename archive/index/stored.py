"""The stored layout both index backends share: which study attributes are indexed and how,
and the JSON of the instance, series, study and patient records (LMDB values, PostgreSQL jsonb),
so an index migrated from one backend to the other holds the same records."""
from __future__ import annotations

from .. import metadata as md
from ..records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord

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
