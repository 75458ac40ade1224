"""What state each run of a plan is in (run folders + Slurm accounting), which runs to submit,
and the grid manifest (``<root>/_grids/<name>.json``: the job id of every submitted run).

The folders are the truth for outcomes (result.json = done, error.json = failed); sacct adds
what only the scheduler knows: queued, running, killed without a word (cancel, walltime, OOM,
node failure). States, first rule that applies:

    done      result.json
    running   its Slurm job is running          pending  its Slurm job is queued or requeued
    failed    error.json, or its job ended badly without a result
    blocked   its parent (transitively) failed, so it cannot start
    started   checkpoint or metrics but no live job (killed, or a local run that was stopped)
    waiting   config.yaml only (written at submission)     new  never submitted
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bip import identity
from bip.atomic import write_text
from launch.sweep import Plan, Run

STATES = ("done", "running", "pending", "failed", "blocked", "started", "waiting", "new")
# Slurm states of a job that may still produce a result (submitit's list, plus the rarer ones).
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING",
          "CONFIGURING", "SUSPENDED", "RESIZING", "PREEMPTED", "SIGNALING", "STAGE_OUT",
          "READY"}
OUTPUTS = (identity.RESULT, identity.CHECKPOINT, identity.MASK, identity.METRICS, identity.ERROR, identity.REWIND)


def file_state(run_dir: Path) -> str:
    try:
        names = set(os.listdir(run_dir))
    except OSError:
        return "new"
    if identity.RESULT in names:
        return "done"
    if identity.ERROR in names:
        return "failed"
    if identity.CHECKPOINT in names or identity.METRICS in names:
        return "started"
    return "waiting" if identity.CONFIG in names else "new"


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state of each job id (``123`` or ``123_4``): one sacct call for all of them, then
    squeue for the ids sacct does not list yet (it lags squeue by a few seconds)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher
    watcher = SlurmInfoWatcher(delay_s=0)
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher.update()
    # "CANCELLED by 0" -> CANCELLED; UNKNOWN = not listed.
    states = {j: watcher.get_state(j, mode="cache").split()[0].upper() for j in job_ids}
    missing = {j for j, s in states.items() if s == "UNKNOWN"}
    if missing:
        states.update({j: s for j, s in _squeue().items() if j in missing})
    return {j: s for j, s in states.items() if s != "UNKNOWN"}


def _squeue() -> dict[str, str]:
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def run_states(plan: Plan, manifest: dict, slurm: bool = True) -> dict[str, tuple[str, str]]:
    """{run key: (state, detail)} for every run of the plan."""
    cells = manifest.get("cells", {})
    jobs = {key: cells[key]["job_id"] for key in cells if cells[key].get("job_id")}
    wanted = [jobs[run.key] for run in plan.all_runs() if run.key in jobs]
    sacct = job_states(wanted) if slurm else {}
    out: dict[str, tuple[str, str]] = {}
    for run in plan.all_runs():  # stage order: a parent is always decided before its children
        files = file_state(plan.dir(run))
        job = jobs.get(run.key)
        slurm_state = sacct.get(job, "") if job else ""
        parent = out.get(run.parent, ("done", ""))[0] if run.parent else "done"
        out[run.key] = _combine(files, slurm_state, parent, job, plan.dir(run))
    return out


def _combine(files: str, slurm_state: str, parent: str, job: str | None, run_dir: Path) -> tuple[str, str]:
    where = f"job {job} {slurm_state}" if job and slurm_state else (f"job {job}" if job else "")
    if files == "done":
        return "done", where
    if slurm_state in ACTIVE:
        return ("running" if slurm_state == "RUNNING" else "pending"), where
    if files == "failed":
        return "failed", error_line(run_dir) + (f" ({where})" if where else "")
    if parent in ("failed", "blocked"):
        return "blocked", "parent " + parent
    if slurm_state and slurm_state != "COMPLETED":  # killed: cancel, walltime, OOM, node failure
        return "failed", f"{where} without {identity.RESULT}"
    return files, where


def error_line(run_dir: Path) -> str:
    if not (run_dir / identity.ERROR).is_file():
        return f"no {identity.ERROR} (killed? see the job's log)"
    try:
        return str(json.loads((run_dir / identity.ERROR).read_text()).get("error", "?")).splitlines()[0]
    except (OSError, ValueError, AttributeError, IndexError):
        return "error.json unreadable"


def select(plan: Plan, states: dict, only_failed: bool = False) -> tuple[list[Run], list[Run]]:
    """(runs to submit, done runs among them whose outputs must be set aside first).

    A run is submitted when it is not done and has no live job (with ``only_failed``: when it
    failed); every run below a submitted one is submitted with it (its parent is being
    redone, so its old outputs would no longer follow from the parent's)."""
    chosen: set[str] = set()
    for run in plan.all_runs():
        state = states[run.key][0]
        if only_failed:
            pick = state == "failed"
        else:
            pick = state not in ("done", "running", "pending")
        if pick or (run.parent in chosen and state not in ("running", "pending")):
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

def write_configs(plan: Plan, runs: list[Run], submission: dict) -> None:
    """config.yaml of each run about to be submitted (if missing), so the results index shows
    queued and blocked runs too; train() rewrites it with full provenance when it starts."""
    for run in runs:
        path = plan.dir(run) / identity.CONFIG
        if not path.is_file():
            write_text(path, identity.config_yaml(run.cfg, {"submitted": submission}))


def manifest_path(plan: Plan) -> Path:
    return plan.root / "_grids" / f"{plan.name}.json"


def read_manifest(plan: Plan) -> dict:
    path = manifest_path(plan)
    if not path.is_file():
        return {"cells": {}, "submissions": []}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"cells": {}, "submissions": []}  # a broken manifest only loses job states


def record(plan: Plan, manifest: dict, submission: dict, job_ids: dict[str, str | None]) -> Path:
    """Add one submission (its arrays and the job id of every run) to the manifest."""
    manifest = {**manifest, "grid": str(plan.path.resolve()), "name": plan.name, "root": str(plan.root)}
    manifest.setdefault("cells", {})
    for run in plan.all_runs():
        entry = manifest["cells"].setdefault(run.key, {})
        entry.update(stage=run.stage, parent=run.parent, label=run.label)
        if run.key in job_ids:
            entry.update(job_id=job_ids[run.key], executor=submission["executor"])
    manifest["submissions"] = manifest.get("submissions", []) + [submission]
    path = manifest_path(plan)
    write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path
