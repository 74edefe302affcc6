"""`pathpacs audit`: who looked at this slide, when, from where; `audit verify`: is the
chain intact; `audit status`: the trail and its forwarding. Reading the trail is itself
recorded (Audit Log Used)."""
from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from .events import AuditEvent
from .trail import Record, Trail

FORMATS = ("table", "json", "xml")


def register(sub) -> None:
    """Add the `audit` verb to the `pathpacs` parser."""
    p = sub.add_parser("audit", help="the audit trail: who did what, when, from where; verify the chain",
                       description="Without an action: list audit records (filters combine). "
                                   "`verify`: check the hash chain and name the first broken record. "
                                   "`status`: records, size, forwarding backlog and alarms.")
    p.add_argument("action", nargs="?", choices=["list", "verify", "status"], default="list")
    p.add_argument("--patient", metavar="ID", help="records about this Patient ID")
    p.add_argument("--study", metavar="UID", help="records about this Study Instance UID")
    p.add_argument("--user", metavar="U", help="records of this user (id or name) or AE title")
    p.add_argument("--event", metavar="KIND", help="stored, retrieved, queried, moved, rejected, login, ...")
    p.add_argument("--since", metavar="DATE", help="from this time: 2026-01-31, 2026-01-31T08:00, 7d, 12h")
    p.add_argument("--until", metavar="DATE", help="before this time (same forms)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--limit", type=int, metavar="N", help="at most N records (the newest)")
    p.add_argument("--trail", type=Path, action="append", metavar="DIR",
                   help="an audit trail directory (repeat for several nodes' trails: each verified on "
                        "its own, listed merged in time order; default this node's audit.path or DATA/audit)")
    p.add_argument("--data", type=Path, help="data directory (default ./data or archive.data_dir)")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_audit)


def _fail(message: str, code: int = 2):
    from ..cli import CliError

    return CliError(message, code)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A date, an ISO date-time (UTC unless it says otherwise) or a span back from now (7d, 12h, 30m)."""
    now = now or datetime.now(timezone.utc)
    m = re.fullmatch(r"(\d{1,6})([dhm])", text.strip())
    if m:
        n = int(m.group(1))
        return now - {"d": timedelta(days=n), "h": timedelta(hours=n), "m": timedelta(minutes=n)}[m.group(2)]
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise _fail(f"{text[:40]!r} is not a date (2026-01-31, 2026-01-31T08:00, 7d, 12h)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _when(rec: Record) -> datetime:
    return datetime.fromisoformat(rec.time.replace("Z", "+00:00"))


def select(trail: "Trail | list[Trail]", args: argparse.Namespace) -> Iterator[tuple[Record, AuditEvent]]:
    """The records matching the filters; of several trails (several nodes'), merged in time
    order (a record's time is its event's: aggregated reads are written after later events,
    so the matches are sorted, not merged)."""
    if isinstance(trail, list):
        if len(trail) > 1:
            return iter(sorted((x for t in trail for x in _select(t, args)), key=lambda x: _when(x[0])))
        trail = trail[0]
    return _select(trail, args)


def _select(trail: Trail, args: argparse.Namespace) -> Iterator[tuple[Record, AuditEvent]]:
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    for rec in trail.records():
        if since is not None and _when(rec) < since:
            continue
        if until is not None and _when(rec) >= until:
            continue
        e = AuditEvent.from_dict(rec.event)
        if args.study and args.study not in e.studies:
            continue
        if args.patient and args.patient not in e.patients:
            continue
        if args.event and e.kind != args.event:
            continue
        if args.user and not any(args.user in (p.user_id, p.user_name, p.aet) for p in e.participants):
            continue
        yield rec, e


def _who(e: AuditEvent) -> tuple[str, str]:
    p = e.requestor or (e.participants[0] if e.participants else None)
    if p is None:
        return "-", "-"
    user = p.user_name or p.user_id
    if p.user_roles:
        user += f" ({','.join(p.user_roles)})"
    where = p.address or "-"
    if p.aet:
        where += f" AE {p.aet}"
    return user, where


def _what(e: AuditEvent) -> str:
    d = e.detail
    if e.kind in ("stored", "retrieved"):
        parts = []
        if d.get("instances"):
            parts.append(f"{d['instances']} instances")
        if d.get("frames"):
            parts.append(f"{d['frames']} frames")
        if not parts:
            parts.append(f"{d.get('distinct_instances', 0)} instances (metadata)")
        if d.get("destination"):
            parts.append(f"to {d['destination']}")
        return ", ".join(parts)
    if e.kind == "queried":
        return f"{d.get('via', '')} {d.get('level', '')}: {d.get('results', 0)} results".strip()
    if e.kind == "moved":
        return f"{d.get('instances')} instances {d.get('from_tier')} -> {d.get('to_tier')}"
    if e.kind in ("rejected", "restored", "purged", "exported"):
        return f"{d.get('instances')} instances" + (f" ({d['reason']})" if d.get("reason") else "")
    return ", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list)))[:120]


def _row(rec: Record, e: AuditEvent) -> list[str]:
    user, where = _who(e)
    outcome = "ok" if e.outcome == 0 else f"FAIL {e.outcome}" + (f": {e.outcome_text[:60]}" if e.outcome_text else "")
    return [str(rec.seq), rec.time, e.kind, outcome, user, where, ",".join(e.studies) or "-",
            ",".join(e.patients) or "-", _what(e)]


HEADER = ["#", "time (UTC)", "event", "outcome", "user", "from", "study", "patient", "what"]


def cmd_audit(args: argparse.Namespace) -> int:
    from ..cli import load_config
    from . import build_audit, trail_of

    cfg = load_config(args)
    given = getattr(args, "trail", None)
    if not cfg.audit.enabled and args.action != "verify" and not given:
        raise _fail("the audit trail is disabled ([audit] enabled = false)")
    trail = trail_of(cfg)
    trails = [Trail(d) for d in given] if given else [trail]
    for t in trails:
        if not t.dir.is_dir():
            raise _fail(f"no audit trail in {t.dir}")
    if args.limit is not None and args.limit < 1:
        raise _fail("--limit must be at least 1")
    if args.action == "verify":
        code = max(_verify(t, cfg, args, named=bool(given)) for t in trails)
    elif args.action == "status":
        code = _status(trail, cfg)
    else:
        code = _list(trails, args, with_node=bool(given))
    if not trail.dir.is_dir():  # only other nodes' trails were read: this node records nothing
        return code
    if cfg.audit.enabled:
        event = build_audit(cfg).audit_log_event(_command_text(args))
        try:
            trail.append([(event.time, event.to_dict())])
        except OSError as exc:
            print(f"pathpacs: warning: cannot record this use of the audit trail: {exc.strerror}", file=sys.stderr)
    return code


def _command_text(args: argparse.Namespace) -> str:
    """What was asked of the trail, as a command line (the Audit Log Used record's query)."""
    words = ["audit", args.action]
    for name in ("patient", "study", "user", "event", "since", "until", "format", "limit"):
        value = getattr(args, name, None)
        if value is not None and not (name == "format" and value == "table"):
            words += [f"--{name}", str(value)]
    for d in getattr(args, "trail", None) or []:
        words += ["--trail", str(d)]
    return " ".join(words)[:1000]


def _list(trails: list[Trail], args: argparse.Namespace, with_node: bool = False) -> int:
    rows = list(select(trails, args))
    if args.limit is not None:
        rows = rows[-args.limit:]
    if args.format == "json":
        for rec, _e in rows:
            node = {"node": rec.node} if rec.node else {}
            print(json.dumps({"seq": rec.seq, "time": rec.time, "hash": rec.hash, **node, **rec.event},
                             ensure_ascii=False))
    elif args.format == "xml":
        out = sys.stdout.buffer
        out.write(b'<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages>\n')
        for _rec, e in rows:
            out.write(e.to_xml().split(b"?>", 1)[1].strip() + b"\n")
        out.write(b"</AuditMessages>\n")
        out.flush()
    else:
        table = [HEADER] + [_row(rec, e) for rec, e in rows]
        if with_node:  # several nodes' trails: which node wrote each record
            table = [["node"] + HEADER] + [[rec.node or "-"] + _row(rec, e) for rec, e in rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if not rows:
            print("no audit records match", file=sys.stderr)
    return 0


def _verify(trail: Trail, cfg, args: argparse.Namespace, named: bool = False) -> int:
    from tqdm import tqdm

    from .syslog import read_cursor

    with tqdm(total=trail.size(), unit="B", unit_scale=True, disable=args.quiet or not sys.stderr.isatty(),
              file=sys.stderr, desc="audit verify") as bar:
        result = trail.verify(progress=bar.update)
    broken = result.broken
    if broken is None:
        seq, digest = read_cursor(trail.dir)
        if seq > result.records:
            broken = f"record {seq} was forwarded to the collector but is missing (the trail was truncated)"
        elif seq:
            rec = next(trail.records(seq - 1), None)
            if rec is not None and rec.seq == seq and digest and rec.hash != digest:
                broken = f"record {seq} is not the record forwarded to the collector"
    where = f"{trail.dir}: " if named else ""
    if broken is not None:
        print(f"pathpacs: audit trail {where}broken after {result.records} good records: {broken}", file=sys.stderr)
        return 1
    print(f"{where}{result.records} records, chain intact")
    return 0


def _status(trail: Trail, cfg) -> int:
    for line in stats_lines(cfg):
        print(line)
    return 0


def stats_lines(cfg) -> list[str]:
    """Lines for `pathpacs stats` and `pathpacs audit status`: the trail and its forwarding."""
    from . import trail_of
    from .syslog import read_status

    if not cfg.audit.enabled:
        return ["audit      disabled"]
    trail = trail_of(cfg)
    seq, _ = trail.head()
    lines = [f"audit      {seq} records ({trail.size()} bytes) in {trail.dir}"]
    st: dict[str, Any] | None = read_status(trail.dir)
    if cfg.audit.syslog is not None or st:
        if st is None:
            lines.append("audit forwarding: not started yet")
        else:
            lines.append(f"audit forwarding to {st.get('target')}: {'connected' if st.get('connected') else 'DOWN'}, "
                         f"delivered {st.get('delivered')}, backlog {st.get('backlog')} "
                         f"(max {st.get('max_backlog')}), alarms {st.get('alarms')}"
                         + (" ALARM" if st.get("alarm") else "")
                         + (f", last error: {st['last_error']}" if st.get("last_error") else ""))
    return lines
