"""``python launch/grid.py GRID.yml``: expand a grid, skip what is done, submit the rest.

Every cell is expanded and validated before anything is submitted. The pretrain -> prune ->
finetune DAG goes to Slurm as one job array per stage (launch/submit.py says why the arrays
are chained with afterany) and the command returns at once, leaving a manifest
(``<root>/_grids/<name>.json``). ``--local`` runs the DAG on this machine, ``--debug``
in this process; both block. ``--status`` reads the run folders plus sacct. Exit status: 0,
1 when a run failed or is blocked (after ``--wait``, ``--local`` or ``--debug``), 2 for a
bad grid or command line (one line on stderr, nothing submitted).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/grid.py`: make `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bip.config import names  # noqa: E402
from bip.config import OneLineParser  # noqa: E402
from bip.errors import BipError  # noqa: E402
from bip.config.names import check_root  # noqa: E402
from launch import manifest as manifests, profiles, snapshot, submit, sweep  # noqa: E402
from launch import status as run_status  # noqa: E402


def argument_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="grid.py", description="Run a grid of bip runs (pretrain -> prune -> finetune) "
                "on Slurm (default), this machine (--local) or in this process (--debug).")
    p.add_argument("grid", help="grid file, e.g. configs/grids/demo.yml")
    p.add_argument("--root", help="run root (default: the grid's root:, else ./runs)")
    p.add_argument("--profile", help="Slurm profile name (slurm/profiles/NAME.yaml) or file")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run on this machine (blocks)")
    where.add_argument("--debug", action="store_true", help="run in this process, one at a time")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    what.add_argument("--status", action="store_true", help="runs by state (folders + sacct)")
    p.add_argument("--only-failed", action="store_true", help="resubmit failed runs (and what they block)")
    p.add_argument("--wait", action="store_true", help="block until the submitted jobs end")
    p.add_argument("--hold", action="store_true", help="submit held (release: scontrol release ID)")
    p.add_argument("--jobs", type=int, default=0,
                   help="--local: runs at a time (default: CPUs / the profile's cpus_per_task)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argument_parser().parse_args(argv))
    except sweep.GridProblems as err:  # one line per problem
        sys.stdout.flush()  # after the plan a dry run printed
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except BipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    executor = "debug" if args.debug else "local" if args.local else "slurm"
    if args.hold and (args.wait or executor != "slurm"):
        raise BipError("--hold submits held Slurm jobs: not with --wait, --local or --debug")
    plan = sweep.load_grid(args.grid, args.root, args.profile, keep_going=True)
    resources = stage_resources(plan, args.profile, executor)
    # A dry run validates every cell as a submission would, shows the plan of the cells that
    # are fine, then every problem; anything else refuses before it looks at a run folder.
    problems = list(dict.fromkeys(list(plan.problems) + ([] if args.status else check_names(plan))))
    if problems and not (args.dry_run or args.status):
        raise sweep.GridProblems(problems)
    manifest = manifests.read_manifest(plan)
    # Jobs of EVERY grid under the root: a run another grid queued is live for this one too.
    jobs = manifests.all_jobs(plan.root)
    states = run_status.run_states(plan, slurm=shutil.which("sacct") is not None, jobs=jobs)
    if args.status:
        print_status(plan, states)
        if problems:
            raise sweep.GridProblems(problems)
        return 0
    check_root("root", plan.root)  # writable: every run folder goes under it
    runs, stale = run_status.select(plan, states, args.only_failed)
    live = {key: jobs[key]["job_id"] for key, (s, _) in states.items() if s in run_status.LIVE and key in jobs}
    unsure = {key: jobs[key]["job_id"] for key, (s, _) in states.items() if s in run_status.UNSURE and key in jobs}
    runs, held = hold_back(plan, runs, states, live)
    print_plan(plan, states, runs, resources, executor, live)
    if unsure:
        print(f"{len(unsure)} run(s) unknown ({states[next(iter(unsure))][1]}): not submitted again, "
              "nor their children; --status asks Slurm again")
    for run_, parent in held[:5]:
        why = "its job's state is unknown" if states[parent][0] in run_status.UNSURE else "runs outside Slurm"
        print(f"held back {run_.key}: its parent {parent} {why} ({states[parent][1]}); "
              "submit again once it is done")
    if args.dry_run:
        print("dry run: nothing submitted" + (f"; {len(problems)} problem(s) to fix first" if problems else ""))
        if problems:
            raise sweep.GridProblems(problems)
        return 0
    if not runs:
        print("nothing to submit" + (f"; {len(live)} run(s) still queued or running" if live else ""))
        if args.wait and (live or unsure):
            submit.wait_slurm(sorted(set(live.values()) | set(unsure.values())))
        return finish(plan, wait=args.wait or executor != "slurm")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise BipError("sbatch not found: this is not a Slurm login node (use --local or --debug)")
    for run_ in stale:
        moved = run_status.supersede(plan.dir(run_))
        print(f"redo {run_.key}: its parent is redone; old outputs moved to {moved}")
    code = snapshot.take(plan.root) if executor != "debug" else {"id": None, **snapshot.git_state()}
    submission = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "at": time.time(), "executor": executor,
                  "profile": args.profile or plan.profile, "runs": len(runs), "only_failed": args.only_failed,
                  "code": {k: code.get(k) for k in ("id", "git_sha", "git_dirty", "path")}}
    manifests.write_configs(plan, runs, submission)
    if executor == "slurm":
        return submit_to_slurm(plan, manifest, runs, resources, submission, live, code, args, unsure)
    manifests.record(plan, manifest, submission, {run_.key: None for run_ in runs})
    if executor == "local":
        workers, threads = submit.local_jobs(resources)
        submit.run_local(plan, runs, resources, args.jobs or workers, threads, code)
    else:
        submit.run_debug(plan, runs)
    return finish(plan, wait=True)


def hold_back(plan, runs, states, live) -> tuple[list, list]:
    """Runs whose parent is live without a Slurm job (a hand-started or --local trainer holds
    its lease) cannot depend on it, nor those whose parent's job state is unknown (sacct
    failed): they are left for the next submission."""
    held: dict[str, str] = {}  # run key -> the live parent it waits for
    for run in runs:  # stage order: parents first
        if run.parent in held:
            held[run.key] = held[run.parent]
        elif run.parent and (states[run.parent][0] in run_status.UNSURE or
                             states[run.parent][0] in run_status.LIVE and run.parent not in live):
            held[run.key] = run.parent
    return [r for r in runs if r.key not in held], [(r, held[r.key]) for r in runs if r.key in held]


def submit_to_slurm(plan, manifest, runs, resources, submission, live, code, args, unsure) -> int:
    saved = dict(os.environ)
    # Jobs import the code snapshot (and sbatch exports this environment to them).
    os.environ.update(snapshot.job_environment(os.environ, code["path"]))
    try:
        job_ids, arrays, error = submit.submit_slurm(plan, runs, resources, live, hold=args.hold, code=code)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    submission["arrays"] = arrays
    path = manifests.record(plan, manifest, submission, job_ids)
    for array in arrays:
        after = f", {array['dependency']}" if array["dependency"] else ""
        print(f"submitted {array['stage']}: job {array['job_id']} ({array['tasks']} run(s){after})")
    print(f"{len(arrays)} sbatch call(s); code {code['id']} (git {str(code.get('git_sha'))[:10]}"
          f"{', dirty' if code.get('git_dirty') else ''}); manifest: {path}")
    if error:
        raise BipError(error)
    if not args.wait:
        return 0
    submit.wait_slurm(sorted(set(job_ids.values()) | set(live.values()) | set(unsure.values())))
    return finish(plan, wait=True)


def finish(plan: sweep.Plan, wait: bool) -> int:
    """After the runs ended: status summary, results index, exit status."""
    if not wait:
        return 0
    states = run_status.run_states(plan, slurm=shutil.which("sacct") is not None)
    print_status(plan, states)
    from launch.collect import collect
    print(f"index: {collect(plan.root)}")
    # unknown: the jobs' end could not be confirmed (sacct failed), so neither can success.
    bad = [key for key, (s, _) in states.items() if s in ("failed", "blocked", "corrupt", "unknown")]
    return 1 if bad else 0


def stage_resources(plan: sweep.Plan, profile: str | None, executor: str) -> dict:
    name = profile or plan.profile
    if not name and executor == "slurm":
        raise BipError(f"grid {plan.name}: no Slurm profile; add `profile:` to the grid or pass --profile")
    base = profiles.load_profile(name) if name else {}
    out = {stage: profiles.resolve(base, plan.resources[stage], f"grid {plan.name}: {stage} resources")
           for stage in plan.runs}
    for stage, p in out.items():
        if executor == "local" and p["nodes"] > 1:
            raise BipError(f"grid {plan.name}: {stage} asks for {p['nodes']} nodes; --local runs on one")
    return out


def check_names(plan: sweep.Plan) -> list[str]:
    """Unknown arch or dataset names fail here, not in a thousand jobs (one problem each).
    Built-in names are checked against bip.config.names (no torch import); only a zoo arch
    (tv:, timm:) asks bip.models, which imports torch and the zoo."""
    problems = []
    for arch, dataset in sorted({(r.cfg.model.arch, r.cfg.data.dataset) for r in plan.all_runs()}):
        try:
            names.check_arch(arch)
            names.check_dataset(dataset)
            if arch.startswith(names.ZOO_PREFIXES):
                from bip.models import model_builder
                model_builder(arch)
        except BipError as err:
            problems.append(f"grid {plan.name}: {err}")
    # A zoo model's prune.skip spelling is only checkable on the built model (bip.config.names).
    zoo = {(r.cfg.model, r.cfg.prune.layer_type, r.cfg.prune.skip) for r in plan.all_runs()
           if r.cfg.prune.skip and r.stage == "prune" and r.cfg.model.arch.startswith(names.ZOO_PREFIXES)}
    for model, layer_type, skip in sorted(zoo, key=repr):
        from bip.models import check_skip
        try:
            check_skip(model, layer_type, skip)
        except BipError as err:
            problems.append(f"grid {plan.name}: {model.arch}: {err}")
    return problems


def print_plan(plan, states, runs, resources, executor, live) -> None:
    chosen = {run.key for run in runs}
    print(f"grid {plan.name} ({plan.path}): {plan.cells} cells, {len(plan.all_runs())} runs "
          f"under {plan.root}, executor {executor}")
    print(f"{'stage':9s} {'runs':>6s} {'done':>6s} {'live':>6s} {'failed':>6s} {'submit':>6s}  resources")
    for stage, stage_runs in plan.runs.items():
        got = [states[run.key][0] for run in stage_runs]
        print(f"{stage:9s} {len(stage_runs):6d} {got.count('done'):6d} "
              f"{got.count('running') + got.count('pending'):6d} {got.count('failed'):6d} "
              f"{sum(run.key in chosen for run in stage_runs):6d}  {profiles.describe(resources[stage])}")
    if executor == "slurm" and runs:
        calls = submit.sbatch_calls(submit.plan_arrays(plan, runs, live), submit.max_array_size())
        print(f"sbatch calls: {sum(calls.values())} (" + ", ".join(f"{k} {v}" for k, v in calls.items())
              + f"; one array per parent up to {submit.MAX_ARRAYS} per stage, see launch/submit.py)")


def print_status(plan: sweep.Plan, states: dict, limit: int = 20) -> None:
    print(f"grid {plan.name}: {len(plan.all_runs())} runs under {plan.root}")
    print(f"{'stage':9s} " + " ".join(f"{s:>7s}" for s in run_status.STATES))
    for stage, stage_runs in plan.runs.items():
        got = [states[run.key][0] for run in stage_runs]
        print(f"{stage:9s} " + " ".join(f"{got.count(s):7d}" for s in run_status.STATES))
    for kind in ("unknown", "failed", "corrupt", "blocked"):
        rows = [run for run in plan.all_runs() if states[run.key][0] == kind]
        if rows:
            print(f"{kind}:")
        for run in rows[:limit]:
            detail = states[run.key][1]
            print(f"  {run.key}  [{run.label}]  " + (f"unknown ({detail})" if kind == "unknown" else detail))
        if len(rows) > limit:
            print(f"  ... and {len(rows) - limit} more")
    changed = run_status.code_changes(plan)
    if changed:
        print("resumed under other code than they started with:")
    for key, shas in changed[:limit]:
        print(f"  {key}  {' -> '.join(shas)}")


if __name__ == "__main__":
    sys.exit(main())
