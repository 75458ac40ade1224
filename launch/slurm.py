"""Slurm accounting: the state of submitted jobs, read with sacct (squeue for ids it does not
list yet), with fixed arguments only."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Iterable

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING",
          "CONFIGURING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "READY"}
SACCT_TIMEOUT_S = 120.0  # a slurmdbd that does not answer in this time counts as down
UNKNOWN = "unknown"  # a job whose state sacct could not tell (lower case: no Slurm state is)


@dataclass(frozen=True)
class Accounting:
    """What Slurm said about some jobs: ``states`` (job id -> state) for the ids sacct or squeue
    listed, and ``error``, why sacct gave no answer ('' when it did). With an error, an id that
    squeue does not list either is UNKNOWN, never "not submitted yet" or "ended"."""
    states: dict = field(default_factory=dict)
    error: str = ""

    def state(self, job: str | None) -> str:
        """The job's state; '' when nothing is known and sacct answered (a fresh submission)."""
        if not job:
            return ""
        return self.states.get(job) or (UNKNOWN if self.error else "")


def job_states(job_ids: Iterable[str]) -> Accounting:
    """Slurm state of each job id (``123`` or ``123_4``): sacct over the few array ids they
    belong to, then squeue for the ids sacct does not list yet (it lags squeue by seconds).
    A sacct that fails or times out (slurmdbd down) is reported in ``error``; its output is
    never read as "no such jobs"."""
    ids = sorted({j for j in job_ids if j})
    if not ids or shutil.which("sacct") is None:
        return Accounting()
    bases = sorted({j.split("_")[0] for j in ids})
    states: dict[str, str] = {}
    errors = []
    for start in range(0, len(bases), 200):
        out, error = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j",
                           ",".join(bases[start:start + 200])], SACCT_TIMEOUT_S)
        if error:
            errors.append(error)
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 2 and parts[1].strip():
                for job in expand_job_id(parts[0]):
                    states[job] = parts[1].split()[0].upper()  # "CANCELLED by 0" -> CANCELLED
    missing = [j for j in ids if j not in states]
    if missing:
        bases = sorted({j.split("_")[0] for j in missing})
        out, _ = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)], SACCT_TIMEOUT_S)
        for line in out.splitlines():
            if "|" in line:
                job, state = line.split("|", 1)
                states.setdefault(job.strip(), state.strip().upper())
    return Accounting({j: states[j] for j in ids if j in states}, errors[0] if errors else "")


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


def _run(cmd: list[str], timeout: float) -> tuple[str, str]:
    """(stdout, '' or why the command failed: its exit status and last stderr line, or the
    timeout)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "", f"no answer in {timeout:g} s"
    except (OSError, subprocess.SubprocessError) as err:
        return "", f"{type(err).__name__}: {err}"
    if out.returncode != 0:
        lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
        return out.stdout, f"exit status {out.returncode}" + (f": {lines[-1]}" if lines else "")
    return out.stdout, ""


# -- choosing what to submit -----------------------------------------------------------------

