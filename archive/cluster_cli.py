"""`pathpacs cluster status`: the nodes sharing this index (alive or dead, last seen) and the
cluster leases held, with their owners. Read-only: any node, or the CLI with a node's config."""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone


def register(sub, common) -> None:
    p = sub.add_parser("cluster", help="the nodes sharing the index: heartbeats and leases")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    s = csub.add_parser("status", help="every node (alive/dead, last seen) and the leases held")
    common(s)
    s.add_argument("--json", action="store_true", help="one JSON document")
    s.set_defaults(func=cmd_cluster)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def cmd_cluster(args: argparse.Namespace) -> int:
    from .cli import open_archive

    arc = open_archive(args, readonly=True)
    try:
        cl = arc.cluster
        nodes = cl.nodes.all()
        leases = cl.leases.held()
    finally:
        arc.close()
    now = time.time()
    if args.json:
        print(json.dumps({"this_node": cl.node, "lease_seconds": cl.lease_seconds,
                          "nodes": [{"node": n.name, "alive": n.alive, **n.record} for n in nodes],
                          "leases": [{"name": k, **r} for k, r in leases]}, indent=1))
        return 0
    print(f"this node: {cl.node}   (dead after {cl.lease_seconds:g} s without a heartbeat)")
    if not nodes:
        print("nodes: none serving")
    for n in nodes:
        r = n.record
        print(f"node {n.name:<20} {'alive' if n.alive else 'DEAD':<5}  last seen {_when(n.seen)} "
              f"({now - n.seen:.0f} s ago)  pid {r.get('pid', '?')}  http {r.get('http_port', '?')}  "
              f"dicom {r.get('dicom_port', '?')}  version {r.get('version', '?')}")
    if not leases:
        print("leases: none held")
    for name, r in leases:
        print(f"lease {name:<24} held by {r.get('owner')}  for {float(r['until']) - now:.0f} s more")
    return 0
