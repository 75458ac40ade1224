"""BiP's implicit gradient under DDP: g = dL/dZ is averaged over ranks before it is squared.

The upper-level score gradient sign(S) * (W * g - (1/gamma) * M * g^2) is nonlinear in g, and
the mean over ranks of g_r^2 is not (mean g)^2: averaging the score gradients (as DDP would)
makes the implicit-gradient term grow with the number of ranks. So in BiP's upper pass each
masked layer's backward hands g to a ``GReducer`` instead of forming the score gradient: g is
appended to a bucket, and a full bucket (25 MB, as DDP's) is all-reduced asynchronously while
the backward goes on with the layers below, so communication overlaps compute. After the
backward, ``finish`` waits for the buckets, divides by the world size and forms every score
gradient from the averaged g. The volume is that of the score gradients DDP would have
reduced (g has the shape of the weights), in as many collective calls as buckets. Every rank
runs the same graph, so the buckets (arrival order, sizes) agree across ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from bip.pruning.layers import score_grad

BUCKET_BYTES = 25 * 1024 * 1024


def world_size() -> int:
    """Processes in the default group (1 without one): the one "is this distributed" test."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def distributed() -> bool:
    return world_size() > 1


class GReducer:
    """Collects (layer, g) from the masked layers' backward; ``finish`` sets scores.grad."""

    def __init__(self, ig_coeff: float, bucket_bytes: int | None = None):
        self.ig_coeff, self.bucket_bytes = ig_coeff, bucket_bytes or BUCKET_BYTES
        self.world = dist.get_world_size()
        self.bucket: list[tuple] = []
        self.bytes = 0
        self.inflight: list[tuple] = []

    def add(self, layer, g: torch.Tensor) -> None:
        self.bucket.append((layer, g))
        self.bytes += g.numel() * g.element_size()
        if self.bytes >= self.bucket_bytes:
            self._launch()

    def _launch(self) -> None:
        if not self.bucket:
            return
        flat = _flatten_dense_tensors([g for _, g in self.bucket])
        self.inflight.append((dist.all_reduce(flat, async_op=True), flat, self.bucket))
        self.bucket, self.bytes = [], 0

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for every bucket; scores.grad = score gradient at the rank-averaged g."""
        self._launch()
        for work, flat, entries in self.inflight:
            work.wait()
            flat.div_(self.world)
            for (layer, g), mean in zip(entries, _unflatten_dense_tensors(flat, [g for _, g in entries])):
                grad = score_grad(layer.weight, layer.scores, layer.mask, mean, self.ig_coeff)
                s = layer.scores
                s.grad = grad if s.grad is None else s.grad + grad
        self.inflight = []
