"""`pathpacs consent add|list|withdraw` and `pathpacs share [list|revoke]` (issue 12).

`share` prints the link alone on stdout (so `URL=$(pathpacs share --study UID)` works); the
token inside it is shown only then, only its hash is kept. Whoever runs these verbs has the
data directory, so they act as the local administrator (recorded as the OS user).
"""
from __future__ import annotations

import argparse
import json
import sys

from .consent import PURPOSES


def register(sub, common) -> None:
    p = sub.add_parser("consent", help="patient consent to consult, share or research: add, list, withdraw")
    csub = p.add_subparsers(dest="consent_command", required=True)
    a = csub.add_parser("add", help="record a consent (a guardian's for a patient under 14)")
    common(a)
    a.add_argument("--study", help="the study it covers")
    a.add_argument("--patient", help="the Patient ID it covers (every study of the patient, without --study)")
    a.add_argument("--by", required=True, metavar="NAME", help="who records the consent (the doctor or clerk)")
    a.add_argument("--guardian", default="", metavar="NAME", help="the guardian who consented for the patient")
    a.add_argument("--relationship", default="", metavar="R", help="the guardian's relationship (mother, ...)")
    a.add_argument("--scope", required=True, help=f"what for, comma-separated: {', '.join(PURPOSES)}")
    a.add_argument("--ref", default="", metavar="TEXT", help="a paper form number or an e-signature id")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_consent)
    ls = csub.add_parser("list", help="every consent (of a study): who, when, scope, state")
    common(ls)
    ls.add_argument("--study")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_consent)
    w = csub.add_parser("withdraw", help="withdraw a consent: its share links are refused within 10 s")
    common(w)
    w.add_argument("id")
    w.set_defaults(func=cmd_consent)

    s = sub.add_parser("share", help="a link that opens a study in the viewer (and works as a DICOMweb token); "
                                     "share list, share revoke ID",
                       description="Without an action: make a share link for --study. `list`: the links "
                                   "(of --study). `revoke ID`: refused everywhere within auth.cache_seconds.")
    common(s)
    s.add_argument("action", nargs="?", choices=["list", "revoke"])
    s.add_argument("id", nargs="?", help="the link to revoke")
    s.add_argument("--study", help="the study to share (list: only its links)")
    s.add_argument("--expires", default="7d", help="7d (default), 12h, 30m, 90s, or an ISO date")
    s.add_argument("--deidentify", action="store_true", help="the study is seen de-identified")
    s.add_argument("--permissions", default="read", help="read (view) or read,download (whole instances)")
    s.add_argument("--consent", metavar="REF", help="the consent (id or reference) the link is made under")
    s.add_argument("--qr", metavar="FILE.png", help="also write the link as a QR code")
    s.add_argument("--name", default="", help="who the link is for")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_share)


def _fail(message: str):
    from .cli import CliError

    return CliError(message)


def _check_uid(uid: str, what: str = "--study") -> str:
    import re

    if len(uid) > 64 or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", uid):
        raise _fail(f"{what} {uid[:80]!r} is not a valid UID")
    return uid


def cmd_consent(args: argparse.Namespace) -> int:
    from .audit import local_principal
    from .cli import open_archive
    from .consent import Consents
    from .status import ArchiveError

    if getattr(args, "study", None):
        _check_uid(args.study)
    arc = open_archive(args, readonly=args.consent_command == "list")
    try:
        consents = Consents(arc)
        try:
            if args.consent_command == "add":
                rec = consents.add(study=args.study, patient=args.patient, recorded_by=args.by,
                                   scope=args.scope.split(","), guardian=args.guardian,
                                   relationship=args.relationship, reference=args.ref, who=local_principal())
                if args.json:
                    print(json.dumps(rec, indent=1))
                else:
                    print(f"consent {rec['id']} recorded for {rec['study'] or 'patient ' + str(rec['patient'])}: "
                          f"{','.join(rec['scope'])}, given by {rec['consented_by']}"
                          + (f" ({rec['relationship']})" if rec.get("relationship") else ""), file=sys.stderr)
                    print(rec["id"])
                return 0
            if args.consent_command == "withdraw":
                rec = consents.withdraw(args.id, local_principal())
                links = rec["revoked_links"]
                print(f"consent {rec['id']} withdrawn at {rec['withdrawn']}"
                      + (f"; share links revoked: {', '.join(links)}" if links else ""), file=sys.stderr)
                return 0
            recs = consents.list(args.study)
        except ArchiveError as exc:
            raise _fail(exc.reason)
        if args.json:
            print(json.dumps(recs, indent=1))
            return 0
        print(f"{'ID':<16}  {'STATE':<9}  {'SCOPE':<22}  {'TIME':<20}  {'GIVEN BY':<20}  {'REF':<12}  STUDY / PATIENT")
        for r in recs:
            given = r["consented_by"] + (f" ({r['relationship']})" if r.get("relationship") else "")
            print(f"{r['id']:<16}  {'withdrawn' if r.get('withdrawn') else 'valid':<9}  {','.join(r['scope']):<22}  "
                  f"{r['time']:<20}  {given:<20}  {r.get('reference') or '-':<12}  "
                  f"{r.get('study') or 'patient ' + str(r.get('patient'))}")
        return 0
    finally:
        arc.close()


def _write_qr(url: str, path: str) -> None:
    import segno

    try:
        segno.make(url, error="m", micro=False).save(path, scale=8, border=4)
    except OSError as exc:
        raise _fail(f"--qr {path[:80]}: {exc.strerror or exc}")


def cmd_share(args: argparse.Namespace) -> int:
    from .audit import local_principal
    from .cli import open_archive
    from .shares import ShareLinks, check_permissions
    from .status import ArchiveError
    from .tokens import parse_expiry

    if args.action == "revoke" and not args.id:
        raise _fail("say which link: pathpacs share revoke ID (see pathpacs share list)")
    if args.action != "revoke" and args.id:
        raise _fail(f"unexpected argument {args.id[:40]!r} (see pathpacs share --help)")
    if args.study:
        _check_uid(args.study)
    if args.action is None:
        if not args.study:
            raise _fail("say what to share: pathpacs share --study UID")
        try:
            expires = parse_expiry(args.expires)
            perms = check_permissions(args.permissions)
        except ValueError as exc:
            raise _fail(str(exc))
        except ArchiveError as exc:
            raise _fail(exc.reason)
        if args.qr:
            from pathlib import Path

            if not args.qr.lower().endswith(".png"):
                raise _fail(f"--qr {args.qr[:80]!r}: give a .png file name")
            if not Path(args.qr).resolve().parent.is_dir():
                raise _fail(f"--qr {args.qr[:80]}: no such directory")
    arc = open_archive(args, readonly=args.action == "list")
    try:
        links = ShareLinks(arc)
        try:
            if args.action == "revoke":
                d = links.revoke(args.id, local_principal())
                print(f"share link {d['id']} revoked at {d['revoked']}", file=sys.stderr)
                return 0
            if args.action == "list":
                found = links.list(args.study)
                if args.json:
                    print(json.dumps(found, indent=1))
                    return 0
                print(f"{'ID':<16}  {'STATE':<7}  {'PERMISSIONS':<13}  {'DEID':<4}  {'EXPIRES':<20}  {'CONSENT':<16}  STUDY")
                for d in found:
                    print(f"{d['id']:<16}  {d['state']:<7}  {','.join(d['permissions']):<13}  "
                          f"{'yes' if d['deidentify'] else 'no':<4}  {d['expires'] or 'never':<20}  "
                          f"{d['consent'] or '-':<16}  {d['study']}")
                return 0
            url, d = links.create(args.study, expires=expires, permissions=perms, deidentify=args.deidentify,
                                  consent=args.consent, who=local_principal(), name=args.name)
        except ArchiveError as exc:
            raise _fail(exc.reason)
        if args.qr:
            _write_qr(url, args.qr)
        if args.json:
            print(json.dumps({**d, "url": url, **({"qr": args.qr} if args.qr else {})}, indent=1))
            return 0
        print(f"share link {d['id']} for study {d['study']}: {','.join(d['permissions'])}"
              + (", de-identified" if d["deidentify"] else "") + f", expires {d['expires']}"
              + (f", consent {d['consent']}" if d["consent"] else "")
              + (f", QR code in {args.qr}" if args.qr else "") + ". The link is shown only now:", file=sys.stderr)
        print(url)
        return 0
    finally:
        arc.close()
