"""What state each run is in, which runs to submit, and the grid manifests.

ONE function decides a run's state (``combine``), from its folder (bip.runfolder.inspect: the
files and the lease) and, when available, Slurm accounting; ``grid.py --status``, ``--wait``
and ``collect.py`` all use it. States, first rule that applies:

    done      result.json + config.yaml parse and final.pt passes its header check
    running   a live lease (heartbeat fresh, pid alive), or its Slurm job is running
    pending   its Slurm job is queued or requeued
    failed    error file(s), or its Slurm job ended (cancelled, timed out, PREEMPTED and not
              requeued, node failure, out of memory) without a result
    corrupt   result.json, final.pt or config.yaml damaged (resubmitted by --only-failed; the
              job moves the damaged files aside and trains again)
    blocked   its parent (transitively) failed, is corrupt or blocked
    started   a checkpoint or metrics but nothing runs it (killed, or stopped): resumable
    waiting   config.yaml only (written at submission)        new  no folder

Manifests (``<root>/_grids/<name>.json``) record the job id of every submitted run. Every
manifest under the root is read, so a run queued by ANY grid counts as live for all of them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable

from bip import identity
from bip.atomic import write_text
from bip.runfolder import Inspection, inspect, lease_live
from launch.sweep import Plan, Run

STATES = ("done", "running", "pending", "failed", "corrupt", "blocked", "started", "waiting", "new")
LIVE = ("running", "pending")
# Slurm states of a job that may still produce a result. PREEMPTED is not one: a preempted job
# that is requeued shows PENDING again; one that stays PREEMPTED was cancelled by preemption.
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING",
          "CONFIGURING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "READY"}
OUTPUTS = (identity.RESULT, identity.FINAL, identity.CHECKPOINT, identity.MASK, identity.METRICS,
           identity.ERROR, identity.REWIND)


def combine(found: Inspection, slurm_state: str = "", parent: str = "done",
            job: str | None = None) -> tuple[str, str]:
    """(state, detail) of one run: its folder, its Slurm job's state ('' when unknown) and its
    parent's state (decided first)."""
    where = f"job {job} {slurm_state}" if job and slurm_state else (f"job {job}" if job else "")
    if found.state == "done":
        return "done", where
    owner = found.owner
    # A lease of the run's own job that Slurm says has ended is dead (node crash, OOM kill).
    dead_job = bool(owner and job and owner.get("slurm_job_id") == job
                    and slurm_state and slurm_state not in ACTIVE)
    if lease_live(owner) and not dead_job:
        age = time.time() - float(owner.get("heartbeat", time.time()))
        job_text = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
        return "running", f"{owner.get('host')} pid {owner.get('pid')}{job_text}, heartbeat {age:.0f} s ago"
    if slurm_state in ACTIVE:
        return ("running" if slurm_state == "RUNNING" else "pending"), where
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
    sacct = job_states(wanted) if slurm else {}
    out: dict[str, tuple[str, str]] = {}
    for run in plan.all_runs():  # stage order: a parent is always decided before its children
        job = jobs.get(run.key, {}).get("job_id")
        parent = out.get(run.parent, ("done", ""))[0] if run.parent else "done"
        out[run.key] = combine(found[run.key], sacct.get(job, "") if job else "", parent, job)
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

def select(plan: Plan, states: dict, only_failed: bool = False) -> tuple[list[Run], list[Run]]:
    """(runs to submit, done runs among them whose outputs must be set aside first).

    A run is submitted when it is not done and nothing runs it (with ``only_failed``: when it
    failed or is corrupt); every run below a submitted one is submitted with it (its parent
    is being redone, so its old outputs would no longer follow from the parent's)."""
    chosen: set[str] = set()
    for run in plan.all_runs():
        state = states[run.key][0]
        pick = state in ("failed", "corrupt") if only_failed else state not in ("done",) + LIVE
        if pick or (run.parent in chosen and state not in LIVE):
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
    return _read_json(manifest_path(plan)) or {"cells": {}, "submissions": []}


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a broken manifest only loses job states
    return doc if isinstance(doc, dict) else None


def all_jobs(root: Path) -> dict[str, dict]:
    """{run key: {job_id, grid, submitted}}: the latest submission of each run by ANY grid
    under ``root`` (every manifest is read)."""
    out: dict[str, dict] = {}
    folder = Path(root) / "_grids"
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        doc = _read_json(path) or {}
        cells = doc.get("cells") if isinstance(doc.get("cells"), dict) else {}
        for key, entry in cells.items():
            if isinstance(entry, dict) and entry.get("job_id"):
                when = float(entry.get("submitted_at", 0) or 0)
                if key not in out or when >= out[key]["submitted"]:
                    out[key] = {"job_id": str(entry["job_id"]), "grid": path.stem, "submitted": when}
    return out


def record(plan: Plan, manifest: dict, submission: dict, job_ids: dict[str, str | None]) -> Path:
    """Add one submission (its arrays and the job id of every run) to the manifest."""
    manifest = {**manifest, "grid": str(plan.path.resolve()), "name": plan.name, "root": str(plan.root)}
    manifest.setdefault("cells", {})
    for run in plan.all_runs():
        entry = manifest["cells"].setdefault(run.key, {})
        entry.update(stage=run.stage, parent=run.parent, label=run.label)
        if run.key in job_ids:
            entry.update(job_id=job_ids[run.key], executor=submission["executor"],
                         submitted_at=submission.get("at", time.time()))
    manifest["submissions"] = manifest.get("submissions", []) + [submission]
    path = manifest_path(plan)
    write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def error_line(run_dir: Path) -> str:
    found = inspect(run_dir)
    if found.state in ("failed", "corrupt"):
        return found.detail
    return f"no {identity.ERROR} (killed? see the job's log)"
