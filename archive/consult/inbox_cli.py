"""`pathpacs consult inbox|accept|decline|answer|report`: the consultant's verbs, and the report.

Registered into the `consult` verb group (archive.consult.commands) by `register`. Whoever runs
them has the data directory, so they act as the local consultant; the answer is stored in the
case and queued back to the requester (the running `serve` sends it).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def register(consult_sub, common) -> None:
    """Add the verbs to the `consult` subparsers; `common` adds --data/--config/--quiet."""
    p = consult_sub.add_parser("inbox", help="received consultation requests and their state")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inbox, inbox_verb="inbox")
    p = consult_sub.add_parser("accept", help="accept a received case")
    common(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_inbox, inbox_verb="accept")
    p = consult_sub.add_parser("decline", help="decline a received case: the reason is sent back")
    common(p)
    p.add_argument("id")
    p.add_argument("--reason", required=True, help="why (sent back to the requester)")
    p.set_defaults(func=cmd_inbox, inbox_verb="decline")
    p = consult_sub.add_parser("answer", help="write the opinion: stored in the case as an SR and sent back")
    common(p)
    p.add_argument("id")
    p.add_argument("--text", help="the opinion")
    p.add_argument("--file", type=Path, help="read the opinion from this UTF-8 text file")
    p.add_argument("--regions", type=Path,
                   help="JSON file: [{sop_instance_uid, graphic_type POINT|POLYLINE|POLYGON, points [[x, y]...], label}]")
    p.add_argument("--consultant", help="the consultant's name (default: the institution or archive name)")
    p.set_defaults(func=cmd_inbox, inbox_verb="answer")
    p = consult_sub.add_parser("report", help="per partner and month: counts, turnaround, volume")
    common(p)
    p.add_argument("--month", help="YYYY-MM (default: every month)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)


def regions_from(data: object, to_pixels=None):
    """Regions from parsed JSON (the CLI file, the HTTP body); ValueError naming what is wrong.
    A region may give `slide_points` ([x, y, z] in mm, the viewer's marks) instead of pixel
    `points`: `to_pixels(sop, slide_points)` converts them (the archive knows the slide's geometry)."""
    from .opinion import GRAPHIC_TYPES, Region

    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError("regions must be a list")
    out = []
    for n, r in enumerate(data, 1):
        try:
            sop = str(r["sop_instance_uid"])
            kind = str(r.get("graphic_type", "POLYLINE")).upper()
            if "points" not in r and "slide_points" in r and to_pixels is not None:
                points = tuple(to_pixels(sop, [[float(c) for c in p[:3]] for p in r["slide_points"]]))
            else:
                points = tuple((float(p[0]), float(p[1])) for p in r["points"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise ValueError(f"region {n}: give sop_instance_uid and points [[x, y], ...]") from None
        if kind not in GRAPHIC_TYPES:
            raise ValueError(f"region {n}: graphic_type must be one of {', '.join(GRAPHIC_TYPES)}")
        if not points:
            raise ValueError(f"region {n}: no points")
        out.append(Region(sop, kind, points, str(r.get("sop_class_uid") or "1.2.840.10008.5.1.4.1.1.77.1.6"),
                          str(r.get("label") or "")[:64]))
    return out


def cmd_inbox(args: argparse.Namespace) -> int:
    from ..cli import CliError, open_archive
    from ..status import ArchiveError
    from .inbox import Inbox

    verb = args.inbox_verb
    text = None
    regions = []
    if verb == "answer":
        if args.file is not None:
            try:
                text = args.file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CliError(f"cannot read {args.file}: {getattr(exc, 'strerror', None) or exc}")
        if args.text:
            text = args.text if text is None else f"{args.text}\n{text}"
        if not (text or "").strip():
            raise CliError("give the opinion with --text or --file")
        if args.regions is not None:
            try:
                regions = regions_from(json.loads(args.regions.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                raise CliError(f"--regions {args.regions}: {getattr(exc, 'strerror', None) or exc}")
    arc = open_archive(args, readonly=verb == "inbox")
    try:
        inbox = Inbox(arc)
        try:
            if verb == "inbox":
                cases = inbox.list()
                if args.json:
                    print(json.dumps(cases, indent=1))
                    return 0
                print(f"{'ID':<14}  {'STATE':<9}  {'PRIORITY':<8}  {'FROM':<16}  {'RECEIVED':<20}  {'STUDY':<40}  QUESTION")
                for c in cases:
                    who = c.get("partner") or f"{c.get('requester')} (unknown partner)"
                    q = re.sub(r"\s+", " ", c.get("question") or "")[:60]
                    print(f"{c['id']:<14}  {c['state']:<9}  {c.get('priority') or '':<8}  {who:<16}  "
                          f"{(c.get('received') or '')[:19]:<20}  {c.get('study') or '':<40}  {q}")
                return 0
            if verb == "accept":
                rec = inbox.accept(args.id)
                print(f"consultation {rec['id']} accepted", file=sys.stderr)
            elif verb == "decline":
                rec = inbox.decline(args.id, args.reason)
                print(f"consultation {rec['id']} declined; the reason is sent back to {rec.get('partner') or rec.get('requester')}"
                      + (f" ({rec['note']})" if rec.get("note") else ""), file=sys.stderr)
            else:
                rec = inbox.answer(args.id, text or "", regions, consultant=args.consultant)
                print(f"consultation {rec['id']} answered (SR {rec.get('answer_sop')}); sent back to "
                      f"{rec.get('partner') or rec.get('requester')}" + (f" ({rec['note']})" if rec.get("note") else ""),
                      file=sys.stderr)
            return 0
        except ValueError as exc:
            raise CliError(str(exc))
        except ArchiveError as exc:
            raise CliError(exc.reason, 1)
    finally:
        arc.close()


def _fmt(stats: dict) -> str:
    m, p = stats.get("median"), stats.get("p90")
    return "-" if m is None else f"{_dur(m)}/{_dur(p)}"


def _dur(minutes: float | None) -> str:
    if minutes is None:
        return "-"
    if minutes < 120:
        return f"{minutes:.0f}m"
    if minutes < 48 * 60:
        return f"{minutes / 60:.1f}h"
    return f"{minutes / 1440:.1f}d"


def cmd_report(args: argparse.Namespace) -> int:
    from ..cli import CliError, open_archive
    from .report import report

    if args.month is not None and not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", args.month):
        raise CliError(f"--month {args.month[:20]!r} is not YYYY-MM")
    arc = open_archive(args, readonly=True)
    try:
        rows = report(arc, args.month)
    finally:
        arc.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'MONTH':<7}  {'PARTNER':<16}  {'ROLE':<10}  {'CASES':>5}  {'ACC':>4}  {'DECL':>4}  {'ANS':>4}  "
          f"{'REQ>ACC med/p90':<16}  {'ACC>ANS med/p90':<16}  {'REQ>ANS med/p90':<16}  {'INST':>6}  BYTES")
    for r in rows:
        print(f"{r['month']:<7}  {r['partner']:<16}  {r['role']:<10}  {r['cases']:>5}  {r['accepted']:>4}  "
              f"{r['declined']:>4}  {r['answered']:>4}  {_fmt(r['requested_to_accepted_min']):<16}  "
              f"{_fmt(r['accepted_to_answered_min']):<16}  {_fmt(r['requested_to_answered_min']):<16}  "
              f"{r['instances']:>6}  {r['bytes']}")
    return 0
