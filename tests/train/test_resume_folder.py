"""``--resume`` takes a checkpoint file or a run folder (its checkpoint.pt); a folder without one
is refused before a done run's shortcut, in one line that does not say "not found"."""
import json
from pathlib import Path

import pytest

from bip.train import main as train_main
from tests.helpers import one_error_line, tree

RUN = ["--dataset", "synthetic", "data.synthetic_size=64", "data.batch_size=32"]


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A finished 1-epoch run folder (it keeps its checkpoint.pt)."""
    root = tmp_path_factory.mktemp("runs")
    assert train_main([*RUN, "--epochs", "1", "--result-dir", str(root)]) == 0
    (run_dir,) = root.glob("*/seed_*")
    return run_dir


def test_a_run_folder_resumes_from_its_checkpoint(done, tmp_path, capsys):
    argv = [*RUN, "--epochs", "2", "--result-dir", str(tmp_path), "--resume", str(done),
            "run.resume_foreign=true"]  # 2 epochs: another run id
    assert train_main(argv) == 0
    captured = capsys.readouterr()
    assert f"resuming from {done}: epoch 2" in captured.err
    run_dir = Path(captured.out.strip().splitlines()[-1])
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [2]  # epoch 1 came from the folder's checkpoint


@pytest.mark.parametrize("case, message", [
    ("empty folder", "is a folder without checkpoint.pt (neither a run folder nor a checkpoint file)"),
    ("run folder without checkpoint", "is a run folder without checkpoint.pt (it never saved one)"),
])
def test_a_folder_without_a_checkpoint_is_refused_even_for_a_done_run(done, tmp_path, capsys, case, message):
    target = tmp_path / "target"
    target.mkdir()
    if case == "run folder without checkpoint":
        (target / "config.yaml").write_bytes((done / "config.yaml").read_bytes())
    before = tree(done.parent.parent), tree(tmp_path)
    # the same command as the done run, plus --resume: it would return the finished result
    argv = [*RUN, "--epochs", "1", "--result-dir", str(done.parent.parent), "--resume", str(target)]
    assert train_main(argv) == 2
    assert "not found" not in one_error_line(capsys, message)
    assert (tree(done.parent.parent), tree(tmp_path)) == before


def test_a_folder_without_a_checkpoint_is_refused_where_it_would_seed(done, tmp_path, capsys):
    argv = [*RUN, "--epochs", "2", "--result-dir", str(tmp_path / "runs"), "--resume", str(tmp_path)]
    assert train_main(argv) == 2  # was: "resume checkpoint not found: DIR"
    assert "not found" not in one_error_line(capsys, "is a folder without checkpoint.pt")
    assert not (tmp_path / "runs").exists()
