"""launch.collect and launch.plots on hand-made run folders: statuses, columns, idempotence,
plots and the summary table. Config files come from bip.config.identity, as the trainer writes them."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from bip.config import identity
from bip.config import Config
from bip.errors import BipError
from launch import collect, plots

REPO = Path(__file__).resolve().parents[2]


def config(stage: str = "pretrain", method: str = "hydra", k: float = 1.0, seed: int = 1,
           parent: str = "", layer_type: str | None = None, **extra) -> Config:
    layer_type = layer_type or ("dense" if stage == "pretrain" else "unstructured")
    return Config().replace(**{"data.dataset": "CIFAR10", "run.stage": stage, "prune.method": method,
                               "prune.layer_type": layer_type, "prune.k": k, "run.seed": seed,
                               "run.parent": parent, **extra})


def write_model_file(path: Path) -> int:
    """A file shaped like torch.save's (a zip holding a pickle); returns its size."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return path.stat().st_size


def write_lease(folder: Path, pid: int = os.getppid(), age_s: float = 0.0) -> None:
    """owner.json of a live trainer (default: this process's parent, alive, another process)."""
    owner = {"host": socket.gethostname(), "pid": pid, "slurm_job_id": None, "started": "now",
             "heartbeat": time.time() - age_s, "stale_s": 600, "token": "test"}
    (folder / identity.OWNER).write_text(json.dumps(owner))


def write_run(root: Path, cfg: Config, status: str = "done", test_acc: float = 90.0) -> Path:
    """A run folder as the trainer leaves it in ``status`` (the launcher's config for waiting;
    running: a live lease; started: a checkpoint and no lease)."""
    folder = identity.run_dir(cfg, root)
    folder.mkdir(parents=True)
    provenance = {} if status == "waiting" else {"git_sha": "abc123", "git_dirty": False,
                                                 "device": "cpu", "slurm_job_id": "77_3"}
    (folder / identity.CONFIG).write_text(identity.config_yaml(cfg, provenance))
    if status == "waiting":
        return folder
    if status == "running":
        write_lease(folder)
    metrics = [{"epoch": e, "test_acc": test_acc, "val_acc": test_acc} for e in (1, 2)]
    (folder / identity.METRICS).write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"epo')
    (folder / identity.CHECKPOINT).write_bytes(b"")
    if status == "failed":
        (folder / identity.ERROR).write_text(json.dumps(
            {"status": "failed", "error": "RuntimeError: boom", "time": 1.0}))
    if status == "done":
        dense = cfg.run.stage == "pretrain"
        result = {
            "status": "done", "run_id": identity.run_id(cfg), "parent_id": cfg.run.parent,
            "stage": cfg.run.stage, "method": "dense" if dense else cfg.prune.method,
            "dataset": cfg.data.dataset, "arch": cfg.model.arch, "layer_type": cfg.prune.layer_type,
            "k": cfg.prune.k, "seed": cfg.run.seed, "epochs": 2, "test_acc": test_acc, "test_top5": 99.0,
            "val_acc": test_acc, "best_val_acc": None, "best_epoch": None, "test_acc_at_best_val": None,
            "sparsity": None if dense else {"kept_fraction": cfg.prune.k + 0.001},
            "params_dense": 100, "params_effective": 100 if dense else 10, "macs_dense": 1000,
            "macs_effective": 1000 if dense else 100, "wall_time_s": 1.5, "device": "cpu", "world_size": 1,
            "final": {"file": identity.FINAL, "bytes": write_model_file(folder / identity.FINAL)},
        }
        (folder / identity.RESULT).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Every status, plus folders that are not runs."""
    root = tmp_path / "runs"
    dense = config()
    write_run(root, dense)
    write_run(root, config(stage="pretrain", seed=2), status="failed")
    prune = config("prune", "hydra", 0.1, parent=identity.run_id(dense))
    write_run(root, prune, status="running")
    write_run(root, config("prune", "bip", 0.1, parent=identity.run_id(dense)), status="waiting")
    killed = write_run(root, config("prune", "hydra", 0.3, parent=identity.run_id(dense)), status="running")
    write_lease(killed, pid=_dead_pid())  # its trainer was killed: a lease nobody renews
    # seed 2's pretrain failed: its prune is blocked, and so is the finetune after that prune
    blocked = config("prune", "omp", 0.5, seed=2, parent=identity.run_id(config(seed=2)))
    write_run(root, blocked, status="waiting")
    write_run(root, config("finetune", "omp", 0.5, seed=2, parent=identity.run_id(blocked)), "waiting")
    damaged = write_run(root, config("prune", "omp", 0.7, parent=identity.run_id(dense)))
    (damaged / identity.FINAL).write_bytes(b"")  # emptied: result.json alone is not done
    cut = write_run(root, config("prune", "omp", 0.2, parent=identity.run_id(dense)))
    (cut / identity.RESULT).write_text((cut / identity.RESULT).read_text()[:40])
    cut = write_run(root, config("prune", "random", 0.2, parent=identity.run_id(dense)), test_acc=55.0)
    (cut / identity.CONFIG).write_text((cut / identity.CONFIG).read_text()[:300])
    (root / "_slurm" / "123").mkdir(parents=True)
    (root / "plots").mkdir()
    (root / "stray-folder" / "not_a_seed").mkdir(parents=True)
    return root


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def read_index(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["run_id"] + "/" + row["seed"]: row for row in csv.DictReader(f)}


def run_key(cfg: Config) -> str:
    return f"{identity.run_id(cfg)}/{cfg.run.seed}"


def test_statuses_and_columns(root: Path, capsys):
    rows = read_index(collect.collect(root))
    statuses = {key: row["status"] for key, row in rows.items()}
    dense = config()
    bip_cfg = config("prune", "bip", 0.1, parent=identity.run_id(dense))
    omp_blocked = config("prune", "omp", 0.5, seed=2, parent=identity.run_id(config(seed=2)))
    assert statuses[run_key(dense)] == "done"
    assert statuses[run_key(config(seed=2))] == "failed"
    assert statuses[run_key(config("prune", "hydra", 0.1, parent=identity.run_id(dense)))] == "running"
    assert statuses[run_key(config("prune", "hydra", 0.3, parent=identity.run_id(dense)))] == "started"
    assert statuses[run_key(bip_cfg)] == "waiting"
    assert statuses[run_key(omp_blocked)] == "blocked"
    assert statuses[run_key(config("finetune", "omp", 0.5, seed=2,
                                   parent=identity.run_id(omp_blocked)))] == "blocked"
    assert sorted(statuses.values()).count("corrupt") == 3
    assert len(rows) == 10  # _slurm, plots and a folder without seed_* are not runs

    done = rows[run_key(dense)]
    identity_columns = (done["method"], done["stage"], done["layer_type"], done["k"])
    assert identity_columns == ("dense", "pretrain", "dense", "1.0")
    result_columns = (done["test_acc"], done["kept_fraction"], done["git_sha"], done["slurm_job_id"])
    assert result_columns == ("90.0", "", "abc123", "77_3")
    assert done["data.dataset"] == "CIFAR10" and done["prune.method"] == "hydra"
    assert done["path"] == f"{identity.run_id(dense)}/seed_1"
    running = rows[run_key(config("prune", "hydra", 0.1, parent=identity.run_id(dense)))]
    assert running["epochs"] == "2" and running["test_acc"] == ""  # the cut-short line is skipped
    assert rows[run_key(config(seed=2))]["error"] == "RuntimeError: boom"
    pending = rows[run_key(bip_cfg)]
    assert (pending["method"], pending["k"], pending["parent_id"]) == ("bip", "0.1", identity.run_id(dense))

    corrupt = {row["path"]: row for row in rows.values() if row["status"] == "corrupt"}
    messages = sorted(row["error"] for row in corrupt.values())
    assert messages == ["config.yaml is truncated", "final.pt is missing or damaged",
                        "result.json is not valid JSON"]
    # A cut config.yaml keeps what result.json says; the row still has its path.
    assert [row["test_acc"] for row in corrupt.values() if "config" in row["error"]] == ["55.0"]
    err = capsys.readouterr().err
    assert all(f"warning: {path}:" in err for path in corrupt)


def test_rerun_gives_identical_csv(root: Path):
    first = collect.collect(root).read_bytes()
    assert collect.collect(root).read_bytes() == first
    assert not list(root.glob(".*.tmp"))  # the atomic write leaves no temp file
    header = first.split(b"\n", 1)[0].decode().split(",")
    assert header[:3] == ["status", "stage", "method"] and "prune.k" in header and "run.seed" in header


def test_pandas_reads_the_index(root: Path):
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(collect.collect(root))
    assert len(frame) == 10
    assert frame["test_acc"].dtype.kind == "f" and frame["prune.k"].dtype.kind == "f"
    assert set(frame["status"]) == {"done", "running", "started", "failed", "waiting", "blocked", "corrupt"}


def accuracy_grid(root: Path) -> None:
    """dense 90/92; hydra k=0.1 prune 80/82 with a finetune (85) for seed 1; bip k=0.1 88/86/87."""
    for seed, acc in ((1, 90.0), (2, 92.0)):
        write_run(root, config(seed=seed), test_acc=acc)
    parent = identity.run_id(config())
    for seed, acc in ((1, 80.0), (2, 82.0)):
        write_run(root, config("prune", "hydra", 0.1, seed=seed, parent=parent), test_acc=acc)
    hydra = identity.run_id(config("prune", "hydra", 0.1, parent=parent))
    write_run(root, config("finetune", "hydra", 0.1, seed=1, parent=hydra), test_acc=85.0)
    write_run(root, config("finetune", "hydra", 0.1, seed=2, parent=hydra), status="failed")
    for seed, acc in ((1, 88.0), (2, 86.0), (3, 87.0)):
        write_run(root, config("prune", "bip", 0.1, seed=seed, parent=parent), test_acc=acc)
    write_run(root, config("prune", "bip", 0.5, seed=1, parent=parent), test_acc=89.0)


def test_summary_uses_the_last_stage_and_right_means(tmp_path: Path):
    accuracy_grid(tmp_path)
    entries = {(e["method"], e["k"]): e for e in plots.summarize(collect.scan(tmp_path))}
    dense, hydra, bip = entries[("dense", 1.0)], entries[("hydra", 0.1)], entries[("bip", 0.1)]
    assert (dense["n"], dense["test_acc_mean"]) == (2, 91.0)
    # seed 1's finetune is done, seed 2's failed: the point is the finetune stage alone, never a
    # mean of one finetuned and one unfinetuned seed
    assert (hydra["n"], hydra["test_acc_mean"], hydra["stage"]) == (1, 85.0, "finetune")
    assert (bip["n"], bip["test_acc_mean"], bip["test_acc_std"]) == (3, 87.0, 1.0)
    assert bip["kept_fraction_mean"] == pytest.approx(0.101)
    table = plots.summary_markdown(plots.summarize(collect.scan(tmp_path)))
    assert "## CIFAR10 / resnet20s / unstructured" in table
    assert "| bip | 0.1 | 90% | 87.00 ± 1.00 | 3 | 0.1010 | prune |" in table
    assert "| dense | 1 | 0% | 91.00 ± 1.41 | 2 |  | pretrain |" in table


def test_plots_are_written(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    root = tmp_path / "runs"
    accuracy_grid(root)
    assert collect.main([str(root), "--plots", "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    assert "87.00 ± 1.00" in out and out.strip().endswith("index.csv")
    assert (root / "summary.md").read_text() in out
    pngs = list((tmp_path / "figs").glob("*.png"))
    assert [p.name for p in pngs] == ["CIFAR10-resnet20s-unstructured.png"]
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pngs[0].stat().st_size > 1000


def test_missing_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch):
    accuracy_grid(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(BipError, match=r"pip install -e '\.\[plots\]'"):
        plots.render_panels(plots.summarize(collect.scan(tmp_path)))


def test_missing_root_is_one_line_and_exit_2(tmp_path: Path, capsys):
    assert collect.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:")


def test_runs_as_a_script(root: Path):
    done = subprocess.run([sys.executable, str(REPO / "launch" / "collect.py"), str(root)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(root / "index.csv")
    assert "10 runs: 1 done, 1 running, 1 failed, 3 corrupt, 2 blocked, 1 started, 1 waiting" in done.stderr


def test_config_files_read_as_yaml_and_json(tmp_path):
    cfg = config("prune", "bip", 0.05, parent="p")
    folder = write_run(tmp_path, cfg)
    text = (folder / identity.CONFIG).read_text()
    assert yaml.safe_load(text) == json.loads(text)  # JSON syntax is YAML too
    # a config.yaml rewritten by hand in YAML block style still indexes
    (folder / identity.CONFIG).write_text(yaml.safe_dump(json.loads(text), sort_keys=False))
    row = collect.scan(tmp_path)[0]
    assert row["status"] == "done" and row["prune.k"] == 0.05 and row["method"] == "bip"


def test_swept_settings_are_separate_curves_and_stages_never_mix(tmp_path: Path):
    """bip.gamma swept (1 is the default), bip.variant swept, seeds pooled per setting; a hydra
    point whose finetune is still pending for one seed shows only the finished finetune."""
    pre = identity.run_id(config())
    for seed in (1, 2):
        write_run(tmp_path, config(seed=seed))
        for k in (0.5, 0.1):
            for gamma, acc in ((1.0, 80.0), (10.0, 70.0)):
                write_run(tmp_path, config("prune", "bip", k, seed=seed, parent=pre,
                                           **{"bip.gamma": gamma}), test_acc=acc + seed)
            write_run(tmp_path, config("prune", "bip", k, seed=seed, parent=pre,
                                       **{"bip.variant": "reference"}), test_acc=60.0 + seed)
            write_run(tmp_path, config("prune", "hydra", k, seed=seed, parent=pre), test_acc=50.0)
    hydra = identity.run_id(config("prune", "hydra", 0.5, parent=pre))
    write_run(tmp_path, config("finetune", "hydra", 0.5, seed=1, parent=hydra), test_acc=85.0)
    write_run(tmp_path, config("finetune", "hydra", 0.5, seed=2, parent=hydra), status="pending")
    entries = plots.summarize(collect.scan(tmp_path))
    got = {(e["curve"], e["k"]): (e["n"], e["test_acc_mean"], e["stage"]) for e in entries}
    assert got[("bip (bip.gamma=1.0, bip.variant=paper)", 0.5)] == (2, 81.5, "prune")
    assert got[("bip (bip.gamma=10.0, bip.variant=paper)", 0.1)] == (2, 71.5, "prune")
    assert got[("bip (bip.variant=reference)", 0.5)] == (2, 61.5, "prune")  # it ignores gamma
    assert got[("hydra", 0.5)] == (1, 85.0, "finetune") and got[("hydra", 0.1)] == (2, 50.0, "prune")
    assert len([e for e in entries if e["method"] == "bip"]) == 6
    table = plots.summary_markdown(entries)
    assert "| bip (bip.gamma=10.0, bip.variant=paper) | 0.1 | 90% | 71.50 ± 0.71 | 2 |" in table


def test_collapsed_runs_are_counted_and_marked(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    accuracy_grid(tmp_path)
    parent = identity.run_id(config())
    folder = identity.run_dir(config("prune", "bip", 0.1, seed=2, parent=parent), tmp_path)
    result = json.loads((folder / identity.RESULT).read_text())
    (folder / identity.RESULT).write_text(json.dumps({**result, "collapsed": True, "collapsed_layers": ["conv1"]}))
    rows = collect.scan(tmp_path)
    assert [r["collapsed"] for r in rows if r["path"] == f"{folder.parent.name}/seed_2"] == [True]
    entries = plots.summarize(rows)
    bip = next(e for e in entries if (e["method"], e["k"]) == ("bip", 0.1))
    assert bip["collapsed"] == 1 and "| prune | 1 |" in plots.summary_markdown(entries)
    ax = Figure().add_subplot()
    panel = ("CIFAR10", "resnet20s", "unstructured")
    plots._draw(ax, panel, [e for e in entries if e["method"] != "dense"], [])
    marked = [c for c in ax.collections if c.get_label().startswith("collapsed")]
    assert len(marked) == 1 and len(marked[0].get_offsets()) == 1  # one point, crossed
    # the same from index.csv as any user has it (launch/plots.py reads it typed)
    assert plots.summarize(plots.read_index(collect.collect(tmp_path)))[0].keys() == entries[0].keys()
    assert next(e for e in plots.summarize(plots.read_index(tmp_path / "index.csv"))
                if (e["method"], e["k"]) == ("bip", 0.1))["collapsed"] == 1
