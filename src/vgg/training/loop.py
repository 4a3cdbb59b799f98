"""The training loop: one epoch, evaluation, and ``fit`` with best-model checkpointing and early stopping."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sized
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .augment import AugmentConfig, augment_batch, batch_mixer
from .config import TrainConfig, default_lr
from .data import Batches, normalize
from .distributed import all_reduce_sum, gather, rank
from .runtime import autocast
from .schedules import Schedule, make_schedule
from .state import rng_states, set_rng_states


@dataclass
class Step:
    """How batches become model inputs, shared by training, evaluation and prediction."""

    device: torch.device
    precision: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    memory_format: torch.memory_format = torch.channels_last
    # Test-time augmentation for evaluation and prediction: also classify each image mirrored left-right and
    # average the two probability vectors. Right only where mirroring keeps the class (clothes, not text).
    tta: bool = False

    def inputs(self, images: torch.Tensor, augment: AugmentConfig | None = None) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if augment is not None:
            images = augment_batch(images, augment)
        images = normalize(images, self.mean, self.std)
        return images.contiguous(memory_format=self.memory_format)

    def log_probabilities(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Float32 class log-probabilities of a batch, averaged over the mirror image too when ``tta`` is on.

        Being normalised, they can stand in for logits: cross-entropy, argmax and softmax give the same answers.
        """
        inputs = self.inputs(images)
        with autocast(self.device, self.precision):
            log_p = model(inputs).float().log_softmax(1)
            if not self.tta:
                return log_p
            mirrored = model(inputs.flip(3)).float().log_softmax(1)
        return torch.logaddexp(log_p, mirrored) - math.log(2)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    from .transfer import lr_groups

    if config.lr is None:
        config = replace(config, lr=default_lr(config.arch, config.weights))
    groups = []
    for params, lr in lr_groups(model, config):
        # No weight decay on biases and batch-norm parameters: decaying them only fights the normalisation.
        groups.append({"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lr": lr})
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr})
    groups = [group for group in groups if group["params"]]
    # Fused kernels update every parameter in one pass: measured 133 -> 27 ms per AdamW step for VGG16 at 32 px
    # on 2 CPU cores (172 vs 155 img/s at batch 128, 131 vs 103 at batch 64).
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    if config.optimizer == "sgd":
        nesterov = config.nesterov and config.momentum > 0
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=nesterov, fused=fused)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, fused=fused)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused)


@dataclass
class Totals:
    """An epoch's running sums. They stay on the device: reading them every step would make the GPU wait."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> Totals:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

    def state_dict(self) -> dict:
        """The sums over all processes (a collective call under DDP); a resumed run restores them on rank 0."""
        loss_sum, correct = self.loss_sum.detach().clone(), self.correct.clone()
        seen = torch.tensor(self.seen, device=loss_sum.device)
        for tensor in (loss_sum, correct, seen):
            all_reduce_sum(tensor)
        return {"loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": int(seen)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Totals:
        return cls(state["loss_sum"].to(device), state["correct"].to(device), int(state["seen"]))


def train_one_epoch(
    model: nn.Module,
    batches: Sized,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    step: Step,
    augment: AugmentConfig,
    label_smoothing: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    description: str = "train",
    progress: bool = True,
    *,
    accumulate: int = 1,
    clip_grad_norm: float = 0.0,
    start: int = 0,
    totals: Totals | None = None,
    on_step: Callable[[Totals, int], None] | None = None,
    mixer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    class_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` (an iterable with a length), one optimizer step per ``accumulate`` batches.

    ``start`` batches of this epoch were done before a resume, and ``totals`` holds their sums.
    ``on_step(totals, batches_done)`` runs after every optimizer step: where mid-epoch checkpoints are taken.
    ``mixer`` (MixUp/CutMix) turns labels into soft targets for the loss; ``class_weights`` weight it per class.
    The returned ``lr`` is the learning rate of the epoch's last optimizer step.
    """
    model.train()
    if class_weights is not None:
        class_weights = class_weights.to(step.device)
    totals = totals if totals is not None else Totals.zeros(step.device)
    n = len(batches)
    started, seen_before = time.perf_counter(), totals.seen
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(batches, desc=description, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    for i, (images, labels) in enumerate(bar, start):
        if len(labels) == 0:
            continue
        inputs = step.inputs(images, augment)
        labels = labels.to(step.device, non_blocking=True)
        targets = labels
        if mixer is not None:
            inputs, targets = mixer(inputs, labels)
        # The last group of an epoch may be short: average over the batches it really has.
        group = min(accumulate, n - i // accumulate * accumulate)
        boundary = (i + 1) % accumulate == 0 or i + 1 == n
        # Under DDP, gradients are averaged across processes only on the group's last backward pass.
        sync = model.no_sync() if not boundary and isinstance(model, DistributedDataParallel) else nullcontext()
        with sync:
            with autocast(step.device, step.precision):
                logits = model(inputs)
                loss = F.cross_entropy(logits.float(), targets, weight=class_weights, label_smoothing=label_smoothing)
            scaled = loss / group if group > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        totals.loss_sum += loss.detach() * len(labels)
        totals.correct += (logits.argmax(1) == labels).sum()
        totals.seen += len(labels)
        if boundary:
            lr = optimizer.param_groups[0]["lr"]
            if clip_grad_norm:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if on_step is not None:
                on_step(totals, i + 1)
        if progress and (i % 10 == 0):
            rate = (totals.seen - seen_before) / (time.perf_counter() - started)
            bar.set_postfix(
                loss=f"{totals.loss_sum.item() / totals.seen:.4f}",
                acc=f"{totals.correct.item() / totals.seen:.4f}",
                img_s=f"{rate:.1f}",
            )
    elapsed = time.perf_counter() - started
    rate = (totals.seen - seen_before) / elapsed
    sums = torch.stack([totals.loss_sum.double(), totals.correct.double()])
    sums = all_reduce_sum(torch.cat([sums, torch.tensor([totals.seen, rate], dtype=torch.float64, device=sums.device)]))
    loss_sum, correct, seen, rate = sums.tolist()
    seen = max(seen, 1)
    return {"loss": loss_sum / seen, "accuracy": correct / seen, "images_per_s": rate, "lr": lr}


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
        logits = step.log_probabilities(model, images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    all_reduce_sum(confusion)
    all_reduce_sum(loss_sum)
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
    train_batches: Batches | Sized,
    val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    step: Step,
    num_classes: int,
    on_epoch_end: Callable[[dict[str, float], bool], None] | None = None,
    progress: bool = True,
    state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    class_weights: torch.Tensor | None = None,
) -> FitResult:
    """Train for ``config.epochs`` epochs, evaluating after each.

    ``on_epoch_end(row, improved)`` receives the epoch's history row and whether the monitored metric improved;
    it is where the caller saves the best and last models and writes the curves. ``on_checkpoint(state)``
    receives the full training state after every epoch and every ``config.save_every_steps`` optimizer steps;
    passing such a ``state`` back in continues the run exactly where it was taken. ``model`` may be wrapped in
    DistributedDataParallel.
    """
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer = make_optimizer(raw, config)
    steps_per_epoch = -(-max(1, len(train_batches)) // config.accumulate)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(step.device.type) if step.precision == "fp16" else None
    stopper = EarlyStopping(config.monitor, config.patience, config.min_delta)
    mixer = batch_mixer(config.augment, num_classes)
    result = FitResult()
    first_epoch, global_step, resumed, best_weights = 1, 0, None, None
    if state is not None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        stopper.best, stopper.best_epoch, stopper.bad_epochs = (state["stopper"][k] for k in ("best", "epoch", "bad"))
        result.history = list(state["history"])
        first_epoch, global_step, resumed = state["epoch"] + 1, state["global_step"], state["in_epoch"]
        best_weights = state.get("best_model")
        if isinstance(train_batches, Batches):
            train_batches.load_state_dict(state["batches"])
        # One entry per process: each continues its own dropout and augmentation stream.
        set_rng_states(state["rng"][rank()] if rank() < len(state["rng"]) else state["rng"][0])

    def snapshot(done: int, in_epoch: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "epoch": done,
            "in_epoch": in_epoch,
            "global_step": global_step,
            "model": raw.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "stopper": {"best": stopper.best, "epoch": stopper.best_epoch, "bad": stopper.bad_epochs},
            "history": result.history,
            "batches": train_batches.state_dict() if isinstance(train_batches, Batches) else None,
            "rng": gather(rng_states(step.device)),
        }

    if state is not None and stopper.should_stop:
        first_epoch, result.stopped_early = config.epochs + 1, True
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()

        def on_step(totals: Totals, done: int, epoch: int = epoch) -> None:
            nonlocal global_step
            global_step += 1
            every = config.save_every_steps
            if on_checkpoint is not None and every and global_step % every == 0 and done < len(train_batches):
                on_checkpoint(snapshot(epoch - 1, {"totals": totals.state_dict()}))

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
            accumulate=config.accumulate,
            clip_grad_norm=config.clip_grad_norm,
            start=train_batches.state_dict()["position"] if resumed and isinstance(train_batches, Batches) else 0,
            totals=Totals.from_state(resumed["totals"], step.device) if resumed and rank() == 0 else None,
            on_step=on_step,
            mixer=mixer,
            class_weights=class_weights,
        )
        resumed = None
        val = evaluate(raw, val_batches, step, num_classes)
        row = {
            "epoch": epoch,
            "loss": train["loss"],
            "accuracy": train["accuracy"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": train["lr"],
            "images_per_s": train["images_per_s"],
            "seconds": time.perf_counter() - started,
        }
        result.history.append(row)
        improved = stopper.update(row[config.monitor], epoch)
        schedule.epoch_end(row[config.monitor])
        if improved and config.restore_best:
            best_weights = {name: t.detach().to("cpu", copy=True) for name, t in raw.state_dict().items()}
        if on_epoch_end is not None:
            on_epoch_end(row, improved)
        if on_checkpoint is not None:
            on_checkpoint(snapshot(epoch, None))
        if stopper.should_stop:
            result.stopped_early = True
            break
    if config.restore_best and best_weights is not None:
        raw.load_state_dict(best_weights)
    result.best_epoch, result.best_value = stopper.best_epoch, stopper.best
    return result
