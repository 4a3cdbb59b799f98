"""The learning-rate range test (`vgg lr-find`, `vgg train --lr find`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vgg.cli import main
from vgg.inference import Step
from vgg.training.augment import AugmentConfig
from vgg.training.config import TrainConfig
from vgg.training.epoch import Objective
from vgg.training.lr_find import range_test, sweep_model, sweep_rates

TINY = ["--arch", "vgg11", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu"]


def _task() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Four Gaussian blobs in 8 dimensions and a small MLP, the same every call."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=generator) * 3
    labels = torch.randint(0, 4, (512,), generator=generator)
    inputs = centres[labels] + torch.randn(512, 8, generator=generator)
    torch.manual_seed(0)
    return inputs, labels, nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _trainer(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = iter(range(10**6))

    def train_step(rate: float) -> float:
        optimizer.param_groups[0]["lr"] = rate
        start = next(batches) * 32 % len(labels)
        loss = F.cross_entropy(model(inputs[start : start + 32]), labels[start : start + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return train_step


def _loss_after_training(rate: float, steps: int = 30) -> tuple[float, float]:
    inputs, labels, model = _task()
    with torch.no_grad():
        before = F.cross_entropy(model(inputs), labels).item()
    train_step = _trainer(model, inputs, labels)
    for _ in range(steps):
        train_step(rate)
    with torch.no_grad():
        return before, F.cross_entropy(model(inputs), labels).item()


def test_suggestion_lies_between_the_rate_that_does_nothing_and_the_one_that_diverges():
    inputs, labels, model = _task()
    result = range_test(_trainer(model, inputs, labels), start=1e-5, end=100.0, steps=100)
    assert result.stopped_early  # the sweep reached rates that blow the loss up, and stopped there

    # Measured by brute force: train a fresh copy for 30 steps at each rate of a grid.
    grid = [10 ** (k / 2) for k in range(-10, 5)]  # 1e-5 ... 1e2
    idle, diverging = [], []
    for rate in grid:
        before, after = _loss_after_training(rate)
        if not math.isfinite(after) or after > before:
            diverging.append(rate)
        elif after > 0.99 * before:
            idle.append(rate)
    assert idle and diverging
    assert max(idle) < result.suggestion < min(diverging)
    before, after = _loss_after_training(result.suggestion)
    assert after < 0.25 * before  # and it trains well, not merely "somewhere in between"


def test_the_sweep_trains_on_the_training_objective_and_puts_the_model_back():
    # A rate suggested for a run with MixUp and label smoothing must come from the loss that run minimises.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))] * 3
    step = Step(torch.device("cpu"), "fp32", (0.5,) * 3, (0.25,) * 3)
    mixed: list[torch.Tensor] = []

    def mixer(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed.append(labels)
        return inputs, F.one_hot(labels, 2).float()

    plain = sweep_model(model, batches, step, TrainConfig(), Objective(AugmentConfig(policy="none")), steps=12)
    smoothed = Objective(AugmentConfig(policy="none"), label_smoothing=0.4, mixer=mixer)
    sweep = sweep_model(model, batches, step, TrainConfig(), smoothed, steps=12)
    assert len(mixed) == 12  # every step's batch went through the mixer
    # The first rate is too small to move the weights: the two first losses differ by the smoothing alone.
    assert sweep.losses[0] != pytest.approx(plain.losses[0], abs=1e-4)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_sweep_rates_rise_exponentially_from_start_to_end():
    rates = sweep_rates(1e-6, 1.0, 7)
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(rates, rates[1:], strict=False))


def test_a_sweep_that_ends_in_nan_reads_as_strict_json():
    losses = iter([2.0] * 12 + [1.0, math.nan, 0.5])
    result = range_test(lambda rate: next(losses), start=1e-3, end=1.0, steps=15, diverge=100.0)
    assert result.stopped_early and len(result.rates) == 14  # ended at the first loss that is not a number
    text = json.dumps(result.as_dict(), allow_nan=False)  # what `vgg lr-find --json` prints; NaN is not JSON
    assert json.loads(text)["losses"][-1] is None and json.loads(text)["smoothed"][-1] is None


def test_lr_find_command_prints_a_suggestion_and_draws_the_curve(two_class_dir: Path, tmp_path: Path, capsys):
    plot = tmp_path / "curve.png"
    code = main(["lr-find", str(two_class_dir), *TINY, "--steps", "30", "--plot", str(plot), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rates = result["rates"]
    assert 3 <= len(rates) <= 30 and rates == sorted(rates) and rates[0] == pytest.approx(1e-7)
    assert len(result["losses"]) == len(rates)
    if result["suggestion"] is not None:
        assert rates[0] <= result["suggestion"] <= rates[-1]


def test_lr_find_refuses_a_falling_sweep(two_class_dir: Path, capsys):
    code = main(["lr-find", str(two_class_dir), *TINY, "--start", "1", "--end", "1e-3"])
    assert code == 2
    assert "expected 0 < start < end < inf. Received: start=1.0, end=0.001" in capsys.readouterr().err


@pytest.mark.parametrize("end", ["inf", "nan"])
def test_lr_find_refuses_a_sweep_without_a_finite_end(two_class_dir: Path, end: str, capsys):
    code = main(["lr-find", str(two_class_dir), *TINY, "--end", end])
    assert code == 2
    assert f"expected 0 < start < end < inf. Received: start=1e-07, end={end}." in capsys.readouterr().err


def test_sweep_rates_span_any_finite_range():
    rates = sweep_rates(1e-300, 1e300, 7)  # the ratio, 1e600, is past the largest float
    assert rates[0] == pytest.approx(1e-300) and rates[-1] == pytest.approx(1e300)
    assert all(math.isfinite(r) for r in rates) and rates == sorted(rates)


def test_lr_find_refuses_a_folder_for_the_plot_before_the_sweep(two_class_dir: Path, tmp_path: Path, capsys):
    code = main(["lr-find", str(two_class_dir), *TINY, "--plot", str(tmp_path)])
    printed = capsys.readouterr()
    assert code == 2 and "range test" not in printed.out  # refused before any image is read
    assert f"error: --plot {tmp_path} is a folder: expected a file name for the loss curve (PNG)" in printed.err


def test_train_lr_find_trains_at_the_suggested_rate(two_class_dir: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    code = main(["train", str(two_class_dir), "--out", str(run), *TINY, "--epochs", "1", "--lr", "find"])
    out = capsys.readouterr().out
    assert code == 0, out
    suggested = float(out.split("suggested learning rate: ")[1].split()[0])
    saved = json.loads((run / "config.json").read_text())["config"]["lr"]
    assert saved == pytest.approx(suggested, rel=0.01)  # config.json holds the number, so the run can be repeated


def test_lr_must_be_a_number_or_find(two_class_dir: Path, tmp_path: Path, capsys):
    code = main(["train", str(two_class_dir), "--out", str(tmp_path / "run"), "--lr", "fast"])
    assert code == 2 and "expected a number or find, received 'fast'" in capsys.readouterr().err
