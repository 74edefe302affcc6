"""`pathpacs export`: studies to a directory of Part 10 files with a DICOMDIR, optionally
de-identified (archive.export, archive.deid). Expected failures are one line and exit 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: give KEY=VALUE (e.g. PatientID=P1, StudyDate=20260101-)")
    return name.strip(), value


def cmd_export(args: argparse.Namespace) -> int:
    from . import cli
    from .deid import DeidOptions
    from .export import Export, select
    from .query import QueryError
    from .status import ArchiveError

    if not args.study and not args.query:
        raise cli.CliError("give --study UID or --query KEY=VALUE")
    arc = cli.open_archive(args, readonly=not args.deidentify)  # a de-identified export records its uid map
    try:
        try:
            recs = select(arc, args.study or [], args.query or [])
        except QueryError as exc:
            raise cli.CliError(f"--query: {exc}")
        except ArchiveError as exc:
            raise cli.CliError(exc.reason)
        if not recs:
            raise cli.CliError("no study matches")
        options = DeidOptions.from_config(arc.config).replace(**{k: True for k in ("keep_label", "keep_overview")
                                                                 if getattr(args, k)})
        job = Export(arc, recs, args.output, deidentify=args.deidentify, options=options)
        bar = cli._bar(args, sum(r.size for r in recs))
        try:
            result = job.run(progress=bar.update)
        except ArchiveError as exc:
            raise cli.CliError(exc.reason)
        finally:
            bar.close()
    finally:
        arc.close()
    left = f", {len(result.excluded)} left out ({', '.join(sorted({w for _, w in result.excluded}))})" \
        if result.excluded else ""
    how = f" de-identified (uid map {result.context})" if result.context else ""
    print(f"exported {len(result.written)} instances{how} to {args.output}{left}", file=sys.stderr)
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("export", help="studies to a directory with a DICOMDIR, optionally de-identified")
    common(p)
    p.add_argument("--study", action="append", metavar="UID", help="a study to export (repeatable)")
    p.add_argument("--query", nargs="+", type=_pair, metavar="KEY=VALUE",
                   help="export the studies this C-FIND-style query matches")
    p.add_argument("--deidentify", action="store_true", help="PS3.15 Annex E profile of [deidentify]")
    p.add_argument("--keep-label", dest="keep_label", action="store_true", help="include LABEL images")
    p.add_argument("--keep-overview", dest="keep_overview", action="store_true", help="include OVERVIEW images")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                   help="a new or empty directory (never merged into)")
    p.set_defaults(func=cmd_export)
