"""What the study browser shows of a study beyond QIDO: its slides, their stain, size and tier.

QIDO answers the search (patient, dates, modality, paging); a study row also wants each
slide's stain (in the instance metadata's specimen description, not in any QIDO return key),
the bytes stored (the index counts them, no DICOM attribute holds them) and the tier. This reads
them from the index's records for the studies of one page only: per slide the instance records
of its series and one instance's stored metadata, so the cost follows the page size, never the
archive's size. Visibility (rejected objects, a principal's study scope) is the archive's.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from . import metadata as md
from .access import Principal
from .status import NotFound

MAX_STUDIES = 100  # one browser page at most asks for this many at once
SORTS = ("-date", "date")  # the browser's study orders: newest first (its default), oldest first
USING_SUBSTANCE = ("424361007", "SCT")  # the preparation step item naming the stain (PS3.3 C.8.12.2.1)

T_SPECIMEN_DESCRIPTION, T_PREPARATION, T_STEP_ITEMS = "00400560", "00400610", "00400612"
T_SHORT_DESCRIPTION, T_CONCEPT_NAME, T_CONCEPT_CODE, T_TEXT = "00400600", "0040A043", "0040A168", "0040A160"


@dataclass
class Slide:
    """One SM series: what a row of the browser shows of it."""

    series: str
    description: str
    instances: int
    bytes: int
    stain: list[str]
    tiers: dict[str, int]
    availability: str
    label: bool = False
    overview: bool = False


@dataclass
class StudySummary:
    study: str
    bytes: int
    tiers: dict[str, int]
    availability: str
    slides: list[Slide] = field(default_factory=list)


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list((doc.get(tag) or {}).get("Value") or [])


def stains(meta: dict[str, Any]) -> list[str]:
    """The stains of a slide: the "Using substance" items of its specimen preparation steps
    (their code meaning or text), else the specimen's short description (what our converter
    writes from `slide.specimen_description`)."""
    found: list[str] = []
    short: list[str] = []
    for spec in _items(meta, T_SPECIMEN_DESCRIPTION):
        for step in _items(spec, T_PREPARATION):
            for item in _items(step, T_STEP_ITEMS):
                name = (_items(item, T_CONCEPT_NAME) or [{}])[0]
                if (md.first_value(name, "00080100"), md.first_value(name, "00080102")) != USING_SUBSTANCE:
                    continue
                code = (_items(item, T_CONCEPT_CODE) or [{}])[0]
                value = md.first_value(code, "00080104") or md.first_value(item, T_TEXT)
                if value and str(value) not in found:
                    found.append(str(value))
        value = md.first_value(spec, T_SHORT_DESCRIPTION)
        if value and str(value) not in short:
            short.append(str(value))
    return found or short


def _slide(arc, study: str, se, who: Principal) -> Slide | None:
    try:
        recs = arc.instances_under(study, se.uid, who)
    except NotFound:
        return None
    kinds = {(r.image_type[2] if len(r.image_type) > 2 else "") for r in recs}
    volumes = [r for r in recs if "VOLUME" in r.image_type] or recs
    stain: list[str] = []
    raw = arc.instance_metadata(max(volumes, key=lambda r: r.total_pixels))
    description = str(md.first_value(se.attrs, "0008103E") or "")
    view = arc.view(who)
    if raw and view is not None:  # a research view: what the de-identified metadata says
        metas = view.metadata([raw])
        raw = metas[0] if metas else None
        description = str(md.first_value(json.loads(raw), "0008103E") or "") if raw else ""
    if raw:
        stain = stains(json.loads(raw))
    tiers: dict[str, int] = {}
    for r in recs:
        tiers[r.blob.tier] = tiers.get(r.blob.tier, 0) + 1
    return Slide(se.uid, description, len(recs), sum(r.size for r in recs),
                 stain, tiers, arc.availability(tiers), "LABEL" in kinds, "OVERVIEW" in kinds)


def study_summaries(arc, studies: list[str], who: Principal) -> list[StudySummary]:
    """The summary of each study in `studies` that exists and that `who` may see (others are
    left out, never named: existence is not disclosed), in the order asked."""
    out = []
    for uid in dict.fromkeys(studies[:MAX_STUDIES]):
        st = arc.study(uid)
        if st is None or not who.sees(uid) or arc.study_hidden(st, who):
            continue
        slides = []
        for se in arc.series_of_study(uid):
            if "SM" not in md.string_values(se.attrs.get("00080060")):
                continue
            slide = _slide(arc, uid, se, who)
            if slide is not None:
                slides.append(slide)
        vis = arc.deletion.visibility.current()
        if vis.sops and vis.by_study.get(uid):  # part of it hidden: count what `who` sees
            recs = arc.instances_under(uid, None, who)
            tiers: dict[str, int] = {}
            for r in recs:
                tiers[r.blob.tier] = tiers.get(r.blob.tier, 0) + 1
            size = sum(r.size for r in recs)
        else:
            tiers, size = dict(st.tiers), st.bytes
        out.append(StudySummary(uid, size, tiers, arc.availability(tiers), slides))
    return out


def as_json(summaries: list[StudySummary]) -> list[dict[str, Any]]:
    return [asdict(s) for s in summaries]
