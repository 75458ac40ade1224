"""Run under torchrun (2 CPU processes, gloo): trains dense, hydra, bip (both variants) through
bip.train.train and checks after EVERY step that all ranks hold identical parameters and masks.
Prints one JSON line per method on rank 0."""
import json
import sys

import torch
import torch.distributed as dist

from bip.config import identity
from bip.config import load_config
from bip.train import train

root = sys.argv[1]
base = ["data.dataset=synthetic", "data.synthetic_size=256", "data.batch_size=16", "train.epochs=1",
        f"run.result_dir={root}"]
report = {}


def replica_check(name):
    mismatched = []

    def hook(event, info):
        if event != "step":
            return
        model = getattr(info["model"], "module", info["model"])
        tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if n.endswith("mask")]
        flat = torch.cat([t.detach().double().flatten() for t in tensors])
        copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, flat)
        if not all(torch.equal(copies[0], c) for c in copies[1:]):
            mismatched.append(info["step"])
        report.setdefault(name, {"steps": 0})["steps"] += 1
    return hook, mismatched


pre = load_config([], base)
runs = [("dense", pre)]
prune = base + ["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.2",
                f"run.parent={identity.run_id(pre)}", "prune.score_init=magnitude"]
runs += [("hydra", load_config([], prune + ["prune.method=hydra"])),
         ("bip", load_config([], prune + ["prune.method=bip"])),
         ("bip-reference", load_config([], prune + ["prune.method=bip", "bip.variant=reference"]))]
for name, cfg in runs:
    hook, mismatched = replica_check(name)
    result = train(cfg, hook=hook)
    report[name].update(mismatched=mismatched, world=dist.get_world_size(),
                        kept_fraction=(result["sparsity"] or {}).get("kept_fraction"),
                        passes=(result["train_forward_passes"], result["train_backward_passes"]))
if dist.get_rank() == 0:
    print(json.dumps(report), flush=True)
