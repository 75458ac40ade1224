"""The launcher against the real local Slurm cluster (bash slurm/dev-cluster.sh up): per-parent
dependent arrays, skipping and redoing runs, two grids sharing a pretrain, requeue mid-epoch
and preemptions (step-exact, bit-identical), an epoch longer than the time limit, code pinned
at submission, one status after scancel, failures and blocked children, a 2-node DDP cell,
and a bounded number of sbatch calls for 1,000 cells.

Every test polls with a deadline (sacct lags squeue by seconds); runs are tiny (synthetic data,
resnet20s, a few steps), so the file takes several minutes on 2 busy cores.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
import yaml

from bip.config import identity
from bip.rundir import folder as runfolder
from launch import sweep, slurm

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
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
        now = watcher.get_state(job_id, mode="force").split()[0]
        if now in wanted:
            return now
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {wanted} after {deadline_s} s (last: {now})")


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
    # One array per parent: the prunes of the pretrain, then each finetune after its own prune.
    assert [(a["stage"], a["tasks"]) for a in arrays] == \
        [("pretrain", 1), ("prune", 4)] + [("finetune", 1)] * 4
    cells = manifest(root, "dag")["cells"]
    assert arrays[1]["dependency"] == f"afterany:{cells[pretrain]['job_id']}"
    for run in plan.runs["finetune"]:
        array = next(a for a in arrays if a["job_id"] == cells[run.key]["job_id"].split("_")[0])
        assert array["dependency"] == f"afterany:{cells[run.parent]['job_id']}"  # its own parent only
        mine, parent = sacct(cells[run.key]["job_id"])[0], sacct(cells[run.parent]["job_id"])[0]
        assert mine["State"] == "COMPLETED" and mine["Start"] >= parent["End"]
    prunes = sacct(arrays[1]["job_id"])
    assert len(prunes) == 4 and min(t["Start"] for t in prunes) >= sacct(arrays[0]["job_id"])[0]["End"]

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


def owner_pid(folder: Path) -> int | None:
    owner = runfolder.read_owner(folder / identity.OWNER)
    return owner.get("pid") if owner else None


def assert_same_final(a: Path, b: Path) -> None:
    sa, sb = (torch.load(d / identity.FINAL, weights_only=True)["model"] for d in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def epochs_of(folder: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / identity.METRICS).read_text().splitlines()]


def no_time(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (folder / identity.METRICS).read_text().splitlines()]


def job_log(root: Path, job_id: str) -> str:
    return (root / "_slurm" / job_id / f"{job_id}_0_log.err").read_text()


def test_two_grids_sharing_a_pretrain_submit_it_once_and_train_every_cell_once(tmp_path):
    root = tmp_path / "shared"
    body = {"set": {**TINY, "data.synthetic_size": 1024, "epochs": 2, "train.steps_per_epoch": 0},
            "stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured", "epochs": 1}}}}
    first = write_grid(tmp_path, "share-a", axes={"method": ["hydra"], "k": [0.5], "seed": [5]}, **body)
    second = write_grid(tmp_path, "share-b", axes={"method": ["hydra"], "k": [0.3], "seed": [5]}, **body)
    assert grid(first, root).returncode == 0
    out = grid(second, root)
    assert out.returncode == 0, out.stdout + out.stderr
    pretrain = sweep.load_grid(first, root).runs["pretrain"][0]
    owner = manifest(root, "share-a")["cells"][pretrain.key]["job_id"]
    arrays = manifest(root, "share-b")["submissions"][-1]["arrays"]
    assert [(a["stage"], a["tasks"], a["dependency"]) for a in arrays] == [("prune", 1, f"afterany:{owner}")]
    for path in (first, second):
        done = grid(path, root, "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
    assert epochs_of(root / pretrain.key) == [1, 2]  # trained once, by one job
    for path in (first, second):
        prune = sweep.load_grid(path, root).runs["prune"][0]
        assert epochs_of(root / prune.key) == [1]
        assert runfolder.inspect(root / prune.key).state == "done"
    history = json.loads((root / pretrain.key / identity.CONFIG).read_text())["history"]
    assert [h["slurm_job_id"] for h in history] == [owner]


def test_scontrol_requeue_mid_epoch_resumes_from_that_step_bit_identically(tmp_path):
    body = {"set": {**TINY, "data.synthetic_size": 1536, "epochs": 2, "train.steps_per_epoch": 0},
            "stages": {"pretrain": {}}, "axes": {"seed": [11]}}
    path = write_grid(tmp_path, "requeue", **body)
    interrupted, twin = tmp_path / "interrupted", tmp_path / "twin"
    for run_root in (interrupted, twin):
        assert grid(path, run_root).returncode == 0
    key = sweep.load_grid(path, interrupted).runs["pretrain"][0].key
    poll(lambda: (interrupted / key / identity.METRICS).is_file(), what="the first epoch")
    time.sleep(1.0)  # into epoch 2
    job_id = manifest(interrupted, "requeue")["cells"][key]["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    for run_root in (interrupted, twin):  # --wait also waits for jobs submitted earlier
        out = grid(path, run_root, "--wait")
        assert out.returncode == 0 and "nothing to submit" in out.stdout, out.stdout + out.stderr
    assert "REQUEUED" in {row["State"] for row in sacct(job_id, "-D")}
    log = job_log(interrupted, job_id)
    steps = no_time(interrupted / key)[0]["step"]
    resumed = re.search(r"resuming from checkpoint.pt: epoch 2, step (\d+) of the epoch", log)
    assert "stop requested (SIGTERM)" in log and resumed and 0 < int(resumed.group(1)) < steps, log[-2000:]
    assert_same_final(interrupted / key, twin / key)
    assert no_time(interrupted / key) == no_time(twin / key)


def test_three_preemptions_do_not_fail_a_run_with_max_requeues_1(tmp_path):
    body = {"set": {**TINY, "data.synthetic_size": 1536, "epochs": 2, "train.steps_per_epoch": 0},
            "stages": {"pretrain": {}}, "axes": {"seed": [12]}, "resources": {"max_requeues": 1}}
    path = write_grid(tmp_path, "preempt", **body)
    root = tmp_path / "runs"
    assert grid(path, root).returncode == 0
    key = sweep.load_grid(path, root).runs["pretrain"][0].key
    job_id = manifest(root, "preempt")["cells"][key]["job_id"]
    job = submitit.SlurmJob(folder=root / "_slurm" / "%j", job_id=job_id)
    seen = set()
    for preempt in (job._interrupt, lambda: subprocess.run(["scontrol", "requeue", job_id], check=True),
                    job._interrupt):  # submitit's preemption (SIGTERM + USR2), Slurm's requeue
        poll(lambda: owner_pid(root / key) not in seen | {None}, what="the next start")
        seen.add(owner_pid(root / key))
        time.sleep(0.5)
        preempt()
    out = grid(path, root, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [row["State"] for row in sacct(job_id, "-D")].count("REQUEUED") == 3
    history = json.loads((root / key / identity.CONFIG).read_text())["history"]
    assert len(history) == 4 and all(h["git_sha"] and h["code"] for h in history)  # every start's sha
    assert epochs_of(root / key) == [1, 2]


@pytest.mark.slow
def test_an_epoch_longer_than_the_time_limit_finishes_across_timeouts(tmp_path):
    # One epoch of ~40 s of compute on an idle core (~2 min under make test's load), a 1-minute
    # limit, USR2 30 s before it (Slurm checks limits about every 30 s): each job trains a part
    # of the epoch and requeues. 8192 images (~19 s idle) could finish before the first USR2.
    body = {"set": {**TINY, "data.synthetic_size": 16384, "data.batch_size": 64, "epochs": 1,
                    "train.steps_per_epoch": 0},
            "stages": {"pretrain": {}}, "axes": {"seed": [13]},
            "resources": {"time_min": 1, "signal_delay_s": 30, "max_requeues": 20}}
    path = write_grid(tmp_path, "timeout", **body)
    root = tmp_path / "runs"
    out = grid(path, root, "--wait", timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    key = sweep.load_grid(path, root).runs["pretrain"][0].key
    job_id = manifest(root, "timeout")["cells"][key]["job_id"]
    log = job_log(root, job_id)
    assert re.search(r"resuming from checkpoint.pt: epoch 1, step [1-9]", log), log[-2000:]
    assert "REQUEUED" in {row["State"] for row in sacct(job_id, "-D")}
    assert epochs_of(root / key) == [1]


def test_queued_jobs_run_the_code_they_were_submitted_with(tmp_path):
    checkout = tmp_path / "checkout"
    for name in ("bip", "launch", "configs", "slurm"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "submitted"], check=True)
    sha = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    path = write_grid(tmp_path, "pinned", axes={"method": ["omp"], "k": [0.5], "seed": [14]},
                      stages={"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}}})
    root = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    held = subprocess.run([sys.executable, str(checkout / "launch" / "grid.py"), str(path), "--root",
                           str(root), "--hold"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=checkout)
    assert held.returncode == 0, held.stdout + held.stderr
    train_py = checkout / "bip" / "train" / "__init__.py"  # a git pull that breaks training, after submission
    broken = 'raise RuntimeError("the checkout changed after submission")\n'
    train_py.write_text(broken + train_py.read_text())
    subprocess.run(git + ["commit", "-qam", "pulled"], check=True)
    jobs = [a["job_id"] for a in manifest(root, "pinned")["submissions"][-1]["arrays"]]
    subprocess.run(["scontrol", "release", *jobs], check=True)
    out = grid(path, root, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    submitted = manifest(root, "pinned")["submissions"][-1]["code"]
    assert submitted["git_sha"] == sha and submitted["git_dirty"] is False
    for run in sweep.load_grid(path, root).all_runs():
        history = json.loads((root / run.key / identity.CONFIG).read_text())["history"]
        assert [(h["git_sha"], h["code"]) for h in history] == [(sha, submitted["id"])]


def test_after_scancel_of_a_running_pretrain_status_wait_and_collect_agree(tmp_path):
    body = {"set": {**TINY, "data.synthetic_size": 1536, "epochs": 2, "train.steps_per_epoch": 0},
            "stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}}},
            "axes": {"method": ["omp"], "k": [0.5], "seed": [15]}}
    path = write_grid(tmp_path, "cancel", **body)
    root = tmp_path / "runs"
    assert grid(path, root).returncode == 0
    plan = sweep.load_grid(path, root)
    pretrain, prune = plan.runs["pretrain"][0].key, plan.runs["prune"][0].key
    poll(lambda: owner_pid(root / pretrain) is not None, what="the pretrain to start")
    job = manifest(root, "cancel")["cells"][pretrain]["job_id"]
    subprocess.run(["scancel", job], check=True)
    # Until Slurm reports the cancel, the run is live; after it, a plain submission would
    # resubmit it (a cancelled run is not done): status and the index are read in between.
    poll(lambda: slurm.job_states([job]).state(job) == "CANCELLED", what="the cancel")
    child = manifest(root, "cancel")["cells"][prune]["job_id"]  # afterany: it starts, finds its
    # parent not done and ends blocked. Polled through the launcher's own reader: while the
    # array is pending, `sacct -j <id>_0` lists nothing (its record is <id>_[0]), and a job
    # that is not listed has not ended.
    poll(lambda: (slurm.job_states([child]).state(child) or "PENDING") not in slurm.ACTIVE,
         what="the prune job to end")
    waited = subprocess.run([sys.executable, str(REPO / "launch" / "collect.py"), str(root)],
                            capture_output=True, text=True, timeout=120)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    status = grid(path, root, "--status").stdout
    waited.stdout = status
    with open(root / "index.csv", newline="") as f:
        statuses = {row["path"]: row["status"] for row in csv.DictReader(f)}
    for text in (waited.stdout, status):  # the last table printed is the status
        lines = text.splitlines()
        top = max(i for i, line in enumerate(lines) if line.startswith("stage"))
        header = lines[top].split()[1:]
        rows = {line.split()[0]: dict(zip(header, line.split()[1:])) for line in lines[top + 1:top + 3]}
        assert rows["pretrain"]["failed"] == "1" and rows["prune"]["blocked"] == "1", text
    assert statuses == {pretrain: "failed", prune: "blocked"}
    assert "CANCELLED without result.json" in status
    retry = grid(path, root, "--only-failed", "--wait")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert all(runfolder.inspect(root / k).state == "done" for k in (pretrain, prune))


def test_a_failing_cell_is_failed_in_status_and_slurm_and_only_failed_resubmits_it(root, tmp_path):
    # run.resume is not hashed: the same cell without it is the same run, fixed. The pretrain
    # (seed 1) is the first test's when the module runs whole.
    broken = write_grid(tmp_path, "fail", axes={"method": ["hydra"], "seed": [1]},
                        zip={"k": [0.4, 0.3], "run.resume": ["", "/nonexistent/checkpoint.pt"]})
    out = grid(broken, root, "--wait")
    assert out.returncode == 1, out.stdout + out.stderr
    status = grid(broken, root, "--status").stdout
    header = status.splitlines()[1].split()[1:]
    rows = {line.split()[0]: dict(zip(header, line.split()[1:])) for line in status.splitlines()[2:5]}
    assert (rows["prune"]["done"], rows["prune"]["failed"]) == ("1", "1")
    assert (rows["finetune"]["done"], rows["finetune"]["blocked"]) == ("1", "1")
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


@pytest.mark.slow
def test_bip_on_two_nodes_x_two_tasks_ends_as_one_process_with_four_times_the_batch(tmp_path):
    """BiP (paper), BN-free vgg11: 2 nodes x 2 tasks (gloo) with batch 4 per process and one
    process with batch 16 read the same global batches; the results agree to round-off, in two
    run folders (the world size is part of the id), sharing one pretrain."""
    small = {**TINY, "arch": "vgg11", "data.synthetic_size": 160, "data.loader": "tensor",
             "train.steps_per_epoch": 2}
    prune = {"set": {"layer_type": "unstructured", "prune.method": "bip", "k": 0.2, "bip.gamma": 0.5}}
    results, losses = {}, {}
    for name, batch, resources in (("wide", 4, {"nodes": 2, "tasks_per_node": 2}), ("one", 16, {})):
        path = write_grid(tmp_path, name, set={**small, "data.batch_size": batch},
                          stages={"pretrain": {"set": {"data.batch_size": 16}},
                                  "prune": {**prune, "resources": resources}})
        out = grid(path, tmp_path / "runs", "--wait")
        assert out.returncode == 0, out.stdout + out.stderr
        run = sweep.load_grid(path, tmp_path / "runs").runs["prune"][0]
        results[name] = json.loads((tmp_path / "runs" / run.key / identity.RESULT).read_text())
        losses[name] = no_time(tmp_path / "runs" / run.key)[-1]
        if name == "wide":
            job_id = manifest(tmp_path / "runs", name)["cells"][run.key]["job_id"]
            assert sacct(job_id)[0]["NodeList"] == "node[1-2]"
    wide, one = results["wide"], results["one"]
    assert (wide["world_size"], one["world_size"]) == (4, 1)
    assert wide["global_batch_size"] == one["global_batch_size"] == 16
    assert wide["run_id"] != one["run_id"] and wide["parent_id"] == one["parent_id"]
    for key in ("test_acc", "test_top5", "val_acc", "best_val_acc", "best_epoch", "epochs", "params_effective"):
        assert wide[key] == one[key], key
    assert wide["sparsity"] == one["sparsity"]
    for key in ("train_loss", "val_loss", "test_loss", "train_acc"):  # summed over all 4 ranks
        assert abs(losses["wide"][key] - losses["one"][key]) <= 1e-5 * abs(losses["one"][key]), key
    print(f"2x2 tasks: test_acc {wide['test_acc']} {losses['wide']} wall {wide['wall_time_s']} s; "
          f"1 process: test_acc {one['test_acc']} {losses['one']} wall {one['wall_time_s']} s")


def test_a_1000_cell_grid_takes_one_sbatch_per_parent_array(root, tmp_path):
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
    # 5 pretrains; the prunes of each pretrain wait for it; 500 finetunes (500 parents, over the
    # cap of 64 arrays) go one array per prune array.
    assert [(a["stage"], a["tasks"]) for a in arrays] == \
        [("pretrain", 5)] + [("prune", 200)] * 5 + [("finetune", 100)] * 5
    assert len(calls.read_text().splitlines()) == 11 and "sbatch calls: 11" in out.stdout


def test_a_lease_held_by_an_ended_slurm_job_is_taken_over_at_once(tmp_path):
    # A node crash or an OOM kill leaves a heartbeat only minutes old; squeue says the job is over.
    def sbatch(command: str) -> str:
        return subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", command],
                              capture_output=True, text=True, check=True).stdout.strip()

    def listed(job: str) -> bool:
        return bool(subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip())
    ended, running = sbatch("true"), sbatch("sleep 120")
    try:
        poll(lambda: not listed(ended), what="the short job to end")
        for job, free in ((running, False), (ended, True)):
            folder = tmp_path / job
            folder.mkdir()
            (folder / identity.OWNER).write_text(json.dumps(
                {"host": "a-crashed-node", "pid": 4242, "slurm_job_id": job, "started": "t",
                 "heartbeat": time.time(), "stale_s": 600, "token": "x"}))
            logged = []
            lease = runfolder.Lease(folder, 600, log=logged.append)
            if free:
                lease.acquire()
                assert "has ended" in logged[0]
                lease.release()
            else:
                with pytest.raises(runfolder.LeaseHeld):
                    lease.acquire()
    finally:
        subprocess.run(["scancel", running], check=False)
