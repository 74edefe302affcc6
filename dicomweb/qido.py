"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

Parameters become `archive.query.Key`s and the search runs on `archive.query.Searcher`, the
same code C-FIND answers from, so both protocols match with the same rules. This module
only parses parameters, projects the result documents onto the return attributes
(PS3.18 Table 10.6.3-3/-4/-5 defaults + includefield + the matching keys) and encodes them.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from archive import metadata as md
from archive.access import ANONYMOUS, Principal
from archive.query import Key, QueryError, series_doc, study_doc, tag_hex, vr_of

from . import dicomxml
from .common import BASE_TOKEN_B, HttpError

# Default return attributes (PS3.18 Table 10.6.3-3 study, -4 series, -5 instance)
STUDY_DEFAULT = [
    "00080005", "00080020", "00080030", "00080050", "00080056", "00080061", "00080090",
    "00080201", "00081190", "00100010", "00100020", "00100030", "00100040", "0020000D",
    "00200010", "00201206", "00201208", "00080054",
]
SERIES_DEFAULT = [
    "00080005", "00080060", "00080201", "0008103E", "00081190", "0020000E", "00200011",
    "00201209", "00400244", "00400245", "00400275", "00080056", "0020000D", "00080054",
]
INSTANCE_DEFAULT = [
    "00080005", "00080016", "00080018", "00080056", "00080201", "00081190", "00200013",
    "00280010", "00280011", "00280100", "00280008", "0020000E", "0020000D", "00080054",
]
# Instance attributes the index keeps in the instance record (no metadata read needed)
_RECORD_INSTANCE_TAGS = set(md.INSTANCE_TAGS) | {"00080018", "00080016", "0020000E", "0020000D",
                                                 "00083002", "00080056", "00080054", "00081190"}
_UPPER_TAGS = set(md.STUDY_TAGS) | set(md.SERIES_TAGS) | {
    "00080061", "00080062", "00201206", "00201208", "00201209"}

SPECIAL = {"limit", "offset", "fuzzymatching", "includefield", "orderby"}


@dataclass
class QidoQuery:
    keys: list[Key] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False


MAX_OFFSET = 2**31 - 1


def _int_param(name: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", value):
        raise QueryError(f"{name} must be a non-negative integer, not {value[:40]!r}")
    return int(value)


def _key(path: str, value: str) -> Key:
    names = path.split(".")
    tags = [tag_hex(n) for n in names]
    leaf_tag = tags[-1]
    leaf_vr = vr_of(leaf_tag)
    if leaf_vr == "SQ" and value:
        raise QueryError(f"sequence attribute {path!r} cannot be matched with a value")
    if value == "":
        values = None
    elif leaf_vr == "UI":
        values = [v.strip() for v in value.replace("\\", ",").split(",") if v.strip()]
    else:
        values = [value]
    key = Key(leaf_tag, leaf_vr, values)
    for parent in reversed(tags[:-1]):
        if vr_of(parent) != "SQ":
            raise QueryError(f"{path!r}: {names[tags.index(parent)]} is not a sequence")
        key = Key(parent, "SQ", None, [[key]])
    return key


def parse_params(items: Iterable[tuple[str, str]]) -> QidoQuery:
    q = QidoQuery()
    bytag: dict[str, Key] = {}
    for name, value in items:
        lname = name.lower()
        if lname == "limit":
            q.limit = _int_param("limit", value)
        elif lname == "offset":
            q.offset = _int_param("offset", value)
            if q.offset > MAX_OFFSET:
                raise QueryError(f"offset must be at most {MAX_OFFSET}, not {value[:40]}")
        elif lname == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise QueryError(f"fuzzymatching must be true or false, not {value!r}")
            q.fuzzy = value.lower() == "true"
        elif lname == "includefield":
            for f in value.split(","):
                f = f.strip()
                if not f:
                    continue
                if f.lower() == "all":
                    q.include_all = True
                else:
                    q.include.append(tag_hex(f.split(".")[0]))
        elif lname == "orderby":
            continue  # accepted and ignored (results come in index order)
        else:
            key = _key(name, value)
            prev = bytag.get(key.tag)
            if prev is not None and key.vr != "SQ" and prev.values and key.values:
                prev.values.extend(key.values)
            else:
                bytag[key.tag] = key
                q.keys.append(key)
    return q


def _project(doc: dict[str, Any], tags: set[str] | None) -> dict[str, Any]:
    if tags is None:
        return doc
    return {t: doc[t] for t in doc if t in tags}


def search(arc, level: str, params: Iterable[tuple[str, str]], *, study: str | None = None,
           series: str | None = None, retrieve_aet: str | None = None, max_results: int = 10000,
           who: Principal = ANONYMOUS, order: str | None = None) -> tuple[list[dict[str, Any]], bool, int | None]:
    """Run one QIDO search; returns (projected documents, more results exist, the limit
    used when the client asked for more than `max_results`, else None). At most
    `max_results` documents (http.max_results) whatever `limit` asks (PS3.18 10.6.3.2: the
    server's maximum applies); the "more results" Warning tells the client to page on.
    `order` (not QIDO: the study browser's `browser/search`): "date" | "-date" at study level,
    limit and offset applied to the sorted result."""
    q = parse_params(params)
    clamped = max_results if q.limit is not None and q.limit > max_results else None
    q.limit = max_results if q.limit is None else min(q.limit, max_results)
    key_tags = {k.tag for k in q.keys}
    include = set(q.include)
    if level == "STUDY":
        tags: set[str] | None = set(STUDY_DEFAULT) | include | key_tags
        full = False
    elif level == "SERIES":
        tags = set(SERIES_DEFAULT) | include | key_tags
        if study is None:
            tags |= set(STUDY_DEFAULT)
        full = False
    else:
        tags = set(INSTANCE_DEFAULT) | include | key_tags
        if series is None:
            tags |= set(SERIES_DEFAULT)
        if study is None:
            tags |= set(STUDY_DEFAULT)
        full = q.include_all or bool((include | key_tags) - _RECORD_INSTANCE_TAGS - _UPPER_TAGS)
    if q.include_all:
        tags = None
    results = arc.search(level, q.keys, study=study, series=series, fuzzy=q.fuzzy,
                         retrieve_aet=retrieve_aet, full_metadata=full, who=who,
                         order=order)
    stop = None if q.limit is None else q.offset + q.limit
    page = list(itertools.islice(results, q.offset, None if stop is None else stop + 1))
    more = stop is not None and len(page) > q.limit  # type: ignore[operator]
    if more:
        page = page[: q.limit]
    out = []
    study_cache: dict[str, dict] = {}
    series_cache: dict[str, dict] = {}
    for r in page:
        doc = dict(r.doc)
        if level == "STUDY":
            doc["00081190"] = {"vr": "UR", "Value": [f"{md.BASE_TOKEN}/studies/{r.study}"]}
        elif level == "SERIES":
            doc["00081190"] = {"vr": "UR", "Value": [f"{md.BASE_TOKEN}/studies/{r.study}/series/{r.series}"]}
            if study is None:
                doc = {**_upper(arc, retrieve_aet, "study", r.study, study_cache), **doc}
        else:
            doc["00081190"] = {"vr": "UR", "Value": [
                f"{md.BASE_TOKEN}{md.instance_path(r.study, r.series, r.sop)}"]}
            upper: dict[str, Any] = {}
            if study is None:
                upper.update(_upper(arc, retrieve_aet, "study", r.study, study_cache))
            if series is None:
                upper.update(_upper(arc, retrieve_aet, "series", r.series, series_cache))
            if upper:
                view = arc.view(who)  # de-identified views: the upper levels' attributes too
                doc = {**(upper if view is None else view.doc(upper)), **doc}
        out.append(_project(doc, tags))
    return out, more, clamped


def _upper(arc, retrieve_aet: str | None, kind: str, uid: str, cache: dict[str, dict]) -> dict:
    doc = cache.get(uid)
    if doc is None:
        if kind == "study":
            rec = arc.study(uid)
            doc = study_doc(rec, retrieve_aet, arc.availability) if rec else {}
            if doc:
                doc["00081190"] = {"vr": "UR", "Value": [f"{md.BASE_TOKEN}/studies/{uid}"]}
        else:
            srec = arc.series(uid)
            doc = series_doc(srec, retrieve_aet, arc.availability) if srec else {}
            if doc:
                doc.pop("00081190", None)
        cache[uid] = doc
    return doc


def encode_json(docs: list[dict[str, Any]], base: str) -> bytes:
    return json.dumps(docs, separators=(",", ":")).encode().replace(BASE_TOKEN_B, base.encode())


def encode_xml_parts(docs: list[dict[str, Any]], base: str) -> list[bytes]:
    return [dicomxml.to_xml(d).replace(BASE_TOKEN_B, base.encode()) for d in docs]
