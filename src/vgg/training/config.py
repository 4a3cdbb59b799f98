"""Training configuration: one tree of dataclasses, resolved as defaults <- recipe <- config file <- command line.

The resolved tree is written to ``RUN_DIR/config.json`` with every run, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .augment import AugmentConfig
from .errors import UsageError, did_you_mean

MONITORS = ("val_accuracy", "val_loss", "accuracy", "loss")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step", "onecycle", "plateau")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE = ("none", "features")
CLASS_WEIGHTS = ("none", "auto")
SAMPLERS = ("shuffle", "balanced")
DECODE = ("auto", "workers", "device")


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    The defaults are a recipe that learns on plain VGG16 from scratch: AdamW at 2e-4 (1e-3 for the batch-norm
    VGGs trained from scratch, ``default_lr``) after a one-epoch linear warm-up, cosine decay, decoupled weight
    decay, label smoothing, shift + flip augmentation. Measured on Fashion-MNIST at 32 px (5,000 training
    images, 2 epochs): the tutorial's Adam at 1e-3 stays at chance (0.100), SGD+Nesterov at 0.01-0.02 barely
    leaves it (0.29-0.31), Adam at 1e-4 reaches 0.734. With all 57,000 images and batch 128 the tutorial's recipe
    does learn: one epoch gives 0.808 test accuracy, against 0.837 for this recipe (then at 2e-4) on VGG16-BN in
    the same time (benchmarks/RESULTS.md).
    ``recipe="tutorial"`` (the ``RECIPES`` table) restores the tutorial's settings.
    """

    data: str = ""
    val: str | None = None
    out: str = "runs/train"
    arch: str = "vgg16"
    image_size: int = 224
    epochs: int = 30
    batch_size: int | str = 64  # or "auto": the largest that fits (autobatch.py), resolved when training starts
    optimizer: str = "adamw"
    lr: float | None = None  # None: default_lr(arch, weights), filled in by validate()
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    step_size: int = 10
    gamma: float = 0.1
    plateau_patience: int = 3
    clip_grad_norm: float = 0.0
    accumulate: int = 1
    label_smoothing: float = 0.1
    dropout: float = 0.5
    patience: int = 20
    monitor: str = "val_accuracy"
    min_delta: float = 0.0
    restore_best: bool = False
    val_fraction: float = 0.2
    max_per_class: int | None = None
    seed: int = 0
    deterministic: bool = False
    save_every_steps: int = 0
    tensorboard: bool = False
    compile: bool = False
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    cache: str = "auto"
    # JPEG decoding: "auto" = on the accelerator (nvJPEG) when training on CUDA from streamed images, else in the
    # loader workers; "device" forces the batch decoder (jpeg.py), "workers" the workers.
    decode: str = "auto"
    # transfer learning (transfer.py): weights to start from, frozen backbone, its learning rate, cached features
    weights: str | None = None
    freeze: str = "none"
    unfreeze_at: int | None = None
    backbone_lr_scale: float = 1.0
    cache_features: bool = True
    split: str | None = None
    class_weight: str = "none"
    sampler: str = "shuffle"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> TrainConfig:
        """Check every setting (a clear error naming the bad one) and fill in ``lr``'s default."""
        _choice("monitor", self.monitor, MONITORS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("cache", self.cache, ("auto", "ram", "none"))
        _choice("decode", self.decode, DECODE)
        _choice("class_weight", self.class_weight, CLASS_WEIGHTS)
        _choice("sampler", self.sampler, SAMPLERS)
        if self.split is not None and self.val is not None:
            raise UsageError(
                f"split and val both say which images validate. Received: split={self.split!r}, val={self.val!r}; "
                "pass one of them."
            )
        self.augment.validate()
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise UsageError(
                f"batch_size must be a positive integer or 'auto'. Received: batch_size={self.batch_size!r}."
            )
        for name in ("epochs", "image_size", "step_size", "accumulate"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be a positive integer. Received: {name}={getattr(self, name)}.")
        if self.lr is None:
            self.lr = default_lr(self.arch, self.weights)
        if self.lr <= 0:
            raise UsageError(f"lr must be positive. Received: lr={self.lr}.")
        for name in ("patience", "plateau_patience", "save_every_steps", "clip_grad_norm", "min_delta"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be 0 or more. Received: {name}={getattr(self, name)}.")
        if not 0 < self.gamma < 1:
            raise UsageError(f"gamma (learning-rate decay) must be between 0 and 1. Received: gamma={self.gamma}.")
        self._validate_transfer()
        return self

    def _validate_transfer(self) -> None:
        _choice("freeze", self.freeze, FREEZE)
        if self.unfreeze_at is not None:
            if self.freeze != "features":
                raise UsageError(
                    f"unfreeze_at needs frozen features. Received: unfreeze_at={self.unfreeze_at} with "
                    f"freeze={self.freeze!r}; add --freeze features."
                )
            if not 2 <= self.unfreeze_at <= self.epochs:
                raise UsageError(
                    f"unfreeze_at must be an epoch from 2 to epochs={self.epochs}. Received: "
                    f"unfreeze_at={self.unfreeze_at}."
                )
        if not self.backbone_lr_scale > 0:
            raise UsageError(
                f"backbone_lr_scale must be positive (use --freeze features to stop the backbone). "
                f"Received: backbone_lr_scale={self.backbone_lr_scale}."
            )


def default_lr(arch: str, weights: str | None) -> float:
    """The peak learning rate when none is given: 1e-3 for a batch-norm VGG trained from scratch, else 2e-4.

    Plain VGG16 does not learn at 1e-3 (TrainConfig's docstring); VGG16-BN does, and better than at 2e-4 (on
    Fashion-MNIST at 32 px, 5 epochs: 0.9253 against 0.9103 test accuracy, benchmarks/RESULTS.md). Pretrained
    weights keep the gentler rate.
    """
    return 1e-3 if arch.endswith("_bn") and weights is None else 2e-4


# Named recipes: overrides applied on top of the defaults, before any config file or flag.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # The Keras tutorial: Adam 1e-3, constant rate, plain cross-entropy, no augmentation.
    "tutorial": {
        "optimizer": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "constant",
        "warmup_epochs": 0.0,
        "label_smoothing": 0.0,
        "augment": {"rotation": 0.0, "shift": 0.0, "zoom": 0.0, "shear": 0.0, "hflip": False, "vflip": False},
    },
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(
            f"{name} must be one of {{{', '.join(choices)}}}. Received: {name}={value!r}.{did_you_mean(value, choices)}"
        )


def merge(obj: Any, updates: dict[str, Any], where: str = "config") -> Any:
    """Return a copy of dataclass ``obj`` with ``updates`` applied; unknown keys are errors with a suggestion."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        if key not in fields:
            raise UsageError(f"Unknown key {key!r} in {where}.{did_you_mean(key, fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UsageError(f"{where}.{key} must be a table of settings. Received: {value!r}.")
            changes[key] = merge(current, value, f"{where}.{key}")
        else:
            changes[key] = value
    return dataclasses.replace(obj, **changes)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a .toml or .json config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Config file not found: {path}. Expected a .toml or .json file.")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"Config file {path} is not valid {path.suffix[1:].upper()}: {error}.") from error
    raise UsageError(f"Config file must end in .toml or .json. Received: {path}.")


def resolve(recipe: str = "default", file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults <- recipe <- config file <- keyword overrides (``None`` values are ignored)."""
    _choice("recipe", recipe, tuple(RECIPES))
    config = merge(TrainConfig(), RECIPES[recipe], f"recipe {recipe}")
    if file is not None:
        config = merge(config, load_file(file), str(file))
    augment = {k: v for k, v in overrides.pop("augment", {}).items() if v is not None}
    given = {k: v for k, v in overrides.items() if v is not None}
    if augment:
        given["augment"] = augment
    return merge(config, given, "arguments").validate()


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
