"""``python -m converters convert|watch ...`` (the same verbs as ``pathpacs``)."""

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
