"""Learning-rate schedules at the edges: one-cycle without a warm-up, and very short runs."""

from __future__ import annotations

import pytest
from torch import nn

from vgg.cli import main
from vgg.training.config import TrainConfig
from vgg.training.loop import make_optimizer
from vgg.training.schedules import make_schedule


def rates(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    optimizer = make_optimizer(nn.Linear(2, 2), config)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    seen = []
    for _ in range(config.epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


def test_one_cycle_without_warm_up_starts_at_the_peak_and_anneals():
    config = TrainConfig(optimizer="sgd", lr=0.1, epochs=2, schedule="onecycle", warmup_epochs=0)
    lr = rates(config, steps_per_epoch=10)
    assert lr[0] == pytest.approx(0.1)  # no warm-up: the run starts at the peak rate
    assert all(a >= b for a, b in zip(lr, lr[1:], strict=False))
    assert lr[-1] < 0.01


@pytest.mark.parametrize(("epochs", "steps_per_epoch"), [(1, 1), (1, 2), (1, 3), (2, 1)])
@pytest.mark.parametrize("warmup", [0.0, 0.5, 1.0])
def test_one_cycle_runs_of_a_few_steps_do_not_crash(epochs: int, steps_per_epoch: int, warmup: float):
    config = TrainConfig(lr=0.1, epochs=epochs, schedule="onecycle", warmup_epochs=warmup)
    lr = rates(config, steps_per_epoch)
    assert len(lr) == epochs * steps_per_epoch and all(0 < rate <= 0.1 + 1e-12 for rate in lr)


def test_cli_trains_one_cycle_without_warm_up(two_class_dir, tmp_path):
    # Issue 17: this ended in a ZeroDivisionError inside torch's OneCycleLR.
    code = main([
        "train", str(two_class_dir), "--out", str(tmp_path / "run"), "--arch", "vgg11", "--image-size", "32",
        "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--schedule", "onecycle",
        "--warmup-epochs", "0",
    ])  # fmt: skip
    assert code == 0 and (tmp_path / "run" / "best.safetensors").is_file()


@pytest.mark.parametrize(
    ("epochs", "expected"), [(1, 0.5), (2, 1.0), (5, 1.0), (10, 2.0), (15, 3.0), (25, 5.0), (90, 5.0)]
)
def test_warm_up_length_scales_with_the_run(epochs: int, expected: float):
    steps_per_epoch = 10
    lr = rates(TrainConfig(lr=0.1, epochs=epochs), steps_per_epoch)
    peak = lr.index(max(lr))
    # The rate rises for a fifth of the run (at least one epoch, half of a one-epoch run, at most five epochs), is at
    # its peak right after, then decays.
    assert peak == round(expected * steps_per_epoch)
    assert lr[peak] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lr[:peak], lr[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lr[peak:], lr[peak + 1 :], strict=False))


def test_an_explicit_warm_up_is_kept_and_the_run_file_records_the_length_used():
    assert TrainConfig(lr=0.1, epochs=40, warmup_epochs=2).validate().warmup_epochs == 2
    assert TrainConfig(lr=0.1, epochs=10).validate().warmup_epochs == pytest.approx(2.0)
