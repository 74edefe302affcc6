"""`pathpacs capacity`: how many TB each tier holds at the end of each year, and what it costs,
from the configured rules, replicas and prices.

A simple day-by-day model: every day `slides_per_day` slides of `gb_per_slide` arrive on the
ingest tier; a rule moves a day's slides once they are older than its `after_days_since_access`
(slides are assumed not to be read again after their first days, the common case the reports
describe) or `after_days_since_received`; rules with a `match` are assumed to apply to all
slides (the model does not know study attributes). Every replica holds a copy of what is on the
tiers it replicates. Cost per year sums the monthly TB price of what each tier holds, charged
day by day (12/365 of a month's price per day).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import Config


@dataclass
class YearRow:
    year: int
    tb: dict[str, float]
    cost: float


def forecast(cfg: Config, slides_per_day: float, gb_per_slide: float, years: int) -> list[YearRow]:
    tiers = cfg.tier_configs()
    ingest = cfg.ingest_tier
    # the path a slide takes: (day it arrives on a tier, tier), following the first rule that
    # leaves each tier (rules are applied one step per pass, in config order)
    path = [(0.0, ingest)]
    seen = {ingest}
    while True:
        here = path[-1][1]
        rule = next((r for r in cfg.rules if r.from_tier == here), None)
        if rule is None:
            break
        wait = max(rule.after_days_since_access or 0.0, rule.after_days_since_received or 0.0)
        if rule.to_tier in seen:
            break
        path.append((path[-1][0] + wait, rule.to_tier))
        seen.add(rule.to_tier)
    daily_tb = slides_per_day * gb_per_slide / 1000.0
    rows = []
    total_days = int(years * 365)
    cost = 0.0
    for day in range(1, total_days + 1):
        held = _held(path, day, daily_tb, cfg, tiers)  # a TB-month price, charged day by day
        cost += sum(held[t] * tiers[t].price_per_tb_month * 12 / 365 for t in held)
        if day % 365 == 0:
            rows.append(YearRow(day // 365, _held(path, day, daily_tb, cfg, tiers), cost))
            cost = 0.0
    return rows


def _held(path, day: int, daily_tb: float, cfg: Config, tiers) -> dict[str, float]:
    held = {name: 0.0 for name in tiers}
    for i, (start, tier) in enumerate(path):
        end = path[i + 1][0] if i + 1 < len(path) else float("inf")
        # slides that arrived `age` days ago sit on `tier` when start <= age < end
        lo, hi = start, min(end, day)
        if hi > lo:
            held[tier] += daily_tb * (hi - lo)
    primary = dict(held)
    for rep in cfg.replicas:
        held[rep.tier] = held.get(rep.tier, 0.0) + sum(primary.get(t, 0.0) for t in rep.of)
    return held


def table(rows: list[YearRow], currency: str = "") -> list[str]:
    names = list(rows[0].tb) if rows else []
    out = ["year  " + "  ".join(f"{n + ' TB':>12}" for n in names) + f"  {'cost/year':>14}"]
    for r in rows:
        out.append(f"{r.year:>4}  " + "  ".join(f"{r.tb[n]:>12,.1f}" for n in names) + f"  {r.cost:>14,.0f}{currency}")
    return out
