"""The three executors of a plan: Slurm (one job array per stage, chained by dependencies), local
(subprocesses on this machine, started as their parents finish) and debug (in-process, one at a
time). All of them run ``launch.job.TrainJob`` on the runs they are given.

Slurm dependencies are ``afterany`` on the whole previous array, not ``afterok``: with afterok a
single failed pretrain would leave every prune task of the grid PENDING forever
(DependencyNeverSatisfied; only clusters with kill_invalid_depend cancel them). With afterany
each task checks its own parent's result.json when it starts and ends at once as blocked
(FAILED in Slurm, config only in its folder) when the parent did not finish. Per-task
dependencies would need one sbatch per parent (Slurm's aftercorr pairs task i with task i,
which a pretrain shared by many prune cells cannot satisfy).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from launch import profiles
from launch.job import TrainJob
from launch.state import ACTIVE, error_line, file_state, job_states
from launch.sweep import Plan, Run

Log = Callable[[str], None]


def _say(text: str) -> None:
    print(text, flush=True)


def _parent_dir(plan: Plan, run: Run) -> str | None:
    return str(plan.dir(run.parent)) if run.parent else None


# -- Slurm -----------------------------------------------------------------------------------

def submit_slurm(plan: Plan, runs: list[Run], resources: dict, known_jobs: dict[str, str],
                 hold: bool = False) -> tuple[dict[str, str], list[dict], str | None]:
    """Submit ``runs`` as one array per stage. ``known_jobs`` maps runs already queued or
    running (earlier submissions) to their job ids, so that their children wait for them.
    Returns ({run key: job id}, [array records], error or None): on an sbatch error the stages
    submitted so far are returned with the message, so the manifest can still record them."""
    import submitit
    job_ids: dict[str, str] = {}
    arrays: list[dict] = []
    limit = max_array_size()
    for stage in plan.runs:
        batch = [run for run in runs if run.stage == stage]
        if not batch:
            continue
        p = resources[stage]
        waits = sorted({(job_ids.get(run.parent) or known_jobs.get(run.parent)).split("_")[0]
                        for run in batch if run.parent in job_ids or run.parent in known_jobs})
        dependency = "afterany:" + ":".join(waits) if waits else None
        executor = submitit.SlurmExecutor(folder=plan.root / "_slurm" / "%j",
                                          max_num_timeout=p["max_requeues"])
        executor.update_parameters(**profiles.slurm_parameters(p), job_name=f"bip-{plan.name}-{stage}",
                                   dependency=dependency,
                                   additional_parameters={"hold": True} if hold else None)
        for start in range(0, len(batch), limit):  # one sbatch per stage unless MaxArraySize splits it
            chunk = batch[start:start + limit]
            try:
                with executor.batch():
                    jobs = [executor.submit(TrainJob(p["max_requeues"]), run.cfg.to_dict(),
                                            str(plan.dir(run)), _parent_dir(plan, run), run.export)
                            for run in chunk]
            except Exception as err:  # sbatch refused: report it with what did get submitted
                lines = [line for line in str(err).splitlines() if line.strip()]
                return job_ids, arrays, f"sbatch failed for stage {stage}: {lines[-1] if lines else err}"
            job_ids.update({run.key: job.job_id for run, job in zip(chunk, jobs)})
            arrays.append({"stage": stage, "job_id": jobs[0].job_id.split("_")[0], "tasks": len(chunk),
                           "dependency": dependency, "resources": profiles.describe(p)})
    return job_ids, arrays, None


def max_array_size() -> int:
    """Slurm's MaxArraySize (task ids must stay below it); 1001 when scontrol does not say."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=30).stdout
        match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
        return max(1, int(match.group(1))) if match else 1001
    except (OSError, subprocess.SubprocessError):
        return 1001


def wait_slurm(job_ids: list[str], log: Log = _say, grace_s: float = 120.0) -> dict[str, str]:
    """Block until every job has ended; returns their last Slurm states. A job that neither
    sacct nor squeue lists counts as live for ``grace_s`` (both lag a fresh submission)."""
    start, last = time.time(), None
    while True:
        states = job_states(job_ids)
        live = [j for j in job_ids
                if states.get(j) in ACTIVE or (j not in states and time.time() - start < grace_s)]
        tally = _count(states.get(j, "UNKNOWN") for j in job_ids)
        counts = " ".join(f"{s.lower()} {n}" for s, n in sorted(tally.items()))
        if counts != last:
            log(f"[{time.time() - start:6.0f} s] jobs: {counts}")
            last = counts
        if not live:
            return states
        time.sleep(min(2 + (time.time() - start) / 30, 15))


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


# -- this machine ----------------------------------------------------------------------------

class _Done:
    """Handle of a run that has already finished (debug executor, blocked runs)."""

    def done(self) -> bool:
        return True


def run_dag(plan: Plan, runs: list[Run], start: Callable[[Run], object], workers: int,
            log: Log = _say) -> dict[str, str]:
    """Start each run once its parent has a result (at most ``workers`` at a time); a run whose
    parent failed is blocked. Returns {run key: done | failed | blocked}."""
    todo, live, outcome = list(runs), {}, {}
    chosen = {run.key for run in runs}
    while todo or live:
        for key, handle in list(live.items()):
            if handle.done():
                del live[key]
                outcome[key] = "done" if file_state(plan.dir(key)) == "done" else "failed"
                why = f": {error_line(plan.dir(key))}" if outcome[key] == "failed" else ""
                log(f"{outcome[key]:7s} {key}{why}")
        for run in list(todo):
            if len(live) >= workers:
                break
            if run.parent in chosen and run.parent not in outcome:
                continue  # its parent has not finished yet
            todo.remove(run)
            if run.parent and file_state(plan.dir(run.parent)) != "done":
                outcome[run.key] = "blocked"
                log(f"blocked {run.key} (parent {run.parent} did not finish)")
                continue
            log(f"start   {run.key}  [{run.label}]")
            live[run.key] = start(run)
        if live:
            time.sleep(0.5)
    return outcome


def run_local(plan: Plan, runs: list[Run], resources: dict, workers: int, log: Log = _say) -> dict[str, str]:
    """Subprocesses through submitit's LocalExecutor (one node; tasks_per_node > 1 runs DDP)."""
    import submitit
    executors = {}
    for stage in plan.runs:
        p = resources[stage]
        executor = submitit.LocalExecutor(folder=plan.root / "_local" / "%j")
        # No walltime on this machine: a month, so submitit's timeout signal never fires.
        executor.update_parameters(timeout_min=60 * 24 * 30, tasks_per_node=p["tasks_per_node"],
                                   gpus_per_node=p["gpus_per_node"], signal_delay_s=p["signal_delay_s"])
        executors[stage] = executor

    jobs = []

    def start(run: Run):
        job = TrainJob(resources[run.stage]["max_requeues"])
        jobs.append(executors[run.stage].submit(job, run.cfg.to_dict(), str(plan.dir(run)),
                                                _parent_dir(plan, run), run.export))
        return jobs[-1]
    try:
        return run_dag(plan, runs, start, workers, log)
    except KeyboardInterrupt:  # stop what this command started; the runs resume next time
        for job in jobs:
            if not job.done():
                job.cancel()
        raise


def run_debug(plan: Plan, runs: list[Run], log: Log = _say) -> dict[str, str]:
    """In-process and one at a time: breakpoints work, tracebacks print here."""
    def start(run: Run) -> _Done:
        try:
            TrainJob()(run.cfg.to_dict(), str(plan.dir(run)), _parent_dir(plan, run), run.export)
        except Exception:  # the run's folder has error.json; show why and go on with the grid
            print(traceback.format_exc(limit=3), file=sys.stderr, flush=True)
        return _Done()
    return run_dag(plan, runs, start, workers=1, log=log)


def repo_on_pythonpath(env: dict) -> None:
    """Jobs unpickle ``launch.job.TrainJob``: make this checkout importable in them even when the
    editable install predates ``launch/``."""
    repo = str(Path(__file__).resolve().parents[1])
    parts = [p for p in env.get("PYTHONPATH", "").split(":") if p]
    if repo not in parts:
        env["PYTHONPATH"] = ":".join([repo] + parts)
