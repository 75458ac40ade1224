"""Slurm accounting: the state of submitted jobs, read with sacct (squeue for ids it does not
list yet), with fixed arguments only."""
from __future__ import annotations

import re
import shutil
import subprocess
from typing import Iterable

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING",
          "CONFIGURING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "READY"}
def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Slurm state of each job id (``123`` or ``123_4``): sacct over the few array ids they
    belong to, then squeue for the ids sacct does not list yet (it lags squeue by seconds)."""
    ids = sorted({j for j in job_ids if j})
    if not ids or shutil.which("sacct") is None:
        return {}
    bases = sorted({j.split("_")[0] for j in ids})
    states: dict[str, str] = {}
    for start in range(0, len(bases), 200):
        out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(bases[start:start + 200])])
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 2 and parts[1].strip():
                for job in expand_job_id(parts[0]):
                    states[job] = parts[1].split()[0].upper()  # "CANCELLED by 0" -> CANCELLED
    missing = [j for j in ids if j not in states]
    if missing:
        bases = sorted({j.split("_")[0] for j in missing})
        out = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)])
        for line in out.splitlines():
            if "|" in line:
                job, state = line.split("|", 1)
                states.setdefault(job.strip(), state.strip().upper())
    return {j: states[j] for j in ids if j in states}


def expand_job_id(text: str) -> list[str]:
    """sacct's ``123_[0-3,7%2]`` (pending array tasks) -> 123_0 ... 123_3, 123_7."""
    match = re.fullmatch(r"(\d+)_\[([^\]]+)\]", text.strip())
    if not match:
        return [text.strip()]
    base, spec = match.group(1), match.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            out += [f"{base}_{i}" for i in range(int(low), int(high or low) + 1)]
    return out


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# -- choosing what to submit -----------------------------------------------------------------

