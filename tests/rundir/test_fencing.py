"""Fencing (bip/rundir/fence.py): a trainer whose lease was taken over while it was paused or too
slow writes nothing after it could know, exits 2 with one line naming the new owner, and the
folder ends up as an uninterrupted run's. The reproduction of issue 21: pause a trainer
(SIGSTOP) at a precise point, let a second one take the lease over and finish, continue the first."""
from __future__ import annotations

import errno
import fcntl
import itertools
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bip.config import identity, load_config
from bip.errors import BipError
from bip.rundir import folder as runfolder
from bip.rundir import lease as leases
from bip.rundir import lock
from bip.train import main

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see a stopped process")

STALE_MIN = 0.02  # 1.2 s: a stopped trainer's lease is free soon; a running one beats every 0.3 s
OVERRIDES = ["data.synthetic_size=128", "data.batch_size=32", "train.steps_per_epoch=4",
             f"run.lease_stale_min={STALE_MIN}"]
ARGS = ["--dataset", "synthetic", "--epochs", "2", *OVERRIDES]
TIME_KEYS = ("time_s", "wall_time_s", "lineage_wall_time_s")
CTX = multiprocessing.get_context("forkserver")  # forks of a server that imported torch once
CTX.set_forkserver_preload(["bip.train", "test_fencing"])


# -- trainers in child processes, parked at a precise point --------------------------------------

def _park() -> None:
    """Stop this process (SIGSTOP) at a moment when no thread of it is inside a commit (the
    heartbeat's included): what a pause of the whole process looks like to the others."""
    sys.stderr.flush()
    with lock.IN_PROCESS:
        os.kill(os.getpid(), signal.SIGSTOP)


def _install_pause(pause: str) -> None:
    from bip.rundir import atomic, boundary, fence
    from bip.rundir import lease
    from bip.train import report
    once = itertools.count()
    if pause in ("step boundary", "never beats"):
        calls, poll = itertools.count(1), boundary.StepBoundary.poll

        def parked_poll(self):
            if pause == "never beats":
                time.sleep(0.8)  # slow, and without a heartbeat: it looks dead while it trains
            elif next(calls) == 6:  # after the second step of the second epoch (4 per epoch)
                _park()
            return poll(self)
        boundary.StepBoundary.poll = parked_poll
        if pause == "never beats":
            lease.Lease.start_heartbeat = lambda self: None
    elif pause == "epoch end":  # the first epoch is evaluated; its line and checkpoint are next
        end_epoch = report.end_epoch

        def parked_end_epoch(*args, started=None, **kwargs):
            row = end_epoch(*args, started=started, **kwargs)
            if started is not None and next(once) == 0:
                _park()
            return row
        report.end_epoch = parked_end_epoch
    else:  # the temp file is written; the commit is next
        target = {"checkpoint write": identity.CHECKPOINT, "publish": identity.RESULT}[pause]

        def parked_write(path, write, commit=os.replace, tag=""):
            def parked_commit(tmp, final):
                if final.name == target and next(once) == 0:
                    _park()
                commit(tmp, final)
            return atomic.atomic_write(path, write, commit=parked_commit, tag=tag)
        fence.atomic_write = parked_write


def _child(argv: list[str], pause: str | None, err: str) -> None:
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    torch.set_num_threads(1)  # CPU sums depend on it: the same in every trainer and the reference
    if pause:
        _install_pause(pause)
    sys.exit(main(argv))


def start(root: Path, err: Path, pause: str | None = None):
    proc = CTX.Process(target=_child, args=([*ARGS, "--result-dir", str(root)], pause, str(err)))
    proc.start()
    return proc


def run_dir(root: Path) -> Path:
    return identity.run_dir(load_config([], ["data.dataset=synthetic", "train.epochs=2", *OVERRIDES,
                                             f"run.result_dir={root}"]))


def eventually(predicate, what: str, deadline_s: float = 120) -> None:
    end = time.time() + deadline_s
    while not predicate():
        assert time.time() < end, f"{what}: not after {deadline_s} s"
        time.sleep(0.02)


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def lease_free(folder: Path) -> bool:
    owner = leases.read_owner(folder / identity.OWNER)
    return owner is not None and leases.takeover_reason(owner) is not None


def snapshot(folder: Path) -> dict:
    """Every file of the folder, hidden ones included, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / identity.METRICS).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


def assert_like_uninterrupted(folder: Path, reference: Path) -> None:
    # The same files (no error.json, temp file, owner.json or lock left behind) ...
    assert sorted(os.listdir(folder)) == sorted(os.listdir(reference))
    # ... one metrics line per epoch, as the uninterrupted run's ...
    assert [row["epoch"] for row in metrics(folder)] == [1, 2]
    assert metrics(folder) == metrics(reference)
    # ... the same model and result.
    a, b = (torch.load(f / identity.FINAL, weights_only=True)["model"] for f in (folder, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result, expected = (json.loads((f / identity.RESULT).read_text()) for f in (folder, reference))
    assert result["test_acc"] == expected["test_acc"] and result["epochs"] == 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    proc = start(root, root / "err.txt")
    proc.join(300)
    assert proc.exitcode == 0, (root / "err.txt").read_text()[-3000:]
    return run_dir(root)


def new_lines(path: Path, offset: int) -> list[str]:
    return path.read_bytes()[offset:].decode().splitlines()


def assert_fenced_line(lines: list[str], folder: Path, new_owner_pid: int) -> None:
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"error: lost the lease of {folder} to {socket.gethostname()} "
                           f"pid {new_owner_pid}, generation 2"), line
    assert "this trainer held generation 1" in line and "None" not in line and "?" not in line, line


# -- the reproduction: pause, takeover, continue -----------------------------------------------------

@pytest.mark.parametrize("pause", ["step boundary", "epoch end", "checkpoint write", "publish"])
def test_a_paused_trainer_whose_lease_was_taken_over_exits_2_and_writes_nothing(tmp_path, pause, reference):
    root, a_err, b_err = tmp_path / "runs", tmp_path / "a.txt", tmp_path / "b.txt"
    folder = run_dir(root)
    a = start(root, a_err, pause)
    eventually(lambda: stopped(a.pid) or not a.is_alive(), "the first trainer parks")
    assert a.is_alive(), a_err.read_text()[-3000:]
    parked_at = a_err.stat().st_size
    eventually(lambda: lease_free(folder), "its heartbeat goes stale", 30)
    b = start(root, b_err)  # the same command again: takes the lease over and finishes the run
    b.join(300)
    assert b.exitcode == 0, b_err.read_text()[-3000:]
    assert "lease: took over" in b_err.read_text() and "(now generation 2)" in b_err.read_text()
    finished = snapshot(folder)
    os.kill(a.pid, signal.SIGCONT)
    a.join(120)
    assert a.exitcode == 2, a_err.read_text()[-3000:]
    assert_fenced_line(new_lines(a_err, parked_at), folder, b.pid)
    assert snapshot(folder) == finished  # not a byte written after it woke
    assert_like_uninterrupted(folder, reference)
    history = json.loads((folder / identity.CONFIG).read_text())["history"]
    assert [h["generation"] for h in history] == [1, 2] and history[1]["took_over"]["generation"] == 1


@pytest.mark.parametrize("how", ["continued while the new owner trains", "never beats"])
def test_two_trainers_training_at_once_leave_one_run(tmp_path, how, reference):
    """Both train in the folder at the same time: the old owner, continued while the new one
    trains, or one that trains on without a heartbeat (a frozen thread, a slow node) and so
    looks dead: it is stopped by its next write, not by the heartbeat."""
    root, a_err, b_err = tmp_path / "runs", tmp_path / "a.txt", tmp_path / "b.txt"
    folder = run_dir(root)
    a = start(root, a_err, "step boundary" if how.startswith("continued") else "never beats")
    if how.startswith("continued"):
        eventually(lambda: stopped(a.pid) or not a.is_alive(), "the first trainer parks")
    else:
        eventually(lambda: (folder / identity.CONFIG).exists() or not a.is_alive(), "the first trainer starts")
    assert a.is_alive(), a_err.read_text()[-3000:]
    eventually(lambda: lease_free(folder), "its heartbeat goes stale", 30)
    b = start(root, b_err)
    eventually(lambda: (leases.read_owner(folder / identity.OWNER) or {}).get("pid") == b.pid
               or not b.is_alive(), "the second trainer takes the lease")
    if how.startswith("continued"):
        os.kill(a.pid, signal.SIGCONT)
    offset = a_err.stat().st_size
    a.join(120)
    b.join(300)
    assert b.exitcode == 0, b_err.read_text()[-3000:]
    assert a.exitcode == 2, a_err.read_text()[-3000:]
    lines = [line for line in new_lines(a_err, offset) if line.startswith("error:")]
    assert_fenced_line(lines, folder, b.pid)
    assert_like_uninterrupted(folder, reference)


# -- the fence itself -----------------------------------------------------------------------------

def take_over(folder: runfolder.RunFolder, host: str = "elsewhere", pid: int = 4321, **fields) -> dict:
    """Another trainer's lease replaces ours (what a takeover does to a paused owner)."""
    owner = {**leases.read_owner(folder.path / identity.OWNER), "host": host, "pid": pid,
             "token": "newer", "generation": folder.fence.generation + 1, **fields}
    owner.pop("raw")
    (folder.path / identity.OWNER).write_text(json.dumps(owner))
    return owner


def test_every_takeover_increments_the_generation(tmp_path):
    first = runfolder.Lease(tmp_path / "run", 600)
    first.acquire()
    assert json.loads((tmp_path / "run" / identity.OWNER).read_text())["generation"] == 1
    owner = json.loads((tmp_path / "run" / identity.OWNER).read_text())
    (tmp_path / "run" / identity.OWNER).write_text(json.dumps({**owner, "heartbeat": time.time() - 700}))
    logged = []
    second = runfolder.Lease(tmp_path / "run", 600, log=logged.append)
    second.acquire()
    assert second.generation == 2 and "generation 1" in logged[0] and "(now generation 2)" in logged[0]
    second.release()
    # A lease after a release (no owner.json left) still outgrows every start config.yaml records.
    folder = runfolder.RunFolder(tmp_path / "run", 10)
    (folder.path / identity.CONFIG).write_text(json.dumps({"run_id": "r", "parent_id": None, "config": {},
                                                           "provenance": {}, "history": [{"generation": 5}]}) + "\n")
    assert folder.claim() is None and folder.fence.generation == 6
    folder.release()
    assert not (folder.path / identity.OWNER).exists() and not (folder.path / lock.NAME).exists()


def test_a_fenced_trainer_writes_nothing_and_names_the_new_owner(tmp_path):
    folder = runfolder.RunFolder(tmp_path / "run", stale_min=10)
    assert folder.claim() is None
    folder.started = True
    folder.append_metrics({"epoch": 1})
    folder.save(identity.CHECKPOINT, {"step": 1})
    take_over(folder, slurm_job_id="77")
    before = snapshot(folder.path)
    writes = {"metrics": lambda: folder.append_metrics({"epoch": 2}),
              "checkpoint": lambda: folder.save(identity.CHECKPOINT, {"step": 2}),
              "rewind": lambda: folder.save(identity.REWIND, {"step": 2}),
              "publish": lambda: folder.publish({"model": {}}, {"test_acc": 1.0}, {"masks": {}}),
              "config": lambda: folder.write_text(identity.CONFIG, "{}\n"),
              "export": lambda: folder.write_json(identity.EXPORT, {})}
    for name, write in writes.items():
        with pytest.raises(runfolder.FencedOut) as caught:
            write()
        assert str(caught.value) == (f"lost the lease of {folder.path} to elsewhere pid 4321 (Slurm job 77), "
                                     "generation 2 (this trainer held generation 1): stopped, writing "
                                     "nothing more"), name
    folder.fail(RuntimeError("boom"), 0)  # no error.json in a folder that is not ours
    folder.release()  # leaves the new owner's lease alone
    assert snapshot(folder.path) == before


def test_a_write_broken_by_the_takeover_reports_the_takeover(tmp_path):
    """The new owner's start removes the old owner's temp files: a write of the old owner that
    fails on that (here: between creating its temp file and writing it) ends as FencedOut, the
    one line that says what happened, not as a FileNotFoundError."""
    folder = runfolder.RunFolder(tmp_path / "run", stale_min=10)
    assert folder.claim() is None

    def write(f):
        take_over(folder)
        temps = [folder.path / name for name in os.listdir(folder.path) if name.endswith(".tmp")]
        for temp in temps:  # what the new owner's claim does
            temp.unlink()
        os.chmod(temps[0], 0o644)  # what atomic_write does next: FileNotFoundError
    with pytest.raises(runfolder.FencedOut, match="to elsewhere pid 4321, generation 2"):
        folder.fence.write(identity.CHECKPOINT, write)
    assert sorted(os.listdir(folder.path)) == [identity.OWNER]
    folder.release()


def test_a_published_result_is_never_replaced(tmp_path):
    folder = runfolder.RunFolder(tmp_path / "run", stale_min=10)
    assert folder.claim() is None
    (folder.path / identity.RESULT).write_text('{"test_acc": 50}\n')  # what a newer owner published
    with pytest.raises(BipError, match="another trainer published this run"):
        folder.write_json(identity.RESULT, {"test_acc": 1}, exclusive=True)
    assert json.loads((folder.path / identity.RESULT).read_text()) == {"test_acc": 50}
    assert not [n for n in os.listdir(folder.path) if n.endswith(".tmp")]
    folder.release()


def test_a_takeover_waits_for_an_owner_inside_a_commit(tmp_path, monkeypatch):
    """The check and the rename of a commit run under the write lock, and so does a takeover:
    an owner stopped between the two holds the lock, and nobody takes its lease meanwhile."""
    monkeypatch.setattr(leases, "LOCK_WAIT_S", 0.3)
    owner = runfolder.RunFolder(tmp_path / "run", stale_min=10)
    assert owner.claim() is None
    doc = json.loads((owner.path / identity.OWNER).read_text())
    (owner.path / identity.OWNER).write_text(json.dumps({**doc, "heartbeat": time.time() - 700}))
    inside, leave = threading.Event(), threading.Event()

    def commit_in_progress():  # another process's flock: a descriptor of its own, another thread
        fd = os.open(owner.path / lock.NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        inside.set()
        leave.wait(30)
        os.close(fd)
    holder = threading.Thread(target=commit_in_progress)
    holder.start()
    assert inside.wait(30)
    with pytest.raises(runfolder.LeaseHeld, match=rf"holds {lock.NAME} \(stopped inside a write\?\)"):
        runfolder.Lease(owner.path, 600).acquire()
    leave.set()
    holder.join()
    taker = runfolder.Lease(owner.path, 600)
    taker.acquire()
    assert taker.generation == 2
    with pytest.raises(runfolder.FencedOut):
        owner.save(identity.CHECKPOINT, {"step": 1})
    owner.release()
    taker.release()
    assert os.listdir(owner.path) == []


def test_without_file_locks_writes_are_still_checked(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    folder = runfolder.RunFolder(tmp_path / "run", stale_min=10)
    assert folder.claim() is None
    folder.save(identity.CHECKPOINT, {"step": 1})
    folder.append_metrics({"epoch": 1})
    err = capsys.readouterr().err
    assert err.count("has no file locks") == 1 and "could overwrite a newer owner's file" in err
    take_over(folder)
    with pytest.raises(runfolder.FencedOut):
        folder.append_metrics({"epoch": 2})
    folder.release()


def test_a_lost_lease_names_what_is_known_never_none(tmp_path):
    folder = runfolder.RunFolder(tmp_path / "run", stale_min=10)
    assert folder.claim() is None
    (folder.path / identity.OWNER).unlink()  # gone, and no newer start recorded
    with pytest.raises(runfolder.FencedOut, match=r"to another trainer \(its owner.json is gone\)"):
        folder.check_lease(lost=True)
    folder.release()
    assert leases.describe_owner({}) == "an owner whose owner.json is unreadable"
    assert leases.describe_owner({"pid": 7}) == "pid 7 on an unknown host"
    assert leases.describe_owner({"host": "n1"}) == "a trainer on n1 (pid unknown)"
    # A takeover of an unreadable lease file says so, not "from None pid None".
    (folder.path / identity.OWNER).write_text("{\"hos")
    os.utime(folder.path / identity.OWNER, (time.time() - 700,) * 2)
    logged = []
    lease = runfolder.Lease(folder.path, 600, log=logged.append)
    lease.acquire()
    assert "from an owner whose owner.json is unreadable: its heartbeat is" in logged[0], logged
    assert "None" not in logged[0]
    lease.release()


def test_an_owner_json_that_is_a_directory_is_one_clear_line(tmp_path, capsys):
    cfg = load_config([], ["data.dataset=synthetic", "train.epochs=1", f"run.result_dir={tmp_path}"])
    folder = identity.run_dir(cfg)
    (folder / identity.OWNER).mkdir(parents=True)
    assert main(["--dataset", "synthetic", "--epochs", "1", "--result-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"error: {folder / identity.OWNER} is a directory, not a lease file "
                                        "(bip writes owner.json itself): remove it if nothing in it is "
                                        "yours (rm -r), then run again"), err
    assert sorted(os.listdir(folder)) == [identity.OWNER]  # nothing written
    with pytest.raises(BipError, match="is a directory") as caught:  # the lease itself says the same
        runfolder.Lease(folder, 600).acquire()
    assert "keep claiming" not in str(caught.value)
