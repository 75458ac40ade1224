"""``python -m bip.data.ffcv write ...``: write .beton files (bip.data.ffcv.write)."""
from __future__ import annotations

import sys

from bip.data.ffcv.loader import require_ffcv
from bip.errors import BipError


def main(argv: list[str] | None = None) -> int:
    try:
        require_ffcv()
    except BipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from bip.data.ffcv.write import main as write_main
    return write_main(argv)


if __name__ == "__main__":
    sys.exit(main())
