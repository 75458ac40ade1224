"""Run under torchrun (2 CPU processes, gloo): one hydra (unstructured) and one bip (paper;
filter) step on each torchvision / timm model given on the command line, through accelerate's
DDP wrapper, each rank on its own batch; then checks that both ranks hold identical parameters
and masks. Prints one JSON line on rank 0: {arch: {method: {"identical": bool, "kept_fraction": float, "world": 2}}}."""
import json
import sys

import torch
import torch.distributed as dist
from bip.pruning import masking
from bip.config import load_config
from bip.methods.registry import create_method
from bip.models import create_model
from bip.train.loop import _accelerator  # the trainer's DDP settings (broadcast_buffers=False)

K = 0.5
accelerator = _accelerator(load_config([]))
rank, report = accelerator.process_index, {}
for arch in sys.argv[1:]:
    g = torch.Generator().manual_seed(100 + rank)  # a different batch on every rank
    batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g))
               for _ in range(2)]
    for method_name, layer_type in (("hydra", "unstructured"), ("bip", "filter")):
        torch.manual_seed(0)  # the same model on every rank; a fresh one per DDP wrapper
        model = create_model(arch, 10, layer_type, input_size=32)
        cfg = load_config([], ["run.stage=prune", f"prune.layer_type={layer_type}", f"prune.k={K}",
                               f"prune.method={method_name}", "prune.score_init=magnitude",
                               "train.epochs=1", "bip.alpha=0.1", "bip.beta=0.5"])
        method = create_method(cfg, model)
        method.attach(accelerator.prepare_model(model), accelerator)
        method.step(batches, 0.0)
        identical = True
        for t in list(model.parameters()) + [m.mask for _, m in masking.masked_layers(model)]:
            t = t.detach().float().contiguous()  # one tensor at a time: ViT-B is 86M weights
            copies = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(copies, t)
            identical &= all(torch.equal(copies[0], c) for c in copies[1:])
        report.setdefault(arch, {})[method_name] = {
            "identical": identical, "world": dist.get_world_size(),
            "kept_fraction": masking.sparsity_report(model)["kept_fraction"]}
        del copies, model, method
        accelerator.free_memory()
if rank == 0:
    print(json.dumps(report), flush=True)
