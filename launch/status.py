"""What state each run is in, and which runs to submit.

ONE function decides a run's state (``combine``), from its folder (bip.rundir.folder.inspect: the
files and the lease) and, when available, Slurm accounting; ``grid.py --status``, ``--wait``
and ``collect.py`` all use it. States, first rule that applies:

    done      result.json + config.yaml parse and final.pt passes its header check
    running   a live lease (heartbeat fresh, pid alive), or its Slurm job is running
    pending   its Slurm job is queued or requeued
    unknown   its Slurm job's state cannot be read (sacct failed or timed out: slurmdbd down):
              queued, running and ended look alike, so it is neither submitted again nor
              counted as over; its children wait with it
    failed    error file(s), or its Slurm job ended (cancelled, timed out, PREEMPTED and not
              requeued, node failure, out of memory) without a result
    corrupt   result.json, final.pt or config.yaml damaged (resubmitted by --only-failed; the
              job moves the damaged files aside and trains again)
    blocked   its parent (transitively) failed, is corrupt or blocked
    started   a checkpoint or metrics but nothing runs it (killed, or stopped): resumable
    waiting   config.yaml only (written at submission)        new  no folder

Slurm accounting is launch/slurm.py's; the grid manifests are launch/manifest.py's.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from bip.config import identity
from bip.rundir.folder import Inspection, inspect, lease_live
from bip.rundir.lease import describe_owner
from launch.manifest import all_jobs
from launch.slurm import ACTIVE, UNKNOWN, Accounting, job_states
from launch.sweep import Plan, Run

STATES = ("done", "running", "pending", "unknown", "failed", "corrupt", "blocked", "started", "waiting",
          "new")
LIVE = ("running", "pending")
# Not submitted (nor their children) while their job's state is unknown.
UNSURE = ("unknown",)
# Slurm states of a job that may still produce a result. PREEMPTED is not one: a preempted job
# that is requeued shows PENDING again; one that stays PREEMPTED was cancelled by preemption.
OUTPUTS = (identity.RESULT, identity.FINAL, identity.CHECKPOINT, identity.MASK, identity.METRICS,
           identity.ERROR, identity.REWIND)


def combine(found: Inspection, slurm_state: str = "", parent: str = "done",
            job: str | None = None, sacct_error: str = "") -> tuple[str, str]:
    """(state, detail) of one run: its folder, its Slurm job's state ('' when Slurm has none;
    launch.slurm.UNKNOWN when sacct failed, ``sacct_error`` saying why) and its parent's state
    (decided first)."""
    where = f"job {job} {slurm_state}" if job and slurm_state else (f"job {job}" if job else "")
    if found.state == "done":
        return "done", where
    owner = found.owner
    # A lease of the run's own job that Slurm says has ended is dead (node crash, OOM kill).
    dead_job = bool(owner and job and owner.get("slurm_job_id") == job
                    and slurm_state and slurm_state not in ACTIVE and slurm_state != UNKNOWN)
    if lease_live(owner) and not dead_job:
        age = time.time() - float(owner.get("heartbeat", time.time()))
        return "running", f"{describe_owner(owner)}, heartbeat {age:.0f} s ago"
    if slurm_state in ACTIVE:
        return ("running" if slurm_state == "RUNNING" else "pending"), where
    if slurm_state == UNKNOWN:  # whatever the folder says, the job may still run or be requeued
        return "unknown", f"sacct: {sacct_error or 'no answer'}; job {job}"
    if found.state in ("failed", "corrupt"):
        return found.state, found.detail + (f" ({where})" if where else "")
    if parent in ("failed", "blocked", "corrupt"):
        return "blocked", "parent " + parent
    if slurm_state and slurm_state != "COMPLETED":  # killed: cancel, walltime, preemption, OOM, node
        return "failed", f"{where} without {identity.RESULT}"
    return found.state, where


def run_states(plan: Plan, slurm: bool = True, jobs: dict | None = None) -> dict[str, tuple[str, str]]:
    """{run key: (state, detail)} for every run of the plan."""
    jobs = all_jobs(plan.root) if jobs is None else jobs
    found = {run.key: inspect(plan.dir(run)) for run in plan.all_runs()}
    wanted = [jobs[k]["job_id"] for k, f in found.items() if f.state != "done" and k in jobs]
    acct = job_states(wanted) if slurm else Accounting()
    out: dict[str, tuple[str, str]] = {}
    for run in plan.all_runs():  # stage order: a parent is always decided before its children
        job = jobs.get(run.key, {}).get("job_id")
        parent = out.get(run.parent, ("done", ""))[0] if run.parent else "done"
        out[run.key] = combine(found[run.key], acct.state(job), parent, job, acct.error)
    return out


def code_changes(plan: Plan) -> list[tuple[str, list[str]]]:
    """(run key, [sha, ...]) of runs resumed under other code than they started with."""
    out = []
    for run in plan.all_runs():
        doc = inspect(plan.dir(run)).config
        if doc and doc.get("code_changed"):
            shas = []
            for entry in doc.get("history", []):
                sha = f"{str(entry.get('git_sha'))[:10]}{'+dirty' if entry.get('git_dirty') else ''}"
                if not shas or shas[-1] != sha:
                    shas.append(sha)
            out.append((run.key, shas))
    return out


# -- Slurm accounting ------------------------------------------------------------------------

def select(plan: Plan, states: dict, only_failed: bool = False) -> tuple[list[Run], list[Run]]:
    """(runs to submit, done runs among them whose outputs must be set aside first).

    A run is submitted when it is not done and nothing runs it (with ``only_failed``: when it
    failed or is corrupt); every run below a submitted one is submitted with it (its parent
    is being redone, so its old outputs would no longer follow from the parent's). A run whose
    job's state is unknown is not submitted (grid.hold_back holds back its children)."""
    chosen: set[str] = set()
    for run in plan.all_runs():
        state = states[run.key][0]
        pick = state in ("failed", "corrupt") if only_failed else state not in ("done",) + LIVE + UNSURE
        if pick or (run.parent in chosen and state not in LIVE + UNSURE):
            chosen.add(run.key)
    runs = [run for run in plan.all_runs() if run.key in chosen]
    return runs, [run for run in runs if states[run.key][0] == "done"]


def supersede(run_dir: Path) -> Path:
    """Move a run's outputs into ``superseded/<time>/`` so that it trains afresh."""
    target = run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)
    return target


# -- files -----------------------------------------------------------------------------------

def error_line(run_dir: Path) -> str:
    found = inspect(run_dir)
    if found.state in ("failed", "corrupt"):
        return found.detail
    return f"no {identity.ERROR} (killed? see the job's log)"
