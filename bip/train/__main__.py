"""``python -m bip.train`` (bip.train.cli)."""
import sys

from bip.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
