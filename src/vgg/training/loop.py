"""The training loop, ``fit``: epochs (epoch.py), validation, early stopping, unfreezing, a weight average and
resumable state."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import all_reduce_sum, gather, rank
from ..errors import UsageError
from ..inference import Step, evaluate
from .config import TrainConfig, monitor_mode
from .ema import WeightAverage
from .epoch import Objective, Totals, Updates, train_one_epoch
from .schedules import make_schedule
from .state import rng_states, set_rng_states
from .transfer import lr_groups, unfreeze_if_due

# How often (optimizer steps) the epoch's running loss is read to catch a divergence before the epoch ends: reading
# it makes a GPU wait, so not every step; a run that diverges trains at most this many steps on NaN.
CHECK_LOSS_EVERY = 20


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = []
    for params, lr in lr_groups(model, config):
        # No weight decay on biases and batch-norm parameters: decaying them only fights the normalisation.
        groups.append({"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lr": lr})
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr})
    groups = [group for group in groups if group["params"]]
    # Fused kernels update every parameter in one pass: a 5x shorter AdamW step for VGG16 on 2 CPU cores
    # (benchmarks/RESULTS.md, "Design measurements").
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    if config.optimizer == "sgd":
        nesterov = config.nesterov and config.momentum > 0
        return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum, nesterov=nesterov, fused=fused)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.peak_lr, fused=fused)
    return torch.optim.AdamW(groups, lr=config.peak_lr, fused=fused)


class Diverged(UsageError):
    """The loss (or the weights) stopped being finite numbers: the rate was too high for this model and data."""


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
        return monitor_mode(self.monitor)

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


def match_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's optimizer state (momentum, Adam's moments) the parameter's device and memory layout.

    ``Optimizer.load_state_dict`` moves state to the parameter's device but keeps the layout it was saved in: a run
    saved where parameters were NCHW (fp32 on a CPU at >= 128 px) and resumed where they are channels-last (CUDA)
    would mix layouts, which the fused CUDA kernels refuse, and elementwise updates between mismatched layouts are
    slow everywhere. Scalars (Adam's step count) are left as loaded.
    """
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape and value.ndim > 0:
                    matched = torch.empty_like(parameter, dtype=value.dtype)  # the parameter's strides and device
                    optimizer.state[parameter][key] = matched.copy_(value)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    stopped_early: bool = False


class Optimisation:
    """What moves during a run besides the weights: optimizer, schedule, grad scaler, early stopping, history.

    ``state_dict`` captures all of it with the model, the batches' position and every process's RNG streams
    (a collective call under DDP), so ``load_state_dict`` continues the run exactly where it was taken.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, steps_per_epoch: int, step: Step) -> None:
        self.model, self.config, self.device = model, config, step.device
        optimizer = make_optimizer(model, config)
        self.updates = Updates(
            optimizer, make_schedule(optimizer, config, steps_per_epoch),
            torch.amp.GradScaler(step.device.type) if step.precision == "fp16" else None,
            config.accumulate, config.clip_grad_norm,
        )  # fmt: skip
        self.stopper = EarlyStopping(config.monitor, config.patience, config.min_delta)
        self.result = FitResult()
        self.epoch, self.global_step = 0, 0
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.ema = WeightAverage(model, config.ema) if config.ema else None

    def state_dict(self, batches: Sized, in_epoch: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "in_epoch": in_epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.updates.optimizer.state_dict(),
            "schedule": self.updates.schedule.state_dict(),
            "scaler": self.updates.scaler.state_dict() if self.updates.scaler is not None else None,
            "stopper": {"best": self.stopper.best, "epoch": self.stopper.best_epoch, "bad": self.stopper.bad_epochs},
            "history": self.result.history,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "batches": batches.state_dict() if hasattr(batches, "state_dict") else None,
            "rng": gather(rng_states(self.device)),
        }

    def load_state_dict(self, state: dict[str, Any], batches: Sized) -> None:
        self.model.load_state_dict(state["model"])
        self.updates.optimizer.load_state_dict(state["optimizer"])
        match_parameters(self.updates.optimizer)
        self.updates.schedule.load_state_dict(state["schedule"])
        if self.updates.scaler is not None and state["scaler"] is not None:
            self.updates.scaler.load_state_dict(state["scaler"])
        self.stopper.best, self.stopper.best_epoch, self.stopper.bad_epochs = (
            state["stopper"][k] for k in ("best", "epoch", "bad")
        )
        self.result.history = list(state["history"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_weights = state.get("best_model")
        if state["batches"] is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(state["batches"])
        # One entry per process: each continues its own dropout and augmentation stream.
        set_rng_states(state["rng"][rank()] if rank() < len(state["rng"]) else state["rng"][0], self.device)

    def record(
        self, epoch: int, train: dict[str, float], val: dict, seconds: float, ema_val: dict | None = None
    ) -> tuple[bool, bool]:
        """Add an epoch's history row; returns whether the monitored metric improved and whether the weight average
        (``ema_val``: its validation) is the better model of the epoch."""
        row = {
            "epoch": epoch,
            "loss": train["loss"],
            "accuracy": train["accuracy"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": train["lr"],
            "images_per_s": train["images_per_s"],
            "seconds": seconds,
        }
        value, use_ema = row[self.config.monitor], False
        if ema_val is not None:
            row["ema_val_loss"], row["ema_val_accuracy"] = ema_val["loss"], ema_val["accuracy"]
            if self.config.monitor.startswith("val_"):
                averaged = row["ema_" + self.config.monitor]
                use_ema = averaged > value if self.stopper.mode == "max" else averaged < value
                value = averaged if use_ema else value
            row["model_is_average"] = float(use_ema)  # which of the two the epoch's model (and any saved one) is
        self.result.history.append(row)
        self.epoch = epoch
        improved = self.stopper.update(value, epoch)
        self.updates.schedule.epoch_end(value)
        if improved and self.config.restore_best:
            chosen = self.ema.model if use_ema else self.model
            self.best_weights = {name: t.detach().to("cpu", copy=True) for name, t in chosen.state_dict().items()}
        return improved, use_ema


def fit(
    model: nn.Module,
    train_batches: Sized,
    val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    step: Step,
    num_classes: int,
    on_epoch_end: Callable[[list[dict[str, float]], bool, nn.Module], None] | None = None,
    progress: bool = True,
    state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    class_weights: torch.Tensor | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> FitResult:
    """Train for ``config.epochs`` epochs, evaluating after each.

    ``on_epoch_end(history, improved, model)`` receives the history so far (the epoch's row last), whether the
    monitored metric improved and the model of the epoch (the unwrapped model, or with ``config.ema`` its weight
    average when that validated better): where the caller saves models and curves. ``on_checkpoint(state)``
    receives the full training state after every epoch and every ``config.save_every_steps`` optimizer steps;
    passing such a ``state`` back in continues the run exactly where it was taken. ``model`` may be wrapped in
    DistributedDataParallel; ``train_batches`` is ``Batches`` or anything with the same ``state_dict`` protocol.
    """
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    run = Optimisation(raw, config, -(-max(1, len(train_batches)) // config.accumulate), step)
    resumed, start = None, 0
    if state is not None:
        run.load_state_dict(state, train_batches)
        resumed = state["in_epoch"]
        start = state["batches"]["position"] if resumed and state["batches"] is not None else 0
        run.result.stopped_early = run.stopper.should_stop
    objective = Objective.from_config(config, num_classes, class_weights)
    # --tta: validation scores the flip-averaged predictions, as `vgg evaluate --tta` does; training is unchanged.
    val_step = replace(step, tta=True) if config.tta else step
    for epoch in range(run.epoch + 1, config.epochs + 1):
        if run.result.stopped_early:
            break
        started = time.perf_counter()
        unfreeze_if_due(raw, config, epoch, log)

        def on_step(totals: Totals, done: int) -> None:
            run.global_step += 1
            # Every process reads the sum of all of theirs, at the same step, so all of them stop together.
            if run.global_step % CHECK_LOSS_EVERY == 0:
                loss_sum = all_reduce_sum(totals.loss_sum.detach().clone()).item()
                if not math.isfinite(loss_sum):
                    raise _diverged(run, run.epoch + 1, f"the training loss by batch {done}", loss_sum)
            if run.ema is not None:
                run.ema.update(raw)
            every = config.save_every_steps
            if on_checkpoint is not None and every and run.global_step % every == 0 and done < len(train_batches):
                # A state with NaN weights would resume into NaN: checked here, where a checkpoint syncs anyway.
                if not _finite(raw):
                    raise _diverged(run, run.epoch + 1, f"the weights after step {run.global_step}", math.nan)
                on_checkpoint(run.state_dict(train_batches, {"totals": totals.state_dict()}))

        train = train_one_epoch(
            model, train_batches, run.updates, step, objective, description=f"epoch {epoch}/{config.epochs}",
            progress=progress, start=start, on_step=on_step,
            totals=Totals.from_state(resumed["totals"], step.device) if resumed and rank() == 0 else None,
        )  # fmt: skip
        resumed, start = None, 0
        val = evaluate(raw, val_batches, val_step, num_classes, progress)
        ema_val = evaluate(run.ema.model, val_batches, val_step, num_classes) if run.ema is not None else None
        for name, loss in (("the training loss", train["loss"]), ("the validation loss", val["loss"])):
            if not math.isfinite(loss):
                raise _diverged(run, epoch, name, loss)
        improved, use_ema = run.record(epoch, train, val, time.perf_counter() - started, ema_val)
        if on_epoch_end is not None:
            on_epoch_end(run.result.history, improved, run.ema.model if use_ema else raw)
        if on_checkpoint is not None:
            on_checkpoint(run.state_dict(train_batches))
        run.result.stopped_early = run.stopper.should_stop
    if config.restore_best and run.best_weights is not None:
        raw.load_state_dict(run.best_weights)
    run.result.best_epoch, run.result.best_value = run.stopper.best_epoch, run.stopper.best
    return run.result


def _finite(model: nn.Module) -> bool:
    """Whether every weight is a finite number (one float64 sum per tensor: NaN or inf anywhere makes it so)."""
    return all(math.isfinite(t.detach().sum(dtype=torch.float64).item()) for t in model.parameters())


def _diverged(run: Optimisation, epoch: int, what: str, value: float) -> Diverged:
    """The error for a run whose loss left the numbers in ``epoch``; it says what the run folder still holds."""
    kept = "no model was saved"
    if run.epoch:
        kept = f"nothing of epoch {epoch} is saved; the run folder keeps the state of epoch {run.epoch}"
        if run.stopper.best_epoch:
            kept += f" and the best model (epoch {run.stopper.best_epoch})"
    return Diverged(
        f"Training diverged in epoch {epoch}: {what} became {value} (expected finite numbers); {kept}. Lower the "
        f"learning rate (peak {run.config.peak_lr:g}; `vgg lr-find` suggests one) and train again."
    )
