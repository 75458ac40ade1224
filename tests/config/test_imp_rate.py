"""prune.imp_rate=1 (prune everything in one round) is refused in the config, so the command
line and a grid's --dry-run both say so in one line; imp_levels never raises a math error."""
import pytest
import yaml

from bip.config import load_config
from bip.errors import BipError
from bip.methods import imp_levels
from launch.grid import main as grid_main
from tests.helpers import one_error_line, tree

IMP = ["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.5", "prune.method=imp"]


def test_the_config_refuses_a_rate_of_one():
    with pytest.raises(BipError, match=r"prune.imp_rate=1.0 is out of range \(0.0, 1.0\)"):
        load_config([], [*IMP, "prune.imp_rate=1"])
    assert load_config([], [*IMP, "prune.imp_rate=0.99"]).prune.imp_rate == 0.99


def test_a_grid_dry_run_refuses_it_in_one_line(tmp_path, capsys):
    grid = tmp_path / "grid.yml"
    grid.write_text(yaml.safe_dump({
        "name": "g", "profile": "local", "set": {"dataset": "synthetic", "epochs": 1},
        "stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured", "prune.imp_rate": 1}}},
        "axes": {"method": ["imp"], "k": [0.5, 0.2], "seed": [1]}}))
    before = tree(tmp_path)
    assert grid_main([str(grid), "--dry-run", "--root", str(tmp_path / "runs")]) == 2
    one_error_line(capsys, "prune.imp_rate=1.0 is out of range (0.0, 1.0)")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("rate", [1.0, 1.5, 0.0, -0.2])
def test_imp_levels_refuses_rates_it_cannot_iterate(rate):
    with pytest.raises(BipError, match="prune.imp_rate"):
        imp_levels.densities(0.2, rate)
    assert imp_levels.densities(0.512, 0.2) == [0.8, 0.64, 0.512]
