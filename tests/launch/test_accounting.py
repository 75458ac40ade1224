"""Slurm accounting that fails (slurmdbd down): a fake ``sacct`` first on PATH that exits 1 or
does not answer, a fake ``squeue`` that lists nothing. No cluster is needed: the runs' job ids
come from a grid manifest written here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import grid, slurm, submit, sweep

REPO = Path(__file__).resolve().parents[2]
TINY = {"dataset": "synthetic", "data.synthetic_size": 64, "data.batch_size": 32, "epochs": 1,
        "arch": "resnet20s", "data.num_workers": 0, "train.steps_per_epoch": 2}
DOWN = "sacct: error: Problem talking to the database: Connection refused"


def fake_slurm(folder: Path, sacct: str) -> dict:
    """An environment whose PATH starts with a fake sacct (``sacct``: its sh body) and a squeue
    that lists no job."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name, body in (("sacct", sacct), ("squeue", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def failing(times: int, counter: Path) -> str:
    """A sacct that fails its first ``times`` calls, then says job 41_0 completed."""
    return (f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "{counter}"\n'
            f'if [ $n -le {times} ]; then echo "{DOWN}" >&2; exit 1; fi\necho "41_0|COMPLETED"')


@pytest.fixture
def submitted(tmp_path):
    """(grid path, root, plan): a pretrain -> prune grid whose pretrain was submitted as job
    41_0 (a manifest entry only: no folder yet)."""
    doc = {"name": "g", "profile": "local", "set": TINY,
           "stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}}},
           "axes": {"method": ["omp"], "k": [0.5], "seed": [1]}}
    path, root = tmp_path / "g.yml", tmp_path / "runs"
    path.write_text(yaml.safe_dump(doc))
    plan = sweep.load_grid(path, root)
    pretrain = plan.runs["pretrain"][0]
    manifest = {"cells": {pretrain.key: {"job_id": "41_0", "submitted_at": 1.0, "stage": "pretrain"}}}
    (root / "_grids").mkdir(parents=True)
    (root / "_grids" / "g.json").write_text(json.dumps(manifest))
    return path, root, plan


def test_a_failing_sacct_is_reported_not_read_as_no_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, f'echo "{DOWN}" >&2; exit 1')["PATH"])
    acct = slurm.job_states(["41_0"])
    assert acct.state("41_0") == slurm.UNKNOWN and acct.error == f"exit status 1: {DOWN}"


def test_a_sacct_that_does_not_answer_times_out_as_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, "exec sleep 30")["PATH"])
    monkeypatch.setattr(slurm, "SACCT_TIMEOUT_S", 0.5)
    acct = slurm.job_states(["41_0"])
    assert acct.state("41_0") == slurm.UNKNOWN and acct.error == "no answer in 0.5 s"


def test_runs_whose_job_sacct_cannot_tell_are_unknown_and_never_resubmitted(submitted, tmp_path, monkeypatch,
                                                                            capsys):
    path, root, plan = submitted
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, f'echo "{DOWN}" >&2; exit 1')["PATH"])
    assert grid.main([str(path), "--root", str(root), "--status"]) == 0
    out = capsys.readouterr().out
    assert f"[seed=1]  unknown (sacct: exit status 1: {DOWN}; job 41_0)" in out, out
    header, pretrain = out.splitlines()[1].split(), out.splitlines()[2].split()
    assert dict(zip(header[1:], map(int, pretrain[1:])))["unknown"] == 1
    # Neither the run nor its child is submitted again on that basis.
    assert grid.main([str(path), "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    submit_column = {line.split()[0]: int(line.split()[5]) for line in out.splitlines()[2:4]}
    assert submit_column == {"pretrain": 0, "prune": 0}, out
    assert "1 run(s) unknown (sacct: exit status 1" in out and "its job's state is unknown" in out
    # A sacct that hangs: the same, after the timeout.
    (tmp_path / "hang").mkdir()
    monkeypatch.setenv("PATH", fake_slurm(tmp_path / "hang", "exec sleep 30")["PATH"])
    monkeypatch.setattr(slurm, "SACCT_TIMEOUT_S", 0.5)
    assert grid.main([str(path), "--root", str(root), "--status"]) == 0
    assert "unknown (sacct: no answer in 0.5 s; job 41_0)" in capsys.readouterr().out


class Clock:
    """time for launch.submit: sleeping moves it on at once."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def time(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_backs_off_while_sacct_fails_then_sees_the_jobs_end(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, failing(3, tmp_path / "calls"))["PATH"])
    clock, lines = Clock(), []
    monkeypatch.setattr(submit, "time", clock)
    assert submit.wait_slurm(["41_0"], log=lines.append) == {"41_0": "COMPLETED"}
    assert clock.sleeps == [2, 4, 8]  # growing, and not the 120 s grace of a fresh submission
    assert sum(f"sacct failed (exit status 1: {DOWN}): 1 job(s) unknown; asking again in" in line
               for line in lines) == 3, lines


def test_wait_gives_up_after_a_long_outage_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, f'echo "{DOWN}" >&2; exit 1')["PATH"])
    clock, lines = Clock(), []
    monkeypatch.setattr(submit, "time", clock)
    assert submit.wait_slurm(["41_0"], log=lines.append, give_up_s=3600) == {"41_0": slurm.UNKNOWN}
    assert clock.sleeps[:4] == [2, 4, 8, 16] and max(clock.sleeps) == 600 and 3600 <= sum(clock.sleeps) < 4300
    assert lines[-1].startswith("giving up: sacct has failed for") and "1 job(s) unknown" in lines[-1]


def test_grid_wait_goes_on_through_sacct_failures(submitted, tmp_path):
    path, root, plan = submitted
    env = fake_slurm(tmp_path, failing(2, tmp_path / "calls"))  # the plan's call, then the wait's first
    out = subprocess.run([sys.executable, REPO / "launch" / "grid.py", path, "--root", root, "--wait"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 run(s) unknown (sacct: exit status 1" in out.stdout and "nothing to submit" in out.stdout
    assert f"sacct failed (exit status 1: {DOWN}): 1 job(s) unknown; asking again in 2 s" in out.stdout
    assert "jobs: completed 1" in out.stdout and "index: " in out.stdout
