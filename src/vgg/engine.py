"""The training loop: one epoch, evaluation, and ``fit`` with best-model checkpointing and early stopping."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import AugmentConfig, augment_batch, batch_mixer
from .config import TrainConfig
from .data import normalize
from .runtime import autocast


@dataclass
class Step:
    """How batches become model inputs, shared by training, evaluation and prediction."""

    device: torch.device
    precision: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool = True

    def inputs(self, images: torch.Tensor, augment: AugmentConfig | None = None) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if augment is not None:
            images = augment_batch(images, augment)
        images = normalize(images, self.mean, self.std)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    from .transfer import lr_groups

    groups = []
    for params, lr in lr_groups(model, config):
        # No weight decay on biases and batch-norm parameters: decaying them only fights the normalisation.
        groups.append({"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lr": lr})
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr})
    groups = [group for group in groups if group["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def make_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear warm-up, then cosine decay to zero (or constant)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    step: Step,
    augment: AugmentConfig,
    label_smoothing: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    description: str = "train",
    progress: bool = True,
    mixer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    class_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; ``mixer`` (MixUp/CutMix) turns labels into soft targets for the loss."""
    model.train()
    if class_weights is not None:
        class_weights = class_weights.to(step.device)
    # Running sums stay on the device: reading them every step would make the GPU wait for the host.
    loss_sum = torch.zeros((), device=step.device)
    correct = torch.zeros((), device=step.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(batches, desc=description, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    for i, (images, labels) in enumerate(bar):
        if len(labels) == 0:
            continue
        inputs = step.inputs(images, augment)
        labels = labels.to(step.device, non_blocking=True)
        targets = labels
        if mixer is not None:
            inputs, targets = mixer(inputs, labels)
        with autocast(step.device, step.precision):
            logits = model(inputs)
            loss = F.cross_entropy(logits.float(), targets, weight=class_weights, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        schedule.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if progress and (i % 10 == 0):
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}", img_s=f"{seen / elapsed:.1f}"
            )
    elapsed = time.perf_counter() - start
    seen = max(seen, 1)
    return {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen, "images_per_s": seen / elapsed}


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    step: Step,
    num_classes: int,
    progress: bool = False,
) -> dict:
    """Loss, accuracy, per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=step.device)
    loss_sum = torch.zeros((), device=step.device)
    for images, labels in tqdm(batches, desc="evaluate", leave=False, disable=not progress, unit="batch"):
        if len(labels) == 0:
            continue
        labels = labels.to(step.device)
        with autocast(step.device, step.precision):
            logits = model(step.inputs(images)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    confusion = confusion.cpu()
    total = int(confusion.sum())
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return {
        "loss": loss_sum.item() / max(total, 1),
        "accuracy": float(confusion.diag().sum()) / max(total, 1),
        "images": total,
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


@dataclass
class EarlyStopping:
    """Tracks the monitored metric: says when it improved and when patience has run out."""

    monitor: str
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    @property
    def mode(self) -> str:
        return "min" if self.monitor.endswith("loss") else "max"

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; returns True when it is a new best."""
        sign = 1 if self.mode == "max" else -1
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    stopped_early: bool = False


def fit(
    model: nn.Module,
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    step: Step,
    num_classes: int,
    on_epoch_end: Callable[[dict[str, float], bool], None] | None = None,
    progress: bool = True,
    class_weights: torch.Tensor | None = None,
) -> FitResult:
    """Train for ``config.epochs`` epochs, evaluating after each.

    ``on_epoch_end(row, improved)`` receives the epoch's history row and whether the monitored metric improved;
    it is where the caller saves the best and last models and writes the curves.
    """
    optimizer = make_optimizer(model, config)
    steps_per_epoch = max(1, len(train_batches)) if hasattr(train_batches, "__len__") else 1
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(step.device.type) if step.precision == "fp16" else None
    stopper = EarlyStopping(config.monitor, config.patience)
    mixer = batch_mixer(config.augment, num_classes)
    result = FitResult()
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(
            model,
            train_batches,
            optimizer,
            schedule,
            step,
            config.augment,
            config.label_smoothing,
            scaler,
            description=f"epoch {epoch}/{config.epochs}",
            progress=progress,
            mixer=mixer,
            class_weights=class_weights,
        )
        val = evaluate(model, val_batches, step, num_classes)
        row = {
            "epoch": epoch,
            "loss": train["loss"],
            "accuracy": train["accuracy"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": lr,
            "images_per_s": train["images_per_s"],
            "seconds": time.perf_counter() - start,
        }
        result.history.append(row)
        improved = stopper.update(row[config.monitor], epoch)
        if on_epoch_end is not None:
            on_epoch_end(row, improved)
        if stopper.should_stop:
            result.stopped_early = True
            break
    result.best_epoch, result.best_value = stopper.best_epoch, stopper.best
    return result
