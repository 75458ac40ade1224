"""One-shot GPU check: everything a fresh GPU machine should tell us, in one table.

    python benchmarks/gpu_check.py [--device cuda] [--out FILE.md] [--budget 450] [--parts ...]
    python benchmarks/gpu_check.py --device cpu --quick      # the CPU test (tests/benchmarks/test_gpu_check.py)

benchmarks/gpu_check.sh is the thin wrapper to run on the GPU machine. Parts, in this order (the
most important first), each in its own process with its own timeout, all within --budget
seconds: a part that hangs or crashes costs its own timeout and yields a row that says so, a part
with too little budget left is skipped with a row that says so.

  syncs        host syncs per step of dense, finetune, hydra, bip, bip-reference (x unstructured,
               filter, channel, nm) and of the tensor loader (CUDA: torch.cuda.set_sync_debug_mode
               counting; CPU: bip.testing.synccheck.SyncRecorder)
  tests        pytest -m gpu over the test files with GPU tests (those needing submitit / ffcv
               when absent are listed and skipped)
  step_cost    benchmarks/step_cost.py, CIFAR resnet18 batch 128: dense / hydra / bip /
               bip-reference, fp32, bf16, bf16 + channels_last; mask update share
  cifar_epoch  a full synthetic CIFAR-sized BiP epoch (45,000 images, batch 128) through the
               tensor loader: seconds and images/s (bf16, bf16 + channels_last, fp32)
  imagenet     ResNet-50 at 224 px, dense and BiP: images/s (ffcv if importable, else synthetic
               images through the tensor loader, and the table says so)
  invariance   the same 3 steps of every method in float64 on the device and on the CPU: max
               difference; and tests/distributed/test_invariance.py when the checkout has it
  compile_*    step_cost with torch.compile (dense / hydra / bip): bf16, bf16 + channels_last,
               fp32; graphs compiled after warm-up (0 = no recompiles), compile time
The table (markdown, device name on top) is printed last and written to --out (default:
$OUT/gpu_check.md, else ./gpu_check.md), with the rows as JSON and each part's log beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> seconds it may take on the GPU machine (its timeout; --quick: QUICK_TIMEOUT each)
PARTS = {"syncs": 90, "tests": 150, "step_cost": 120, "cifar_epoch": 150, "imagenet": 120,
         "invariance": 90, "compile_bf16": 240, "compile_bf16_cl": 180, "compile_fp32": 180}
QUICK_TIMEOUT = 120
MIN_LEFT = 20  # seconds: a part is not started with less budget than this left


def run_part(name: str, args) -> list[dict]:
    """Run one part in this process (the driver starts one process per part)."""
    import torch
    import gpu_parts as P
    P.SINK = Path(args.json)  # every row lands there when made
    device = torch.device(args.device)
    s = P.QUICK if args.quick else P.Sizes()
    if name == "syncs":
        return P.syncs(device, s)
    if name == "tests":
        return P.gpu_tests(device, s, timeout=PARTS["tests"] - 10)
    if name == "step_cost":
        return [r for precision, cl in (("fp32", False), ("bf16", False), ("bf16", True))
                for r in P.step_cost_rows(device, s, precision, cl, compiled=False)]
    if name == "cifar_epoch":
        return P.cifar_epoch(device, s)
    if name == "imagenet":
        return P.imagenet_slice(device, s, args.quick)
    if name == "invariance":
        return P.invariance(device, s) + P.invariance_tests(device, s, timeout=75, quick=args.quick)
    precision, cl = {"compile_bf16": ("bf16", False), "compile_bf16_cl": ("bf16", True),
                     "compile_fp32": ("fp32", False)}[name]
    return P.step_cost_rows(device, s, precision, cl, compiled=True, methods=s.compile_methods)


def environment(device: str) -> tuple[str, list[dict]]:
    import torch
    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else platform.processor() or "cpu"
    cuda = torch.version.cuda or "none"
    rows = [{"part": "env", "check": "versions", "result": f"python {platform.python_version()}, torch "
             f"{torch.__version__} (CUDA {cuda}), {os.cpu_count()} CPUs", "goal": "", "ok": None}]
    if not (shutil.which("gcc") or shutil.which("cc")):
        rows.append({"part": "env", "check": "no C compiler (gcc / cc)", "result": "torch.compile needs "
                     "one (inductor's CPU code, Triton's launchers): the compile parts may fail",
                     "goal": "", "ok": None})
    for module, what in (("submitit", "the Slurm launcher (launch/) is not checked here; bip itself does not need it"),
                         ("ffcv", "the ImageNet slice reads synthetic images through the tensor loader")):
        if importlib.util.find_spec(module) is None:
            rows.append({"part": "env", "check": f"{module} not installed", "result": f"skipped: {what}",
                         "goal": "", "ok": None})
    return name, rows


def table(device_name: str, rows: list[dict], seconds: float) -> str:
    mark = {True: "yes", False: "**NO**", None: "-"}
    lines = [f"### GPU check: {device_name}", "",
             f"`benchmarks/gpu_check.sh`, {time.strftime('%Y-%m-%d %H:%M')}, {seconds:.0f} s in all", "",
             "| part | check | result | goal | met |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["part"], r["check"], r["result"], r["goal"], mark[r["ok"]]]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


class Part:
    """One part in its own process group (pytest's children included), so that a timeout,
    or a SIGTERM to the driver (the wrapper's outer timeout), ends all of it."""

    current: "Part | None" = None

    def __init__(self, name: str, args, log: Path, rows_file: Path):
        cmd = [sys.executable, __file__, "--part", name, "--device", args.device, "--json", str(rows_file)]
        cmd += ["--quick"] if args.quick else []
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        Part.current = self

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if it ran out of time (then it is killed)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self.log.close()
            Part.current = None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def drive(args) -> int:
    start = time.perf_counter()
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.md")
    logs = out.with_name(out.stem + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    device_name, rows = environment(args.device)
    state = {"failed": False}

    def finish(*_signal) -> int:
        text = table(device_name, rows, time.perf_counter() - start)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))
        print(text + f"written: {out}", flush=True)
        return 1 if state["failed"] else 0

    def terminated(signum, _frame):  # the outer timeout: end the part, keep what was measured
        if Part.current is not None:
            Part.current.kill()
        rows.append({"part": "gpu_check", "check": "stopped", "result": f"signal {signum} after "
                     f"{time.perf_counter() - start:.0f} s", "goal": "", "ok": False})
        state["failed"] = True
        finish()
        sys.exit(1)

    signal.signal(signal.SIGTERM, terminated)
    print(f"gpu check on {device_name}: parts {', '.join(args.parts)}; budget {args.budget:.0f} s", flush=True)
    for name in args.parts:
        left = args.budget - (time.perf_counter() - start)
        limit = min(QUICK_TIMEOUT if args.quick else PARTS[name], left)
        if left < MIN_LEFT and not args.quick:
            rows.append({"part": name, "check": "not run", "result": f"skipped: {left:.0f} s of the "
                         f"{args.budget:.0f} s budget left", "goal": "", "ok": None})
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            made = Path(tmp) / "rows.json"
            code = Part(name, args, logs / f"{name}.log", made).wait(limit)
            if made.is_file():  # what the part measured, even if it failed later
                rows.extend(json.loads(made.read_text()))
        took = time.perf_counter() - t0
        if code != 0:
            state["failed"] = True
            last = (logs / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
            why = f"timed out after {limit:.0f} s" if code is None else f"exit {code}: {last[0][:160]}"
            rows.append({"part": name, "check": "part failed", "result": f"{why} (log: {logs.name}/{name}.log)",
                         "goal": "runs", "ok": False})
        print(f"  {name}: {took:.0f} s" + ("" if code == 0 else " (failed)"), flush=True)
    return finish()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test); figures mean nothing")
    p.add_argument("--out", default="", help="the table's file (default $OUT/gpu_check.md or ./gpu_check.md)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all parts together")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # one part, in-process
    p.add_argument("--json", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        run_part(args.part, args)
        return 0
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --device cpu --quick for the CPU smoke run)", file=sys.stderr)
            return 2
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
