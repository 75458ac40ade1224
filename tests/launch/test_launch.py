"""The launcher without Slurm: grid validation, expansion and the stage DAG, skipping done runs,
--dry-run, and whole grids run in-process (--debug) and as subprocesses (--local)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bip.config import identity
from bip.rundir import folder as runfolder
from launch import grid, profiles, snapshot, submit, sweep, slurm, status

REPO = Path(__file__).resolve().parents[2]
# A run of this size takes well under a second in-process once torch is imported.
TINY = {"dataset": "synthetic", "data.synthetic_size": 128, "data.batch_size": 32, "epochs": 1,
        "arch": "resnet20s", "data.num_workers": 0, "train.steps_per_epoch": 2}
README_K = [0.8, 0.64, 0.512, 0.41, 0.328, 0.262, 0.2097, 0.1678, 0.1342, 0.1074, 0.0859, 0.0687,
            0.055, 0.044, 0.035, 0.028, 0.0225, 0.018, 0.0144, 0.0115, 0.0092]


def write_grid(folder: Path, name: str = "g", **doc) -> Path:
    base = {"name": name, "profile": "local", "set": dict(TINY),
            "stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}},
                       "finetune": {"methods": ["hydra"]}},
            "axes": {"method": ["hydra", "omp"], "k": [0.5, 0.2], "seed": [1]}}
    base.update(doc)
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def cli(*args) -> int:
    return grid.main([str(a) for a in args])


def status_rows(out: str) -> dict[str, dict[str, int]]:
    """--status's table as {stage: {state: count}}."""
    lines = out.splitlines()
    header = lines[1].split()[1:]
    return {line.split()[0]: dict(zip(header, map(int, line.split()[1:])))
            for line in lines[2:] if line.split() and line.split()[0] in state_stages()}


def state_stages():
    return ("pretrain", "prune", "finetune")


# -- validation ------------------------------------------------------------------------------

BAD_GRIDS = {
    "unknown axis key": ({"axes": {"methd": ["bip"]}}, "unknown key 'methd' (did you mean method"),
    "empty axis": ({"axes": {"k": []}}, "non-empty list"),
    "duplicate cells": ({"axes": {"k": [0.5, 0.5]}}, "duplicate cells"),
    "unhashed duplicates": ({"axes": {"data.num_workers": [0, 2]}}, "duplicate cells"),
    "unknown profile": ({"profile": "no-such-cluster"}, "unknown Slurm profile 'no-such-cluster'"),
    "unknown grid key": ({"axis": {"k": [0.5]}}, "unknown key 'axis' (did you mean axes?)"),
    "bad value": ({"axes": {"k": [1.5]}}, "prune.k=1.5 is out of range"),
    "zip lengths": ({"zip": {"bip.gamma": [1, 10], "optim.lr": [0.1]}}, "same length"),
    "axis twice": ({"zip": {"prune.k": [0.1]}}, "prune.k is already an axis (k)"),
    "launcher key": ({"axes": {"run.stage": ["prune"]}}, "set by the launcher"),
    "bad scope": ({"axes": {"optim.lr@finetun": [0.1]}}, "@finetun is not a stage"),
    "bad resource": ({"resources": {"gpus": 1}}, "unknown profile key 'gpus' (did you mean gpus_per_node?)"),
    "finetune alone": ({"stages": {"finetune": {}}}, "needs a prune stage"),
    "placeholder": ({"stages": {"pretrain": {"configs": ["configs/{datset}/pretrain.yml"]}, "prune": {}}},
                    "placeholder {datset}"),
    "missing config": ({"stages": {"pretrain": {"configs": ["configs/{method}/x.yml"]}},
                        "axes": {"seed": [1]}},
                       "placeholder {method}"),
    "no layer type": ({"stages": {"pretrain": {}, "prune": {}}}, "needs prune.layer_type"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grids_fail_with_one_line_before_submitting(case, tmp_path, capsys):
    changes, message = BAD_GRIDS[case]
    path = write_grid(tmp_path, **changes)
    assert cli(path, "--root", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_profiles_validate_and_map_to_submitit():
    for name in ("local", "example-cluster"):
        assert set(profiles.load_profile(name)) == set(profiles.KEYS)
    two_gpus = {"gpus_per_node": 2, "tasks_per_node": 2}
    p = profiles.resolve(profiles.load_profile("example-cluster"), two_gpus, "t")
    params = profiles.slurm_parameters(p)
    assert params["gpus_per_node"] == 2 and params["ntasks_per_node"] == 2 and params["mem"] == "256GB"
    with pytest.raises(Exception, match="tasks_per_node .1. must equal gpus_per_node .2."):
        profiles.resolve(p, {"tasks_per_node": 1}, "t")


# -- expansion -------------------------------------------------------------------------------

def test_one_pretrain_per_seed_is_shared_and_finetune_follows_its_prune(tmp_path):
    plan = sweep.load_grid(write_grid(tmp_path, axes={"method": ["bip", "hydra"], "k": [0.5, 0.2, 0.1],
                                                      "seed": [1, 2]}), tmp_path)
    pretrain, prune, finetune = (plan.runs[s] for s in ("pretrain", "prune", "finetune"))
    assert (plan.cells, len(pretrain), len(prune), len(finetune)) == (12, 2, 12, 6)
    by_key = {run.key: run for run in plan.all_runs()}
    for run in prune:
        parent = by_key[run.parent]
        assert parent.stage == "pretrain" and parent.cfg.run.seed == run.cfg.run.seed
        assert run.cfg.run.parent == parent.key.split("/")[0] and run.cfg.run.result_dir == str(tmp_path)
    for run in finetune:
        parent = by_key[run.parent]
        assert (run.cfg.prune.method, run.cfg.prune.layer_type, run.cfg.prune.k) == \
               (parent.cfg.prune.method, parent.cfg.prune.layer_type, parent.cfg.prune.k) == \
               ("hydra", "unstructured", run.cfg.prune.k)
        assert run.cfg.run.stage == "finetune" and run.key.startswith("synthetic-resnet20s-finetune-hydra-")


def test_finetune_inherits_every_field_that_describes_its_mask(tmp_path):
    # A 1:4 mask finetuned under the default 2:4 would record the wrong group size (the N:M
    # export reads it), and prune settings set only on the prune stage would not describe it.
    stages = {"pretrain": {}, "finetune": {"methods": ["hydra"]},
              "prune": {"set": {"layer_type": "nm", "prune.n": 1, "prune.m": 4, "prune.skip": "first"}}}
    plan = sweep.load_grid(write_grid(tmp_path, stages=stages, axes={"method": ["hydra"], "k": [0.25],
                                                                     "seed": [1]}), tmp_path)
    (prune,), (finetune,) = plan.runs["prune"], plan.runs["finetune"]
    assert all(getattr(finetune.cfg.prune, f) == getattr(prune.cfg.prune, f) for f in sweep.MASK_FIELDS)
    assert (finetune.cfg.prune.n, finetune.cfg.prune.m, finetune.cfg.prune.skip) == (1, 4, "first")


def test_axis_scopes_keep_the_pretrain_shared(tmp_path):
    plan = sweep.load_grid(write_grid(tmp_path, axes={"k": [0.5], "optim.lr": [0.1, 0.01]}), tmp_path)
    assert len(plan.runs["pretrain"]) == 1 and len(plan.runs["prune"]) == 2
    assert {run.cfg.optim.lr for run in plan.runs["finetune"]} == {0.1}  # prune-only by default
    both = {"k": [0.5], "optim.lr@pretrain,prune": [0.1, 0.01]}
    plan = sweep.load_grid(write_grid(tmp_path, axes=both), tmp_path)
    assert len(plan.runs["pretrain"]) == 2


def test_zip_advances_together_and_crosses_the_product(tmp_path):
    zipped = {"method": ["hydra", "omp", "bip"], "k": [0.5, 0.2, 0.1]}
    plan = sweep.load_grid(write_grid(tmp_path, axes={"seed": [1, 2]}, zip=zipped), tmp_path)
    assert plan.cells == 6 and len(plan.runs["pretrain"]) == 2
    assert {(r.cfg.prune.method, r.cfg.prune.k) for r in plan.runs["prune"]} == \
           {("hydra", 0.5), ("omp", 0.2), ("bip", 0.1)}


def test_shipped_grids_reproduce_the_readme_series():
    grids = {name: sweep.load_grid(REPO / "configs" / "grids" / f"{name}.yml")
             for name in ("cifar10_unstructured", "cifar10_structured", "demo")}
    counts = {name: tuple(len(plan.runs[s]) for s in plan.runs) for name, plan in grids.items()}
    assert counts == {"cifar10_unstructured": (3, 126, 63), "cifar10_structured": (3, 108, 54),
                      "demo": (1, 12, 8)}
    unstructured = grids["cifar10_unstructured"].runs["prune"]
    assert sorted({r.cfg.prune.k for r in unstructured}, reverse=True) == README_K
    assert {(r.cfg.prune.method, r.cfg.model.arch, r.cfg.data.dataset) for r in unstructured} == \
           {("bip", "resnet18", "CIFAR10"), ("hydra", "resnet18", "CIFAR10")}
    structured = grids["cifar10_structured"].runs["prune"]
    assert {r.cfg.prune.layer_type for r in structured} == {"filter", "channel"}
    assert sorted({r.cfg.prune.k for r in structured}) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    # The two CIFAR-10 grids share their pretrains (same config -> same run ids).
    assert [r.key for r in grids["cifar10_unstructured"].runs["pretrain"]] == \
           [r.key for r in grids["cifar10_structured"].runs["pretrain"]]


# -- plans and states ------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert cli(write_grid(tmp_path), "--root", tmp_path / "runs", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "4 cells, 7 runs" in out and "nothing submitted" in out
    rows = [line.split()[:2] for line in out.splitlines()[2:5]]
    assert rows == [["pretrain", "1"], ["prune", "4"], ["finetune", "2"]]
    assert not (tmp_path / "runs").exists()


BIG_AXES = {"seed": [1, 2, 3, 4, 5], "method": ["bip", "hydra"],
            "k": [round(0.9 ** i, 5) for i in range(1, 26)], "train.epochs": [1, 2, 3, 4]}


def test_dry_run_of_1000_cells_is_fast_and_prints_its_sbatch_calls(tmp_path):
    path = write_grid(tmp_path, axes=BIG_AXES)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, REPO / "launch" / "grid.py", path, "--root", tmp_path / "runs",
                          "--dry-run"], capture_output=True, text=True, check=True).stdout
    assert time.perf_counter() - t0 < 10
    assert "1000 cells, 1505 runs" in out and not (tmp_path / "runs").exists()
    assert "sbatch calls: 11 (pretrain 1, prune 5, finetune 5;" in out


def test_each_task_waits_for_its_own_parent_in_a_bounded_number_of_arrays(tmp_path):
    plan = sweep.load_grid(write_grid(tmp_path, axes=BIG_AXES), tmp_path)
    pretrains = [run.key for run in plan.runs["pretrain"]]
    specs = submit.plan_arrays(plan, plan.all_runs(), {})
    assert [(s.stage, len(s.runs)) for s in specs][:6] == [("pretrain", 5)] + [("prune", 200)] * 5
    for spec in specs[1:6]:  # one array per pretrain: its prunes wait for that task only
        (kind, parent), = spec.after
        assert kind == "run" and {run.parent for run in spec.runs} == {parent} and parent in pretrains
    # 500 finetunes have 500 distinct parents (> 64): one array per parent ARRAY (one pretrain's prunes)
    finetunes = specs[6:]
    assert len(finetunes) == 5 and all(s.after == {("array", i + 1)} for i, s in enumerate(finetunes))
    for i, spec in enumerate(finetunes):
        assert {run.parent for run in spec.runs} <= {r.key for r in specs[i + 1].runs}
    assert submit.sbatch_calls(specs, 1001) == {"pretrain": 1, "prune": 5, "finetune": 5}
    assert submit.sbatch_calls(specs, 100) == {"pretrain": 1, "prune": 10, "finetune": 5}  # MaxArraySize
    # Past the cap twice over: consecutive groups merge, each waiting for the union.
    few = submit.plan_arrays(plan, plan.all_runs(), {}, limit=2)
    assert [s.stage for s in few] == ["pretrain", "prune", "finetune"]
    assert all(len([s for s in few if s.stage == st]) <= 2 for st in ("prune", "finetune"))
    # A parent that another submission (any grid) queued: its children wait for that job's task.
    prunes = [run for run in plan.all_runs() if run.stage != "pretrain"]
    known = {pretrains[0]: "77_3", **{p: f"78_{i}" for i, p in enumerate(pretrains[1:])}}
    specs = submit.plan_arrays(plan, prunes, known)
    assert specs[0].after == {("run", pretrains[0])} and {r.parent for r in specs[0].runs} == {pretrains[0]}


def _found(state: str, owner: dict | None = None, detail: str = "") -> runfolder.Inspection:
    return runfolder.Inspection(state, detail, frozenset(), None, None, owner)


def test_states_combine_folders_leases_and_slurm():
    combine = status.combine
    live = {"host": socket.gethostname(), "pid": os.getppid(), "heartbeat": time.time(), "stale_s": 600}
    dead = {**live, "pid": _dead_pid()}
    assert combine(_found("done"), "FAILED", "done", "1_0")[0] == "done"
    assert combine(_found("failed"), "PENDING", "done", "1_0")[0] == "pending"      # resubmitted
    assert combine(_found("started"), "RUNNING", "done", "1_0")[0] == "running"
    assert combine(_found("started", live))[0] == "running"                       # lease, no Slurm
    assert combine(_found("started", dead))[0] == "started"                       # killed
    assert combine(_found("started", {**live, "heartbeat": time.time() - 700}))[0] == "started"
    assert combine(_found("corrupt", live))[0] == "running"                       # being repaired
    assert combine(_found("corrupt"), "COMPLETED", "done", "1_0")[0] == "corrupt"
    assert combine(_found("waiting"), "FAILED", "failed", "1_0")[0] == "blocked"
    assert combine(_found("waiting"), "", "corrupt", None)[0] == "blocked"
    assert combine(_found("started"), "TIMEOUT", "done", "1_0")[0] == "failed"     # killed, no error.json
    # Preempted and not requeued (clusters with PreemptMode=CANCEL): over, resubmittable.
    assert combine(_found("started"), "PREEMPTED", "done", "1_0")[0] == "failed"
    assert combine(_found("started"), "COMPLETED", "done", "1_0")[0] == "started"  # result.json deleted
    assert combine(_found("waiting"), "", "done", None)[0] == "waiting"


def test_sacct_array_ids_expand():
    assert slurm.expand_job_id("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert slurm.expand_job_id("12_3") == ["12_3"] and slurm.expand_job_id("7") == ["7"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- whole grids -----------------------------------------------------------------------------

def test_debug_runs_the_dag_skips_done_runs_and_redoes_what_depends_on_a_deleted_result(tmp_path, capsys):
    path, root = write_grid(tmp_path), tmp_path / "runs"
    assert cli(path, "--root", root, "--debug") == 0
    plan = sweep.load_grid(path, root)
    assert all((plan.dir(run) / identity.RESULT).is_file() for run in plan.all_runs())
    assert (root / "index.csv").read_text().count("\n") == 1 + len(plan.all_runs())  # collect ran
    capsys.readouterr()
    assert cli(path, "--root", root, "--debug") == 0
    assert "nothing to submit" in capsys.readouterr().out
    # A run resumed under other code than it started with is listed by --status.
    pretrain = plan.dir(plan.runs["pretrain"][0])
    doc = json.loads((pretrain / identity.CONFIG).read_text())
    doc["history"] = [{**doc["history"][0], "git_sha": "aaaaaaaaaaaa"}, doc["history"][0]]
    doc["code_changed"] = True
    (pretrain / identity.CONFIG).write_text(json.dumps(doc) + "\n")
    assert cli(path, "--root", root, "--status") == 0
    out = capsys.readouterr().out
    assert "resumed under other code than they started with:" in out and "aaaaaaaaaa" in out and " -> " in out  # (+dirty in a dirty checkout)

    prune = next(r for r in plan.runs["prune"] if r.cfg.prune.method == "hydra")
    child = next(r for r in plan.runs["finetune"] if r.parent == prune.key)
    (plan.dir(prune) / identity.RESULT).unlink()
    assert cli(path, "--root", root, "--dry-run") == 0
    submit = {line.split()[0]: int(line.split()[5]) for line in capsys.readouterr().out.splitlines()[2:5]}
    assert submit == {"pretrain": 0, "prune": 1, "finetune": 1}
    assert cli(path, "--root", root, "--debug") == 0
    assert (plan.dir(prune) / identity.RESULT).is_file() and (plan.dir(child) / identity.RESULT).is_file()
    assert list((plan.dir(child) / "superseded").glob(f"*/{identity.RESULT}"))


def test_a_failing_cell_is_failed_its_child_blocked_and_only_failed_retries_that_cell(tmp_path, capsys):
    # run.resume is not hashed: the same cell without it is the same run, fixed.
    broken = {"zip": {"k": [0.5, 0.2], "run.resume": ["", "/nonexistent/checkpoint.pt"]}}
    path, root = write_grid(tmp_path, axes={"method": ["hydra"]}, **broken), tmp_path / "runs"
    assert cli(path, "--root", root, "--debug") == 1
    capsys.readouterr()
    assert cli(path, "--root", root, "--status") == 0
    out = capsys.readouterr().out
    assert "resume checkpoint" in out and "parent failed" in out
    rows = status_rows(out)
    assert (rows["prune"]["failed"], rows["prune"]["done"]) == (1, 1)
    assert (rows["finetune"]["blocked"], rows["finetune"]["done"]) == (1, 1)

    fixed = write_grid(tmp_path, axes={"method": ["hydra"], "k": [0.5, 0.2]})
    assert cli(fixed, "--root", root, "--only-failed", "--debug") == 0
    out = capsys.readouterr().out
    assert out.count("start   ") == 2 and "k=0.2" in out and "k=0.5" not in out.split("start")[1]


def test_local_executor_runs_the_dag_in_subprocesses(tmp_path):
    path = write_grid(tmp_path, stages={"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}}},
                      axes={"method": ["omp"], "k": [0.5, 0.2]})
    root = tmp_path / "runs"
    out = subprocess.run([sys.executable, REPO / "launch" / "grid.py", path, "--root", root, "--local",
                          "--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    plan = sweep.load_grid(path, root)
    results = [json.loads((plan.dir(run) / identity.RESULT).read_text()) for run in plan.all_runs()]
    assert [r["stage"] for r in results] == ["pretrain", "prune", "prune"]
    logs = sorted(p.name for p in (root / "_local").glob("*/*.log"))  # one log per run, from the workers
    assert len(logs) == 3 and "local: 2 run(s) at a time" in out.stdout


def test_a_code_snapshot_is_taken_once_per_code_state_and_does_not_follow_the_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    for name in ("bip", "launch"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    first = snapshot.take(tmp_path / "runs", repo=checkout)
    assert snapshot.take(tmp_path / "runs", repo=checkout)["id"] == first["id"]  # same code, same copy
    copied = Path(first["path"]) / "bip" / "train" / "__init__.py"
    original = copied.read_bytes()
    (checkout / "bip" / "train" / "__init__.py").write_text("raise RuntimeError('edited')\n")
    second = snapshot.take(tmp_path / "runs", repo=checkout)
    assert second["id"] != first["id"] and copied.read_bytes() == original
    assert json.loads((Path(first["path"]) / "CODE.json").read_text())["id"] == first["id"]
    env = snapshot.job_environment({"PYTHONPATH": f"{checkout}:/x"}, first["path"])
    assert env["PYTHONPATH"].split(":")[0] == first["path"]
    # A job started in the checkout imports the snapshot (-P keeps the working directory out).
    out = subprocess.run([*snapshot.python_command(), "-c", "import bip.train; print(bip.train.__file__)"],
                         cwd=checkout, env={**os.environ, **env}, capture_output=True, text=True)
    assert out.stdout.strip() == str(copied), out.stderr[-2000:]


def test_a_run_a_live_trainer_holds_is_not_submitted_and_its_children_are_held_back(tmp_path, capsys):
    path, root = write_grid(tmp_path), tmp_path / "runs"
    plan = sweep.load_grid(path, root)
    pretrain = plan.dir(plan.runs["pretrain"][0])
    pretrain.mkdir(parents=True)
    owner = {"host": socket.gethostname(), "pid": os.getppid(), "slurm_job_id": None, "started": "t",
             "heartbeat": time.time(), "stale_s": 600, "token": "other"}
    (pretrain / identity.OWNER).write_text(json.dumps(owner))
    assert cli(path, "--root", root, "--dry-run") == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:5]}
    assert rows["pretrain"][3:6] == ["1", "0", "0"]  # live 1, failed 0, submit 0
    assert rows["prune"][5] == "0" and "held back" in out and "runs outside Slurm" in out


def test_a_lease_whose_slurm_job_ended_is_not_running(tmp_path):
    live = {"host": "elsewhere", "pid": 1, "heartbeat": time.time(), "stale_s": 600, "slurm_job_id": "5_1"}
    assert status.combine(_found("started", live), "RUNNING", "done", "5_1")[0] == "running"
    assert status.combine(_found("started", live), "NODE_FAIL", "done", "5_1")[0] == "failed"
    assert status.combine(_found("started", live), "", "done", None)[0] == "running"  # no accounting


# -- IMP levels ------------------------------------------------------------------------------

def test_imp_levels_train_each_round_once_and_index_one_row_per_round(tmp_path, capsys):
    import csv
    imp_grid = {"stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}},
                           "finetune": {}},  # default finetune methods: not imp (rounds retrain)
                "axes": {"method": ["imp"], "k": [0.8, 0.64, 0.512], "seed": [1]}}
    path, root = write_grid(tmp_path, **imp_grid), tmp_path / "runs"
    plan = sweep.load_grid(path, root)
    rounds = plan.runs["prune"]
    assert [r.cfg.prune.k for r in rounds] == [0.8, 0.64, 0.512] and not plan.runs["finetune"]
    assert [r.parent for r in rounds] == [plan.runs["pretrain"][0].key, rounds[0].key, rounds[1].key]
    specs = submit.plan_arrays(plan, plan.all_runs(), {})  # one array per round, after its parent
    assert [(s.stage, [r.key for r in s.runs], s.after) for s in specs[1:]] == \
        [("prune", [r.key], {("run", r.parent)}) for r in rounds]
    assert cli(path, "--root", root, "--debug") == 0
    folders = sorted(p for p in root.glob("synthetic-resnet20s-prune-imp-*/seed_1"))
    assert len(folders) == 3
    for folder in folders:  # one round each: its own epochs, mask and final model
        assert len((folder / identity.METRICS).read_text().splitlines()) == 1
        assert (folder / identity.MASK).is_file() and (folder / identity.FINAL).is_file()
    with open(root / "index.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "imp"]
    assert sorted((float(r["k"]), r["imp_round"]) for r in rows) == [(0.512, "3"), (0.64, "2"), (0.8, "1")]
    for r in rows:
        assert abs(float(r["kept_fraction"]) - float(r["k"])) < 1e-3
    by_round = {r["imp_round"]: r for r in rows}
    assert float(by_round["3"]["lineage_train_passes"]) == \
        sum(float(r["train_passes"]) for r in rows) + float(next(
            r for r in csv.DictReader(open(root / "index.csv")) if r["stage"] == "pretrain")["train_passes"])
    # The lineage is one curve; the compute plot exists for it (launch/plots.py, any index).
    from launch import plots
    entries = [e for e in plots.summarize(plots.read_index(root / "index.csv")) if e["method"] == "imp"]
    assert [(e["curve"], e["k"]) for e in entries] == [("imp", 0.8), ("imp", 0.64), ("imp", 0.512)]
    out = subprocess.run([sys.executable, REPO / "launch" / "plots.py", root / "index.csv", "--out",
                          tmp_path / "figs"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == \
        ["synthetic-resnet20s-unstructured-compute.png", "synthetic-resnet20s-unstructured.png"]
    # Another grid on the same root going further reuses the rounds it passes through.
    more = write_grid(tmp_path, name="more", **{**imp_grid, "axes": {"method": ["imp"], "k": [0.64, 0.4],
                                                                     "seed": [1]}})
    capsys.readouterr()
    assert cli(more, "--root", root, "--dry-run") == 0
    out = capsys.readouterr().out
    submitted = {line.split()[0]: int(line.split()[5]) for line in out.splitlines()[2:4]}
    assert submitted == {"pretrain": 0, "prune": 2}, out  # 0.4096, then 0.4 (the shortened step)


# -- sources, problems, log folders (issue 21) -----------------------------------------------

def test_a_grid_pretrain_source_may_be_a_finished_run_folder_as_for_source_net(tmp_path, capsys):
    root = tmp_path / "runs"
    pre = write_grid(tmp_path, name="pre", stages={"pretrain": {}}, axes={"seed": [1]})
    assert cli(pre, "--root", root, "--debug") == 0
    folder = sweep.load_grid(pre, root).dir(sweep.load_grid(pre, root).runs["pretrain"][0])
    prune = {"pretrain": {"source": str(folder)}, "prune": {"set": {"layer_type": "unstructured"}}}
    path = write_grid(tmp_path, name="from_run", stages=prune, axes={"method": ["omp"], "k": [0.5], "seed": [1]})
    plan = sweep.load_grid(path, root)
    (run,) = plan.all_runs()
    assert run.cfg.run.source_net == str(folder.resolve()) and run.parent is None
    assert cli(path, "--root", root, "--debug") == 0
    result = json.loads((plan.dir(run) / identity.RESULT).read_text())
    assert result["status"] == "done" and result["stage"] == "prune"
    # A folder that has not finished is refused, as --source-net refuses it.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    capsys.readouterr()
    bad = write_grid(tmp_path, name="bad", stages={**prune, "pretrain": {"source": str(unfinished)}},
                     axes={"method": ["omp"], "k": [0.5], "seed": [1]})
    assert cli(bad, "--root", root, "--dry-run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"stages.pretrain.source: run folder {unfinished} has not finished" in err


def test_a_dry_run_shows_the_plan_then_every_problem_and_a_submission_refuses_them_all(tmp_path, capsys):
    root = tmp_path / "runs"
    stages = {"pretrain": {"source": str(tmp_path / "missing.pt")}, "prune": {"set": {"layer_type": "unstructured"}}}
    path = write_grid(tmp_path, stages=stages, axes={"method": ["omp"], "k": [0.5, 0.2, 1.5], "seed": [1],
                                                     "arch": ["resnet20s", "resnet19"]})
    assert cli(path, "--root", root, "--dry-run") == 2
    out, err = capsys.readouterr()
    assert "6 cells, 4 runs" in out and "dry run: nothing submitted; 4 problem(s) to fix first" in out
    assert [line.split(": ", 3)[2] for line in err.splitlines()] == \
        ["stages.pretrain.source", "prune of cell [method=omp k=1.5 seed=1 arch=resnet20s]",
         "prune of cell [method=omp k=1.5 seed=1 arch=resnet19]", "unknown arch 'resnet19'; choose one of"], err
    assert all(line.startswith("error: grid g: ") for line in err.splitlines())
    assert f"file not found: {tmp_path / 'missing.pt'}" in err and "prune.k=1.5 is out of range" in err
    # A submission refuses at once, with the same lines, and writes nothing.
    assert cli(path, "--root", root, "--local") == 2
    assert capsys.readouterr().err == err and not root.exists()


def test_the_shipped_imagenet_grid_dry_runs_on_a_fresh_clone_listing_its_missing_weights(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}  # no torch hub cache: the weights file is missing
    out = subprocess.run([sys.executable, REPO / "launch" / "grid.py", REPO / "configs" / "grids" /
                          "imagenet_tv_resnet50.yml", "--root", tmp_path / "runs", "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "3 cells, 3 runs" in out.stdout and "prune          3" in out.stdout, out.stdout
    assert "dry run: nothing submitted; 1 problem(s) to fix first" in out.stdout
    weights = tmp_path / ".cache/torch/hub/checkpoints/resnet50-0676ba61.pth"
    assert out.stderr == f"error: grid imagenet_tv_resnet50: stages.pretrain.source: file not found: {weights}\n"
    assert not (tmp_path / "runs").exists()


def test_two_local_launchers_started_in_the_same_second_log_into_their_own_folders(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20260101-000000")  # the same second
    logs = []
    for name in ("one", "two"):  # one process, so also the same pid
        path = write_grid(tmp_path, name=name, stages={"pretrain": {}}, axes={"seed": [1 if name == "one" else 2]})
        assert cli(path, "--root", root, "--local", "--jobs", "1") == 0
        logs.append(sorted(p.relative_to(root / "_local") for p in (root / "_local").glob("*/*.log")))
    first, both = logs
    assert len(first) == 1 and len(both) == 2 and len({p.parent for p in both}) == 2, both
    assert all(p.parent.name.startswith(f"20260101-000000-{os.getpid()}") for p in both)
