"""What many tests share: a tiny training config, random image batches, a method's config."""
from __future__ import annotations

import torch

from bip.config import load_config

# A tiny run on the synthetic dataset (2 epochs of 8 steps): seconds on a CPU.
TINY = ["data.dataset=synthetic", "data.synthetic_size=256", "data.batch_size=32", "train.epochs=2"]


def image_batches(n: int, size: int = 16, batch: int = 4, classes: int = 10, seed: int = 0):
    """``n`` batches of random (batch, 3, size, size) images and labels, reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def method_config(method: str, layer_type: str, extra=()):
    """The config of one stage: ``dense`` (pretrain), ``finetune``, or ``name[-variant]`` of a
    prune method (``bip-reference``), magnitude score init, 2 epochs, k = 0.3 (N:M: 2:4)."""
    if method == "dense":
        return load_config([], ["run.stage=pretrain", "train.epochs=2"])
    if method == "finetune":
        return load_config([], ["run.stage=finetune", f"prune.layer_type={layer_type}",
                                "train.epochs=2", *([] if layer_type == "nm" else ["prune.k=0.3"])])
    name, _, variant = method.partition("-")
    return load_config([], ["run.stage=prune", f"prune.layer_type={layer_type}", f"prune.method={name}",
                            f"bip.variant={variant or 'paper'}", "prune.score_init=magnitude",
                            "train.epochs=2", *([] if layer_type == "nm" else ["prune.k=0.3"]), *extra])


def one_error_line(capsys, message: str) -> str:
    """The command printed exactly one stderr line, ``error: ...`` holding ``message``, and no
    traceback (the project's rule for bad input); returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    return lines[0]


def tree(root) -> dict:
    """{relative path: bytes} of every file under ``root`` (folders as b'<dir>')."""
    from pathlib import Path
    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}
