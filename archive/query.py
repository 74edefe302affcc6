"""Query matching (PS3.4 C.2.2.2) and search over the index, shared by C-FIND and QIDO-RS.

Keys arrive as `Key` objects (protocol layers build them from a C-FIND identifier or QIDO
parameters) and results leave as DICOM JSON dicts, so both protocols answer from the same
records with the same rules:
  universal (empty), single value, wildcard (* ?), range (DA/TM/DT "a-b", "-b", "a-"),
  list of UIDs, multi-valued stored attributes (any value matches), simple sequence matching
  (an item of the stored sequence matches every non-empty key of the query item).
Person names match case-insensitively; with fuzzy=True each query component is a
case-insensitive prefix of the corresponding name component (QIDO fuzzymatching).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from typing import TYPE_CHECKING

from . import metadata as md
from .records import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord
from .status import ArchiveError, ErrorKind

if TYPE_CHECKING:
    from .index import Index

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
RANGE_VRS = {"DA", "TM", "DT"}
NO_WILDCARD_VRS = {"DA", "TM", "DT", "UI", "US", "SS", "UL", "SL", "FL", "FD", "IS", "DS",
                   "AT", "OB", "OW", "UN"}

# Computed (not stored) attributes, by level.
T_MODALITIES_IN_STUDY = "00080061"
T_SOP_CLASSES_IN_STUDY = "00080062"
T_N_PATIENT_STUDIES = "00201200"
T_N_PATIENT_SERIES = "00201202"
T_N_PATIENT_INSTANCES = "00201204"
T_N_STUDY_SERIES = "00201206"
T_N_STUDY_INSTANCES = "00201208"
T_N_SERIES_INSTANCES = "00201209"
T_AVAILABILITY = "00080056"
T_RETRIEVE_AET = "00080054"
T_STUDY_UID, T_SERIES_UID, T_SOP_UID = "0020000D", "0020000E", "00080018"
T_PATIENT_ID, T_ACCESSION, T_STUDY_DATE = "00100020", "00080050", "00080020"
T_PATIENT_NAME = "00100010"
T_QR_LEVEL = "00080052"


class QueryError(ArchiveError):
    """The query itself is invalid (bad date, unknown attribute...); kind LEVEL for a bad
    query/retrieve level (C-FIND answers that 0xA900), else INVALID."""

    kind = ErrorKind.INVALID


@dataclass
class Key:
    """One query key. values None = universal match (return the attribute only)."""

    tag: str  # 8 hex digits, upper case
    vr: str
    values: list[str] | None = None
    items: list[list["Key"]] | None = None  # sequence matching: keys of the query item

    @property
    def universal(self) -> bool:
        if self.vr == "SQ":
            return not self.items or all(k.universal for k in self.items[0])
        return not self.values or all(v in ("", "*") for v in self.values)


def tag_hex(name: str) -> str:
    """'PatientID' or '00100020' (or '0010,0020') -> '00100020'; QueryError if unknown."""
    s = name.strip()
    hexed = s.replace(",", "").replace("(", "").replace(")", "").upper()
    if re.fullmatch(r"[0-9A-F]{8}", hexed):
        return hexed
    tag = tag_for_keyword(s)
    if tag is None:
        raise QueryError(f"unknown attribute {name!r}")
    return f"{tag:08X}"


@lru_cache(maxsize=4096)
def vr_of(tag: str) -> str:
    try:
        return dictionary_VR(int(tag, 16))
    except KeyError:
        return "UN"


def keyword_of(tag: str) -> str:
    return keyword_for_tag(int(tag, 16)) or tag


_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?(\+\d{4})?$")


def validate(key: Key) -> None:
    """Raise QueryError for values that cannot be matched (a malformed date, a value or a
    list longer than any DICOM attribute holds)."""
    if key.items:
        for item in key.items:
            for k in item:
                validate(k)
    if key.values is None:
        return
    if len(key.values) > MAX_VALUES:
        raise QueryError(f"{keyword_of(key.tag)}: at most {MAX_VALUES} values, not {len(key.values)}")
    for v in key.values:
        if len(v) > MAX_VALUE_LENGTH:
            raise QueryError(f"{keyword_of(key.tag)}: a query value is at most {MAX_VALUE_LENGTH} characters")
    if key.vr not in RANGE_VRS:
        return
    pattern = {"DA": _DA, "TM": _TM, "DT": _DT}[key.vr]
    for v in key.values:
        if v in ("", "*"):
            continue
        parts = v.split("-", 1)
        if all(p == "" for p in parts):
            raise QueryError(f"invalid {keyword_of(key.tag)} value {v!r}")
        for p in parts:
            if p and not pattern.match(p.replace(":", "") if key.vr == "TM" else p):
                raise QueryError(f"invalid {keyword_of(key.tag)} value {v!r}")


MAX_VALUE_LENGTH = 1024  # longest query value (DICOM values are 64 characters or less, UT aside)
MAX_VALUES = 1000  # most values in one key (a UID list)


def _seg_at(seg: str, text: str, i: int) -> bool:
    """Does `seg` ('?' = any one character) match text at position i?"""
    if i + len(seg) > len(text):
        return False
    if "?" not in seg:
        return text.startswith(seg, i)
    for k, c in enumerate(seg):
        if c != "?" and text[i + k] != c:
            return False
    return True


def _seg_find(seg: str, text: str, start: int, stop: int) -> int:
    """Leftmost i in [start, stop - len(seg)] where `seg` matches, or -1."""
    if "?" not in seg:
        return text.find(seg, start, stop)
    for i in range(start, stop - len(seg) + 1):
        if _seg_at(seg, text, i):
            return i
    return -1


def _fold(s: str) -> str:
    """Lower case without changing the length: str.lower turns 'İ' (U+0130) into two code
    points, after which '?' (one character) would no longer match it."""
    low = s.lower()
    return low if len(low) == len(s) else "".join(c if len(c.lower()) != 1 else c.lower() for c in s)


@lru_cache(maxsize=1024)
def _pieces(pattern: str) -> tuple[str, str, tuple[str, ...]] | None:
    """A pattern cut at its stars (first, last, the non-empty middle pieces); None: no star."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return None
    return pieces[0], pieces[-1], tuple(p for p in pieces[1:-1] if p)


def wildcard_match(pattern: str, text: str, ignore_case: bool = False) -> bool:
    """PS3.4 C.2.2.2.4 wildcard matching: '*' any run of characters, '?' any one character.

    No regular expression and no backtracking: the pattern is cut at its stars; the first
    piece must match at the start, the last at the end, and each piece between them is taken
    at its leftmost match after the previous one (leftmost is always safe, since a star may
    absorb anything). Each piece is searched once, so the work is at most
    len(text) x len(pattern), never exponential ("a*a*a*...x" costs the same as "a*x")."""
    if ignore_case:
        pattern, text = _fold(pattern), _fold(text)
    pieces = _pieces(pattern)
    if pieces is None:
        return len(pattern) == len(text) and _seg_at(pattern, text, 0)
    first, last, middle = pieces
    if len(first) + len(last) > len(text):
        return False
    if not _seg_at(first, text, 0) or not _seg_at(last, text, len(text) - len(last)):
        return False
    pos, stop = len(first), len(text) - len(last)
    for piece in middle:
        i = _seg_find(piece, text, pos, stop)
        if i < 0:
            return False
        pos = i + len(piece)
    return True


def _norm_time(v: str) -> str:
    return v.replace(":", "")


def _in_range(stored: str, query: str, vr: str) -> bool:
    parts = query.split("-", 1)
    if vr == "TM":
        stored = _norm_time(stored)
        parts = [_norm_time(p) for p in parts]
    if len(parts) == 1:
        q = parts[0]
        if vr in ("TM", "DT"):
            return stored.startswith(q) or stored == q
        return stored == q
    lo, hi = parts
    if lo and stored < lo:
        return False
    if hi:
        # "-20260131" includes the whole upper day/time: compare on the query's precision.
        if stored[: len(hi)] > hi:
            return False
    return True


def _pn_fuzzy(stored: str, query: str) -> bool:
    s_parts = [p.lower() for p in re.split(r"[\^ ]", stored) if p]
    q_parts = [p.lower() for p in re.split(r"[\^ ]", query.rstrip("*")) if p]
    return all(any(sp.startswith(qp) for sp in s_parts) for qp in q_parts)


def match_value(stored: list[str], key: Key, fuzzy: bool = False) -> bool:
    if key.universal:
        return True
    if not stored:
        return False
    for q in key.values or []:
        for s in stored:
            if _match_one(s, q, key.vr, fuzzy):
                return True
    return False


def _match_one(s: str, q: str, vr: str, fuzzy: bool) -> bool:
    if vr in RANGE_VRS:
        return _in_range(s, q, vr)
    if vr == "PN":
        if fuzzy:
            return _pn_fuzzy(s, q)
        if "*" in q or "?" in q:
            return wildcard_match(q, s, ignore_case=True)
        return s.lower() == q.lower()
    if vr not in NO_WILDCARD_VRS and ("*" in q or "?" in q):
        return wildcard_match(q, s)
    if vr in ("IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"):
        try:
            return float(s) == float(q)
        except ValueError:
            return s == q
    return s == q


def match_doc(doc: dict[str, Any], keys: list[Key], fuzzy: bool = False) -> bool:
    for key in keys:
        if key.universal:
            continue
        el = doc.get(key.tag)
        if key.vr == "SQ":
            items = (el or {}).get("Value") or []
            qkeys = key.items[0] if key.items else []
            if not any(match_doc(item, qkeys, fuzzy) for item in items):
                return False
        elif not match_value(md.name_groups(el) if key.vr == "PN" else md.string_values(el), key, fuzzy):
            return False
    return True


# -- search ------------------------------------------------------------------------

def uid_list(keys: dict[str, Key], tag: str) -> list[str] | None:
    """The values of a non-universal UID key (a list of UIDs), else None. For planners."""
    k = keys.get(tag)
    if k is None or k.universal:
        return None
    vals = [v for v in (k.values or []) if v]
    return vals or None


def single_exact(keys: dict[str, Key], tag: str) -> str | None:
    """The one literal value of a key (no wildcard, no range), else None. For planners."""
    k = keys.get(tag)
    if k is None or k.universal or not k.values or len(k.values) != 1:
        return None
    v = k.values[0]
    if "*" in v or "?" in v or (k.vr in RANGE_VRS and "-" in v):
        return None
    return v


def _int_el(vr: str, n: int) -> dict:
    return {"vr": vr, "Value": [n]}


# Attributes answered from a study record (and so matched against it at upper levels).
STUDY_LEVEL_TAGS = set(md.STUDY_TAGS) | {T_MODALITIES_IN_STUDY, T_STUDY_UID, T_N_STUDY_SERIES, T_N_STUDY_INSTANCES}
_UPPER_FOR_INSTANCES = (set(md.STUDY_TAGS) | set(md.SERIES_TAGS) | {T_MODALITIES_IN_STUDY, T_N_SERIES_INSTANCES}) - {
    T_STUDY_UID, T_SERIES_UID}


@dataclass(frozen=True)
class SearchResult:
    level: str
    doc: dict[str, Any]
    patient: str | None = None  # index patient key (PATIENT level)
    study: str | None = None
    series: str | None = None
    sop: str | None = None


Availability = Callable[[Any], str]  # tier name or {tier: n} -> ONLINE | NEARLINE | OFFLINE


def _online(_where: Any) -> str:
    return "ONLINE"


def study_doc(rec: StudyRecord, retrieve_aet: str | None = None, availability: Availability = _online) -> dict[str, Any]:
    """A study as C-FIND/QIDO answer it: stored attributes plus the computed ones."""
    doc = dict(rec.attrs)
    doc[T_STUDY_UID] = {"vr": "UI", "Value": [rec.uid]}
    doc[T_MODALITIES_IN_STUDY] = {"vr": "CS", "Value": list(rec.modalities)} if rec.modalities else {"vr": "CS"}
    doc[T_SOP_CLASSES_IN_STUDY] = {"vr": "UI", "Value": list(rec.sop_classes)}
    doc[T_N_STUDY_SERIES] = _int_el("IS", rec.n_series)
    doc[T_N_STUDY_INSTANCES] = _int_el("IS", rec.n_instances)
    doc[T_AVAILABILITY] = {"vr": "CS", "Value": [availability(rec.tiers)]}
    if retrieve_aet:
        doc[T_RETRIEVE_AET] = {"vr": "AE", "Value": [retrieve_aet]}
    return doc


def series_doc(rec: SeriesRecord, retrieve_aet: str | None = None, availability: Availability = _online) -> dict[str, Any]:
    doc = dict(rec.attrs)
    doc[T_SERIES_UID] = {"vr": "UI", "Value": [rec.uid]}
    doc[T_STUDY_UID] = {"vr": "UI", "Value": [rec.study]}
    doc[T_N_SERIES_INSTANCES] = _int_el("IS", rec.n_instances)
    doc[T_AVAILABILITY] = {"vr": "CS", "Value": [availability(rec.tiers)]}
    if retrieve_aet:
        doc[T_RETRIEVE_AET] = {"vr": "AE", "Value": [retrieve_aet]}
    return doc


def instance_doc(rec: InstanceRecord, full: bytes | None = None, retrieve_aet: str | None = None,
                 availability: Availability = _online) -> dict[str, Any]:
    """An instance: its record's attributes, or its whole stored metadata when `full` is given."""
    if full is not None:
        doc = json.loads(full)
        doc.pop("7FE00010", None)
    else:
        doc = dict(rec.attrs)
    doc[T_SOP_UID] = {"vr": "UI", "Value": [rec.sop]}
    doc["00080016"] = {"vr": "UI", "Value": [rec.sop_class]}
    doc[T_SERIES_UID] = {"vr": "UI", "Value": [rec.series]}
    doc[T_STUDY_UID] = {"vr": "UI", "Value": [rec.study]}
    doc["00083002"] = {"vr": "UI", "Value": [rec.ts]}  # AvailableTransferSyntaxUID
    doc[T_AVAILABILITY] = {"vr": "CS", "Value": [availability(rec.blob.tier)]}
    if retrieve_aet:
        doc[T_RETRIEVE_AET] = {"vr": "AE", "Value": [retrieve_aet]}
    return doc


def patient_doc(rec: PatientRecord, studies: list[StudyRecord]) -> dict[str, Any]:
    doc = dict(rec.attrs)
    doc[T_N_PATIENT_STUDIES] = _int_el("IS", len(studies))
    doc[T_N_PATIENT_SERIES] = _int_el("IS", sum(s.n_series for s in studies))
    doc[T_N_PATIENT_INSTANCES] = _int_el("IS", sum(s.n_instances for s in studies))
    return doc


class Searcher:
    """Runs a query at one level: candidates from the index's planner, then PS3.4 matching
    here, the same for every backend. Nothing stays open between results."""

    def __init__(self, index: "Index", *, fuzzy: bool = False, retrieve_aet: str | None = None,
                 full_instance_metadata: bool = False, availability: Availability = _online,
                 order: str | None = None) -> None:
        self.index = index
        self.order = order  # STUDY level: "date" | "-date" (Index.candidates), else index order
        self.availability = availability
        self.fuzzy = fuzzy
        self.retrieve_aet = retrieve_aet
        self.full = full_instance_metadata

    def search(self, level: str, keys: list[Key], *, study: str | None = None,
               series: str | None = None) -> Iterator[SearchResult]:
        if level not in LEVELS:
            raise QueryError(f"invalid query/retrieve level {level!r}", kind=ErrorKind.LEVEL)
        for k in keys:
            validate(k)
        if self.order is not None and level == "STUDY":
            cands = self.index.candidates(level, keys, study=study, series=series, fuzzy=self.fuzzy, order=self.order)
        else:
            cands = self.index.candidates(level, keys, study=study, series=series, fuzzy=self.fuzzy)
        if level == "PATIENT":
            return self._patients(cands, keys)
        if level == "STUDY":
            return self._studies(cands, keys)
        if level == "SERIES":
            return self._series(cands, keys)
        return self._instances(cands, keys)

    def _patients(self, cands, keys) -> Iterator[SearchResult]:
        own = [k for k in keys if not k.tag.startswith("0020120")]
        for rec in cands:
            if not match_doc(rec.attrs, own, self.fuzzy):
                continue
            doc = patient_doc(rec, self.index.studies_of_patient(rec.key))
            if match_doc(doc, keys, self.fuzzy):
                yield SearchResult("PATIENT", doc, patient=rec.key)

    def _studies(self, cands, keys) -> Iterator[SearchResult]:
        for rec in cands:
            doc = study_doc(rec, self.retrieve_aet, self.availability)
            if match_doc(doc, keys, self.fuzzy):
                yield SearchResult("STUDY", doc, study=rec.uid)

    @staticmethod
    def _split(keys: list[Key], level_tags: set[str]) -> tuple[list[Key], list[Key]]:
        upper = [k for k in keys if k.tag in level_tags and not k.universal]
        rest = [k for k in keys if k not in upper]
        return upper, rest

    def _series(self, cands, keys) -> Iterator[SearchResult]:
        study_keys, own_keys = self._split(keys, STUDY_LEVEL_TAGS)
        checked: dict[str, bool] = {}
        for rec in cands:
            if study_keys:
                if rec.study not in checked:
                    st = self.index.study(rec.study)
                    checked[rec.study] = st is not None and match_doc(study_doc(st), study_keys, self.fuzzy)
                if not checked[rec.study]:
                    continue
            doc = series_doc(rec, self.retrieve_aet, self.availability)
            if match_doc(doc, own_keys, self.fuzzy):
                yield SearchResult("SERIES", doc, study=rec.study, series=rec.uid)

    def _instances(self, cands, keys) -> Iterator[SearchResult]:
        upper_keys, own_keys = self._split(keys, _UPPER_FOR_INSTANCES)
        parent_ok: dict[str, bool] = {}
        for rec in cands:
            if upper_keys:
                if rec.series not in parent_ok:
                    se = self.index.series(rec.series)
                    st = self.index.study(rec.study)
                    parent_ok[rec.series] = bool(se and st) and match_doc(
                        {**study_doc(st), **series_doc(se)}, upper_keys, self.fuzzy)  # type: ignore[arg-type]
                if not parent_ok[rec.series]:
                    continue
            full = self.index.metadata([rec.sop]) if self.full else []
            doc = instance_doc(rec, full[0] if full else None, self.retrieve_aet, self.availability)
            if not self.full and any(k.tag not in doc and not k.universal for k in own_keys):
                meta = self.index.metadata([rec.sop])
                if meta:
                    doc = {**instance_doc(rec, meta[0], self.retrieve_aet, self.availability)}
            if match_doc(doc, own_keys, self.fuzzy):
                yield SearchResult("IMAGE", doc, study=rec.study, series=rec.series, sop=rec.sop)
