"""Exports: dense-with-zeros weights and params/MACs accounting."""
import torch

from bip import masking
from bip.export import count_params_and_macs, dense_state_dict, main
from bip.models import create_model


def test_dense_export_reproduces_the_pruned_model(tmp_path):
    torch.manual_seed(0)
    pruned = create_model("resnet20s", 10, "filter")
    masking.init_scores(pruned, "magnitude")
    masking.refresh_masks(pruned, 0.5)
    dense = create_model("resnet20s", 10, "dense")
    dense.load_state_dict(dense_state_dict(pruned))  # strict: exactly the dense keys
    pruned.eval()
    dense.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dense(x), pruned(x))
    conv = masking.masked_layers(pruned)[1][1]
    zero_filters = conv.mask.flatten(1).sum(1) == 0
    assert zero_filters.any() and torch.all(dense.get_submodule(masking.masked_layers(pruned)[1][0])
                                            .weight[zero_filters] == 0)


def test_macs_count_kept_weights():
    model = create_model("resnet20s", 10, "unstructured")
    counts = count_params_and_macs(model, (3, 32, 32))
    assert counts["params_dense"] == counts["params_effective"] == 269_722
    assert counts["macs_dense"] == 40_551_040  # resnet20: ~41M multiply-accumulates
    masking.init_scores(model, "magnitude")
    masking.refresh_masks(model, 0.1)
    counts = count_params_and_macs(model, (3, 32, 32))
    assert counts["params_dense"] - counts["params_effective"] == 268_336 - masking.keep_count(0.1, 268_336)
    assert counts["macs_effective"] < 0.3 * counts["macs_dense"]


def test_export_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_export_cli_on_a_run(tmp_path):
    from bip import identity
    from bip.config import load_config
    from bip.train import train
    base = ["data.dataset=synthetic", "data.synthetic_size=128", "data.batch_size=32", "train.epochs=1",
            f"run.result_dir={tmp_path}"]
    pre = load_config([], base)
    train(pre)
    prune = load_config([], base + ["run.stage=prune", "prune.method=omp", "prune.layer_type=unstructured",
                                    "prune.k=0.2", f"run.parent={identity.run_id(pre)}"])
    train(prune)
    run_dir = identity.run_dir(prune)
    assert main([str(run_dir)]) == 0
    state = torch.load(run_dir / "dense.pt", weights_only=True)
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() > 1]
    kept = sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(kept - 0.2) < 1e-3
