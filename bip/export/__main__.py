"""``python -m bip.export RUN_DIR [--thin] [--onnx] [--latency] [--nm-sparse]`` (bip.export.run)."""
import sys

from bip.export.run import main

if __name__ == "__main__":
    sys.exit(main())
