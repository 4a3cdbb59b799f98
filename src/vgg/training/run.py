"""A whole training run: data -> model -> fit -> model files, history, curves and config in RUN_DIR."""

from __future__ import annotations

import csv
import dataclasses
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .augment import image_transform
from .autobatch import find_batch_size
from .checkpoint import ModelInfo, atomic_write, save_model
from .config import TrainConfig, to_dict
from .data import (
    Batches,
    class_weights,
    limit_per_class,
    read_split,
    scan_folder,
    stratified_split,
    write_split,
)
from .distributed import World, finish
from .distributed import setup as setup_distributed
from .engine import FitResult, Step, fit
from .errors import UsageError
from .models import build, check_arch
from .report import format_summary, plot_curves, write_history
from .runtime import pick_device, pick_precision, training_memory_format
from .state import load_state, save_state
from .transfer import cached_fit_inputs, maybe_unfreeze, prepare


@dataclass
class TrainResult:
    run_dir: Path
    best_model: Path
    last_model: Path
    class_names: list[str]
    fit: FitResult
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model: nn.Module | None = None

    @property
    def history(self) -> list[dict[str, float]]:
        return self.fit.history


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(data, indent=2) + "\n"))


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """``skipped.csv`` (path, reason), written even when empty so that "no bad files" is visible too."""

    def write(temp: str) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(skipped)

    atomic_write(path, write)


def imbalance_line(counts: dict[str, int], config: TrainConfig) -> str:
    """One line on class balance: the largest/smallest ratio and what this run does about it."""
    largest = max(counts, key=counts.__getitem__)
    smallest = min(counts, key=counts.__getitem__)
    ratio = counts[largest] / max(1, counts[smallest])
    remedy = []
    if config.class_weight == "auto":
        remedy.append("class-weighted loss")
    if config.sampler == "balanced":
        remedy.append("balanced sampling")
    if counts[largest] == counts[smallest]:
        return f"classes are balanced ({counts[largest]} images each)"
    line = f"imbalance: {ratio:.1f}x ({largest}: {counts[largest]}, {smallest}: {counts[smallest]})"
    if remedy:
        return line + "; using " + " and ".join(remedy)
    if ratio >= 3:
        return line + "; consider --class-weight auto or --sampler balanced"
    return line


def train(
    config: TrainConfig, log: Callable[[str], None] = print, progress: bool = True, resume: bool = False
) -> TrainResult:
    """Train a model as ``config`` says; everything the run produces goes to ``config.out``.

    With ``resume``, continue the run in ``config.out`` from its ``state.pt`` (see ``state.resume_config`` for
    the settings that must match). Under torchrun, every process calls this; only rank 0 writes and logs.
    """
    config.validate()
    check_arch(config.arch)
    state = load_state(config.out) if resume else None
    world, device = setup_distributed(pick_device(config.device))
    if not world.main:
        log, progress = (lambda _: None), False
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_benchmark = torch.backends.cudnn.benchmark
    try:
        result = _train(config, log, progress, state, device, world)
    except BaseException:
        finish(world, wait=False)
        raise
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.backends.cudnn.benchmark = was_benchmark
    finish(world)
    return result


def _tensorboard(config: TrainConfig, state: dict | None):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UsageError(
            "--tensorboard needs the tensorboard package, which is not installed. "
            "Install it with: pip install 'vgg[tensorboard]' (or pip install tensorboard)."
        ) from error
    # purge_step drops events a killed run wrote after its last saved state, so resumed curves do not double back.
    purge = state["epoch"] + 1 if state is not None else None
    return SummaryWriter(str(Path(config.out) / "tensorboard"), purge_step=purge)


def _train(
    config: TrainConfig,
    log: Callable[[str], None],
    progress: bool,
    state: dict | None,
    device: torch.device,
    world: World,
) -> TrainResult:
    precision = pick_precision(config.precision, device)
    if world.distributed and config.unfreeze_at:
        # DDP registers the parameters that need gradients when it wraps the model; later unfreezing is unseen.
        raise UsageError("--unfreeze-at is not supported under torchrun yet: train frozen, then --weights RUN/best...")
    if config.deterministic:
        # Ops with no deterministic kernel (a few CUDA backward passes) warn rather than stop a long run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # Input shapes are fixed for the whole run, so cuDNN's one-off search for the fastest kernels pays back.
        torch.backends.cudnn.benchmark = True
    writer = _tensorboard(config, state) if world.main else None
    torch.manual_seed(config.seed)

    folder = scan_folder(config.data)
    skipped_early = list(folder.skipped)
    if config.val:
        train_samples = folder.samples
        val_folder = scan_folder(config.val, classes=folder.classes)
        val_samples = val_folder.samples
        skipped_early += val_folder.skipped
    elif config.split:
        train_samples, val_samples = read_split(config.split, folder.classes)
    else:
        train_samples, val_samples = stratified_split(folder, config.val_fraction, config.seed)
    if config.max_per_class:
        train_samples = limit_per_class(train_samples, config.max_per_class, config.seed)
        val_samples = limit_per_class(val_samples, max(1, round(config.max_per_class * config.val_fraction)))
    classes = folder.classes
    if state is not None:
        saved = json.loads((Path(config.out) / "config.json").read_text())["class_names"]
        if classes != saved:
            raise UsageError(
                f"Cannot resume {config.out}: {config.data} has classes {classes} but the run was trained on "
                f"{saved}. Resume with the run's data, or start a new run with another --out."
            )

    # Weights are read before the images are decoded: a missing weights file should not cost a decoding pass.
    model = build(config.arch, num_classes=len(classes), image_size=config.image_size, dropout=config.dropout)
    preprocessing = prepare(model, config, classes, log)
    layout = training_memory_format(device, precision, config.image_size)
    if config.batch_size == "auto":
        config = dataclasses.replace(
            config,
            batch_size=find_batch_size(model, config.image_size, device, precision, len(train_samples), layout),
        )
        log(f"batch size: {config.batch_size} (auto: the largest power of two that fits)")
    pin = device.type == "cuda"
    decode_device = device if config.decode == "device" or (config.decode == "auto" and device.type == "cuda") else None
    train_batches = Batches(
        train_samples, config.image_size, config.batch_size, shuffle=True, seed=config.seed,
        workers=config.workers, cache=config.cache, drop_last=True, pin_memory=pin,
        rank=world.rank, world_size=world.world_size,
        transform=image_transform(config.augment), sampler=config.sampler, decode_device=decode_device,
    )  # fmt: skip
    val_batches = Batches(
        val_samples, config.image_size, max(config.batch_size, 128), shuffle=False,
        workers=config.workers, cache=config.cache, pin_memory=pin,
        rank=world.rank, world_size=world.world_size, decode_device=decode_device,
    )  # fmt: skip

    model = model.to(device, memory_format=layout)
    if config.compile:
        # In place: the parameter names (and so the model files and training state) stay those of the module.
        model.compile()
    if world.distributed:
        # DDP copies rank 0's initial weights to every process; the other streams (dropout, augmentation) differ.
        torch.manual_seed(config.seed + world.rank)
    log(format_summary(config.arch, len(classes), config.image_size))
    counts = {name: sum(1 for s in train_samples if s.label == i) for i, name in enumerate(classes)}
    if train_batches.in_memory:
        # What decoded, not what was listed: a class whose every file failed to decode cannot be learned.
        decoded = torch.bincount(train_batches.labels, minlength=len(classes)).tolist()
        counts = dict(zip(classes, decoded, strict=True))
    unusable = [name for name, n in counts.items() if n == 0]
    if unusable:
        raise UsageError(
            f"Class {unusable[0]!r} has no usable training images: every file failed to decode (see the warnings "
            f"above). Expected at least one readable image per class in {config.data}/{unusable[0]}/."
        )
    log(
        f"classes: {len(classes)} ({', '.join(f'{n}: {c}' for n, c in counts.items())})\n"
        + imbalance_line(counts, config)
        + "\n"
        f"train: {len(train_samples)} images ({'in memory' if train_batches.in_memory else 'streamed'}), "
        f"validation: {len(val_samples)} images, device: {device}, precision: {precision}"
        + (f", {world.world_size} processes" if world.distributed else "")
    )

    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.main:
        write_split(run_dir / "split.csv", classes, train_samples, val_samples)
        _write_skipped(run_dir / "skipped.csv", skipped_early + train_batches.skipped + val_batches.skipped)
        _write_json(
            run_dir / "config.json",
            {
                "config": to_dict(config),
                "class_names": classes,
                "seed": config.seed,
                "device": str(device),
                "precision": precision,
                "world_size": world.world_size,
                "versions": {
                    "vgg": __version__,
                    "torch": torch.__version__,
                    "torchvision": torchvision.__version__,
                    "python": sys.version.split()[0],
                    "platform": platform.platform(),
                },
            },
        )
    info = ModelInfo(
        arch=config.arch,
        class_names=classes,
        image_size=config.image_size,
        mean=list(preprocessing.mean),
        std=list(preprocessing.std),
        dropout=config.dropout,
        extra={"weights": preprocessing.source} if preprocessing.source else {},
    )
    best_path, last_path = run_dir / "best.safetensors", run_dir / "last.safetensors"
    history: list[dict[str, float]] = list(state["history"]) if state is not None else []
    if state is not None:
        done = state["epoch"] + (state["batches"]["position"] / max(1, len(train_batches)) if state["in_epoch"] else 0)
        log(f"resuming {run_dir} at epoch {done:.2f} of {config.epochs}")
        if state["epoch"] >= config.epochs:
            log(f"the run already finished {state['epoch']} epochs: pass --epochs N to train longer")
        if config.restore_best and best_path.is_file():
            state["best_model"] = load_file(best_path)

    def on_epoch_end(row: dict[str, float], improved: bool) -> None:
        history.append(row)
        if writer is not None:
            for name in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "images_per_s"):
                writer.add_scalar(name, row[name], int(row["epoch"]))
            writer.flush()
        maybe_unfreeze(model, config, int(row["epoch"]), log)
        if not world.main:
            return
        save_model(last_path, model, info)
        if improved:
            save_model(best_path, model, info)
        write_history(run_dir / "history.csv", history)
        plot_curves(run_dir / "curves.png", history)
        log(
            f"epoch {int(row['epoch'])}/{config.epochs}: loss {row['loss']:.4f} accuracy {row['accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_accuracy {row['val_accuracy']:.4f} "
            f"({row['images_per_s']:.1f} img/s, {row['seconds']:.0f} s)"
            + (f"  * best {config.monitor}, saved {best_path}" if improved else "")
        )

    def on_checkpoint(training_state: dict) -> None:
        if world.main:
            save_state(run_dir, training_state)

    step = Step(device, precision, preprocessing.mean, preprocessing.std, memory_format=layout)
    weights = None
    if config.class_weight == "auto":
        labels = torch.arange(len(classes)).repeat_interleave(torch.tensor(list(counts.values())))
        weights = class_weights(labels, len(classes))
        log("class weights: " + ", ".join(f"{n}: {w:.2f}" for n, w in zip(classes, weights.tolist(), strict=True)))
    # With a frozen backbone and no augmentation, fit the classifier alone on features computed once
    # (single process only: each process would otherwise fit its own classifier on its own shard).
    cached = (
        None if world.distributed else cached_fit_inputs(model, train_batches, val_batches, step, config, log, progress)
    )
    if cached is not None:
        trained, fit_train, fit_val, fit_step = cached
    else:
        fit_train, fit_val, fit_step = train_batches, val_batches, step
        trained = model
        if world.distributed:
            trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    result = fit(
        trained, fit_train, fit_val, config, fit_step, len(classes), on_epoch_end, progress, state, on_checkpoint,
        class_weights=weights,
    )  # fmt: skip
    if writer is not None:
        writer.close()
    if result.stopped_early:
        log(f"stopped early: no {config.monitor} improvement in {config.patience} epochs")
    skipped = skipped_early + train_batches.skipped + val_batches.skipped
    if world.main:
        _write_skipped(run_dir / "skipped.csv", skipped)
    if skipped:
        log(f"skipped {len(skipped)} unreadable files, listed in {run_dir / 'skipped.csv'}")
    if result.best_value is not None:
        log(f"best {config.monitor} {result.best_value:.4f} at epoch {result.best_epoch}; model: {best_path}")
    return TrainResult(run_dir, best_path, last_path, classes, result, skipped, model)
