"""Inference latency of several models measured side by side: the median of interleaved,
warmed-up forward passes, so that load on a shared machine hits every model alike.

CPU: float32. CUDA: bfloat16, timed with a device synchronize around each pass. Both use the
channels_last memory format by default (on this CPU oneDNN's convolutions run it at a steadier
rate per MAC than NCHW, whose speed varies with the channel counts; see the README).
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


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def prepare(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode, in the precision and memory format timed on ``device``."""
    model = copy.deepcopy(model).eval().to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(dtype=dtype, memory_format=_format(channels_last))


def example_input(batch: int, input_shape: tuple[int, ...], device: torch.device,
                  channels_last: bool = True) -> torch.Tensor:
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.to(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return x.contiguous(memory_format=_format(channels_last)) if x.dim() == 4 else x


@torch.no_grad()
def compare(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int,
            device: torch.device | str = "cpu", warmup: int = 2, repeats: int = 7,
            channels_last: bool = True) -> dict[str, float]:
    """{name: median milliseconds per forward of ``batch`` inputs}. Rounds are interleaved
    (model a, b, c, a, b, c, ...), each model warmed up first."""
    device = torch.device(device)
    prepared = {name: prepare(m, device, channels_last) for name, m in models.items()}
    x = example_input(batch, input_shape, device, channels_last)
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


def measure(models: dict[str, nn.Module], input_shape: tuple[int, ...], batches: tuple[int, ...],
            device: str = "cpu") -> dict:
    """export.json's ``latency`` block: ``compare`` at each batch size, with the device, the
    precision and the load average; ``speedup`` = dense / thin where both are measured."""
    dev = torch.device(device)
    out = {"device": device_name(dev), "load_average": load_average(),
           "dtype": ("bf16" if dev.type == "cuda" else "fp32") + ", channels_last", "batches": {}}
    for batch in batches:
        ms = compare(models, input_shape, batch, dev)
        row = {f"{k}_ms": v for k, v in ms.items()}
        if "thin" in ms and "dense" in ms:
            row["speedup"] = round(ms["dense"] / ms["thin"], 3)
        out["batches"][str(batch)] = row
    return out


def headline(block: dict) -> dict:
    """Flat fields for the results index, from the largest batch measured."""
    batch = max(block["batches"], key=int)
    row = block["batches"][batch]
    return {"latency_device": block["device"], "latency_batch": int(batch),
            "latency_ms": row.get("thin_ms", row.get("masked_ms")),
            "latency_ms_dense": row.get("dense_ms"), "speedup": row.get("speedup")}
