"""An N:M pattern that no layer can use is refused before the run folder exists; one that some
layers cannot use reports how many weights it left dense (result.json sparsity)."""
import json
from pathlib import Path

import pytest
import torch

from bip.models import create_model
from bip.train import main as train_main
from tests.helpers import one_error_line

RUN = ["--dataset", "synthetic", "--epochs", "1", "data.synthetic_size=64", "data.batch_size=32",
       "--exp-mode", "prune", "--layer-type", "nm", "prune.method=omp"]


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "dense.pt"
    torch.save(create_model("resnet20s", 10).state_dict(), path)
    return path


def test_a_pattern_no_layer_can_use_is_refused_before_the_folder(tmp_path, source, capsys):
    runs = tmp_path / "runs"
    argv = [*RUN, "prune.m=100000", "--source-net", str(source), "--result-dir", str(runs)]
    assert train_main(argv) == 2
    one_error_line(capsys, "prune.m=100000 leaves every layer dense: no layer's input size (3, 16, 32, 64)")
    assert not runs.exists()


# resnet20s: conv1 has 3 inputs (432 weights), layer1's 6 convs and layer2's first conv 16
# (6 x 2304 + 4608); everything else has 32 or 64
@pytest.mark.parametrize("m, uncovered", [(32, 432 + 6 * 2304 + 4608)])
def test_weights_the_pattern_cannot_cover_are_reported(tmp_path, source, capsys, m, uncovered):
    argv = [*RUN, "prune.n=1", f"prune.m={m}", "--source-net", str(source), "--result-dir", str(tmp_path)]
    assert train_main(argv) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    sparsity = json.loads((run_dir / "result.json").read_text())["sparsity"]
    assert sparsity["nm_uncovered_params"] == uncovered
    assert sparsity["weights_total"] - sparsity["weights_kept"] == (268_336 - uncovered) * (m - 1) // m
