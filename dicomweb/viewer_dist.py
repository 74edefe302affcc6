"""`python -m dicomweb.viewer_dist [--quiet]`: copy what the viewer page serves into the package data.

An installed wheel has no viewer/ folder and no node_modules, so `/viewer` would answer 503. This
build step (run by `make wheel` before the wheel is built) copies our viewer JS/CSS and the files
the page loads from dicom-microscopy-viewer, dicomweb-client and dcmjs (their licences with them;
`dicomweb.viewer.served_files`) into dicomweb/static/viewer-dist/, which the wheel carries as
package data and dicomweb/viewer.py serves first. The folder is git-ignored: a checkout serves
viewer/ itself (`make wheel` removes the copy again, so it never goes stale beside the sources).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .viewer import PACKAGED_DIR, VIEWER_DIR, served_files


def copy(root: Path = VIEWER_DIR, out: Path = PACKAGED_DIR) -> list[Path]:
    """Replace `out` with a fresh copy of the served files; returns the files written."""
    files = served_files(root)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    written = []
    for src, rel in files:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(out / rel)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dicomweb.viewer_dist", description=__doc__.splitlines()[0])
    p.add_argument("--viewer", type=Path, default=VIEWER_DIR, help="the checkout's viewer/ folder")
    p.add_argument("--out", type=Path, default=PACKAGED_DIR, help="where to copy (the package data folder)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        written = copy(args.viewer, args.out)
    except (ValueError, OSError) as exc:
        print(f"viewer_dist: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        size = sum(f.stat().st_size for f in written)
        print(f"copied {len(written)} files ({size / 1e6:.1f} MB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
