"""Per-partner consultation indicators (for the department and for billing), per month.

As requester: our jobs of kind "request" (the "consult" table); as consultant: the inbox.
Counts (sent or received, accepted, declined, answered), turnaround requested -> accepted,
accepted -> answered and requested -> answered (median and 90th percentile, in minutes), and
volume (bytes and instances of the cases). A case belongs to the month it was requested in.
"""
from __future__ import annotations

from datetime import datetime
from statistics import median
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from ..service import Archive


def _t(iso: str | None) -> datetime | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    except ValueError:
        return None


def _minutes(a: str | None, b: str | None) -> float | None:
    ta, tb = _t(a), _t(b)
    if ta is None or tb is None:
        return None
    return max(0.0, (tb - ta).total_seconds() / 60.0)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): a value that occurred, as a report shows."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, -(-len(s) * q // 100))  # ceil(n q / 100)
    return s[int(rank) - 1]


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"median": round(median(values), 2) if values else None,
            "p90": round(percentile(values, 90), 2) if values else None}  # type: ignore[arg-type]


def _cases(archive: "Archive") -> Iterable[dict[str, Any]]:
    """Every case, both roles, as one shape: role, partner, month, times, volume."""
    for _, job in archive.index.records("consult"):
        if job.get("kind", "request") != "request":
            continue
        state = job.get("answer_state") or "requested"
        yield {"role": "requester", "partner": job.get("partner") or "?", "requested": job.get("created"),
               "accepted": job.get("accepted"), "answered": job.get("answered"), "declined": job.get("declined"),
               "state": state, "bytes": int(job.get("bytes_sent") or 0),
               "instances": int(job.get("instances_sent") or 0)}
    for _, rec in archive.index.records("inbox"):
        st = archive.index.study(rec["study"]) if rec.get("study") else None
        yield {"role": "consultant", "partner": rec.get("partner") or f"unknown:{rec.get('requester', '')}",
               "requested": rec.get("received"), "accepted": rec.get("accepted"), "answered": rec.get("answered"),
               "declined": rec.get("declined"), "state": rec.get("state"),
               "bytes": st.bytes if st is not None else 0, "instances": st.n_instances if st is not None else 0}


def report(archive: "Archive", month: str | None = None) -> list[dict[str, Any]]:
    """One row per (month, partner, role), sorted; `month` (YYYY-MM) keeps that month only."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for c in _cases(archive):
        m = (c["requested"] or "")[:7] or "?"
        if month is not None and m != month:
            continue
        groups.setdefault((m, c["partner"], c["role"]), []).append(c)
    rows = []
    for (m, partner, role), cases in sorted(groups.items()):
        to_acc = [v for c in cases if (v := _minutes(c["requested"], c["accepted"])) is not None]
        acc_to_ans = [v for c in cases if (v := _minutes(c["accepted"], c["answered"])) is not None]
        to_ans = [v for c in cases if (v := _minutes(c["requested"], c["answered"])) is not None]
        rows.append({
            "month": m, "partner": partner, "role": role, "cases": len(cases),
            "accepted": sum(1 for c in cases if c["accepted"]),
            "declined": sum(1 for c in cases if c["declined"]),
            "answered": sum(1 for c in cases if c["answered"]),
            "requested_to_accepted_min": _stats(to_acc), "accepted_to_answered_min": _stats(acc_to_ans),
            "requested_to_answered_min": _stats(to_ans),
            "bytes": sum(c["bytes"] for c in cases), "instances": sum(c["instances"] for c in cases),
        })
    return rows
