"""The launcher against the real local Slurm cluster (bash slurm/dev-cluster.sh up): the stage DAG
as dependent arrays, skipping and redoing runs, preemption + requeue + resume, failures and
blocked children, a 2-node DDP cell, and one sbatch per stage for 1,000 cells.

Every test polls with a deadline (sacct lags squeue by seconds); runs are tiny (synthetic data,
resnet20s, a few steps), so the file takes a few minutes on 2 busy cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import yaml

from bip import identity
from launch import sweep

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
TINY = {"dataset": "synthetic", "data.synthetic_size": 128, "data.batch_size": 32, "epochs": 1,
        "arch": "resnet20s", "data.num_workers": 0, "train.steps_per_epoch": 3}
STAGES = {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}}, "finetune": {}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One run root for the module: grids with the same pretrain config share it, as on a cluster."""
    return tmp_path_factory.mktemp("slurm-runs")


def write_grid(folder: Path, name: str, **doc) -> Path:
    body = {"name": name, "profile": "local", "set": dict(TINY), "stages": STAGES, **doc}
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def grid(path: Path, root: Path, *args: str, env: dict | None = None, timeout: int = 400):
    return subprocess.run([sys.executable, str(REPO / "launch" / "grid.py"), str(path), "--root", str(root),
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


def manifest(root: Path, name: str) -> dict:
    return json.loads((root / "_grids" / f"{name}.json").read_text())


def sacct(job_id: str, *flags: str) -> list[dict]:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-P", "-o", "JobID,State,Start,End,NodeList", *flags],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    names = out[0].split("|")
    return [dict(zip(names, line.split("|"))) for line in out[1:]]


def wait_state(job_id: str, wanted: set[str], deadline_s: float = 240) -> str:
    watcher = submitit.SlurmJob.watcher
    end = time.time() + deadline_s
    while time.time() < end:
        state = watcher.get_state(job_id, mode="force").split()[0]
        if state in wanted:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {wanted} after {deadline_s} s (last: {state})")


def poll(predicate, deadline_s: float = 240, what: str = "condition") -> None:
    end = time.time() + deadline_s
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_grid_runs_as_dependent_arrays_then_skips_done_runs_and_redoes_a_deleted_one(root, tmp_path):
    path = write_grid(tmp_path, "dag", axes={"method": ["hydra", "omp"], "k": [0.5, 0.2], "seed": [1]})
    out = grid(path, root, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    plan = sweep.load_grid(path, root)
    assert [len(plan.runs[s]) for s in plan.runs] == [1, 4, 4]  # one pretrain shared by 4 prunes
    assert all((plan.dir(run) / identity.RESULT).is_file() for run in plan.all_runs())
    pretrain = plan.runs["pretrain"][0].key
    assert {run.parent for run in plan.runs["prune"]} == {pretrain}

    arrays = manifest(root, "dag")["submissions"][-1]["arrays"]
    assert [(a["stage"], a["tasks"]) for a in arrays] == [("pretrain", 1), ("prune", 4), ("finetune", 4)]
    ids = [a["job_id"] for a in arrays]
    assert [a["dependency"] for a in arrays] == [None, f"afterany:{ids[0]}", f"afterany:{ids[1]}"]
    sbatch_file = (root / "_slurm" / ids[1] / f"{ids[1]}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterany:{ids[0]}" in sbatch_file and "#SBATCH --array=0-3" in sbatch_file
    tasks = {stage: sacct(job_id) for stage, job_id in zip(("pretrain", "prune", "finetune"), ids)}
    assert [len(tasks[s]) for s in tasks] == [1, 4, 4]
    assert all(t["State"] == "COMPLETED" for rows in tasks.values() for t in rows)
    assert min(t["Start"] for t in tasks["prune"]) >= tasks["pretrain"][0]["End"]
    assert min(t["Start"] for t in tasks["finetune"]) >= max(t["End"] for t in tasks["prune"])

    again = grid(path, root)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert len(manifest(root, "dag")["submissions"]) == 1

    prune = next(run for run in plan.runs["prune"] if run.cfg.prune.method == "hydra")
    (plan.dir(prune) / identity.RESULT).unlink()
    redo = grid(path, root, "--wait")
    assert redo.returncode == 0, redo.stdout + redo.stderr
    arrays = manifest(root, "dag")["submissions"][-1]["arrays"]
    assert [(a["stage"], a["tasks"]) for a in arrays] == [("prune", 1), ("finetune", 1)]
    assert all((plan.dir(run) / identity.RESULT).is_file() for run in plan.all_runs())


def test_a_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(tmp_path):
    body = {"set": {**TINY, "data.synthetic_size": 384, "epochs": 4, "train.steps_per_epoch": 0},
            "stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}}},
            "axes": {"seed": [11], "method": ["omp"], "k": [0.5]}}
    path = write_grid(tmp_path, "preempt", **body)
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    for run_root in (interrupted, reference):
        assert grid(path, run_root).returncode == 0
    plan = sweep.load_grid(path, interrupted)
    key = plan.runs["pretrain"][0].key
    metrics = interrupted / key / identity.METRICS
    poll(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 1, what="the first epoch")
    job_id = manifest(interrupted, "preempt")["cells"][key]["job_id"]
    submitit.SlurmJob(folder=interrupted / "_slurm" / "%j", job_id=job_id)._interrupt()  # SIGTERM, USR2
    for run_root in (interrupted, reference):  # --wait also waits for jobs submitted earlier
        out = grid(path, run_root, "--wait")
        assert out.returncode == 0 and "nothing to submit" in out.stdout, out.stdout + out.stderr

    assert "REQUEUED" in {row["State"] for row in sacct(job_id, "-D")}
    provenance = yaml.safe_load((interrupted / key / identity.CONFIG).read_text())["provenance"]
    assert provenance["slurm_restart_count"] == 1
    log = (interrupted / "_slurm" / job_id / f"{job_id}_0_log.err").read_text()
    assert log.count("epoch 1/4 ") == 1 and log.count("epoch 4/4 ") == 1  # resumed, not restarted
    fields = ("test_acc", "test_top5", "val_acc", "best_val_acc", "epochs")
    for run in plan.all_runs():  # the prune waited through the requeue (afterany) and agrees too
        results = [json.loads((r / run.key / identity.RESULT).read_text()) for r in (interrupted, reference)]
        assert {f: results[0][f] for f in fields} == {f: results[1][f] for f in fields}
    losses = [[json.loads(line)["train_loss"] for line in (r / key / identity.METRICS).open()]
              for r in (interrupted, reference)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_a_failing_cell_is_failed_in_status_and_slurm_and_only_failed_resubmits_it(root, tmp_path):
    # run.resume is not hashed: the same cell without it is the same run, fixed. The pretrain
    # (seed 1) is the first test's when the module runs whole.
    broken = write_grid(tmp_path, "fail", axes={"method": ["hydra"], "seed": [1]},
                        zip={"k": [0.4, 0.3], "run.resume": ["", "/nonexistent/checkpoint.pt"]})
    out = grid(broken, root, "--wait")
    assert out.returncode == 1, out.stdout + out.stderr
    status = grid(broken, root, "--status").stdout
    rows = {line.split()[0]: line.split()[1:6] for line in status.splitlines()[2:5]}
    assert rows["prune"] == ["1", "0", "0", "1", "0"] and rows["finetune"] == ["1", "0", "0", "0", "1"]
    assert "resume checkpoint" in status and "parent failed" in status

    plan = sweep.load_grid(broken, root)
    cells = manifest(root, "fail")["cells"]
    failed = next(run for run in plan.runs["prune"] if run.cfg.prune.k == 0.3)
    blocked = next(run for run in plan.runs["finetune"] if run.parent == failed.key)
    assert wait_state(cells[failed.key]["job_id"], {"FAILED"}, 30) == "FAILED"
    assert wait_state(cells[blocked.key]["job_id"], {"FAILED"}, 30) == "FAILED"
    assert not (plan.dir(blocked) / identity.ERROR).exists()  # blocked, not failed itself

    fixed = write_grid(tmp_path, "fail", axes={"method": ["hydra"], "seed": [1], "k": [0.4, 0.3]})
    retry = grid(fixed, root, "--only-failed", "--wait")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    arrays = manifest(root, "fail")["submissions"][-1]["arrays"]
    assert [(a["stage"], a["tasks"]) for a in arrays] == [("prune", 1), ("finetune", 1)]
    assert (plan.dir(failed) / identity.RESULT).is_file() and (plan.dir(blocked) / identity.RESULT).is_file()


def test_a_two_node_cell_trains_with_ddp_and_both_ranks_agree(root, tmp_path):
    path = write_grid(tmp_path, "ddp", stages={"pretrain": {}}, axes={"seed": [21]},
                      resources={"nodes": 2, "tasks_per_node": 1})
    out = grid(path, root, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    run = sweep.load_grid(path, root).runs["pretrain"][0]
    assert json.loads((root / run.key / identity.RESULT).read_text())["world_size"] == 2
    job_id = manifest(root, "ddp")["cells"][run.key]["job_id"]
    ranks = submitit.SlurmJob(folder=root / "_slurm" / "%j", job_id=job_id, tasks=(0, 1)).results()
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["state_digest"] and ranks[0]["state_digest"] == ranks[1]["state_digest"]
    assert sacct(job_id)[0]["NodeList"] == "node[1-2]"


def test_a_1000_cell_grid_is_one_sbatch_per_stage(root, tmp_path):
    shim, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    shim.mkdir()
    (shim / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {shutil.which("sbatch")} "$@"\n')
    (shim / "sbatch").chmod(0o755)
    axes = {"seed": [1, 2, 3, 4, 5], "method": ["bip", "hydra"],
            "k": [round(0.9 ** i, 5) for i in range(1, 26)], "train.epochs": [1, 2, 3, 4]}
    path = write_grid(tmp_path, "big", stages={**STAGES, "finetune": {"methods": ["hydra"]}}, axes=axes)
    path_env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    out = grid(path, tmp_path / "big-runs", "--hold", env=path_env)
    arrays = manifest(tmp_path / "big-runs", "big")["submissions"][-1]["arrays"]
    subprocess.run(["scancel", *[a["job_id"] for a in arrays]], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [(a["stage"], a["tasks"]) for a in arrays] == [("pretrain", 5), ("prune", 1000), ("finetune", 500)]
    assert len(calls.read_text().splitlines()) == 3
