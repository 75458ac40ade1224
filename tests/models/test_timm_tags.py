"""A timm arch's pretrained tag (``timm:resnet18.a1_in1k``) must exist: an unknown one is one
line at the command line and at a grid's --dry-run, not timm's RuntimeError when the run starts."""
import pytest
import yaml

from bip.models import external
from bip.errors import BipError
from bip.train import main as train_main
from launch.grid import main as grid_main
from tests.helpers import one_error_line, tree

pytest.importorskip("timm")

MESSAGE = "unknown pretrained tag 'nosuchtag' of timm model 'resnet18' (arch 'timm:resnet18.nosuchtag'); its tags: "


def test_tags_are_checked():
    external.check_name("timm:resnet18")
    external.check_name("timm:resnet18.a1_in1k")
    for bad in ("timm:resnet18.nosuchtag", "timm:resnet18.", "timm:resnet18.a1_in1k.x"):
        with pytest.raises(BipError, match="unknown pretrained tag"):
            external.check_name(bad)


def test_the_command_line_refuses_an_unknown_tag(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--epochs", "1", "--arch", "timm:resnet18.nosuchtag",
            "--result-dir", str(tmp_path / "runs")]
    assert train_main(argv) == 2
    assert "a1_in1k" in one_error_line(capsys, MESSAGE)
    assert not (tmp_path / "runs").exists()


def test_a_grid_dry_run_refuses_an_unknown_tag(tmp_path, capsys):
    grid = tmp_path / "grid.yml"
    grid.write_text(yaml.safe_dump({"name": "g", "profile": "local", "stages": {"pretrain": {}},
                                    "set": {"dataset": "synthetic", "arch": "timm:resnet18.nosuchtag"},
                                    "axes": {"seed": [1]}}))
    before = tree(tmp_path)
    assert grid_main([str(grid), "--dry-run", "--root", str(tmp_path / "runs")]) == 2
    one_error_line(capsys, f"grid g: {MESSAGE}")
    assert tree(tmp_path) == before
