"""One epoch of training: what a batch's loss is (``Objective``), how gradients move the weights (``Updates``),
the running sums (``Totals``) and the pass over the batches that ties them together (``train_one_epoch``)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sized
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..distributed import all_reduce_sum
from ..inference import Step
from ..runtime import autocast
from .augment import AugmentConfig, augment_batch, batch_mixer
from .config import TrainConfig
from .schedules import Schedule

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Totals:
    """An epoch's running sums. They stay on the device: reading them every step would make the GPU wait."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> Totals:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.detach() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def state_dict(self) -> dict:
        """The sums over all processes (a collective call under DDP); a resumed run restores them on rank 0."""
        loss_sum, correct = self.loss_sum.detach().clone(), self.correct.clone()
        seen = torch.tensor(self.seen, device=loss_sum.device)
        for tensor in (loss_sum, correct, seen):
            all_reduce_sum(tensor)
        return {"loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": int(seen)}

    def summary(self, images_per_s: float) -> dict[str, float]:
        """Mean loss, accuracy and images/s over all processes (a collective call under DDP)."""
        sums = torch.stack([self.loss_sum.double(), self.correct.double()])
        extra = torch.tensor([self.seen, images_per_s], dtype=torch.float64, device=sums.device)
        loss_sum, correct, seen, rate = all_reduce_sum(torch.cat([sums, extra])).tolist()
        seen = max(seen, 1)
        return {"loss": loss_sum / seen, "accuracy": correct / seen, "images_per_s": rate}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Totals:
        return cls(state["loss_sum"].to(device), state["correct"].to(device), int(state["seen"]))


@dataclass
class Objective:
    """What a training batch becomes and what it is scored on: augmentation on the device, MixUp/CutMix (``mixer``,
    soft targets), label smoothing and per-class loss weights. The range test (lr_find) trains on the same."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    label_smoothing: float = 0.0
    mixer: Mixer | None = None
    class_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Built once, not per batch: the loss below runs on every training step.
        self._transform = functools.partial(augment_batch, config=self.augment) if self.augment.enabled else None

    @classmethod
    def from_config(cls, config: TrainConfig, num_classes: int, class_weights: torch.Tensor | None = None) -> Objective:
        return cls(config.augment, config.label_smoothing, batch_mixer(config.augment, num_classes), class_weights)

    def loss(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's mean loss, the logits and the labels, both on the device (the labels as given, not mixed)."""
        inputs = step.inputs(images, self._transform)
        labels = labels.to(step.device, non_blocking=True)
        targets = labels
        if self.mixer is not None:
            inputs, targets = self.mixer(inputs, labels)
        weight = self.class_weights.to(step.device) if self.class_weights is not None else None
        with autocast(step.device, step.precision):
            logits = model(inputs)
            loss = F.cross_entropy(logits.float(), targets, weight=weight, label_smoothing=self.label_smoothing)
        return loss, logits, labels


@dataclass
class Updates:
    """How gradients move the weights: the optimizer and its per-step schedule, the fp16 grad scaler, one optimizer
    step per ``accumulate`` batches, and clipping of the gradient norm (``clip_grad_norm``, 0 for none)."""

    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler | None = None
    accumulate: int = 1
    clip_grad_norm: float = 0.0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor, group: int = 1) -> None:
        """Add the gradients of ``loss``, one of the ``group`` batches that share the next step."""
        scaled = loss / group if group > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self, model: nn.Module) -> float:
        """Clip (on unscaled gradients), step, clear the gradients and advance the schedule; returns the rate used."""
        lr = self.lr
        if self.clip_grad_norm:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return lr


def train_one_epoch(
    model: nn.Module,
    batches: Sized,
    updates: Updates,
    step: Step,
    objective: Objective | None = None,
    *,
    description: str = "train",
    progress: bool = True,
    start: int = 0,
    totals: Totals | None = None,
    on_step: Callable[[Totals, int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` (an iterable with a length), one optimizer step per ``updates.accumulate`` batches.

    ``start`` batches of this epoch were done before a resume, and ``totals`` holds their sums.
    ``on_step(totals, batches_done)`` runs after every optimizer step: where mid-epoch checkpoints are taken.
    The returned ``lr`` is the learning rate of the epoch's last optimizer step.
    """
    model.train()
    objective = objective if objective is not None else Objective()
    totals = totals if totals is not None else Totals.zeros(step.device)
    n, accumulate = len(batches), updates.accumulate
    started, seen_before = time.perf_counter(), totals.seen
    updates.optimizer.zero_grad(set_to_none=True)
    lr = updates.lr
    bar = tqdm(batches, desc=description, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    for i, (images, labels) in enumerate(bar, start):
        empty = len(labels) == 0
        if empty and not isinstance(model, DistributedDataParallel):
            continue
        # The last group of an epoch may be short: average over the batches it really has.
        group = min(accumulate, n - i // accumulate * accumulate)
        boundary = (i + 1) % accumulate == 0 or i + 1 == n
        # Under DDP, gradients are averaged across processes only on the group's last backward pass.
        sync = model.no_sync() if not boundary and isinstance(model, DistributedDataParallel) else nullcontext()
        with sync:
            if empty:
                # Every file of this process's batch was bad (Batches hands it out empty under DDP). The others'
                # backward passes wait for this one's gradients, and every process must step and checkpoint
                # together: a pass that contributes zero gradients keeps them in step.
                _zero_pass(model, step, images.shape[-1], updates)
            else:
                loss, logits, labels = objective.loss(model, images, labels, step)
                updates.backward(loss, group)
                totals.add(loss, logits, labels)
        if boundary:
            lr = updates.step(model)
            if on_step is not None:
                on_step(totals, i + 1)
        if progress and i % 10 == 0 and totals.seen:
            rate = (totals.seen - seen_before) / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{totals.loss_sum.item() / totals.seen:.4f}",
                            acc=f"{totals.correct.item() / totals.seen:.4f}", img_s=f"{rate:.1f}")  # fmt: skip
    rate = (totals.seen - seen_before) / (time.perf_counter() - started)
    return {**totals.summary(rate), "lr": lr}


def _zero_pass(model: nn.Module, step: Step, image_size: int, updates: Updates) -> None:
    """A forward and backward pass that adds nothing to any gradient, for a process whose batch was empty.

    One blank image goes through in eval mode, so batch-norm statistics and dropout streams stay as they were.
    """
    model.eval()
    try:
        blank = step.inputs(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
        with autocast(step.device, step.precision):
            loss = model(blank).float().sum() * 0.0
        updates.backward(loss)
    finally:
        model.train()
