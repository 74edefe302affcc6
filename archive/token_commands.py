"""`pathpacs token create|list|revoke`: API tokens from the command line.

The secret is printed once, alone on stdout (so `TOKEN=$(pathpacs token create ...)` works);
only its hash is kept. Whoever runs these verbs has the data directory, so they act as the
local administrator; over HTTP the same is `/api/tokens`, for the `secadmin` role only.
"""
from __future__ import annotations

import argparse
import json
import sys

from .access import ROLES


def register(sub, common) -> None:
    p = sub.add_parser("token", help="API tokens: create (the secret is shown once), list, revoke")
    tsub = p.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="a new token for a role, optionally limited to studies and a time")
    common(c)
    c.add_argument("--role", action="append", required=True, choices=ROLES, help="repeat for several roles")
    c.add_argument("--study", action="append", help="limit the token to this study (repeatable)")
    c.add_argument("--expires", help="7d, 12h, 30m, 2w, 1y or an ISO date (default: never)")
    c.add_argument("--name", default="", help="who or what the token is for")
    c.add_argument("--deidentify", action="store_true",
                   help="the token reads de-identified views only (research; LABEL/OVERVIEW hidden)")
    c.set_defaults(func=cmd_token)
    ls = tsub.add_parser("list", help="every token: id, name, roles, scope, expiry, state (never the secret)")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_token)
    r = tsub.add_parser("revoke", help="revoke a token by id: refused everywhere within auth.cache_seconds")
    common(r)
    r.add_argument("id")
    r.set_defaults(func=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    from .cli import CliError, open_archive
    from pydicom.uid import UID

    from .tokens import parse_expiry

    if args.token_command == "create":
        try:
            expires = parse_expiry(args.expires) if args.expires else None
            for uid in args.study or []:
                if len(uid) > 64 or not UID(uid).is_valid:
                    raise ValueError(f"--study {uid[:80]!r} is not a valid UID")
        except ValueError as exc:
            raise CliError(str(exc))
    arc = open_archive(args, readonly=args.token_command == "list")
    try:
        if args.token_command == "create":
            try:
                secret, info = arc.tokens.create(args.role, studies=args.study, expires=expires,
                                                 name=args.name, created_by="cli", deidentify=args.deidentify)
            except ValueError as exc:
                raise CliError(str(exc))
            from .audit import local_principal

            arc.audit.security("token created", local_principal(), info.detail(), subject=info.id)
            print(f"token {info.id} created for {', '.join(info.roles)}"
                  + (f", studies {', '.join(info.studies)}" if info.studies else "")
                  + (", de-identified views" if info.deidentify else "")
                  + (f", expires {info.expires}" if info.expires else ", no expiry")
                  + ". The secret is shown only now:", file=sys.stderr)
            print(secret)
            return 0
        if args.token_command == "revoke":
            try:
                info = arc.tokens.revoke(args.id)
            except KeyError:
                raise CliError(f"no token {args.id} (see pathpacs token list)")
            from .audit import local_principal

            arc.audit.security("token revoked", local_principal(), info.detail(), subject=info.id)
            print(f"token {info.id} revoked at {info.revoked}", file=sys.stderr)
            return 0
        tokens = arc.tokens.list()
        if args.json:
            print(json.dumps([t.as_dict() for t in tokens], indent=1))
            return 0
        print(f"{'ID':<16}  {'STATE':<7}  {'ROLES':<18}  {'SCOPE':<10}  {'EXPIRES':<20}  NAME")
        for t in tokens:
            scope = f"{len(t.studies)} studies" if t.studies else "all"
            if t.deidentify:
                scope += ", de-id"
            print(f"{t.id:<16}  {t.state:<7}  {','.join(t.roles):<18}  {scope:<10}  {t.expires or 'never':<20}  {t.name}")
        return 0
    finally:
        arc.close()
