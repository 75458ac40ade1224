"""A full, read-only or over-quota disk (bip/rundir/diskerror.py): one line naming the file, the
previous checkpoint intact, no empty folder from a start that wrote nothing, and after the disk
is fixed the same command resumes to the result of an uninterrupted run, rewind.pt included.

The disks are small tmpfs mounts (root or CAP_SYS_ADMIN: the tests that need one are skipped
with the reason where mounting is not permitted); the rest fake the failing write."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch

from bip.config import identity, load_config
from bip.export.run import main as export_main
from bip.rundir import atomic, checkpoint
from bip.rundir.diskerror import DiskError
from bip.train import cli, loop, main, train
from helpers import TINY

# 3 epochs of 2 steps, IMP's rewind point after epoch 2: the checkpoint of epoch 1 is the one
# to keep.
RUN = [*TINY, "data.synthetic_size=96", "data.batch_size=16", "train.steps_per_epoch=2",
       "train.epochs=3", "train.rewind_epoch=2"]
TIME_KEYS = ("time_s", "wall_time_s", "lineage_wall_time_s")


# -- tmpfs mounts -----------------------------------------------------------------------------

def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def mountable(tmp_path_factory) -> None:
    """Skip unless this process may mount a tmpfs (tried once)."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount / umount command: the disk-full tests need a small tmpfs")
    probe = tmp_path_factory.mktemp("probe")
    tried = _mount("-t", "tmpfs", "-o", "size=4k", "tmpfs", str(probe))
    if tried.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN): "
                    + (tried.stderr.strip() or f"mount exited {tried.returncode}"))
    subprocess.run(["umount", str(probe)], check=True)


@pytest.fixture
def tmpfs(mountable, tmp_path):
    """``make(size_kb)`` mounts a tmpfs of that size; all are unmounted after the test."""
    mounted: list[Path] = []

    def make(size_kb: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        done = _mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where))
        assert done.returncode == 0, done.stderr
        mounted.append(where)
        return where
    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, options: str) -> None:
    done = _mount("-o", f"remount,{options}", str(where))
    assert done.returncode == 0, done.stderr


# -- what a run left --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run of RUN, on an ordinary disk."""
    cfg = load_config([], RUN + [f"run.result_dir={tmp_path_factory.mktemp('reference')}"])
    train(cfg)
    return identity.run_dir(cfg)


def tensors(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    """Same final model, rewind point and metrics (times aside)."""
    for name in (identity.FINAL, identity.REWIND):
        sa, sb = tensors(a / name), tensors(b / name)
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert metrics(a) == metrics(b)
    ra, rb = (json.loads((d / identity.RESULT).read_text()) for d in (a, b))
    assert ra["test_acc"] == rb["test_acc"] and ra["epochs"] == rb["epochs"] == 3


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / identity.METRICS).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rows]


def one_line(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and all(p in last for p in parts), err
    return last


def run_dir_of(root: Path) -> Path:
    return identity.run_dir(load_config([], RUN + [f"run.result_dir={root}"]))


def leftovers(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


# -- a full disk ------------------------------------------------------------------------------

def test_full_at_config_yaml_is_one_line_and_leaves_no_folder(tmpfs, capsys):
    disk = tmpfs(4)  # one page: owner.json fits, config.yaml does not (nor error.json)
    assert main(RUN + [f"run.result_dir={disk / 'runs'}"]) == 2
    one_line(capsys, f"{run_dir_of(disk / 'runs') / identity.CONFIG}: No space left on device (ENOSPC)",
             "free space")
    assert os.listdir(disk) == []  # runs/, the run id's folder and seed_1234/: all this call's


def _size_kb(reference: Path, checkpoints: float) -> int:
    return int(checkpoints * (reference / identity.CHECKPOINT).stat().st_size / 1024)


@pytest.mark.parametrize("full_at, checkpoints", [(identity.CHECKPOINT, 2.5), (identity.REWIND, 1.5)])
def test_full_disk_keeps_the_last_checkpoint_and_the_same_command_resumes(
        tmpfs, reference, capsys, full_at, checkpoints):
    # 2.5 checkpoints: epoch 2 writes rewind.pt, then its checkpoint finds no room.
    # 1.5: epoch 2's rewind.pt finds no room (the checkpoint of epoch 1 stays, and so must the
    # rewind point be written when the run resumes).
    disk = tmpfs(_size_kb(reference, checkpoints))
    argv = RUN + [f"run.result_dir={disk}"]
    run_dir = run_dir_of(disk)
    assert main(argv) == 2
    one_line(capsys, f"{run_dir / full_at}: No space left on device (ENOSPC)")
    kept = checkpoint.load(run_dir / identity.CHECKPOINT)
    assert (kept["epoch"], kept["step_in_epoch"]) == (1, 0)
    assert (run_dir / identity.REWIND).exists() == (full_at == identity.CHECKPOINT)
    assert leftovers(run_dir) == []  # the temporary file of the failed write is gone
    error = json.loads((run_dir / identity.ERROR).read_text())["error"]
    assert "No space left on device" in error and "inline_container" not in error

    remount(disk, "size=64m")
    assert main(argv) == 0
    assert "resuming from checkpoint.pt: epoch 2, step 0" in capsys.readouterr().err
    assert_same_run(reference, run_dir)
    assert not list(run_dir.glob("error*.json"))


# -- rewind.pt lost by older bip (it saved the checkpoint first) ------------------------------

@pytest.mark.parametrize("stopped_after", [2, 3])
def test_a_missing_rewind_pt_is_written_again_exactly(tmp_path, reference, capsys, stopped_after):
    # After epoch 2 the checkpoint IS the rewind state: resuming writes it from there. After
    # epoch 3 it is gone: the run trains again from the start (the only exact way).
    cfg = load_config([], RUN + [f"run.result_dir={tmp_path}"])

    def stop(event, info):
        if event == "epoch" and info["epoch"] == stopped_after:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        train(cfg, hook=stop)
    run_dir = identity.run_dir(cfg)
    (run_dir / identity.REWIND).unlink()
    capsys.readouterr()
    train(cfg)
    err = capsys.readouterr().err
    assert ("training again from the start" in err) == (stopped_after == 3), err
    assert ("resuming from checkpoint.pt" in err) == (stopped_after == 2), err
    assert_same_run(reference, run_dir)


# -- a read-only disk -------------------------------------------------------------------------

@pytest.mark.parametrize("after_epoch, fails_at", [(1, identity.METRICS), (3, identity.FINAL)])
def test_a_disk_turned_read_only_mid_run_is_one_line_and_resumes(
        tmpfs, reference, capsys, monkeypatch, after_epoch, fails_at):
    disk = tmpfs(64 * 1024)
    argv = RUN + [f"run.result_dir={disk}"]

    def read_only(event, info):
        if event == "epoch" and info["epoch"] == after_epoch:
            remount(disk, "ro")
    monkeypatch.setattr(cli, "train", partial(loop.train, hook=read_only))
    assert main(argv) == 2
    one_line(capsys, f"{run_dir_of(disk) / fails_at}: Read-only file system (EROFS)",
             "make the file system writable")
    monkeypatch.undo()
    remount(disk, "rw")
    assert main(argv) == 0  # owner.json stayed behind (read-only): its pid's trainer is gone
    assert_same_run(reference, run_dir_of(disk))


def test_export_of_a_read_only_run_is_one_line_and_writes_nothing(tmpfs, reference, capsys):
    disk = tmpfs(16 * 1024)
    run_dir = disk / "run"
    shutil.copytree(reference, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    remount(disk, "ro")
    assert export_main([str(run_dir)]) == 2
    # The export takes the run folder's lease before it writes (bip/rundir/fence.py): the first
    # write it tries is owner.json.
    one_line(capsys, f"{run_dir / 'owner.json'}: Read-only file system (EROFS)")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


# -- the translation itself (no mount needed) -------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_torch_save_on_a_full_device_names_enospc_not_inline_container(tmp_path, monkeypatch):
    # torch.save turns the failed write into "RuntimeError: [enforce fail at
    # inline_container.cc] unexpected pos": the OSError under it must be what is reported.
    placeholder = tmp_path / ".model.pt.x.tmp"

    def full_device(**_kwargs):
        placeholder.touch()
        return os.open("/dev/full", os.O_WRONLY), str(placeholder)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", full_device)
    with pytest.raises(DiskError) as caught:
        checkpoint.save(tmp_path / "model.pt", {"w": torch.zeros(1 << 16)})
    assert str(caught.value).startswith(f"cannot write {tmp_path / 'model.pt'}: No space left on device (ENOSPC)")
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert not placeholder.exists()


def test_over_quota_is_one_line_and_other_failures_pass_unchanged(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old\n")

    def fails(err):
        def write(f):
            f.write(b"partial")
            raise err
        return write
    with pytest.raises(DiskError, match=r"result.json: Disk quota exceeded \(EDQUOT\); free space or raise"):
        atomic.atomic_write(target, fails(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(OSError) as other:
        atomic.atomic_write(target, fails(OSError(errno.EIO, "I/O error")))
    assert not isinstance(other.value, DiskError) and other.value.errno == errno.EIO
    with pytest.raises(ValueError):
        atomic.atomic_write(target, fails(ValueError("a bug")))
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []
