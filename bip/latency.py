"""Inference latency of several models measured side by side: the median of interleaved,
warmed-up forward passes, so that load on a shared machine hits every model alike.

CPU: float32, contiguous. CUDA: bfloat16 weights and inputs in channels_last (what a GPU
deployment runs), timed with a device synchronize around each pass.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time

import torch
import torch.nn as nn


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` in eval mode, in the precision and memory format timed on ``device``."""
    model = copy.deepcopy(model).eval().to(device)
    if device.type == "cuda":
        model = model.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    return model


def example_input(batch: int, input_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        x = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    return x


@torch.no_grad()
def compare(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int,
            device: torch.device | str = "cpu", warmup: int = 2, repeats: int = 7) -> dict[str, float]:
    """{name: median milliseconds per forward of ``batch`` inputs}. Rounds are interleaved
    (model a, b, c, a, b, c, ...), each model warmed up first."""
    device = torch.device(device)
    prepared = {name: prepare(m, device) for name, m in models.items()}
    x = example_input(batch, input_shape, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for m in prepared.values():
        for _ in range(warmup):
            m(x)
    sync()
    times: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(repeats):
        for name, m in prepared.items():
            sync()
            start = time.perf_counter()
            m(x)
            sync()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def load_average() -> float | None:
    """The 1-minute load average (how busy the shared machine was), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
