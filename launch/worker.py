"""``python -m launch.worker THREADS``: trains the runs ``grid.py --local`` sends it, one after another.

Each stdin line is a JSON task {config, run_dir, parent_dir, export, log}; the run's output goes to
``log``, and one JSON line {run_dir, ok} is written back on the original stdout when it ends.
Interpreter, torch and accelerate start once per worker, which dominates small runs. SIGTERM
asks the current run to checkpoint at its next step boundary; the worker then exits.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def main() -> int:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    protocol = os.fdopen(os.dup(1), "w")  # fd 1 and 2 go to each run's log
    os.dup2(2, 1)  # stray output between runs must not reach the protocol pipe
    import torch

    from bip.rundir import boundary
    from launch.job import TrainJob
    torch.set_num_threads(threads)
    boundary.install_stop_signals(signal.SIGTERM)
    for line in sys.stdin:
        task = json.loads(line)
        ok = _run(TrainJob(), task)
        protocol.write(json.dumps({"run_dir": task["run_dir"], "ok": ok}) + "\n")
        protocol.flush()
        if boundary.stop_reason():
            return 0
    return 0


def _run(job, task: dict) -> bool:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(task["log"], "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            job(task["config"], task["run_dir"], task.get("parent_dir"), task.get("export"))
            return True
        except Exception:  # recorded in the run's folder; the traceback goes to its log
            traceback.print_exc()
            return False
        except SystemExit:  # stopped by SIGTERM after a checkpoint
            return False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


if __name__ == "__main__":
    sys.exit(main())
