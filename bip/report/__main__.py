"""``python -m bip.report ROOT [--out DIR]``: prints the path of the written index.html."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bip.errors import BipError
from bip.report import report


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, as every bip entry point
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m bip.report", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, metavar="ROOT", help="a runs folder with index.csv (launch/collect.py)")
    parser.add_argument("--out", type=Path, help="folder for the report (default: ROOT/report)")
    args = parser.parse_args(argv)
    try:
        path = report(args.root, args.out)
    except (BipError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
