"""`make bench` / `python -m conformance.bench [--quick] [--only NAME]`.

Runs every benchmark with its peers in the same run, prints one table and writes BENCHMARKS.md
with a description of the machine. Absolute numbers here are noisy; ratios within a run hold.
The benchmarks are the modules of this package (ingest, frames, convert); every peer they
compare is started by conformance.bench.peers, as in the tests.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]

# name -> (module, function); each function takes (workdir: Path, quick: bool) -> list[dict]
BENCHMARKS: dict[str, tuple[str, str]] = {
    "ingest": ("conformance.bench.ingest", "run"),
    "dicomweb": ("conformance.bench.frames", "run"),
    "convert": ("conformance.bench.convert", "run"),
    "tiers": ("conformance.bench.tiers", "run"),
    "s3 client": ("conformance.bench.s3", "run"),
    "study browser": ("conformance.bench.browser", "run"),
    "viewer": ("conformance.bench.viewer", "run"),
    "consultation": ("conformance.bench.consult", "run"),
    "nodes": ("conformance.bench.nodes", "run"),
    "postgresql": ("conformance.bench.pg", "run"),
}


def machine() -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    disk = shutil.disk_usage(ROOT)
    fs = subprocess.run(["df", "-T", str(ROOT)], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not installed"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem:.0f} GiB",
        f"- disk: {fs}, {disk.total / 2**30:.0f} GiB ({disk.free / 2**30:.0f} GiB free)",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- Orthanc: {version(['Orthanc', '--version'])}",
        f"- dcmtk: {version(['dcmsend', '--version'])}",
        "- client and server share the machine (loopback)",
    ]


def table(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |")
    return out


_CHILD = r"""
import importlib, json, sys
from pathlib import Path
module, func, tmp, quick, out = sys.argv[1:6]
rows = getattr(importlib.import_module(module), func)(Path(tmp), quick == "1")
Path(out).write_text(json.dumps(rows, default=str))
"""


def _run_isolated(module: str, func: str, tmp: Path, quick: bool) -> list[dict]:
    """One benchmark in its own interpreter: what one leaves in memory cannot inflate the
    next one's measurements (a child forked from a big process reports the parent's peak RSS)."""
    import json

    out = tmp / "rows.json"
    res = subprocess.run([sys.executable, "-c", _CHILD, module, func, str(tmp), "1" if quick else "0", str(out)],
                         cwd=ROOT)
    if res.returncode != 0 or not out.exists():  # one failing peer must not hide the other results
        return [{"benchmark": module, "system": "-", "value": "FAILED", "note": f"exit code {res.returncode}"}]
    return json.loads(out.read_text())


def _replace_sections(text: str, sections: list[str]) -> str:
    """`text` (BENCHMARKS.md) with each `## name` section of `sections` in place of its old one."""
    import re

    new = "\n".join(sections)
    for part in re.split(r"(?m)^(?=## )", new):
        if not part.strip():
            continue
        head = part.splitlines()[0]
        pattern = re.compile(rf"(?ms)^{re.escape(head)}\n.*?(?=^## |\Z)")
        body = part.rstrip("\n") + "\n\n"
        text = pattern.sub(lambda _m: body, text, count=1) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.bench")
    p.add_argument("--quick", action="store_true", help="small inputs, for a smoke run")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS))
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    sections: list[str] = []
    failed = 0
    for name, (module, func) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-", dir=os.environ.get("BENCH_TMP")) as tmp:
            rows = _run_isolated(module, func, Path(tmp), args.quick)
            if len(rows) == 1 and rows[0].get("value") == "FAILED":
                failed += 1
        lines = table(rows)
        notes = getattr(importlib.import_module(module), "NOTES", "")  # a section's assumptions, as text
        if notes:
            lines += ["", notes]
        print("\n".join(lines), flush=True)
        sections += [f"## {name}", "", *lines, ""]
    doc = [
        "# Benchmarks",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `make bench`"
        + (" (--quick: small inputs)" if args.quick else "") + ", pathpacs and its peers in the same run.",
        "Absolute times on a shared 2-core machine are noisy; compare ratios within one run.",
        "",
        "Machine:",
        *machine(),
        "",
        *sections,
    ]
    if not args.only:
        args.out.write_text("\n".join(doc))
        print(f"wrote {args.out}", file=sys.stderr)
    elif args.out.exists():  # --only: its sections replace theirs (or join the end) in the existing file
        args.out.write_text(_replace_sections(args.out.read_text(), sections))
        print(f"updated {', '.join(args.only)} in {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
