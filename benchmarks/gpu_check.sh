#!/usr/bin/env bash
# One-shot GPU check (README, "GPU"): host syncs, the GPU tests, step cost (fp32 / bf16 /
# channels_last / torch.compile), a CIFAR-sized BiP epoch, a ResNet-50 224 px slice, CUDA vs CPU.
# Prints ONE markdown table (device name on top) and writes it to $1, else $OUT/gpu_check.md,
# else ./gpu_check.md, with the rows as JSON and every part's log beside it.
#
#   bash benchmarks/gpu_check.sh [OUT_FILE.md] [--budget 450] [--parts ...]
#
# Runs as it is on a fresh GPU machine with torch + torchvision + accelerate + pytest installed
# and no package registry: nothing is installed; the checkout is imported through PYTHONPATH.
# Neither submitit (the Slurm launcher) nor ffcv is needed: the table lists what their
# absence skips. Each part has its own timeout inside a total budget (default 450 s).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
"$PY" -c "import torch" 2>/dev/null || PY=python   # the interpreter that has torch
out=()
if [[ $# -gt 0 && "$1" != --* ]]; then out=(--out "$1"); shift; fi
# The whole check stays under 8 minutes even if the driver itself hangs.
exec timeout --kill-after=10 475 "$PY" benchmarks/gpu_check.py --device cuda "${out[@]}" "$@"
