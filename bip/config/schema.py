"""The run configuration: typed frozen sections, loaded from YAML + seed-README flags + key=value.

Precedence is defaults < YAML files (in order) < command line. YAML may use the original BiP
repository's flat keys (``arch: resnet20s``, ``lr2: 1e-4``) or our sections
(``optim: {lr: 0.1}``); the command line takes the seed README's flags plus ``section.key=value``.
Every value is coerced to its field's type (PyYAML reads ``1e-4`` as a string) and every
unknown key is an error that names the closest valid keys.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable


from bip.errors import BipError
from bip.config.names import canonical_skip, check_name, check_root_text

STAGES = ("pretrain", "prune", "finetune")
LAYER_TYPES = ("dense", "unstructured", "filter", "channel", "nm")
METHODS = ("hydra", "bip", "omp", "imp", "random")
SCORE_INITS = ("magnitude", "hydra", "kaiming")


def _check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise BipError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _check_range(name: str, value: float, low: float, high: float, low_open=False,
                 high_open=False) -> None:
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high or math.isnan(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise BipError(f"{name}={value} is out of range {interval}")


def _check_min(section: object, prefix: str, low: float, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(section, name)
        if not value >= low:
            raise BipError(f"{prefix}.{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "CIFAR10"
    data_dir: str = "./data"        # where the dataset lives; not part of the run id
    normalize: bool = False         # per-dataset mean/std normalisation (seed flag --normalize)
    augment: bool = True            # pad-crop + flip (small images) / random-resized-crop (ImageNet)
    batch_size: int = 128           # per process; the global batch is batch_size x world size
    test_batch_size: int = 256
    val_fraction: float = 0.1       # held out of the training split for model selection
    split_seed: int = 0             # the same held-out split for every run and stage
    data_fraction: float = 1.0      # use this fraction of the (remaining) training split
    num_workers: int = 4
    loader: str = "auto"            # auto | tensor (in-memory) | torch (DataLoader) | ffcv
    train_beton: str = ""           # ffcv files (data.loader=ffcv)
    val_beton: str = ""
    synthetic_size: int = 2048      # training images of the `synthetic` dataset (test: a quarter)
    image_size: int = 0             # ImageNet-style train/eval resolution; 0 = dataset default
    min_res: int = 0                # ffcv progressive resizing: train at min_res, growing to
    start_ramp: int = 0             # image_size from epoch start_ramp to end_ramp (multiples of
    end_ramp: int = 0               # 32, as ffcv-imagenet); 0 = always image_size

    def __post_init__(self):
        _check_choice("data.loader", self.loader, ("auto", "tensor", "torch", "ffcv"))
        _check_range("data.val_fraction", self.val_fraction, 0.0, 0.9)
        _check_range("data.data_fraction", self.data_fraction, 0.0, 1.0, low_open=True)
        check_name("data.dataset", self.dataset)
        _check_min(self, "data", 1, ("batch_size", "test_batch_size", "synthetic_size"))
        _check_min(self, "data", 0, ("num_workers", "split_seed", "image_size"))
        if self.min_res < 0 or self.start_ramp < 0 or self.end_ramp < self.start_ramp:
            raise BipError("need data.min_res >= 0 and 0 <= data.start_ramp <= data.end_ramp")
        if self.min_res and self.loader != "ffcv":
            raise BipError("data.min_res (progressive resizing) needs data.loader=ffcv")
        if self.min_res and self.image_size and self.min_res > self.image_size:
            raise BipError(f"data.min_res={self.min_res} exceeds data.image_size={self.image_size}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet20s"         # built-in name, tv:<torchvision model> or timm:<timm model>
    num_classes: int = 0            # 0 = the dataset's number of classes
    input_size: int = 0             # model input resolution; other sizes are resized on the device.
                                    # 0 = tv:/timm: the pretrained size, built-ins: the data's
    skip_first_conv: bool = False   # tv:/timm: leave these layers dense (bip.models.swap)
    skip_classifier: bool = False
    skip_depthwise: bool = False
    skip_patch_embed: bool = False

    def __post_init__(self):
        check_name("model.arch", self.arch)
        _check_min(self, "model", 0, ("num_classes", "input_size"))


@dataclass(frozen=True)
class PruneConfig:
    method: str = "hydra"           # hydra | bip | omp | imp | random (stage prune)
    layer_type: str = "dense"       # dense | unstructured | filter | channel | nm
    k: float = 1.0                  # fraction of weights (unstructured) / filters / channels KEPT
    score_init: str = "kaiming"     # magnitude (--scaled-score-init) | hydra | kaiming
    train_bn: bool = True           # hydra: train BatchNorm affine with the scores
    imp_rate: float = 0.2           # imp: fraction of the remaining weights pruned per round
    variant: str = "paper"          # hydra: paper | reference (the released BiP code's HYDRA run)
    scope: str = "global"           # unstructured budget: global (one top-k) | layer (k per layer)
    min_layer_keep: float = 0.0     # global scope: per-layer floor, a fraction (< 1) or count (>= 1)
    skip: str = ""                  # layers left dense: comma list of first, last|classifier, names
    on_collapse: str = "warn"       # warn | fail when the pruned network is disconnected
    n: int = 2                      # nm: keep n of every m consecutive weights along the input
    m: int = 4
    # Mask dynamics of score-based methods (bip, hydra; docs/experiments/2026-12-08-high-sparsity.md)
    refresh_every: int = 1          # optimizer steps between mask refreshes (1: every step)
    hysteresis: float = 0.0         # a kept weight's |score| counts (1 + h) times when the mask is re-ranked
    ramp_epochs: float = 0.0        # unstructured: k falls from 1 to k along a cubic over these epochs
    score_step_clip: float = 0.0    # each layer's score gradient step (lr x ||grad||) is at most this
                                    # fraction of ||scores|| of the layer (0: unbounded)

    def __post_init__(self):
        _check_choice("prune.method", self.method, METHODS)
        _check_choice("prune.variant", self.variant, ("paper", "reference"))
        _check_choice("prune.layer_type", self.layer_type, LAYER_TYPES)
        _check_choice("prune.score_init", self.score_init, SCORE_INITS)
        _check_range("prune.k", self.k, 0.0, 1.0, low_open=True)
        # A rate of 1 prunes everything in one round: no density (1 - rate)^r to reach.
        _check_range("prune.imp_rate", self.imp_rate, 0.0, 1.0, low_open=True, high_open=True)
        _check_choice("prune.scope", self.scope, ("global", "layer"))
        _check_choice("prune.on_collapse", self.on_collapse, ("warn", "fail"))
        floor = self.min_layer_keep
        if not (0 <= floor < float("inf")) or (floor >= 1 and not floor.is_integer()):
            raise BipError(f"prune.min_layer_keep={floor} must be a fraction in [0, 1) or a whole count >= 1")
        if self.scope == "layer" and self.layer_type not in ("unstructured", "dense"):
            raise BipError(f"prune.scope=layer is for unstructured masks; {self.layer_type} budgets "
                           "are per layer already")
        if floor and (self.layer_type not in ("unstructured", "dense") or self.scope != "global"):
            raise BipError("prune.min_layer_keep applies to the global unstructured budget; filter, "
                           "channel, nm and prune.scope=layer keep at least one unit per layer already")
        _check_min(self, "prune", 1, ("refresh_every",))
        _check_min(self, "prune", 0, ("hysteresis", "ramp_epochs", "score_step_clip"))
        if self.hysteresis and self.layer_type in ("filter", "channel"):
            raise BipError("prune.hysteresis damps unstructured and nm masks; filter and channel masks have none")
        if self.ramp_epochs and self.layer_type != "unstructured":
            raise BipError(f"prune.ramp_epochs ramps an unstructured budget; {self.layer_type} masks keep k from the start")
        skip = sorted({s.strip() for s in self.skip.split(",") if s.strip()})
        object.__setattr__(self, "skip", ",".join(skip))  # one spelling per meaning (run ids)
        if not 1 <= self.n < self.m:
            raise BipError(f"prune.n={self.n} and prune.m={self.m}: need 1 <= n < m")
        if self.layer_type == "nm":
            if self.method == "imp":
                raise BipError("imp prunes a fraction of the remaining weights; it has no nm variant")
            if self.k == 1.0:  # k of an nm mask is n/m; recorded so results plot at their density
                object.__setattr__(self, "k", self.n / self.m)
            elif abs(self.k - self.n / self.m) > 1e-9:
                raise BipError(f"prune.k={self.k} contradicts nm with n={self.n}, m={self.m} "
                               f"(k = n/m = {self.n / self.m}); leave k unset")


SCORE_DYNAMICS = ("prune.refresh_every", "prune.hysteresis", "prune.ramp_epochs", "prune.score_step_clip")


@dataclass(frozen=True)
class BipConfig:
    variant: str = "paper"          # paper: the paper's update | reference: the released code's
                                    # | fused: the paper's formulas from one pass (bip/methods/fused.py)
    alpha: float = 0.01             # paper: lower-level (weight) lr
    beta: float = 0.1               # paper: upper-level (score) lr
    gamma: float = 1.0              # paper: IG term scale 1/gamma (inf = no IG term; README)
    lower_wd: float = 1e-4          # paper: the lower problem's ridge, as SGD weight decay
    upper_wd: float = 0.0           # paper: weight decay on the scores
    momentum: float = 0.9           # paper: SGD momentum at both levels
    lr2: float = 0.1                # reference: coefficient of its slot-wise IG term
    mask_lr: float = 0.1            # reference: initial mask-optimizer lr (overwritten, as released)
    mask_lr_schedule: str = "cosine"  # reference: schedule of the mask optimizer (base: optim.lr)

    def __post_init__(self):
        _check_choice("bip.variant", self.variant, ("paper", "reference", "fused"))
        _check_choice("bip.mask_lr_schedule", self.mask_lr_schedule, ("cosine", "step"))
        if not self.gamma > 0:
            raise BipError(f"bip.gamma must be > 0 (inf drops the implicit-gradient term), got {self.gamma}")
        _check_min(self, "bip", 0, ("alpha", "beta", "lower_wd", "upper_wd", "lr2", "mask_lr"))
        _check_range("bip.momentum", self.momentum, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"          # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    wd: float = 5e-4
    nesterov: bool = False
    lr_schedule: str = "cosine"     # cosine | step | constant
    warmup_epochs: int = 0
    warmup_lr: float = 0.1          # lr at the start of a linear warm-up

    def __post_init__(self):
        _check_choice("optim.optimizer", self.optimizer, ("sgd", "adam"))
        _check_choice("optim.lr_schedule", self.lr_schedule, ("cosine", "step", "constant"))
        if self.lr < 0 or self.wd < 0 or self.warmup_epochs < 0:
            raise BipError("optim.lr, optim.wd and optim.warmup_epochs must be >= 0")
        _check_min(self, "optim", 0, ("warmup_lr",))
        _check_range("optim.momentum", self.momentum, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    mixed_precision: str = "fp32"   # fp32 | bf16 (autocast; bf16 needs no loss scaling)
    label_smoothing: float = 0.0
    deterministic: bool = False     # cuDNN deterministic algorithms (recorded, never implied)
    steps_per_epoch: int = 0        # > 0 caps each epoch (benchmarks, smoke runs); 0 = full
    rewind_epoch: int = -1          # pretrain: epoch whose weights IMP rewinds to (-1: 5% of epochs)
    max_nonfinite_steps: int = 0    # steps with a non-finite loss/weight/score skipped before the
                                    # run stops (0: the first one stops it; bip.train.nonfinite)
    # Speed options (bip.train.compile; not hashed: they change float round-off, not the algorithm).
    channels_last: bool = False     # model and input batches in channels_last memory format
    compile: bool = False           # torch.compile the model (in place; one graph per pass kind)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager / eager: debugging)
    checkpoint_every_min: float = 30.0  # a step checkpoint at least this often (a kill loses less)
    # Processes that train the run together (DDP). Part of the run identity: the global batch is
    # data.batch_size x world_size. Filled in from torchrun's WORLD_SIZE by load_config and from
    # the Slurm profile (nodes x tasks_per_node) by the launcher; train() checks it.
    world_size: int = 1
    sync_bn: bool = False           # under DDP: BatchNorm -> SyncBatchNorm (global batch statistics)
    log_with: str = "none"          # none | tensorboard | wandb: per-epoch metrics to a tracker (bip.train.tracking)

    def __post_init__(self):
        _check_choice("train.log_with", self.log_with, ("none", "tensorboard", "wandb"))
        if self.mixed_precision == "no":  # accelerate's spelling
            object.__setattr__(self, "mixed_precision", "fp32")
        _check_choice("train.mixed_precision", self.mixed_precision, ("fp32", "bf16"))
        # torch.compile backends that train a model (aot_eager / eager: to debug inductor)
        _check_choice("train.compile_backend", self.compile_backend,
                      ("inductor", "aot_eager", "eager", "cudagraphs"))
        if self.epochs < 0 or self.steps_per_epoch < 0:
            raise BipError("train.epochs and train.steps_per_epoch must be >= 0")
        _check_range("train.label_smoothing", self.label_smoothing, 0.0, 1.0)
        _check_min(self, "train", 0, ("max_nonfinite_steps",))
        _check_min(self, "train", -1, ("rewind_epoch",))
        _check_min(self, "train", 1, ("world_size",))
        if not self.checkpoint_every_min > 0:  # also rejects NaN
            raise BipError(f"train.checkpoint_every_min must be > 0, got {self.checkpoint_every_min}")


@dataclass(frozen=True)
class EvalConfig:
    # Before every evaluation: reset BatchNorm's running statistics and re-estimate them in train
    # mode (no gradient, weights and masks untouched) over this many training batches; 0 = off.
    bn_recalibrate: int = 0
    select: str = "last"            # prune: publish the last epoch's model | best_val: the best
                                    # validation epoch's model (weights, scores, mask, BN)

    def __post_init__(self):
        _check_min(self, "eval", 0, ("bn_recalibrate",))
        _check_choice("eval.select", self.select, ("last", "best_val"))


@dataclass(frozen=True)
class RunConfig:
    stage: str = "pretrain"         # pretrain | prune | finetune (seed flag --exp-mode)
    seed: int = 1234
    exp_name: str = ""              # a label only; the folder name comes from the config hash
    result_dir: str = "runs"
    source_net: str = ""            # checkpoint to start from (hand-made runs)
    parent: str = ""                # or: the run id of the parent stage, same seed (grids)
    resume: str = ""                # checkpoint that seeds a run folder without one of its own
    resume_foreign: bool = False    # allow --resume from another run's checkpoint (recorded)
    lease_stale_min: float = 10.0   # a run folder's lease without a heartbeat for this long is free
    print_freq: int = 100           # batches between progress-bar refreshes
    diagnostics: str = "epoch"      # none | epoch | step: mask/score/BN fields of score-based runs
                                    # in metrics.jsonl (bip.pruning.monitor); step: per-step sums

    def __post_init__(self):
        _check_choice("run.stage", self.stage, STAGES)
        check_root_text("run.result_dir", self.result_dir)
        _check_range("run.seed", self.seed, 0, 2**32 - 1)
        _check_min(self, "run", 1, ("print_freq",))
        _check_choice("run.diagnostics", self.diagnostics, ("none", "epoch", "step"))
        if not self.lease_stale_min > 0:
            raise BipError(f"run.lease_stale_min must be > 0, got {self.lease_stale_min}")
        if self.source_net and self.parent:
            raise BipError("give either run.source_net or run.parent, not both")


def method_label(stage: str, prune_method: str) -> str:
    """dense for pretrain; otherwise the prune method that made (or will make) the mask (a
    pretrain config still carries prune.method's default; a finetune's is its mask's method)."""
    return "dense" if stage == "pretrain" else prune_method


_PRUNE_DEFAULTS = PruneConfig()

SECTIONS = {
    "data": DataConfig, "model": ModelConfig, "prune": PruneConfig, "bip": BipConfig,
    "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig, "run": RunConfig,
}
_FIELD_NAMES = {s: tuple(f.name for f in fields(cls)) for s, cls in SECTIONS.items()}


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    bip: BipConfig = field(default_factory=BipConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        stage, layer_type = self.run.stage, self.prune.layer_type
        if stage == "pretrain" and layer_type != "dense":
            raise BipError(f"pretrain trains a dense model: layer_type must be dense, got {layer_type}")
        if stage != "pretrain" and layer_type == "dense":
            raise BipError(f"stage {stage} needs a pruned layer type (unstructured, filter, channel or nm)")
        # One spelling per set of layers (one model, one run id): needs the arch, so here.
        skip = canonical_skip(self.model.arch, self.prune.skip)
        if skip != self.prune.skip:
            object.__setattr__(self, "prune", replace(self.prune, skip=skip))
        if stage == "pretrain" and self.eval.select != "last":
            raise BipError("eval.select=best_val chooses a pruned model; a pretrain publishes its last epoch "
                           "(IMP rewinds to it)")
        dynamics = [k for k in SCORE_DYNAMICS
                    if getattr(self.prune, k.split(".")[1]) != getattr(_PRUNE_DEFAULTS, k.split(".")[1])]
        released = self.prune.method == "bip" and self.bip.variant == "reference" or (
            self.prune.method == "hydra" and self.prune.variant == "reference")
        score_based = stage == "prune" and self.prune.method in ("bip", "hydra")
        if score_based and self.prune.ramp_epochs and self.prune.ramp_epochs >= self.train.epochs:
            raise BipError(f"prune.ramp_epochs={self.prune.ramp_epochs:g} must end before the last epoch "
                           f"(train.epochs={self.train.epochs}): the run would never keep exactly k")
        if dynamics and stage == "prune" and released:
            raise BipError(f"{', '.join(dynamics)}: the reference variant reproduces the released code "
                           "exactly and has no such option")

    @property
    def method_label(self) -> str:
        """The method a run id, a checkpoint's meta, result.json and the index name (method_label)."""
        return method_label(self.run.stage, self.prune.method)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        # Every field is a scalar: a shallow copy equals dataclasses.asdict, 10x faster (grids
        # of 10,000 cells build a config per run).
        return {s: {name: getattr(section, name) for name in _FIELD_NAMES[s]}
                for s, section in ((s, getattr(self, s)) for s in SECTIONS)}

    def replace(self, **dotted: Any) -> "Config":
        """A copy with ``section.key`` values replaced (coerced and validated)."""
        return build_config([(key, value, "replace") for key, value in dotted.items()], base=self)


# ------------------------------------------------------------------------------------------
# Keys of the original repository (args.py and its YAML presets) -> our fields.

FLAT_KEYS = {
    "arch": "model.arch", "num_classes": "model.num_classes",
    "dataset": "data.dataset", "data_dir": "data.data_dir", "normalize": "data.normalize",
    "batch_size": "data.batch_size", "test_batch_size": "data.test_batch_size",
    "num_workers": "data.num_workers", "data_fraction": "data.data_fraction",
    "epochs": "train.epochs",
    "optimizer": "optim.optimizer", "lr": "optim.lr", "wd": "optim.wd", "momentum": "optim.momentum",
    "lr_schedule": "optim.lr_schedule", "warmup_epochs": "optim.warmup_epochs",
    "warmup_lr": "optim.warmup_lr",
    "k": "prune.k", "layer_type": "prune.layer_type", "trainer": "prune.method",
    "scaled_score_init": "prune.score_init", "freeze_bn": "prune.train_bn",
    "lr2": "bip.lr2", "mask_lr": "bip.mask_lr", "mask_lr_schedule": "bip.mask_lr_schedule",
    "exp_mode": "run.stage", "seed": "run.seed", "exp_name": "run.exp_name",
    "result_dir": "run.result_dir", "source_net": "run.source_net", "resume": "run.resume",
    "print_freq": "run.print_freq",
}
# Flat keys whose value means something else in our schema.
_TRAINERS = {"base": "hydra", "bilevel": "bip"}
# Keys the released presets carry that change nothing there either (value checked, then dropped).
_INERT_KEYS = {
    "image_dim": "stored but never read by the released code",
    "val_method": "only 'base' (clean top-1/top-5) exists",
}


def _translate_flat(key: str, value: Any) -> list[tuple[str, Any]]:
    """A seed-style flat key -> our dotted key(s); [] for inert keys."""
    if key in _INERT_KEYS:
        if key == "val_method" and value != "base":
            raise BipError(f"val_method={value!r} is not supported; only 'base' exists")
        return []
    target = FLAT_KEYS[key]
    if key == "trainer":
        if value not in _TRAINERS:
            raise BipError(f"trainer={value!r} is not valid; choose one of: {', '.join(_TRAINERS)}")
        return [(target, _TRAINERS[value])]
    if key == "scaled_score_init":
        return [(target, "magnitude")] if _coerce(bool, value, key) else []
    if key == "freeze_bn":
        return [(target, not _coerce(bool, value, key))]
    return [(target, value)]


def valid_keys() -> list[str]:
    dotted = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]
    return dotted + list(FLAT_KEYS) + list(_INERT_KEYS)


def _unknown(key: str) -> BipError:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return BipError(f"unknown config key {key!r}{hint}")


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
# Float fields where inf means something (bip.gamma=inf switches the implicit-gradient term off);
# NaN never does, and inf anywhere else is a typo or an overflow.
_INFINITE_OK = {"bip.gamma"}


def _number(value: Any) -> int | float:
    """An int when the text is one (exact beyond 2**53), else a float."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    return float(value)


def _coerce(kind: type, value: Any, key: str) -> Any:
    """Convert ``value`` to the field type ``kind`` or raise a one-line error."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            number = value if isinstance(value, int) else _number(value)  # "10", "1e3", 10.0, not 2.5
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            if abs(number) >= 2**63:  # what torch and numpy can hold
                raise BipError(f"{key}={value!r} is too large (at most 2**63 - 1)")
            return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if math.isnan(number):
                raise BipError(f"{key}={value!r} is not a number (NaN)")
            if math.isinf(number) and key not in _INFINITE_OK:
                raise BipError(f"{key}={value!r} must be finite (only bip.gamma may be inf)")
            return number
        if kind is str:
            if value is None:
                return ""
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise BipError(f"{key}={value!r} is not a valid {kind.__name__}")


_FIELD_TYPES = {f"{s}.{f.name}": {"int": int, "float": float, "bool": bool, "str": str}[f.type]
                for s, cls in SECTIONS.items() for f in fields(cls)}


def build_config(overrides: Iterable[tuple[str, Any, str]], base: Config | None = None) -> Config:
    """Apply (key, value, origin) overrides in order on top of ``base`` (default: defaults)."""
    values = (base or Config()).to_dict()
    for key, value, origin in overrides:
        key = key.replace("-", "_") if "." not in key else key
        pairs = [(key, value)] if "." in key else (
            _translate_flat(key, value) if key in FLAT_KEYS or key in _INERT_KEYS else None)
        if pairs is None:
            raise _unknown(key)
        for dotted, val in pairs:
            if dotted not in _FIELD_TYPES:
                raise _unknown(dotted)
            section, name = dotted.split(".", 1)
            if dotted == "prune.skip" and isinstance(val, (list, tuple)):  # YAML list form
                val = ",".join(str(v) for v in val)
            values[section][name] = _coerce(_FIELD_TYPES[dotted], val, dotted)
    return Config(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})
