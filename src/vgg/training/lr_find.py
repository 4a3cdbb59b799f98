"""The learning-rate range test: train with a rate that grows exponentially each step and watch the loss.

Smith, "Cyclical Learning Rates for Training Neural Networks" (2017), popularised by fastai's ``lr_find``. The
loss is smoothed with a bias-corrected exponential average (single batches are noisy); the sweep stops early once
the smoothed loss has grown to ``diverge`` times its best. Two readings of the curve are reported: the steepest
descent (the rate at which the loss falls fastest against log-rate) and the valley (a tenth of the rate at the
minimum, where the loss is still falling safely). The suggestion is the steepest descent when it lies in the
falling stretch before the minimum, else the valley.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..files import atomic_write
from ..inference import Step
from .config import TrainConfig
from .epoch import Objective
from .loop import make_optimizer


@dataclass
class RangeTest:
    """The result of a range test: the rates tried, raw and smoothed losses, and the readings of the curve."""

    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    steepest: float | None = None
    valley: float | None = None
    suggestion: float | None = None
    stopped_early: bool = False

    def as_dict(self) -> dict:
        """The result for JSON: a loss that left the numbers (NaN, infinity; JSON has neither) is ``None``."""
        return {
            "suggestion": self.suggestion,
            "steepest": self.steepest,
            "valley": self.valley,
            "stopped_early": self.stopped_early,
            "rates": self.rates,
            "losses": [v if math.isfinite(v) else None for v in self.losses],
            "smoothed": [v if math.isfinite(v) else None for v in self.smoothed],
        }


def sweep_rates(start: float, end: float, steps: int) -> list[float]:
    """``steps`` rates from ``start`` to ``end``, evenly spaced in log-rate."""
    if not 0 < start < end < math.inf:
        raise ValueError(f"expected 0 < start < end < inf, got start={start}, end={end}")
    if steps < 2:
        return [start]
    low, high = math.log(start), math.log(end)  # in logs: end / start may overflow (1e-300 to 1e300)
    return [math.exp(low + (high - low) * i / (steps - 1)) for i in range(steps)]


def range_test(
    train_step: Callable[[float], float],
    start: float = 1e-7,
    end: float = 1.0,
    steps: int = 200,
    smoothing: float = 0.95,
    diverge: float = 4.0,
) -> RangeTest:
    """Run ``train_step(rate) -> loss`` once per rate of an exponential sweep and read the loss curve.

    Args:
        train_step: sets the optimizer's rate, trains on the next batch and returns that batch's loss.
        start: the first rate.
        end: the last rate (if the loss has not diverged before).
        steps: how many rates (optimizer steps) the sweep has.
        smoothing: weight of the old value in the loss's exponential average.
        diverge: stop once the smoothed loss exceeds this many times its lowest value (or is not finite).
    """
    result = RangeTest()
    average = 0.0
    best = math.inf
    for i, rate in enumerate(sweep_rates(start, end, steps)):
        loss = float(train_step(rate))
        result.rates.append(rate)
        result.losses.append(loss)
        if not math.isfinite(loss):
            result.stopped_early = True
            result.smoothed.append(math.inf)
            break
        average = smoothing * average + (1 - smoothing) * loss
        value = average / (1 - smoothing ** (i + 1))
        result.smoothed.append(value)
        best = min(best, value)
        if value > diverge * best:
            result.stopped_early = True
            break
    read_curve(result)
    return result


def read_curve(result: RangeTest, skip_start: int = 10) -> None:
    """Fill in ``steepest``, ``valley`` and ``suggestion`` from the smoothed losses of ``result``."""
    finite = [i for i, v in enumerate(result.smoothed) if math.isfinite(v)]
    if len(finite) < 3:
        return
    losses = [result.smoothed[i] for i in finite]
    logs = [math.log10(result.rates[i]) for i in finite]
    lowest = min(range(len(losses)), key=losses.__getitem__)
    result.valley = result.rates[finite[lowest]] / 10
    # The first points carry the noise of the average's start-up; skip them when the sweep is long enough.
    first = min(skip_start, max(0, lowest - 2))
    slopes = {j: (losses[j + 1] - losses[j - 1]) / (logs[j + 1] - logs[j - 1]) for j in range(max(1, first), lowest)}
    if slopes:
        steepest = min(slopes, key=slopes.__getitem__)
        if slopes[steepest] < 0:
            result.steepest = result.rates[finite[steepest]]
    result.suggestion = result.steepest if result.steepest is not None else result.valley


def sweep_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    step: Step,
    config: TrainConfig,
    objective: Objective,
    start: float = 1e-7,
    end: float = 1.0,
    steps: int = 200,
    progress: bool = False,
) -> RangeTest:
    """The range test on ``model`` with ``config``'s optimizer and the training ``objective``, one batch per rate.

    The model's weights, the batches' shuffling position and torch's random stream are put back afterwards, so a
    run that starts after the test is the run it would have been without it (save for the rate chosen). Batches are
    drawn epoch after epoch when the sweep is longer than one.
    """
    weights = copy.deepcopy(model.state_dict())
    position = batches.state_dict() if hasattr(batches, "state_dict") else None
    rng = torch.get_rng_state()
    # Each parameter group keeps its share of the peak rate (a scaled-down backbone under --backbone-lr-scale).
    optimizer = make_optimizer(model, dataclasses.replace(config, lr=1.0))
    shares = [group["lr"] for group in optimizer.param_groups]
    stream = _endless(batches)
    bar = tqdm(total=steps, desc="lr-find", leave=False, disable=not progress, unit="step")

    def train_step(rate: float) -> float:
        for group, share in zip(optimizer.param_groups, shares, strict=True):
            group["lr"] = rate * share
        loss, _, _ = objective.loss(model, *next(stream), step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update()
        return loss.item()

    model.train()
    try:
        return range_test(train_step, start, end, steps)
    finally:
        bar.close()
        model.load_state_dict(weights)
        if position is not None:
            batches.load_state_dict(position)
        torch.set_rng_state(rng)


def _endless(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in itertools.count():
        yielded = False
        for images, labels in batches:
            if len(labels):
                yielded = True
                yield images, labels
        if not yielded:
            raise ValueError("no training batch to sweep over")


def describe(result: RangeTest) -> str:
    """The readings of a range test, one line."""

    def rate(value: float | None) -> str:
        return f"{value:.2e}" if value is not None else "none"

    ended = "the loss diverged" if result.stopped_early else "the sweep ended"
    return (
        f"suggested learning rate: {rate(result.suggestion)} (steepest descent {rate(result.steepest)}, valley "
        f"{rate(result.valley)}; {len(result.rates)} steps from {rate(result.rates[0] if result.rates else None)} "
        f"until {ended} at {rate(result.rates[-1] if result.rates else None)})"
    )


def plot(path: str | Path, result: RangeTest) -> None:
    """Loss (raw and smoothed) against the rate on a log axis, with the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    finite = [(r, s) for r, s in zip(result.rates, result.smoothed, strict=True) if math.isfinite(s)]
    axes.plot(result.rates, result.losses, color="0.8", linewidth=0.8, label="loss")
    if finite:
        axes.plot(*zip(*finite, strict=True), color="C0", label="smoothed loss")
        low, high = min(s for _, s in finite), max(s for _, s in finite)
        if high > low:  # one point, or a flat curve: matplotlib picks the limits
            axes.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
    if result.suggestion is not None:
        axes.axvline(result.suggestion, color="C3", linestyle="--", label=f"suggestion {result.suggestion:.2e}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title("learning-rate range test")
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
