"""A key given twice in one YAML mapping is refused, naming the key and both lines: in a config
file, a grid, a profile and a hand-edited config.yaml (PyYAML alone keeps the last value)."""
import pytest

from bip.config.load import DuplicateKey, safe_load
from bip.rundir.folder import read_config
from bip.train import main as train_main
from launch.grid import main as grid_main
from tests.helpers import one_error_line, tree

GRID = """name: g
profile: local
set:
  dataset: synthetic
  epochs: 1
stages: {pretrain: {}}
axes: {seed: [1]}
"""


def test_the_loader_names_the_key_and_both_lines():
    with pytest.raises(DuplicateKey, match=r"duplicate key 'lr' \(lines 2 and 4\)"):
        safe_load("optim:\n  lr: 0.1\n  wd: 0.0\n  lr: 0.2\n")
    with pytest.raises(DuplicateKey, match=r"duplicate key 'a' \(lines 1 and 1\)"):
        safe_load("{a: 1, a: 2}\n")
    # the same key in two mappings, and a merge key overridden, are no duplicates
    assert safe_load("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}
    assert safe_load("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")["c"] == {"x": 3, "y": 2}


def test_a_config_file(tmp_path, capsys):
    path = tmp_path / "c.yml"
    path.write_text("dataset: synthetic\nepochs: 1\nepochs: 2\n")
    assert train_main(["--configs", str(path), "--result-dir", str(tmp_path / "runs")]) == 2
    one_error_line(capsys, f"{path}: duplicate key 'epochs' (lines 2 and 3)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["grid", "profile"])
def test_a_grid_or_profile(tmp_path, capsys, where):
    grid, profile = tmp_path / "grid.yml", tmp_path / "p.yaml"
    grid.write_text(GRID + ("stages: {pretrain: {}}\n" if where == "grid" else ""))
    profile.write_text("partition: debug\ntime_min: 10\ntime_min: 20\n")
    before = tree(tmp_path)
    argv = [str(grid), "--dry-run", "--root", str(tmp_path / "runs")]
    assert grid_main(argv + (["--profile", str(profile)] if where == "profile" else [])) == 2
    one_error_line(capsys, f"{grid}: duplicate key 'stages' (lines 6 and 8)" if where == "grid"
                   else f"{profile}: duplicate key 'time_min' (lines 2 and 3)")
    assert tree(tmp_path) == before


def test_a_hand_edited_config_yaml(tmp_path):
    (tmp_path / "config.yaml").write_text("run_id: a\nparent_id: ''\nconfig: {}\nprovenance: {}\nrun_id: b\n")
    assert read_config(tmp_path, {"config.yaml"}) == (None, "config.yaml has a duplicate key 'run_id' (lines 1 and 5)")
