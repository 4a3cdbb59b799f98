"""Learning-rate schedules: warm-up then cosine, constant, step or one-cycle per step; reduce-on-plateau per epoch.

All of them live in one ``Schedule`` object with one ``state_dict``, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from .config import TrainConfig, monitor_mode


class Schedule:
    """The learning rate over a run.

    ``step()`` after every optimizer step, ``epoch_end(value)`` after every validation with the monitored value.
    ``cosine``, ``constant`` and ``step`` are a per-step factor on each group's initial rate with a linear warm-up;
    ``onecycle`` is torch's OneCycleLR (rises over the warm-up, anneals to almost zero, cycles momentum);
    ``plateau`` warms up, then multiplies the rate by ``gamma`` when the monitored metric has not improved for
    ``plateau_patience`` epochs.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> None:
        total = max(1, config.epochs * steps_per_epoch)
        self.warmup = min(total - 1, round(config.warmup * steps_per_epoch))
        self.kind = config.schedule
        self.plateau: ReduceLROnPlateau | None = None
        if self.kind == "onecycle" and total >= 2:
            # Momentum cycling on plain SGD (momentum 0) would switch momentum on: only cycle what is there.
            cycle = config.optimizer != "sgd" or config.momentum > 0
            # OneCycleLR divides by (rise steps - 1) and by the fall's length, so the rise must last more than one
            # step and less than the run; without a warm-up it starts at the peak (div_factor 1) and stays there
            # for that short rise.
            rise = min(max(self.warmup, 2), max(total / 2, 1.5))
            self.per_step: LambdaLR | OneCycleLR = OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=total,
                pct_start=rise / total,
                div_factor=25.0 if self.warmup > 0 else 1.0,
                cycle_momentum=cycle,
            )
            return
        decay_every = config.step_size * steps_per_epoch

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / (self.warmup + 1)
            if self.kind == "cosine":
                progress = (step - self.warmup) / max(1, total - self.warmup)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            if self.kind == "step":
                return config.gamma ** (step // decay_every)
            return 1.0

        self.per_step = LambdaLR(optimizer, factor)
        if self.kind == "plateau":
            self.plateau = ReduceLROnPlateau(
                optimizer, monitor_mode(config.monitor), factor=config.gamma, patience=config.plateau_patience
            )

    def step(self) -> None:
        # After the warm-up, the plateau schedule leaves the rate to ReduceLROnPlateau: stepping LambdaLR again
        # would overwrite its cuts with the initial rate.
        if self.plateau is None or self.per_step.last_epoch < self.warmup:
            self.per_step.step()

    def epoch_end(self, value: float) -> None:
        if self.plateau is not None:
            self.plateau.step(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "per_step": self.per_step.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> Schedule:
    return Schedule(optimizer, config, steps_per_epoch)
