"""`pathpacs reject`, `restore`, `purge`, `rejected` and `retention report`: deletion in two
audited steps (archive.deletion) and the retention report (archive.retention), from the shell.

The CLI runs as `archive.access.SYSTEM` (whoever can run it owns the data directory). Expected
failures are one line and exit 2.
"""
from __future__ import annotations

import argparse

from .status import ArchiveError


def _cli():
    from . import cli  # archive.cli imports this module to register its verbs

    import logging

    logging.getLogger("pathpacs.deletion").setLevel(logging.WARNING)  # the verb prints its own line
    return cli


def _target(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", metavar="UID")
    g.add_argument("--series", metavar="UID")
    g.add_argument("--instance", metavar="UID")


def _level(args: argparse.Namespace) -> tuple[str, str]:
    for level in ("study", "series", "instance"):
        if getattr(args, level):
            return level, getattr(args, level)
    raise AssertionError("argparse requires one")


def _reason(text: str) -> str:
    from .rejection_note import reason_code

    try:
        return reason_code(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def cmd_reject(args: argparse.Namespace) -> int:
    cli = _cli()
    level, uid = _level(args)
    arc = cli.open_archive(args)
    try:
        n, note = arc.reject(level, uid, args.reason)
    except ArchiveError as exc:
        raise cli.CliError(exc.reason)
    finally:
        arc.close()
    if note is None:
        print(f"{level} {uid}: already rejected, nothing to do")
    else:
        print(f"rejected {n} instances of {level} {uid} ({args.reason}); rejection note {note}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    cli = _cli()
    level, uid = _level(args)
    if args.replaced and level != "instance":
        raise cli.CliError("--replaced restores a replaced version of one --instance")
    arc = cli.open_archive(args)
    try:
        if args.replaced:
            sha = arc.deletion.restore_replaced(uid)
            print(f"instance {uid}: the replaced version (sha256 {sha[:16]}...) is current again")
            return 0
        n = arc.restore(level, uid)
    except ArchiveError as exc:
        raise cli.CliError(exc.reason)
    finally:
        arc.close()
    if n == 0:
        raise cli.CliError(f"{level} {uid} has nothing rejected to restore (or its purge has begun)")
    print(f"restored {n} instances of {level} {uid}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    import sys

    cli = _cli()
    arc = cli.open_archive(args)
    try:
        report = arc.purge(dry_run=args.dry_run)
    except ArchiveError as exc:
        raise cli.CliError(exc.reason)
    finally:
        arc.close()
    verb = "would purge" if args.dry_run else "purged"
    studies = sorted({s for s, _sop in report.purged})
    print(f"{verb} {len(report.purged)} instances of {len(studies)} studies and {report.versions} replaced "
          f"versions ({report.bytes} bytes)")
    for study in studies:
        print(f"  {verb} study {study}: {sum(1 for s, _ in report.purged if s == study)} instances")
    for tier, key in report.left_to_expire:
        print(f"  left to expire on immutable tier {tier}: {key}")
    for line in report.refused:
        print(f"pathpacs: {line}", file=sys.stderr)
    return 2 if report.refused else 0


def cmd_rejected(args: argparse.Namespace) -> int:
    cli = _cli()
    arc = cli.open_archive(args)
    try:
        for sop, m in arc.deletion.rejected():
            kind = "note" if m["note"] == "self" else "instance"
            print(f"{m['time']}  {m['code']}  {kind:8}  study {m['study']}  {sop}  by {m['who']}")
        for v in arc.index.versions():
            rec = v["record"]
            print(f"{v['time']}  replaced  version   study {rec.study}  {rec.sop}  sha256 {rec.sha256[:16]}")
    finally:
        arc.close()
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    cli = _cli()
    if args.within < 0 or args.within > 365 * 200:
        raise cli.CliError("--within is a number of days (0-73000)")
    arc = cli.open_archive(args, readonly=True)
    try:
        rows = list(arc.deletion.retention.report(args.within))
    finally:
        arc.close()
    for state, k in rows:
        print(f"{state:8} {k.until.isoformat() if k.until else '-':10}  study {k.study}  ({k.rule})")
    expired = sum(1 for s, _ in rows if s == "expired")
    print(f"{expired} studies expired, {len(rows) - expired} expire within {args.within} days")
    return 0


def register(sub) -> None:
    """The verbs, on `pathpacs`'s subparsers (called once by archive.cli.build_parser)."""
    common = _cli()._common
    p = sub.add_parser("reject", help="IOCM reject: hide a study/series/instance from all but administrators "
                                      "(kept; purged after deletion.purge_after_days)")
    common(p)
    _target(p)
    p.add_argument("--reason", required=True, type=_reason,
                   help="CID 7011 code or name: 113001 quality, 113037 safety, 113038 worklist, 113039 retention")
    p.set_defaults(func=cmd_reject)

    p = sub.add_parser("restore", help="undo a reject before purge")
    common(p)
    _target(p)
    p.add_argument("--replaced", action="store_true",
                   help="make the version replaced by on_conflict = \"replace\" current again")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("purge", help="remove for good what was rejected more than purge_after_days ago")
    common(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be purged")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("rejected", help="list rejected instances, rejection notes and replaced versions")
    common(p)
    p.set_defaults(func=cmd_rejected)

    p = sub.add_parser("retention", help="retention: what has expired, what expires soon")
    rsub = p.add_subparsers(dest="retention_command", required=True)
    rp = rsub.add_parser("report", help="studies whose retention has ended or ends within --within days")
    common(rp)
    rp.add_argument("--within", type=int, default=0, metavar="DAYS")
    rp.set_defaults(func=cmd_retention)
