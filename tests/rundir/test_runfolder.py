"""A run folder's life (bip/runfolder.py + the loop): one owner, step checkpoints that resume
bit-identically after a stop or a kill -9 at any moment, immutable published outputs, damaged
runs detected and repaired, --resume checked, starts recorded, error files per rank."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bip.rundir import boundary
from bip.rundir import checkpoint, folder as runfolder
from bip.config import identity
from bip.config import load_config
from bip.errors import BipError
from bip.train import main, train
from helpers import TINY

ROOT = Path(__file__).resolve().parents[2]
TIME_KEYS = ("time_s", "wall_time_s", "lineage_wall_time_s")


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / identity.FINAL, weights_only=True)["model"]


def assert_same_model(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / identity.METRICS).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


def snapshot_folder(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- the lease -------------------------------------------------------------------------------

def owner_file(folder: Path, **fields) -> None:
    base = {"host": socket.gethostname(), "pid": os.getppid(), "slurm_job_id": None, "started": "t0",
            "heartbeat": time.time(), "stale_s": 600, "token": "someone-else"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / identity.OWNER).write_text(json.dumps({**base, **fields}))


def eventually(predicate, deadline_s: float = 30) -> None:
    end = time.time() + deadline_s
    while not predicate():
        assert time.time() < end, f"not true after {deadline_s} s"
        time.sleep(0.05)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lease_is_exclusive_and_names_its_owner(tmp_path):
    a, b = runfolder.Lease(tmp_path / "run", 600), runfolder.Lease(tmp_path / "run", 600)
    a.acquire()
    with pytest.raises(runfolder.LeaseHeld, match=rf"in use by {socket.gethostname()} pid {os.getpid()}"):
        b.acquire()
    a.release()
    assert not (tmp_path / "run" / identity.OWNER).exists()
    b.acquire()
    b.release()


def test_stale_or_dead_leases_are_taken_over_and_logged(tmp_path):
    cases = {"dead": {"pid": dead_pid()}, "stale": {"host": "elsewhere", "heartbeat": time.time() - 700},
             "live elsewhere": {"host": "elsewhere"}, "live here": {}}
    for name, fields in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        owner_file(folder, **fields)
        logged = []
        lease = runfolder.Lease(folder, 600, log=logged.append)
        if name.startswith("live"):
            with pytest.raises(runfolder.LeaseHeld):
                lease.acquire()
            assert json.loads((folder / identity.OWNER).read_text())["token"] == "someone-else"
            continue
        lease.acquire()
        assert logged and "took over" in logged[0], name
        assert ("is gone" if name == "dead" else "heartbeat is") in logged[0]
        lease.release()


def test_the_heartbeat_is_refreshed_and_a_lost_lease_stops_the_owner(tmp_path):
    folder = runfolder.RunFolder(tmp_path / "run", stale_min=0.01)  # 0.6 s: a beat every 0.15 s
    assert folder.claim() is None
    first = json.loads((folder.path / identity.OWNER).read_text())["heartbeat"]
    # Waits with a deadline, not a fixed sleep: on a loaded machine (make test's other worker,
    # the Slurm jobs) the heartbeat thread can run later than its 0.15 s.
    eventually(lambda: json.loads((folder.path / identity.OWNER).read_text())["heartbeat"] > first)
    folder.check_lease()  # still ours
    owner_file(folder.path, token="thief")  # someone took it over (we looked dead to them)
    eventually(folder.lease_lost)  # noticed at a heartbeat
    with pytest.raises(BipError, match="lost the lease"):
        folder.check_lease()
    assert not folder.owned
    folder.release()
    assert json.loads((folder.path / identity.OWNER).read_text())["token"] == "thief"  # left alone


def test_a_second_trainer_exits_2_naming_the_owner_and_touches_nothing(tmp_path, capsys):
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}"])
    folder = identity.run_dir(cfg)
    lease = runfolder.Lease(folder, 600)
    lease.acquire()
    (folder / "config.yaml").write_text("{}\n")
    before = snapshot_folder(folder)
    assert main([f"{o}" for o in TINY] + ["--result-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"pid {os.getpid()}" in err[0], err
    assert snapshot_folder(folder) == before
    lease.release()


def test_two_trainers_started_at_once_train_once(tmp_path):
    args = ["--dataset", "synthetic", "--epochs", "3", "--seed", "3", "--result-dir", str(tmp_path / "race"),
            "data.synthetic_size=512", "data.batch_size=32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "bip.train", *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1].strip().splitlines()
    assert len(loser) == 1 and "is in use by" in loser[0] and "pid" in loser[0], loser
    race = tmp_path / "race"
    cfg = load_config([], ["data.dataset=synthetic", "train.epochs=3", "run.seed=3",
                           "data.synthetic_size=512", "data.batch_size=32", f"run.result_dir={race}"])
    raced = identity.run_dir(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the raced trainers (OMP_NUM_THREADS=1): CPU sums depend on it
    try:
        train(cfg, tmp_path / "alone")
    finally:
        torch.set_num_threads(threads)
    assert [row["epoch"] for row in metrics(raced)] == [1, 2, 3]
    assert metrics(raced) == metrics(tmp_path / "alone")
    assert_same_model(raced, tmp_path / "alone")
    assert not (raced / identity.OWNER).exists()


# -- step checkpoints ------------------------------------------------------------------------

def prune_config(tmp_path: Path, method: str, extra: list[str] = ()) -> list[str]:
    base = TINY + [f"run.result_dir={tmp_path}", "train.rewind_epoch=1"]
    pre = load_config([], base)
    train(pre)
    over = base + ["run.stage=prune", f"prune.method={method}", "prune.layer_type=unstructured",
                   f"run.parent={identity.run_id(pre)}", "prune.score_init=magnitude", *extra]
    if method == "imp":  # one round (a run) of 2 epochs: the stop lands in its second epoch
        over += ["prune.k=0.5", "prune.imp_rate=0.5", "train.epochs=2"]
    else:
        over += ["prune.k=0.2"]
    return over


@pytest.mark.parametrize("method", ["pretrain", "bip", "imp"])
def test_a_stop_mid_epoch_resumes_from_that_step_bit_identically(tmp_path, method, capsys):
    overrides = (TINY + [f"run.result_dir={tmp_path}"]) if method == "pretrain" \
        else prune_config(tmp_path, method)
    cfg = load_config([], overrides)
    full = train(cfg, tmp_path / "full")
    steps_per_epoch = metrics(tmp_path / "full")[0]["step"]

    def stop_in_epoch_2(event, info):
        if event == "step" and info["step"] == steps_per_epoch + 3:
            boundary.request_stop("test")
    try:
        with pytest.raises(boundary.Interrupted):
            train(cfg, tmp_path / "stopped", hook=stop_in_epoch_2)
    finally:
        boundary.clear_stop()
    saved = checkpoint.load(tmp_path / "stopped" / identity.CHECKPOINT)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 3)
    assert not list((tmp_path / "stopped").glob("error*.json"))  # a stop is not a failure
    capsys.readouterr()
    resumed = train(cfg, tmp_path / "stopped")
    assert "resuming from checkpoint.pt: epoch 2, step 3 of the epoch" in capsys.readouterr().err
    assert_same_model(tmp_path / "full", tmp_path / "stopped")
    assert metrics(tmp_path / "full") == metrics(tmp_path / "stopped")  # train_loss of the split epoch too
    assert {k: v for k, v in resumed.items() if k not in TIME_KEYS + ("final",)} == \
           {k: v for k, v in full.items() if k not in TIME_KEYS + ("final",)}


def _child(overrides: list[str], run_dir: str, log: str) -> None:
    """A trainer in a process forked from a server that has already imported torch."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    train(load_config([], overrides), run_dir)


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _owned_by(folder: Path, pid: int) -> bool:
    owner = runfolder.read_owner(folder / identity.OWNER)
    return bool(owner) and owner.get("pid") == pid


@pytest.mark.slow
def test_kill_9_at_20_random_moments_never_leaves_an_unresumable_run(tmp_path):
    overrides = TINY + ["train.epochs=4", "data.synthetic_size=320", "train.checkpoint_every_min=1e-6",
                        f"run.result_dir={tmp_path}"]
    ctx = multiprocessing.get_context("forkserver")  # forks of a server that imported torch once
    ctx.set_forkserver_preload(["bip.train", "test_runfolder"])
    log = str(tmp_path / "log.txt")

    def run(run_dir: Path):
        p = ctx.Process(target=_child, args=(overrides, str(run_dir), log))
        p.start()
        return p
    reference = run(tmp_path / "reference")
    reference.join(600)
    assert reference.exitcode == 0, open(log).read()[-3000:]
    target, rng = tmp_path / "killed", random.Random(0)
    kills = during_write = 0
    while kills < 20:
        proc = run(target)
        end = time.time() + 60
        while proc.is_alive() and not _owned_by(target, proc.pid) and time.time() < end:
            time.sleep(0.001)  # the child has its lease: it is set up or training
        if kills % 4 == 3:  # a checkpoint write in flight
            while proc.is_alive() and time.time() < end and not any(
                    n.startswith(".checkpoint.pt.") for n in _names(target)):
                time.sleep(0.0002)
        else:
            proc.join(rng.uniform(0.0, 0.6))
        if not proc.is_alive():
            assert proc.exitcode == 0, open(log).read()[-3000:]
            break  # finished before the 20th kill: the assertion below says so
        proc.kill()
        proc.join()
        kills += 1
        during_write += any(n.startswith(".checkpoint.pt.") for n in _names(target))
        assert runfolder.inspect(target).state in ("started", "waiting", "new")
    assert kills == 20, f"the run finished after {kills} kills: make it longer"
    assert during_write >= 3  # kills during a checkpoint write (its temp file stayed behind)
    final = run(target)
    final.join(600)
    assert final.exitcode == 0, open(log).read()[-3000:]
    assert runfolder.inspect(target).state == "done"
    assert_same_model(tmp_path / "reference", target)
    assert metrics(tmp_path / "reference") == metrics(target)
    assert not [n for n in _names(target) if n.endswith((".tmp", ".stale"))]  # leftovers removed
    assert "is gone" in open(log).read()  # the takeovers of the dead owners' leases were logged


# -- published outputs -----------------------------------------------------------------------

def test_children_read_the_published_final_pt_never_the_checkpoint(tmp_path, capsys):
    base = TINY + [f"run.result_dir={tmp_path}", "train.epochs=1"]
    pre = load_config([], base)
    train(pre)
    parent = identity.run_dir(pre)
    (parent / identity.CHECKPOINT).write_bytes(b"a checkpoint being rewritten by a second job")
    prune = load_config([], base + ["run.stage=prune", "prune.method=omp", "prune.layer_type=unstructured",
                                    "prune.k=0.3", f"run.parent={identity.run_id(pre)}"])
    assert train(prune)["status"] == "done"
    # --source-net accepts a run folder: its final.pt
    rc = main(["--exp-mode", "prune", "--layer-type", "unstructured", "--k", "0.3", "--source-net",
               str(parent), "--trainer", "base", *base, "train.steps_per_epoch=1"])
    assert rc == 0, capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert main(["--exp-mode", "prune", "--layer-type", "unstructured", "--k", "0.3", "--source-net",
                 str(unfinished), "--dataset", "synthetic", "--result-dir", str(tmp_path)]) == 2
    assert "has not finished" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated result.json", "emptied final.pt", "cut config.yaml"])
def test_a_damaged_finished_run_is_corrupt_and_its_command_repairs_it(tmp_path, damage, capsys):
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}", "train.epochs=1"])
    first = train(cfg)
    folder = identity.run_dir(cfg)
    name = {"truncated result.json": identity.RESULT, "emptied final.pt": identity.FINAL,
            "cut config.yaml": identity.CONFIG}[damage]
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(b"" if name == identity.FINAL else data[:len(data) // 2])
    found = runfolder.inspect(folder)
    assert found.state == "corrupt" and name in found.detail
    capsys.readouterr()
    again = train(cfg)
    assert list(folder.glob(f"{name}.corrupt-*")), "the damaged file is kept aside"
    assert "is damaged: moved to" in capsys.readouterr().err
    assert runfolder.inspect(folder).state == "done"
    assert again["test_acc"] == first["test_acc"]


def test_stale_temp_files_of_killed_writes_are_removed_when_a_run_starts(tmp_path):
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}", "train.epochs=1"])
    folder = identity.run_dir(cfg)
    folder.mkdir(parents=True)
    for name in (".checkpoint.pt.abc123.tmp", ".metrics.jsonl.x.tmp", ".owner.json.y.stale"):
        (folder / name).write_bytes(b"x" * 1000)
    (tmp_path / ".not-mine.tmp").write_bytes(b"x")  # outside the run folder: left alone
    train(cfg)
    assert not [n for n in os.listdir(folder) if n.startswith(".")]
    assert (tmp_path / ".not-mine.tmp").exists()


# -- --resume and starts ---------------------------------------------------------------------

def test_resume_checks_what_it_resumes_and_only_seeds_a_folder_without_a_checkpoint(tmp_path, capsys):
    base = TINY + [f"run.result_dir={tmp_path}", "train.epochs=1"]
    other = load_config([], base + ["run.seed=7"])
    train(other)
    foreign = str(identity.run_dir(other) / identity.CHECKPOINT)
    cfg = load_config([], base + ["run.seed=8"])
    waiting = identity.run_dir(cfg)
    waiting.mkdir(parents=True)
    (waiting / identity.CONFIG).write_text(identity.config_yaml(cfg, {"submitted": {}}))
    before = snapshot_folder(waiting)
    capsys.readouterr()
    assert main([*base, "run.seed=8", f"run.resume={foreign}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 7, not of this run" in err[0] and "run.resume_foreign=true" in err[0]
    assert snapshot_folder(waiting) == before  # a bad command touches nothing
    assert main([*base, "run.seed=8", f"run.resume={tmp_path / 'missing.pt'}"]) == 2
    assert snapshot_folder(waiting) == before

    assert main([*base, "run.seed=8", f"run.resume={foreign}", "run.resume_foreign=true"]) == 0
    doc = json.loads((waiting / identity.CONFIG).read_text())
    assert doc["config"]["run"]["resume_foreign"] is True
    assert doc["history"][-1]["seeded_from"] == foreign and doc["history"][-1]["resume_foreign"] is True

    # A folder with its own checkpoint resumes from it; --resume no longer applies.
    def stop_early(event, info):
        if event == "step" and info["step"] == 2:
            boundary.request_stop("test")
    mine = load_config([], base + ["run.seed=9", "train.epochs=2"])
    try:
        with pytest.raises(boundary.Interrupted):
            train(mine, hook=stop_early)
    finally:
        boundary.clear_stop()
    capsys.readouterr()
    assert main([*base, "run.seed=9", "train.epochs=2", f"run.resume={tmp_path / 'missing.pt'}"]) == 0
    assert "resuming from checkpoint.pt: epoch 1, step 2" in capsys.readouterr().err


def test_every_start_is_recorded_and_a_code_change_is_flagged(tmp_path, capsys):
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}"])
    folder = identity.run_dir(cfg)

    def stop_at_3(event, info):
        if event == "step" and info["step"] == 3:
            boundary.request_stop("test")
    try:
        with pytest.raises(boundary.Interrupted):
            train(cfg, hook=stop_at_3)
    finally:
        boundary.clear_stop()
    doc = json.loads((folder / identity.CONFIG).read_text())
    assert len(doc["history"]) == 1 and doc["code_changed"] is False
    doc["history"][0]["git_sha"] = "0123456789abcdef"  # as if started by another commit
    (folder / identity.CONFIG).write_text(json.dumps(doc) + "\n")
    capsys.readouterr()
    train(cfg)
    assert "resumes under other code" in capsys.readouterr().err
    doc = json.loads((folder / identity.CONFIG).read_text())
    assert [h["git_sha"][:10] for h in doc["history"]][0] == "0123456789" and len(doc["history"]) == 2
    assert doc["history"][1]["resumed_at"] == {"epoch": 0, "step_in_epoch": 3}
    assert doc["code_changed"] is True and doc["provenance"]["host"] == socket.gethostname()


def test_every_rank_that_raises_writes_its_error_and_the_first_one_is_shown(tmp_path):
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}"])

    def boom(event, info):
        if event == "step" and info["step"] == 2:
            raise RuntimeError("rank 0 broke")
    with pytest.raises(RuntimeError):
        train(cfg, hook=boom)
    folder = identity.run_dir(cfg)
    assert json.loads((folder / "error.rank0.json").read_text())["error"] == "RuntimeError: rank 0 broke"
    assert runfolder.inspect(folder).detail == "RuntimeError: rank 0 broke"
    # Another rank failed first; rank 0 only saw the collective time out.
    rank1 = {"status": "failed", "error": "ValueError: the real cause", "rank": 1, "time": 1.0}
    (folder / "error.rank1.json").write_text(json.dumps(rank1))
    assert runfolder.inspect(folder).detail == "ValueError: the real cause"
    train(cfg)  # the next start clears them
    assert not list(folder.glob("error*.json"))


def test_sigterm_checkpoints_at_the_next_step_and_the_same_command_resumes(tmp_path):
    args = ["--dataset", "synthetic", "--epochs", "2", "--seed", "4", "--result-dir", str(tmp_path),
            "data.synthetic_size=2048", "data.batch_size=32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bip.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cfg = load_config([], ["data.dataset=synthetic", "train.epochs=2", "run.seed=4",
                           "data.synthetic_size=2048", "data.batch_size=32", f"run.result_dir={tmp_path}"])
    folder = identity.run_dir(cfg)
    end = time.time() + 300
    while not (folder / identity.OWNER).exists() and time.time() < end:
        time.sleep(0.05)
    time.sleep(1.0)  # some steps into epoch 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stop requested (SIGTERM): checkpoint saved at epoch 1, step" in err
    saved = checkpoint.load(folder / identity.CHECKPOINT)
    assert saved["epoch"] == 0 and saved["step_in_epoch"] > 0


def test_a_run_finished_before_final_pt_existed_stays_done(tmp_path):
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}", "train.epochs=1"])
    train(cfg)
    folder = identity.run_dir(cfg)
    result = json.loads((folder / identity.RESULT).read_text())
    del result["final"]
    (folder / identity.RESULT).write_text(json.dumps(result))
    (folder / identity.FINAL).unlink()
    found = runfolder.inspect(folder)
    assert found.state == "done" and runfolder.model_file(folder, found.result).name == identity.CHECKPOINT
    (folder / identity.CHECKPOINT).write_bytes(b"")  # its model file damaged: corrupt
    assert runfolder.inspect(folder).state == "corrupt"


@pytest.mark.parametrize("override", ["train.checkpoint_every_min=0", "train.checkpoint_every_min=nan",
                                      "run.lease_stale_min=-1"])
def test_bad_lifecycle_settings_are_one_line(tmp_path, override, capsys):
    assert main(["--result-dir", str(tmp_path), *TINY, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("must be > 0" in err[0] or "(NaN)" in err[0]) and not list(tmp_path.iterdir())
