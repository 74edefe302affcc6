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
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from . import metadata as md
from .index import CASE_FOLDED_TAGS, Index

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


class QueryError(ValueError):
    """The query itself is invalid (bad date, unknown attribute...)."""


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


def wildcard_match(pattern: str, text: str, ignore_case: bool = False) -> bool:
    """PS3.4 C.2.2.2.4 wildcard matching: '*' any run of characters, '?' any one character.

    No regular expression and no backtracking: the pattern is cut at its stars; the first
    piece must match at the start, the last at the end, and each piece between them is taken
    at its leftmost match after the previous one (leftmost is always safe, since a star may
    absorb anything). Each piece is searched once, so the work is at most
    len(text) x len(pattern), never exponential ("a*a*a*...x" costs the same as "a*x")."""
    if ignore_case:
        pattern, text = _fold(pattern), _fold(text)
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return len(pattern) == len(text) and _seg_at(pattern, text, 0)
    first, last, middle = pieces[0], pieces[-1], [p for p in pieces[1:-1] if p]
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
        elif not match_value(md.string_values(el), key, fuzzy):
            return False
    return True


# -- search ------------------------------------------------------------------------

def _uids(keys: dict[str, Key], tag: str) -> list[str] | None:
    k = keys.get(tag)
    if k is None or k.universal:
        return None
    vals = [v for v in (k.values or []) if v]
    return vals or None


def _single_exact(keys: dict[str, Key], tag: str) -> str | None:
    k = keys.get(tag)
    if k is None or k.universal or not k.values or len(k.values) != 1:
        return None
    v = k.values[0]
    if "*" in v or "?" in v or (k.vr in RANGE_VRS and "-" in v):
        return None
    return v


def _int_el(vr: str, n: int) -> dict:
    return {"vr": vr, "Value": [n]}


@dataclass
class SearchResult:
    level: str
    doc: dict[str, Any]
    patient: str | None = None  # index patient key (PATIENT level)
    study: str | None = None
    series: str | None = None
    sop: str | None = None
    record: dict | None = field(default=None, repr=False)


class Searcher:
    """Runs a query at one level against the index inside one read transaction."""

    def __init__(self, index: Index, *, fuzzy: bool = False, retrieve_aet: str | None = None,
                 full_instance_metadata: bool = False) -> None:
        self.index = index
        self.fuzzy = fuzzy
        self.retrieve_aet = retrieve_aet
        self.full = full_instance_metadata

    def search(self, level: str, keys: list[Key], *, study: str | None = None, series: str | None = None) -> Iterator[SearchResult]:
        if level not in LEVELS:
            raise QueryError(f"invalid query/retrieve level {level!r}")
        for k in keys:
            validate(k)
        bykey = {k.tag: k for k in keys}
        with self.index.read() as txn:
            if level == "PATIENT":
                yield from self._patients(txn, keys, bykey)
            elif level == "STUDY":
                yield from self._studies(txn, keys, bykey, study)
            elif level == "SERIES":
                yield from self._series(txn, keys, bykey, study, series)
            else:
                yield from self._instances(txn, keys, bykey, study, series)

    # PATIENT -----------------------------------------------------------------
    def _patient_doc(self, txn, pkey: str, prec: dict) -> dict:
        doc = dict(prec["attrs"])
        studies = self.index.studies_of_patient(pkey, txn)
        n_series = n_inst = 0
        for s in studies:
            srec = self.index.study(s, txn) or {}
            n_series += srec.get("n_series", 0)
            n_inst += srec.get("n_instances", 0)
        doc[T_N_PATIENT_STUDIES] = _int_el("IS", len(studies))
        doc[T_N_PATIENT_SERIES] = _int_el("IS", n_series)
        doc[T_N_PATIENT_INSTANCES] = _int_el("IS", n_inst)
        return doc

    def _patients(self, txn, keys, bykey) -> Iterator[SearchResult]:
        pid = _single_exact(bykey, T_PATIENT_ID)
        if pid is not None:
            candidates = self.index.patients_with_id(txn, pid)
        else:
            candidates = self.index.iter_records("patient", txn)
        for pkey, prec in candidates:
            if not match_doc(prec["attrs"], [k for k in keys if not k.tag.startswith("0020120")], self.fuzzy):
                continue
            doc = self._patient_doc(txn, pkey, prec)
            if match_doc(doc, keys, self.fuzzy):
                yield SearchResult("PATIENT", doc, patient=pkey)

    # STUDY -------------------------------------------------------------------
    def study_doc(self, txn, uid: str, rec: dict) -> dict:
        doc = dict(rec["attrs"])
        doc[T_STUDY_UID] = {"vr": "UI", "Value": [uid]}
        if rec["modalities"]:
            doc[T_MODALITIES_IN_STUDY] = {"vr": "CS", "Value": list(rec["modalities"])}
        else:
            doc[T_MODALITIES_IN_STUDY] = {"vr": "CS"}
        doc[T_SOP_CLASSES_IN_STUDY] = {"vr": "UI", "Value": list(rec["sop_classes"])}
        doc[T_N_STUDY_SERIES] = _int_el("IS", rec["n_series"])
        doc[T_N_STUDY_INSTANCES] = _int_el("IS", rec["n_instances"])
        doc[T_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
        if self.retrieve_aet:
            doc[T_RETRIEVE_AET] = {"vr": "AE", "Value": [self.retrieve_aet]}
        return doc

    def _study_candidates(self, txn, bykey, study: str | None) -> Iterator[tuple[str, dict]]:
        uids = [study] if study else _uids(bykey, T_STUDY_UID)
        if uids is not None:
            for u in uids:
                rec = self.index.study(u, txn)
                if rec is not None:
                    yield u, rec
            return
        found: set[str] | None = None
        for tag in (T_PATIENT_ID, T_ACCESSION, T_PATIENT_NAME):
            if tag == T_PATIENT_NAME and self.fuzzy:
                continue  # fuzzy matches any name component: not an index prefix
            fold = str.lower if tag in CASE_FOLDED_TAGS else str
            v = _single_exact(bykey, tag)
            if v is not None:
                found = self.index.studies_by_key(txn, tag, fold(v))
                break
            k = bykey.get(tag)
            if k is not None and not k.universal and k.values and len(k.values) == 1:
                q = k.values[0]
                stem = re.split(r"[*?]", q, maxsplit=1)[0]
                if stem and q.endswith("*") and "?" not in q and q.count("*") == 1:
                    found = self.index.studies_by_key(txn, tag, fold(stem), prefix=True)
                    break
        if found is None:
            k = bykey.get(T_STUDY_DATE)
            if k is not None and not k.universal and k.values and len(k.values) == 1:
                q = k.values[0]
                if "-" in q:
                    lo, hi = q.split("-", 1)
                    found = self.index.studies_by_key(txn, T_STUDY_DATE, lo, hi or "99999999")
                else:
                    found = self.index.studies_by_key(txn, T_STUDY_DATE, q)
        if found is not None:
            for u in sorted(found):
                rec = self.index.study(u, txn)
                if rec is not None:
                    yield u, rec
            return
        yield from self.index.iter_records("study", txn)

    def _studies(self, txn, keys, bykey, study) -> Iterator[SearchResult]:
        for uid, rec in self._study_candidates(txn, bykey, study):
            doc = self.study_doc(txn, uid, rec)
            if match_doc(doc, keys, self.fuzzy):
                yield SearchResult("STUDY", doc, study=uid, record=rec)

    # SERIES ------------------------------------------------------------------
    def series_doc(self, txn, uid: str, rec: dict) -> dict:
        doc = dict(rec["attrs"])
        doc[T_SERIES_UID] = {"vr": "UI", "Value": [uid]}
        doc[T_STUDY_UID] = {"vr": "UI", "Value": [rec["study"]]}
        doc[T_N_SERIES_INSTANCES] = _int_el("IS", rec["n_instances"])
        doc[T_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
        if self.retrieve_aet:
            doc[T_RETRIEVE_AET] = {"vr": "AE", "Value": [self.retrieve_aet]}
        return doc

    def _split(self, keys: list[Key], level_tags: set[str]) -> tuple[list[Key], list[Key]]:
        upper = [k for k in keys if k.tag in level_tags and not k.universal]
        rest = [k for k in keys if k not in upper]
        return upper, rest

    def _series(self, txn, keys, bykey, study, series) -> Iterator[SearchResult]:
        uids = [series] if series else _uids(bykey, T_SERIES_UID)
        study_keys, own_keys = self._split(keys, set(md.STUDY_TAGS) | {T_MODALITIES_IN_STUDY, T_STUDY_UID, T_N_STUDY_SERIES, T_N_STUDY_INSTANCES})
        if uids is not None:
            pairs = []
            for u in uids:
                rec = self.index.series(u, txn)
                if rec is not None and (study is None or rec["study"] == study):
                    pairs.append((u, rec))
        else:
            pairs = self._series_pairs(txn, bykey, study, study_keys)
        checked: dict[str, bool] = {}
        for uid, rec in pairs:
            st = rec["study"]
            if study_keys:
                if st not in checked:
                    srec = self.index.study(st, txn)
                    checked[st] = srec is not None and match_doc(self.study_doc(txn, st, srec), study_keys, self.fuzzy)
                if not checked[st]:
                    continue
            doc = self.series_doc(txn, uid, rec)
            if match_doc(doc, own_keys, self.fuzzy):
                yield SearchResult("SERIES", doc, study=st, series=uid, record=rec)

    def _series_pairs(self, txn, bykey, study, study_keys) -> Iterator[tuple[str, dict]]:
        if study is not None:
            studies = [study]
        elif study_keys:
            studies = [u for u, _ in self._study_candidates(txn, bykey, None)]
        else:
            yield from self.index.iter_records("series", txn)
            return
        for st in studies:
            for s in self.index.series_of_study(st, txn):
                rec = self.index.series(s, txn)
                if rec is not None:
                    yield s, rec

    # IMAGE -------------------------------------------------------------------
    def instance_doc(self, txn, sop: str, rec: dict) -> dict:
        if self.full:
            raw = self.index.metadata(sop, txn)
            doc = json.loads(raw) if raw else dict(rec["attrs"])
            doc.pop("7FE00010", None)
        else:
            doc = dict(rec["attrs"])
        doc[T_SOP_UID] = {"vr": "UI", "Value": [sop]}
        doc["00080016"] = {"vr": "UI", "Value": [rec["sop_class"]]}
        doc[T_SERIES_UID] = {"vr": "UI", "Value": [rec["series"]]}
        doc[T_STUDY_UID] = {"vr": "UI", "Value": [rec["study"]]}
        doc["00083002"] = {"vr": "UI", "Value": [rec["ts"]]}  # AvailableTransferSyntaxUID
        doc[T_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
        if self.retrieve_aet:
            doc[T_RETRIEVE_AET] = {"vr": "AE", "Value": [self.retrieve_aet]}
        return doc

    def _instances(self, txn, keys, bykey, study, series) -> Iterator[SearchResult]:
        uids = _uids(bykey, T_SOP_UID)
        upper_tags = set(md.STUDY_TAGS) | set(md.SERIES_TAGS) | {T_MODALITIES_IN_STUDY, T_N_SERIES_INSTANCES}
        upper_keys, own_keys = self._split(keys, upper_tags - {T_STUDY_UID, T_SERIES_UID})
        if uids is not None:
            pairs = []
            for u in uids:
                rec = self.index.instance(u, txn)
                if rec is None:
                    continue
                if study is not None and rec["study"] != study:
                    continue
                if series is not None and rec["series"] != series:
                    continue
                pairs.append((u, rec))
        else:
            pairs = self._instance_pairs(txn, bykey, keys, study, series)
        parent_ok: dict[str, bool] = {}
        for sop, rec in pairs:
            if upper_keys:
                se = rec["series"]
                if se not in parent_ok:
                    srec = self.index.series(se, txn)
                    strec = self.index.study(rec["study"], txn)
                    parent_ok[se] = bool(srec and strec) and match_doc(
                        {**self.study_doc(txn, rec["study"], strec), **self.series_doc(txn, se, srec)},
                        upper_keys, self.fuzzy)
                if not parent_ok[se]:
                    continue
            doc = self.instance_doc(txn, sop, rec)
            if not self.full and any(k.tag not in doc and not k.universal for k in own_keys):
                raw = self.index.metadata(sop, txn)
                full = json.loads(raw) if raw else {}
                full.update(doc)
                doc = full
                doc.pop("7FE00010", None)
            if match_doc(doc, own_keys, self.fuzzy):
                yield SearchResult("IMAGE", doc, study=rec["study"], series=rec["series"], sop=sop, record=rec)

    def _instance_pairs(self, txn, bykey, keys, study, series) -> Iterator[tuple[str, dict]]:
        series_uids = [series] if series else _uids(bykey, T_SERIES_UID)
        if series_uids is None:
            study_uids = [study] if study else _uids(bykey, T_STUDY_UID)
            if study_uids is None:
                study_uids = [u for u, _ in self._study_candidates(txn, bykey, None)]
            series_uids = [s for st in study_uids for s in self.index.series_of_study(st, txn)]
        for se in series_uids:
            srec = self.index.series(se, txn)
            if srec is None or (study is not None and srec["study"] != study):
                continue
            for sop in self.index.instances_of_series(se, txn):
                rec = self.index.instance(sop, txn)
                if rec is not None:
                    yield sop, rec
