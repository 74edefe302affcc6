"""Retention: how long a study must be kept, from `[[retention]]` rules (or the hospital default,
15 years from the study date), and the report of what has expired or soon will.

A rule matches study attributes the way a lifecycle rule does (C-FIND matching, Modality against
ModalitiesInStudy: `Lifecycle._rule_keys`). When several rules match, the longest keep wins
(deletion must never come early). When rules are configured, they replace the default: a study
matching none is not under retention (add `[[retention]] years = 15` without `match` as a
catch-all). Counted from:
  study_date   StudyDate (0008,0020); the receipt date when it is absent or not a date
  last_access  the last recorded read (Index.study_access), else the receipt date
  received     the last instance received into the study (StudyRecord.updated)
A discharge date is not offered: DICOM's Discharge Date (0038,0030) is retired and scanners do
not send it; a hospital that keeps inpatient cases 30 years matches them by an attribute it does
send (e.g. a StudyDescription or AccessionNumber pattern).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Iterator

from . import metadata as md
from .config import Retention
from .query import match_doc, study_doc
from .records import StudyRecord
from .status import Retained

if TYPE_CHECKING:
    from .service import Archive


@dataclass(frozen=True)
class Kept:
    """Until when a study is kept, and why."""

    study: str
    until: date | None  # None: no rule applies
    rule: str  # e.g. "15 years from study_date"

    def refusal(self, what: str) -> Retained:
        return Retained(f"{what} refused: study {self.study} is under retention until "
                        f"{self.until.isoformat() if self.until else '?'} ({self.rule})")


def _add_years(d: date, years: int) -> date:
    try:
        return d.replace(year=d.year + years)
    except ValueError:  # 29 February
        return d.replace(year=d.year + years, day=28)


def _day(text: str | None) -> date | None:
    if not text:
        return None
    try:
        if len(text) == 8 and text.isdigit():
            return date(int(text[:4]), int(text[4:6]), int(text[6:]))
        t = datetime.fromisoformat(text)
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).date()
    except ValueError:
        return None


class RetentionRules:
    """The configured rules over one archive."""

    def __init__(self, arc: "Archive") -> None:
        self.arc = arc
        self.rules: tuple[Retention, ...] = arc.config.retention_rules()
        self._keys = [arc.lifecycle._rule_keys(r.match) for r in self.rules]

    def start(self, st: StudyRecord, rule: Retention) -> date:
        received = _day(st.updated) or datetime.now(timezone.utc).date()
        if rule.from_ == "study_date":
            return _day(md.first_value(st.attrs, "00080020")) or received
        if rule.from_ == "last_access":
            return _day(self.arc.index.study_access(st.uid)) or received
        return received

    def kept(self, st: StudyRecord) -> Kept:
        best: Kept = Kept(st.uid, None, "no retention rule matches")
        doc = None
        for rule, keys in zip(self.rules, self._keys):
            if keys:
                doc = doc or study_doc(st)
                if not match_doc(doc, keys):
                    continue
            until = _add_years(self.start(st, rule), rule.years)
            if best.until is None or until > best.until:
                label = f"{rule.years} years from {rule.from_}" + (f", match {rule.match}" if rule.match else "")
                best = Kept(st.uid, until, label)
        return best

    def check(self, study: str, what: str, today: date | None = None) -> None:
        """Retained (with the date) unless the study's retention has ended."""
        st = self.arc.index.study(study)
        if st is None:
            return
        k = self.kept(st)
        if k.until is not None and k.until > (today or datetime.now(timezone.utc).date()):
            raise k.refusal(what)

    def report(self, within_days: int = 0, today: date | None = None) -> Iterator[tuple[str, Kept]]:
        """("expired" | "expires", Kept) for every study whose retention has ended, or ends
        within `within_days`, soonest first."""
        today = today or datetime.now(timezone.utc).date()
        horizon = today + timedelta(days=within_days)
        rows = []
        for st in self.arc.index.studies():
            k = self.kept(st)
            if k.until is None:
                continue
            if k.until <= today:
                rows.append(("expired", k))
            elif k.until <= horizon:
                rows.append(("expires", k))
        rows.sort(key=lambda r: (r[1].until, r[1].study))
        return iter(rows)
