"""One BiP (paper variant) step on a BN-free model: ``single`` runs the whole global batch in one
process; under torchrun (gloo) each rank takes its contiguous shard. Rank 0 / the single process
saves the score gradients, scores, weights and masks to OUT."""
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from bip.methods import gsync
from bip.config import load_config
from bip.pruning.layers import MaskedConv2d, MaskedLinear
from bip.methods.registry import create_method

out, mode = sys.argv[1], sys.argv[2]
if mode == "dist":
    dist.init_process_group("gloo")
gsync.BUCKET_BYTES = 1000  # two buckets: (fc, conv2) launched during the backward, conv1 after
rank, world = (dist.get_rank(), dist.get_world_size()) if mode == "dist" else (0, 1)

torch.manual_seed(0)
model = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1), nn.ReLU(), MaskedConv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(8, 10))
cfg = load_config([], ["run.stage=prune", "prune.method=bip", "prune.layer_type=unstructured",
                       "prune.k=0.3", "prune.score_init=magnitude", "bip.gamma=0.05", "bip.beta=0.5",
                       "train.epochs=1"])
method = create_method(cfg, model)
if mode == "dist":
    method.attach(nn.parallel.DistributedDataParallel(model, broadcast_buffers=False))
g = torch.Generator().manual_seed(1)
batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
           for _ in range(2)]
shard = slice(rank * 16 // world, (rank + 1) * 16 // world)
method.step([(x[shard], y[shard]) for x, y in batches], 0.0)
if rank == 0:
    layers = [model[0], model[2], model[6]]
    torch.save({"score_grad": [m.scores.grad for m in layers], "scores": [m.scores.detach() for m in layers],
                "weights": [m.weight.detach() for m in layers], "masks": [m.mask for m in layers]}, out)
if mode == "dist":
    dist.destroy_process_group()
