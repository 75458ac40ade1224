"""Every bad input of the README's "Bad input" list, through the real entry points (in-process
``main()`` of bip.train, launch/grid.py and launch/collect.py): one line ``error: ...``, exit
status 2, no traceback, and nothing on disk created or changed (a failure found inside the
trainer may record error.json in the run's own new folder, as the README says)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from bip.rundir import checkpoint
from bip.train import main as train_main
from launch.collect import main as collect_main
from launch.grid import main as grid_main

# A run that would train in a second if the input were good.
RUN = ["--dataset", "synthetic", "--epochs", "1", "data.synthetic_size=64", "data.batch_size=32"]
PRUNE = ["--exp-mode", "prune", "--layer-type", "unstructured"]
PATHS = {"dotdot": "../../x", "absolute": "{outside}", "empty": "", "shell": "a;touch pwned",
         "subst": "$(touch pwned)"}


def _files(tmp: Path) -> dict[str, bytes]:
    """The bytes of every file under ``tmp`` (folders as b'<dir>')."""
    out = {}
    for dirpath, dirs, names in os.walk(tmp):
        for d in dirs:
            out[os.path.join(dirpath, d)] = b"<dir>"
        for n in names:
            p = os.path.join(dirpath, n)
            out[p] = open(p, "rb").read() if os.path.isfile(p) else b"<other>"
    return out


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Input files the cases refer to as {name}."""
    ours = {"format": checkpoint.FORMAT, "meta": {}, "epoch": 0, "step": 0, "method": {},
            "best": {"val_acc": -1.0, "epoch": 0, "test_acc": None}, "wall_time_s": 0.0}
    made = {
        "binary": b"\x80\x81\xfe\xff\x00garbage",
        "latin1": "arch: r\xe9snet20s\n".encode("latin-1"),
        "afile": b"I am a file, not a folder\n",
        "profile_nan": yaml.safe_dump({"partition": "", "time_min": math.nan}).encode(),
        "profile_inf": yaml.safe_dump({"mem_gb": math.inf}).encode(),
    }
    paths = {"outside": tmp_path / "outside" / "x"}  # an absolute path, still under tmp_path
    for name, data in made.items():
        paths[name] = tmp_path / "in" / (name + (".yaml" if name.startswith("profile") else ".yml"))
        paths[name].parent.mkdir(exist_ok=True)
        paths[name].write_bytes(data)
    from bip.models import create_model
    dense = create_model("resnet20s", 10).state_dict()  # a good source for the mask cases
    for name, obj in {"no_model": ours, "model_list": {**ours, "model": [1, 2]}, "resnet20s": dense,
                      "no_rng": {**ours, "model": {"w": torch.zeros(1)}},
                      "foreign": {"state_dict": {"w": [1, 2]}},
                      "other_arch": {"conv1.weight": torch.zeros(4, 3, 3, 3)}}.items():
        paths[name] = tmp_path / "in" / f"{name}.pt"
        torch.save(obj, paths[name])
    return paths


# name -> (args, message, where the failure is found: "cli" = before anything is written,
#          "run" = inside the trainer: the new run folder may record error.json)
TRAIN_CASES = {
    # names that become paths: checked against the charset, then the registry
    **{f"dataset {k}": (["--dataset", v], "data.dataset=", "cli") for k, v in PATHS.items()},
    **{f"arch {k}": (["--arch", v], "model.arch=", "cli") for k, v in PATHS.items()},
    **{f"layer type {k}": ([*PRUNE[:2], "--layer-type", v, "--k", "0.5"], "prune.layer_type=", "cli")
       for k, v in PATHS.items()},
    **{f"method {k}": ([*PRUNE, "--k", "0.5", f"prune.method={v}"], "prune.method=", "cli")
       for k, v in PATHS.items()},
    **{f"result dir {k}": (["--result-dir", v], "run.result_dir=", "cli")
       for k, v in PATHS.items() if k in ("empty", "shell", "subst")},
    "unknown arch": (["--arch", "resnet19"], "unknown arch 'resnet19'", "cli"),
    "unknown dataset": (["--dataset", "CIFAR11"], "unknown dataset 'CIFAR11'", "cli"),
    "unknown external arch": (["--arch", "nosuchzoo:resnet18"], "unknown arch 'nosuchzoo:resnet18'", "cli"),
    "result dir is a file": (["--result-dir", "{afile}"], "is a file", "cli"),
    "result dir under /dev/null": (["--result-dir", "/dev/null/runs"], "is under /dev/null, which is not a folder", "cli"),
    # numbers
    "k nan": ([*PRUNE, "--k", "nan"], "prune.k='nan' is not a number (NaN)", "cli"),
    "k inf": ([*PRUNE, "--k", "inf"], "prune.k='inf' must be finite", "cli"),
    "k above 1": ([*PRUNE, "--k", "1.5"], "out of range", "cli"),
    "k of 0": ([*PRUNE, "--k", "0"], "out of range", "cli"),
    "seed overflow": (["--seed", "99999999999999999999"], "run.seed='99999999999999999999' is too large", "cli"),
    "negative seed": (["--seed", "-1"], "run.seed=-1 is out of range", "cli"),
    "lr nan": (["--lr", "nan"], "optim.lr='nan' is not a number", "cli"),
    "lr inf": (["--lr", "inf"], "optim.lr='inf' must be finite", "cli"),
    "wd nan": (["optim.wd=nan"], "optim.wd='nan' is not a number", "cli"),
    "bip alpha nan": ([*PRUNE, "--k", "0.5", "prune.method=bip", "bip.alpha=nan"], "bip.alpha='nan'", "cli"),
    "bip gamma nan": (["bip.gamma=nan"], "bip.gamma='nan' is not a number", "cli"),
    "bip gamma -inf": (["bip.gamma=-inf"], "bip.gamma must be > 0", "cli"),
    "label smoothing 5": (["train.label_smoothing=5"], "train.label_smoothing=5.0 is out of range", "cli"),
    "num workers -1": (["data.num_workers=-1"], "data.num_workers must be >= 0", "cli"),
    "input size -1": (["model.input_size=-1"], "model.input_size must be >= 0, got -1", "cli"),
    "compile backend": (["train.compile=true", "train.compile_backend=tvm"],
                        "train.compile_backend='tvm' is not valid; choose one of: inductor", "cli"),
    "momentum 1.5": (["optim.momentum=1.5"], "optim.momentum=1.5 is out of range", "cli"),
    "bip gamma 0": (["bip.gamma=0"], "bip.gamma must be > 0", "cli"),
    "wrong type": (["--epochs", "two"], "train.epochs='two' is not a valid int", "cli"),
    "unknown trainer": (["--trainer", "fast"], "trainer='fast' is not valid", "cli"),
    "pruned pretrain": (["--layer-type", "unstructured"], "pretrain trains a dense model", "cli"),
    "dense prune": (["--exp-mode", "prune", "--k", "0.5"], "needs a pruned layer type", "cli"),
    "huge int": (["data.batch_size=1e30"], "data.batch_size='1e30' is too large", "cli"),
    # files
    "binary --configs": (["--configs", "{binary}"], "not UTF-8 text", "cli"),
    "latin-1 --configs": (["--configs", "{latin1}"], "not UTF-8 text", "cli"),
    "missing --configs": (["--configs", "/nonexistent.yml"], "config file not found", "cli"),
    "missing source": ([*PRUNE, "--k", "0.1", "--source-net", "/nonexistent/ckpt.pt"],
                       "--source-net file not found", "run"),
    "source without model": ([*PRUNE, "--k", "0.1", "--source-net", "{no_model}"],
                             "holds no model state_dict (its 'model' entry is missing", "run"),
    "source model not a dict": ([*PRUNE, "--k", "0.1", "--source-net", "{model_list}"],
                                "holds no model state_dict", "run"),
    "resume without rng": (["--resume", "{no_rng}"], "cannot be resumed from: it lacks rng", "run"),
    "corrupt source": ([*PRUNE, "--k", "0.1", "--source-net", "{binary}"], "is corrupt or not a torch checkpoint", "run"),
    "foreign source": ([*PRUNE, "--k", "0.1", "--source-net", "{foreign}"], "holds no model state_dict", "run"),
    "source of another arch": ([*PRUNE, "--k", "0.1", "--source-net", "{other_arch}"], "does not fit resnet20s", "run"),
    "missing data": (["--dataset", "CIFAR10", "--data-dir", "/nonexistent"], "never downloaded", "run"),
    # masks (README "Masks")
    "floor not a count": ([*PRUNE, "--k", "0.5", "prune.min_layer_keep=2.5"],
                          "must be a fraction in [0, 1) or a whole count", "cli"),
    "floor with filter": (["--exp-mode", "prune", "--layer-type", "filter", "--k", "0.5",
                           "prune.min_layer_keep=0.1"], "applies to the global unstructured budget", "cli"),
    "layer scope with channel": (["--exp-mode", "prune", "--layer-type", "channel", "--k", "0.5",
                                  "prune.scope=layer"], "prune.scope=layer is for unstructured", "cli"),
    "nm with another k": (["--exp-mode", "prune", "--layer-type", "nm", "--k", "0.3"], "contradicts nm", "cli"),
    "nm n >= m": (["--exp-mode", "prune", "--layer-type", "nm", "prune.n=4"], "need 1 <= n < m", "cli"),
    "imp with nm": (["--exp-mode", "prune", "--layer-type", "nm", "prune.method=imp"], "no nm variant", "cli"),
    "floor above the budget": ([*PRUNE, "--k", "0.001", "prune.min_layer_keep=0.05", "--source-net",
                                "{resnet20s}"], "more than the budget round(k * N)", "run"),
    "skip names no layer": ([*PRUNE, "--k", "0.5", "prune.skip=conv9", "--source-net", "{resnet20s}"],
                            "no conv or linear layer named 'conv9'", "run"),
    # the command line
    "unknown key": (["optim.lrr=0.1"], "unknown config key 'optim.lrr'", "cli"),
    "overrides around a flag": (["a.b=1", "--epochs", "2", "c.d=2"], "unknown config key 'a.b'", "cli"),
    "abbreviated --epoch": (["--epoch", "2"], "unrecognized arguments: --epoch", "cli"),
    "abbreviated --lay": (["--lay", "unstructured"], "unrecognized arguments: --lay", "cli"),
}


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) if "{" in a and "$(" not in a else a
            for a in args]


def _one_line(capsys, message: str) -> None:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and len(err.splitlines()) == 1, captured.err
    assert err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_cli(case, tmp_path, files, capsys, monkeypatch):
    args, message, where = TRAIN_CASES[case]
    monkeypatch.chdir(tmp_path)  # relative paths (pwned, runs/..) land here, where they are seen
    (tmp_path / "a" / "b").mkdir(parents=True)
    before = _files(tmp_path)
    argv = ["--result-dir", str(tmp_path / "a" / "b" / "runs"), *RUN, *_fill(args, files)]
    assert train_main(argv) == 2
    _one_line(capsys, message)
    new = {p: v for p, v in _files(tmp_path).items() if before.get(p) != v}
    if where == "run":  # only the run's own folder, holding only error.json
        new = {p: v for p, v in new.items()
               if not p.startswith(str(tmp_path / "a" / "b" / "runs"))}
    assert not new, sorted(new)


def test_overrides_on_both_sides_of_a_flag_work(tmp_path, capsys):
    assert train_main(["data.dataset=synthetic", "--epochs", "1", "data.synthetic_size=64",
                       "--result-dir", str(tmp_path), "data.batch_size=32", "train.steps_per_epoch=1"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())["config"]
    assert config["data"]["synthetic_size"] == 64 and config["data"]["batch_size"] == 32


def test_gamma_inf_config_reads_back_as_strict_json_and_yaml(tmp_path, capsys):
    import json

    from bip.config import build_config
    from launch import collect
    argv = ["--dataset", "synthetic", "--epochs", "0", "--result-dir", str(tmp_path), "bip.gamma=inf",
            "data.synthetic_size=64", "data.batch_size=32"]
    assert train_main(argv) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    text = (run_dir / "config.yaml").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert doc == yaml.safe_load(text) and doc["config"]["bip"]["gamma"] == "inf"
    items = [(f"{s}.{k}", v, "file") for s, values in doc["config"].items() for k, v in values.items()]
    assert build_config(items).bip.gamma == math.inf  # and loads back as the number
    row = collect.scan(tmp_path)[0]
    assert row["status"] == "done" and float(row["bip.gamma"]) == math.inf


# -- launch/grid.py ---------------------------------------------------------------------------

def _grid(folder: Path, **changes) -> Path:
    doc = {"name": "g", "profile": "local",
           "set": {"dataset": "synthetic", "data.synthetic_size": 64, "data.batch_size": 32, "epochs": 1},
           "stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured"}}},
           "axes": {"method": ["hydra"], "k": [0.5], "seed": [1]}}
    for key, value in changes.items():
        if key == "set":
            doc["set"] = {**doc["set"], **value}
        elif key == "axes":
            doc["axes"] = {**doc["axes"], **value}
        else:
            doc[key] = value
    path = folder / "in" / "grid.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# name -> (grid changes, extra argv, message); {root} is the tmp root, {x} a fixture file
GRID_CASES = {
    "k nan": ({"axes": {"k": [math.nan]}}, ["--dry-run"], "prune.k=nan is not a number"),
    "lr nan": ({"set": {"lr": math.nan}}, ["--dry-run"], "optim.lr=nan is not a number"),
    "lr inf": ({"set": {"optim.lr": math.inf}}, ["--dry-run"], "optim.lr=inf must be finite"),
    "unknown arch": ({"axes": {"arch": ["resnet19"]}}, ["--dry-run"], "grid g: unknown arch 'resnet19'"),
    "unknown dataset": ({"set": {"dataset": "CIFAR11"}}, ["--dry-run"], "grid g: unknown dataset 'CIFAR11'"),
    "dataset path": ({"axes": {"dataset": ["../../x"]}}, ["--dry-run"], "data.dataset='../../x' is not a valid name"),
    "arch path": ({"set": {"arch": "/abs/x"}}, ["--dry-run"], "model.arch='/abs/x' is not a valid name"),
    "layer type path": ({"axes": {"layer_type": ["../x"]}}, ["--dry-run"], "prune.layer_type='../x' is not valid"),
    "method shell": ({"axes": {"method": ["a;b"]}}, ["--dry-run"], "prune.method='a;b' is not valid"),
    "grid name path": ({"name": "../../x"}, ["--dry-run"], "grid name (set `name:`)='../../x' is not a valid name"),
    "grid name empty": ({"name": " "}, ["--dry-run"], "is not a valid name"),
    "root is a file (dry run)": ({"root": "{afile}"}, ["--dry-run"], "root='{afile}' is a file"),
    "root is a file (local)": ({"root": "{afile}"}, ["--local"], "root='{afile}' is a file"),
    "root under /dev/null": ({}, ["--local", "--root", "/dev/null/runs"], "is under /dev/null"),
    "root with shell metacharacters": ({}, ["--dry-run", "--root", "runs;touch pwned"], "is not a usable folder"),
    "binary grid": (None, ["--dry-run"], "not UTF-8 text"),
    "binary profile": ({}, ["--dry-run", "--profile", "{binary}"], "not UTF-8 text"),
    "latin-1 profile": ({}, ["--dry-run", "--profile", "{latin1}"], "not UTF-8 text"),
    "profile time_min nan": ({}, ["--local", "--profile", "{profile_nan}"], "time_min=nan is not a valid int"),
    "profile mem_gb inf (dry run)": ({"resources": {"mem_gb": math.inf}}, ["--dry-run"], "mem_gb=inf is not a valid float"),
    "profile mem_gb inf (local)": ({"resources": {"mem_gb": math.inf}}, ["--local"], "mem_gb=inf is not a valid float"),
    "abbreviated --dry": ({}, ["--dry"], "unrecognized arguments: --dry"),
    "abbreviated --roo": ({}, ["--roo", "x"], "unrecognized arguments: --roo"),
}


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_grid_cli(case, tmp_path, files, capsys, monkeypatch):
    changes, extra, message = GRID_CASES[case]
    monkeypatch.chdir(tmp_path)
    fill = {k: str(v) for k, v in files.items()}
    if changes is None:
        path = files["binary"]
    else:
        changes = {k: v.format(**fill) if isinstance(v, str) else v for k, v in changes.items()}
        path = _grid(tmp_path, **changes)
    argv = [str(path), *[a.format(**fill) for a in extra]]
    if "--root" not in extra and "root" not in (changes or {}):
        argv += ["--root", str(tmp_path / "runs")]
    before = _files(tmp_path)
    assert grid_main(argv) == 2
    _one_line(capsys, message.format(**fill))
    assert _files(tmp_path) == before


def test_collect_cli_refuses_abbreviations(tmp_path, capsys):
    assert collect_main([str(tmp_path), "--plot"]) == 2
    _one_line(capsys, "unrecognized arguments: --plot")


def test_the_catalogue_lists_exactly_the_registered_names():
    """The launcher checks names against bip.config.names (no torch import); the registries refuse
    unlisted names, and nothing listed may be missing from them."""
    from bip.config import names as catalogue
    from bip.data import DATASETS
    from bip.models import MODELS
    assert set(MODELS) == catalogue.MODELS and set(DATASETS) == catalogue.DATASETS
