"""``python -m converters convert ...``: the converters library's own command line (the same
``convert`` verb as ``pathpacs convert``; importing into an archive is ``pathpacs import``/``watch``)."""

import argparse
import sys

from .commands import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pathpacs")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
