"""`pathpacs partner list|check`: the configured partners, and whether each route works.

`partner check NAME` prints one line per route (see `partner_check`) and exits 0 when every
route passes, 1 otherwise (2 for an unknown partner or a bad configuration). It reads only the
configuration: no archive is opened, nothing is stored here or at the partner.
"""
from __future__ import annotations

import argparse
import json


def register(sub, common) -> None:
    p = sub.add_parser("partner", help="consultation partners: list, check reachability and permissions")
    psub = p.add_subparsers(dest="partner_command", required=True)
    ls = psub.add_parser("list", help="every [partners.NAME]: routes and experts")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_partner)
    c = psub.add_parser("check", help="test every route of a partner; one line per route, exit 1 if one fails")
    common(c)
    c.add_argument("name")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_partner)


def _routes(partner) -> list[str]:
    out = []
    if partner.dicomweb:
        auth = "token" if partner.token or partner.token_file else "oidc" if partner.oidc else "no credentials"
        out.append(f"dicomweb {partner.dicomweb} ({auth})")
    if partner.has_dimse:
        out.append(f"dimse {partner.aet}@{partner.host}:{partner.port}"
                   + (" TLS" if partner.tls else "") + (" +commitment" if partner.commitment else ""))
    return out


def cmd_partner(args: argparse.Namespace) -> int:
    from archive.cli import CliError, load_config

    cfg = load_config(args)
    if args.partner_command == "list":
        rows = [{"name": p.name, "routes": _routes(p),
                 "experts": [{"id": e.id, "name": e.name, "specialties": list(e.specialties)} for e in p.experts]}
                for p in cfg.partners.values()]
        if args.json:
            print(json.dumps(rows, indent=2, ensure_ascii=False))
        elif not rows:
            print("no partners configured ([partners.NAME] in the config file)")
        else:
            for r in rows:
                experts = ", ".join(f"{e['id']} ({e['name']})" for e in r["experts"]) or "-"
                print(f"{r['name']}: {'; '.join(r['routes']) or 'no route'}; experts: {experts}")
        return 0
    partner = cfg.partners.get(args.name)
    if partner is None:
        known = ", ".join(sorted(cfg.partners)) or "none configured"
        raise CliError(f"no partner {args.name!r} (partners: {known})")
    from .partner_check import check_partner

    results = check_partner(partner, cfg)
    if args.json:
        print(json.dumps([{"route": r.route, "target": r.target, "ok": r.ok, "problem": r.problem}
                          for r in results], indent=2))
    else:
        for r in results:
            print(r.line())
    return 0 if all(r.ok for r in results) else 1
