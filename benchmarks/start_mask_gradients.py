"""What a score step does at the one-shot magnitude mask of a pretrained model, per keep ratio.

    python benchmarks/start_mask_gradients.py PRETRAIN_RUN_DIR [--k 0.1 0.05 0.02 0.01] [--lr 0.1]

For each k: the mask that --scaled-score-init starts from (global magnitude top-k,
prune.min_layer_keep=10), one training batch in train mode, and then
- lr x ||dL/dS|| / ||S|| per masked layer (the first SGD step of the scores, before momentum),
  its maximum and median over layers;
- the BatchNorm channels whose input is exactly zero (every weight of the channel pruned), and
  the smallest non-zero spread (std over the batch) of a BatchNorm input.
docs/experiments/2026-12-08-high-sparsity.md reads the step explosion at k <= 0.02 from it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bip.config import build_config
from bip.data import load_dataset
from bip.data.loaders import build_loaders
from bip.models import create_model
from bip.pruning import masking
from bip.rundir import checkpoint


def measure(run_dir: Path, k: float, lr: float) -> dict:
    cfg = build_config([(f"{s}.{key}", v, str(run_dir)) for s, fields in
                        __import__("json").loads((run_dir / "config.yaml").read_text())["config"].items()
                        for key, v in fields.items() if s in ("data", "model")]
                       + [("run.stage", "prune", "cli"), ("prune.layer_type", "unstructured", "cli"),
                          ("prune.k", k, "cli"), ("prune.min_layer_keep", 10, "cli")])
    spec = load_dataset(cfg.data, cfg.model.num_classes)
    model = create_model(cfg.model.arch, spec.num_classes, "unstructured")
    model.load_state_dict(checkpoint.source_state(run_dir / "final.pt")[0], strict=False)
    masking.configure(model, cfg.prune)
    masking.init_scores(model, "magnitude")
    masking.refresh_masks(model, k)
    loaders = build_loaders(cfg.data, spec, seed=cfg.run.seed, streams=1, rank=0, world=1, device=torch.device("cpu"))
    x, y = next(iter(loaders.streams[0].epoch(0)))
    spreads = []
    hooks = [m.register_forward_hook(lambda m, i, o: spreads.append(i[0].detach().transpose(0, 1).flatten(1).std(1)))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train()
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    ratios = sorted(lr * float(m.scores.grad.norm() / m.scores.detach().norm()) for _, m in masking.masked_layers(model))
    spread = torch.cat(spreads)
    return {"k": k, "max_step": ratios[-1], "median_step": ratios[len(ratios) // 2],
            "dead_channels": int((spread == 0).sum()), "channels": spread.numel(),
            "min_spread": float(spread[spread > 0].min())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished pretrain run folder (final.pt, config.yaml)")
    p.add_argument("--k", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    p.add_argument("--lr", type=float, default=0.1, help="the score learning rate (default 0.1)")
    args = p.parse_args(argv)
    if not (args.run / "final.pt").is_file():
        raise SystemExit(f"error: {args.run} has no final.pt (a finished pretrain run folder)")
    torch.manual_seed(0)
    print("| k | max over layers of lr x \\|\\|dL/dS\\|\\| / \\|\\|S\\|\\| | median | BN channels with zero input | "
          "smallest non-zero BN input std |\n|---|---|---|---|---|")
    for k in args.k:
        r = measure(args.run, k, args.lr)
        print(f"| {k:g} | {r['max_step']:.3g} | {r['median_step']:.3g} | {r['dead_channels']} of {r['channels']} | "
              f"{r['min_spread']:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
