"""The three executors of a plan: Slurm (job arrays chained by per-parent dependencies), local
(long-lived worker processes on this machine, each run started once its parent finished) and
debug (in-process, one at a time). All of them run ``launch.job.TrainJob``.

Slurm: which array a task goes into, and what it waits for (``plan_arrays``):
- Per stage, runs are grouped by the parent they wait for: a parent submitted now, or one that
  a job of ANY grid still queues or runs (a run whose parent is done waits for nothing).
- Up to ``MAX_ARRAYS`` (64) groups: one array per group, depending on that parent's task only
  (``afterany:<job>_<task>``), so a task waits only for its own parent.
- More groups: the children of the tasks of one earlier array (one pretrain's prunes, say)
  form one array that waits for that array, i.e. for its parents' siblings too; beyond 64 of
  those, consecutive groups are merged until 64 remain, each waiting for the union.
- An array longer than Slurm's MaxArraySize is split, one sbatch per piece.
So a stage costs at most 64 sbatch calls (plus MaxArraySize splits), however many parents it has.

Dependencies are ``afterany``, not ``afterok``: with afterok a single failed parent would leave
its children PENDING forever (DependencyNeverSatisfied; only clusters with kill_invalid_depend
cancel them). With afterany each task checks its parent's published result when it starts and
ends at once as blocked (FAILED in Slurm, config only in its folder) when the parent did not
finish. Jobs run from a snapshot of the code taken at submission (launch/snapshot.py).
"""
from __future__ import annotations

import json
import os
import re
import select as select_module
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from launch import profiles, snapshot
from launch.job import TrainJob
from launch.slurm import ACTIVE, UNKNOWN, job_states
from launch.status import error_line
from launch.sweep import Plan, Run
from bip.errors import BipError
from bip.rundir.folder import inspect

Log = Callable[[str], None]
MAX_ARRAYS = 64  # arrays (sbatch calls, before MaxArraySize splits) per stage


def _say(text: str) -> None:
    print(text, flush=True)


def _parent_dir(plan: Plan, run: Run) -> str | None:
    return str(plan.dir(run.parent)) if run.parent else None


# -- Slurm -----------------------------------------------------------------------------------

@dataclass
class ArraySpec:
    """One job array: its runs and what it waits for: ("run", key) = that run's task,
    ("array", i) = every task of the i-th planned array, ("job", id) = a job id."""
    stage: str
    runs: list = field(default_factory=list)
    after: set = field(default_factory=set)


def plan_arrays(plan: Plan, runs: list[Run], known_jobs: dict[str, str],
                limit: int = MAX_ARRAYS) -> list[ArraySpec]:
    """The arrays ``runs`` are submitted as (the rule is in the module docstring). ``known_jobs``
    maps runs that earlier submissions still queue or run to their job ids."""
    chosen = {run.key for run in runs}
    planned: dict[str, int] = {}  # run key -> index of its array
    specs: list[ArraySpec] = []
    for stage, level in _levels(plan, runs):
        groups: dict = {}
        for run in level:
            waits = run.parent if run.parent in chosen or run.parent in known_jobs else None
            spec = groups.setdefault(waits, ArraySpec(stage, after={("run", waits)} if waits else set()))
            spec.runs.append(run)
        specs_now = list(groups.values())
        if len(specs_now) > limit:  # by the parent's array
            by_array: dict = {}
            for parent, spec in groups.items():
                ref = None if parent is None else ("array", planned[parent]) if parent in planned \
                    else ("job", known_jobs[parent].split("_")[0])
                merged = by_array.setdefault(ref, ArraySpec(stage, after={ref} if ref else set()))
                merged.runs += spec.runs
            specs_now = list(by_array.values())
        if len(specs_now) > limit:  # consecutive groups share an array
            size = -(-len(specs_now) // limit)
            specs_now = [ArraySpec(stage, [r for s in specs_now[i:i + size] for r in s.runs],
                                   set().union(*(s.after for s in specs_now[i:i + size])))
                         for i in range(0, len(specs_now), size)]
        for spec in specs_now:
            planned.update({run.key: len(specs) for run in spec.runs})
            specs.append(spec)
    return specs


def _levels(plan: Plan, runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """(stage, runs) in submission order: per stage, runs whose parent is in the same stage (IMP
    round r + 1 after round r) come one level after it, so every parent's array is planned
    before its children's."""
    out = []
    for stage in plan.runs:
        mine = [r for r in runs if r.stage == stage]
        keys = {r.key for r in mine}
        depth: dict[str, int] = {}
        for run in mine:  # parents before children (launch.sweep's order)
            depth[run.key] = depth.get(run.parent, -1) + 1 if run.parent in keys else 0
        for d in range(max(depth.values(), default=-1) + 1):
            out.append((stage, [r for r in mine if depth[r.key] == d]))
    return out


def sbatch_calls(specs: list[ArraySpec], max_array: int) -> dict[str, int]:
    """sbatch calls per stage for these arrays (MaxArraySize splits included)."""
    out: dict[str, int] = {}
    for spec in specs:
        out[spec.stage] = out.get(spec.stage, 0) + -(-len(spec.runs) // max_array)
    return out


def submit_slurm(plan: Plan, runs: list[Run], resources: dict, known_jobs: dict[str, str],
                 hold: bool = False, code: dict | None = None,
                 ) -> tuple[dict[str, str], list[dict], str | None]:
    """Submit ``runs`` as the arrays of plan_arrays. Returns ({run key: job id}, [array
    records], error or None): on an sbatch error the arrays submitted so far are returned with
    the message, so the manifest can still record them."""
    import submitit
    job_ids: dict[str, str] = {}
    array_ids: dict[int, list[str]] = {}
    arrays: list[dict] = []
    limit = max_array_size()
    executors = {}
    for index, spec in enumerate(plan_arrays(plan, runs, known_jobs)):
        p = resources[spec.stage]
        if spec.stage not in executors:
            python = " ".join(map(shlex.quote, snapshot.python_command()))
            executor = submitit.SlurmExecutor(folder=plan.root / "_slurm" / "%j",
                                              max_num_timeout=p["max_requeues"], python=python)
            executors[spec.stage] = executor
        executor = executors[spec.stage]
        waits = sorted({job for kind, ref in spec.after
                        for job in ([job_ids.get(ref) or known_jobs[ref]] if kind == "run"
                                    else array_ids[ref] if kind == "array" else [ref])})
        dependency = "afterany:" + ":".join(waits) if waits else None
        executor.update_parameters(**profiles.slurm_parameters(p), job_name=f"bip-{plan.name}-{spec.stage}",
                                   dependency=dependency,
                                   additional_parameters={"hold": True} if hold else None)
        for start in range(0, len(spec.runs), limit):  # MaxArraySize splits
            chunk = spec.runs[start:start + limit]
            try:
                with executor.batch():
                    jobs = [executor.submit(TrainJob(p["max_requeues"]), run.cfg.to_dict(),
                                            str(plan.dir(run)), _parent_dir(plan, run), run.export)
                            for run in chunk]
            except Exception as err:  # sbatch refused: report it with what did get submitted
                lines = [line for line in str(err).splitlines() if line.strip()]
                return job_ids, arrays, f"sbatch failed for stage {spec.stage}: {lines[-1] if lines else err}"
            job_ids.update({run.key: job.job_id for run, job in zip(chunk, jobs)})
            array_ids.setdefault(index, []).append(jobs[0].job_id.split("_")[0])
            arrays.append({"stage": spec.stage, "job_id": jobs[0].job_id.split("_")[0], "tasks": len(chunk),
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


def wait_slurm(job_ids: list[str], log: Log = _say, grace_s: float = 120.0,
               give_up_s: float = 3600.0) -> dict[str, str]:
    """Block until every job has ended; returns their last Slurm states. A job that neither
    sacct nor squeue lists counts as live for ``grace_s`` (both lag a fresh submission).

    While sacct fails (slurmdbd down) the jobs it cannot tell about are unknown, not ended: the
    wait goes on, asking again after 2, 4, 8 ... s (at most 10 min), and says so each time; after
    ``give_up_s`` of failures in a row it stops and returns them as launch.slurm.UNKNOWN."""
    start, last = time.time(), None
    failures, failing_since = 0, None
    while True:
        acct = job_states(job_ids)
        states = {j: acct.state(j) for j in job_ids if acct.state(j)}
        live = [j for j in job_ids
                if states.get(j) in ACTIVE or states.get(j) == UNKNOWN
                or (j not in states and time.time() - start < grace_s)]
        tally = _count(states.get(j, "UNKNOWN").upper() for j in job_ids)
        counts = " ".join(f"{s.lower()} {n}" for s, n in sorted(tally.items()))
        if counts != last:
            log(f"[{time.time() - start:6.0f} s] jobs: {counts}")
            last = counts
        if not live:
            return states
        if acct.error and any(states.get(j) == UNKNOWN for j in live):
            failures += 1
            failing_since = failing_since or time.time()
            unknown = sum(states.get(j) == UNKNOWN for j in job_ids)
            if time.time() - failing_since >= give_up_s:
                log(f"giving up: sacct has failed for {time.time() - failing_since:.0f} s ({acct.error}); "
                    f"{unknown} job(s) unknown; --status asks again")
                return states
            delay = min(2.0 * 2 ** (failures - 1), 600.0)
            log(f"sacct failed ({acct.error}): {unknown} job(s) unknown; asking again in {delay:.0f} s")
            time.sleep(delay)
            continue
        failures, failing_since = 0, None
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
                outcome[key] = "done" if inspect(plan.dir(key)).state == "done" else "failed"
                why = f": {error_line(plan.dir(key))}" if outcome[key] == "failed" else ""
                log(f"{outcome[key]:7s} {key}{why}")
        for run in list(todo):
            if len(live) >= workers:
                break
            if run.parent in chosen and run.parent not in outcome:
                continue  # its parent has not finished yet
            todo.remove(run)
            if run.parent and inspect(plan.dir(run.parent)).state != "done":
                outcome[run.key] = "blocked"
                log(f"blocked {run.key} (parent {run.parent} did not finish)")
                continue
            log(f"start   {run.key}  [{run.label}]")
            live[run.key] = start(run)
        if live:
            time.sleep(0.2)
    return outcome


class _Worker:
    """A long-lived ``python -m launch.worker`` that trains one run after another: python, torch
    and the CUDA/accelerate set-up start once per worker, not once per run."""

    def __init__(self, env: dict, threads: int):
        self.proc = subprocess.Popen([*snapshot.python_command(), "-m", "launch.worker", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.busy = False

    def submit(self, task: dict) -> "_Worker":
        self.busy = True
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        return self

    def done(self) -> bool:
        if not self.busy:
            return True
        if self.proc.poll() is not None:  # the worker died (killed): the run's folder tells
            self.busy = False
            return True
        ready, _, _ = select_module.select([self.proc.stdout], [], [], 0)
        if ready:
            self.proc.stdout.readline()
            self.busy = False
        return not self.busy

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def local_jobs(resources: dict) -> tuple[int, int]:
    """(runs at a time, threads per run) for --local: every CPU busy, cpus_per_task each."""
    threads = max(p["cpus_per_task"] for p in resources.values())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // threads), threads


def local_log_dir(root: Path) -> Path:
    """A new ``<root>/_local/<time>-<pid>[-n]/`` for one --local launcher's logs, created
    exclusively: two launchers started in the same second (or a pid reused within it) never
    share a folder, so neither overwrites the other's logs of a run with the same name."""
    base = root / "_local"
    base.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for n in range(1000):
        folder = base / (stem if n == 0 else f"{stem}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise BipError(f"{base}: 1000 log folders named {stem}-* exist already")


def run_local(plan: Plan, runs: list[Run], resources: dict, workers: int, threads: int,
              code: dict | None = None, log: Log = _say) -> dict[str, str]:
    """Runs of one process in a pool of worker processes (one run each at a time, ``threads``
    torch threads); runs of several tasks (DDP) through submitit's LocalExecutor."""
    env = snapshot.job_environment({**os.environ, "OMP_NUM_THREADS": str(threads),
                                    "MKL_NUM_THREADS": str(threads)}, (code or {}).get("path"))
    logs = local_log_dir(plan.root)
    single = sum(resources[run.stage]["tasks_per_node"] * resources[run.stage]["nodes"] == 1 for run in runs)
    # Started now, so their interpreter and torch start-up overlaps the first run (the DAG's
    # root often runs alone: its children start the moment it ends).
    pool: list[_Worker] = [_Worker(env, threads) for _ in range(min(workers, single))]
    submitted = []

    def start(run: Run):
        p = resources[run.stage]
        if p["tasks_per_node"] * p["nodes"] > 1:
            return _start_ddp(plan, run, p, env, submitted)
        worker = next((w for w in pool if not w.busy and w.proc.poll() is None), None)
        if worker is None:
            worker = _Worker(env, threads)
            pool.append(worker)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", run.key)
        return worker.submit({"config": run.cfg.to_dict(), "run_dir": str(plan.dir(run)),
                              "parent_dir": _parent_dir(plan, run), "export": run.export,
                              "log": str(logs / f"{name}.log")})
    try:
        log(f"local: {workers} run(s) at a time, {threads} thread(s) each; logs in {logs}")
        return run_dag(plan, runs, start, workers, log)
    except KeyboardInterrupt:  # stop what this command started; the runs resume next time
        for worker in pool:
            worker.proc.terminate()  # SIGTERM: the run checkpoints at its next step and exits
        for job in submitted:
            if not job.done():
                job.cancel()
        raise
    finally:
        for worker in pool:
            worker.close()


def _start_ddp(plan: Plan, run: Run, p: dict, env: dict, submitted: list):
    import submitit
    executor = submitit.LocalExecutor(folder=plan.root / "_local" / "%j",
                                      python=" ".join(map(shlex.quote, snapshot.python_command())))
    # No walltime on this machine: a month, so submitit's timeout signal never fires.
    executor.update_parameters(timeout_min=60 * 24 * 30, tasks_per_node=p["tasks_per_node"],
                               gpus_per_node=p["gpus_per_node"], signal_delay_s=p["signal_delay_s"])
    saved = dict(os.environ)
    os.environ.update(env)  # LocalExecutor starts its process with this environment
    try:
        submitted.append(executor.submit(TrainJob(p["max_requeues"]), run.cfg.to_dict(), str(plan.dir(run)),
                                         _parent_dir(plan, run), run.export))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return submitted[-1]


def run_debug(plan: Plan, runs: list[Run], log: Log = _say) -> dict[str, str]:
    """In-process and one at a time: breakpoints work, tracebacks print here."""
    def start(run: Run) -> _Done:
        try:
            TrainJob()(run.cfg.to_dict(), str(plan.dir(run)), _parent_dir(plan, run), run.export)
        except Exception:  # the run's folder has error.json; show why and go on with the grid
            print(traceback.format_exc(limit=3), file=sys.stderr, flush=True)
        return _Done()
    return run_dag(plan, runs, start, workers=1, log=log)
