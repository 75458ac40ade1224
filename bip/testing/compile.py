"""A compile counter for tests and benchmarks (bip.train.compile: steps must not recompile)."""
from __future__ import annotations


class CompileCounter:
    """A torch.compile backend that counts the graphs it is given, then hands them to
    ``backend``: after warm-up, a steady count proves that steps do not recompile."""

    def __init__(self, backend: str = "inductor"):
        from torch._dynamo import lookup_backend
        self.inner = lookup_backend(backend)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)
