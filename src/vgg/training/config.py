"""Training configuration: one tree of dataclasses, resolved as defaults <- recipe <- config file <- command line.

The resolved tree is written to ``RUN_DIR/config.json`` with every run, so a run can be repeated exactly.

Every setting is declared once, with ``setting(default, help, ...)``: its type (``Literal`` for a choice), default,
help text and whether a resumed run may change it. The command line builds its flags from these declarations
(``cli.py``), ``validate`` checks choices and ranges from them, and ``state.resume_config`` reads resumability
from them.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import UsageError, did_you_mean
from ..models import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_arch
from .augment import AugmentConfig
from .settings import check_settings, setting


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    The defaults are the small-budget recipe search's winner (benchmarks/recipes.py, RESULTS.md "Recipe search at
    a small budget"): VGG16-BN, AdamW at 1e-3 (2e-4 for the plain VGGs, which do not learn at 1e-3, and for
    pretrained weights: ``default_lr``) after a warm-up over a fifth of the run, at least an epoch
    (``auto_warmup``), cosine decay, decoupled weight decay, label smoothing, random flips and no shifts. On 6,000
    Fashion-MNIST images, 2 epochs at 32 px, that reached 0.85 test accuracy where plain VGG16 with 4-pixel shifts
    (the previous default) reached 0.745: batch norm gave 4-7 points and dropping the shifts 4-7 more; flips cost
    nothing, and a weight average (``ema``) gained nothing at the end of the decayed schedule. The tutorial's own
    recipe (Adam at 1e-3, no augmentation) stalls at chance on small data.
    ``recipe="tutorial"`` (the ``RECIPES`` table) restores the tutorial's settings.
    """

    data: str = setting("", "dataset folder: DATA/<class>/<image> (optional with --resume)", resumable=True)
    val: str | None = setting(
        None, "validation folder with the same classes (default: a stratified split)", resumable=True
    )
    out: str | None = setting(
        None, "run folder for models, history, curves and config (default: runs/train, or runs/train2, ... when taken)"
    )
    overwrite: bool = setting(
        False, "replace the run already in --out (its files are deleted first) instead of refusing", resumable=True
    )
    arch: str = setting("vgg16_bn", "vgg11, vgg13, vgg16, vgg19 or their _bn variants")
    image_size: int = setting(224, "images are resized to this square side", low=MIN_IMAGE_SIZE, high=MAX_IMAGE_SIZE)
    epochs: int = setting(30, "maximum number of epochs", low=1, high=1_000_000, resumable=True)
    batch_size: int | Literal["auto"] = setting(64, "images per step, or auto (the largest that fits)", low=1)
    optimizer: Literal["sgd", "adam", "adamw"] = setting("adamw", "the optimizer")
    lr: float | Literal["find"] | None = setting(
        None,
        "peak learning rate, or find: run `vgg lr-find` first and use its suggestion "
        "(default: 1e-3 for _bn archs from scratch, else 2e-4)",
    )
    momentum: float = setting(0.9, "SGD momentum", low=0, high=1)
    nesterov: bool = setting(True, "Nesterov momentum for SGD")
    weight_decay: float = setting(0.05, "weight decay (decoupled with AdamW)", low=0)
    schedule: Literal["cosine", "constant", "step", "onecycle", "plateau"] = setting(
        "cosine", "learning-rate schedule, all after the warm-up"
    )
    warmup_epochs: float | Literal["auto"] = setting(
        "auto",
        "linear warm-up length in epochs, or auto: a fifth of the run, at least 1 (half of a 1-epoch run), at most 5",
        low=0,
    )
    step_size: int = setting(10, "step schedule: decay the rate by --gamma every N epochs", low=1)
    gamma: float = setting(0.1, "step and plateau schedules: rate decay factor, between 0 and 1")
    plateau_patience: int = setting(3, "plateau schedule: epochs without improvement before a cut", low=0)
    clip_grad_norm: float = setting(0.0, "clip the gradient norm to this value (0: off)", low=0)
    accumulate: int = setting(1, "accumulate gradients over N batches per optimizer step", low=1)
    label_smoothing: float = setting(0.1, "label smoothing of the loss", low=0, high=1)
    ema: float = setting(
        0.0,
        "keep an exponential moving average of the weights with this decay (e.g. 0.99; 0: off), validated every "
        "epoch and saved as the model when it scores better",
        low=0,
    )
    dropout: float = setting(0.5, "dropout in the classifier", low=0, high=1)
    patience: int = setting(20, "stop after this many epochs without improvement (0: never)", low=0, resumable=True)
    monitor: Literal["val_accuracy", "val_loss", "accuracy", "loss"] = setting(
        "val_accuracy", "the metric that picks the best model and drives early stopping"
    )
    min_delta: float = setting(0.0, "smallest change of --monitor that counts as improvement", low=0)
    tta: bool = setting(
        False,
        "validate as `vgg evaluate --tta` scores: each image also mirrored left-right, the two averaged (the "
        "best model is picked on that; only where mirroring keeps the class)",
    )
    restore_best: bool = setting(False, "end with the best epoch's weights instead of the last")
    val_fraction: float = setting(0.2, "validation share when --val is not given", low=0, high=1)
    max_per_class: int | None = setting(None, "use at most this many training images per class", low=1)
    seed: int = setting(0, "seed for the split, initialisation and shuffling")
    deterministic: bool = setting(False, "deterministic kernels only (torch.use_deterministic_algorithms)")
    deterministic_warn_only: bool = setting(
        False, "with --deterministic: warn at an op with no deterministic kernel instead of stopping", resumable=True
    )
    save_every_steps: int = setting(0, "also save state.pt every N steps, for mid-epoch resume", low=0, resumable=True)
    tensorboard: bool = setting(
        False, "write TensorBoard files to RUN_DIR/tensorboard (vgg[tensorboard])", resumable=True
    )
    compile: bool = setting(False, "compile the model with torch.compile (slow first step)", resumable=True)
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N", resumable=True)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", "numeric precision: auto is bf16 where the hardware runs it natively; fp16 needs CUDA"
    )
    workers: int | None = setting(
        None, "image decoding processes (default: one per core, up to 8)", low=0, high=256, resumable=True
    )
    cache: Literal["auto", "ram", "none"] = setting(
        "auto", "keep decoded images in memory: auto when they fit", resumable=True
    )
    decode: Literal["auto", "workers", "device"] = setting(
        "auto", "where JPEGs are decoded: auto is on the GPU when training on CUDA", resumable=True
    )
    weights: str | None = setting(
        None, "start from 'imagenet' (torchvision's weights), a .pth/.safetensors file or a Keras VGG .h5/.keras file"
    )
    freeze: Literal["none", "features"] = setting("none", "features: train only the classifier")
    unfreeze_at: int | None = setting(None, "with --freeze features: train the features too from this epoch")
    backbone_lr_scale: float = setting(1.0, "the features' learning rate is lr times this (more than 0)")
    cache_features: bool = setting(True, "frozen features, no augmentation: compute the features once")
    split: str | None = setting(None, "reuse a split.csv (path,class,split) of an earlier run instead of splitting")
    class_weight: Literal["none", "auto"] = setting("none", "auto: loss weights inversely proportional to class size")
    sampler: Literal["shuffle", "balanced"] = setting("shuffle", "balanced: draw every class equally often")
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> TrainConfig:
        """Check every setting (a clear error naming the bad one) and fill in ``lr``'s default."""
        check_settings(self)
        check_arch(self.arch)
        if self.split is not None and self.val is not None:
            raise UsageError(
                f"split and val both say which images validate. Received: split={self.split!r}, val={self.val!r}; "
                "pass one of them."
            )
        self.augment.validate()
        self.lr = self.peak_lr
        self.warmup_epochs = self.warmup
        if self.lr != "find" and not self.lr > 0:  # NaN fails this too
            raise UsageError(f"lr must be positive or 'find'. Received: lr={self.lr}.")
        if not self.ema < 1:
            raise UsageError(f"ema must be a decay from 0 (off) up to, not including, 1. Received: ema={self.ema}.")
        if not 0 < self.val_fraction < 1:
            raise UsageError(
                f"val_fraction must be between 0 and 1 (both excluded). Received: val_fraction={self.val_fraction}."
            )
        if not 0 < self.gamma < 1:
            raise UsageError(f"gamma (learning-rate decay) must be between 0 and 1. Received: gamma={self.gamma}.")
        self._validate_transfer()
        return self

    @property
    def peak_lr(self) -> float | str:
        """``lr``, or its default for this architecture and starting point when none was given (``find`` stays
        ``find`` until the run replaces it by the range test's suggestion)."""
        return self.lr if self.lr is not None else default_lr(self.arch, self.weights)

    @property
    def warmup(self) -> float:
        """``warmup_epochs``, or with ``auto`` the warm-up that scales with the run (``auto_warmup``)."""
        return auto_warmup(self.epochs) if self.warmup_epochs == "auto" else float(self.warmup_epochs)

    def _validate_transfer(self) -> None:
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


def monitor_mode(monitor: str) -> str:
    """``min`` for a loss, ``max`` for an accuracy."""
    return "min" if monitor.endswith("loss") else "max"


def default_lr(arch: str, weights: str | None) -> float:
    """The peak learning rate when none is given: 1e-3 for a batch-norm VGG trained from scratch, else 2e-4.

    Plain VGG16 does not learn at 1e-3 (TrainConfig's docstring); VGG16-BN does, and better than at 2e-4 (on
    Fashion-MNIST at 32 px, 5 epochs: 0.9253 against 0.9103 test accuracy, benchmarks/RESULTS.md). Pretrained
    weights keep the gentler rate.
    """
    return 1e-3 if arch.endswith("_bn") and weights is None else 2e-4


# The automatic warm-up: this share of the run, at least WARMUP_MIN_EPOCHS (half of a shorter run), at most
# WARMUP_MAX_EPOCHS.
WARMUP_SHARE = 0.2
WARMUP_MIN_EPOCHS = 1.0
WARMUP_MAX_EPOCHS = 5.0


def auto_warmup(epochs: int) -> float:
    """The warm-up length in epochs for a run of ``epochs``: a fifth of it, at least one epoch, at most five.

    A one-epoch run warms up for half of it. Measured on Fashion-MNIST at 32 px (benchmarks/RESULTS.md, "Recipe
    search at a small budget"): with 6,000 images and 2 epochs, one epoch of warm-up reached 0.849 test accuracy
    (3 seeds), 0.4 epochs 0.835 (3 seeds) and 0.1 epochs 0.671 (1 seed), so short runs keep the full epoch; longer
    runs warm up for a fifth of the run (3 epochs of 15 on the full set, "Accuracy on Fashion-MNIST"), and the cap
    keeps a long run from spending its first tens of epochs warming up.
    """
    return min(WARMUP_MAX_EPOCHS, max(WARMUP_SHARE * epochs, min(WARMUP_MIN_EPOCHS, epochs / 2)))


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


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UsageError(
            f"{name} must be one of {{{', '.join(options)}}}. Received: {name}={value!r}.{did_you_mean(value, options)}"
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
