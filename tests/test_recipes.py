"""Training recipes: optimizers, learning-rate schedules, accumulation, clipping, early stopping, best weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from vgg.batches import Batches
from vgg.errors import UsageError
from vgg.inference import Step
from vgg.scan import scan_folder
from vgg.training.augment import AugmentConfig
from vgg.training.config import TrainConfig, resolve
from vgg.training.epoch import Objective, Updates, train_one_epoch
from vgg.training.loop import fit, make_optimizer
from vgg.training.schedules import make_schedule

CPU = Step(torch.device("cpu"), "fp32", (0.5,) * 3, (0.25,) * 3, memory_format=torch.contiguous_format)
NO_AUGMENT = AugmentConfig(shift=0.0, hflip=False)


def tiny(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(dropout), nn.Linear(16, 2)
    )


def rates(config: TrainConfig, steps_per_epoch: int = 5, plateau_values: list[float] | None = None) -> list[float]:
    optimizer = make_optimizer(nn.Linear(2, 2), config)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    seen = []
    for epoch in range(config.epochs):
        for _ in range(steps_per_epoch):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        if plateau_values is not None:
            schedule.epoch_end(plateau_values[epoch])
    return seen


def test_step_schedule_decays_by_gamma_every_step_size_epochs():
    lr = rates(TrainConfig(lr=0.1, epochs=5, schedule="step", step_size=2, gamma=0.5, warmup_epochs=0))
    assert lr[:10] == pytest.approx([0.1] * 10) and lr[10:20] == pytest.approx([0.05] * 10)
    assert lr[20:] == pytest.approx([0.025] * 5)


def test_cosine_warms_up_then_decays_to_zero():
    lr = rates(TrainConfig(lr=0.1, epochs=4, schedule="cosine", warmup_epochs=1))
    assert lr[:5] == pytest.approx([0.1 * k / 6 for k in range(1, 6)])
    assert lr[5] == pytest.approx(0.1) and all(a >= b for a, b in zip(lr[5:], lr[6:], strict=False))
    assert lr[-1] < 0.002


def test_one_cycle_rises_to_the_peak_then_anneals_and_cycles_momentum():
    config = TrainConfig(optimizer="sgd", lr=0.1, epochs=4, schedule="onecycle", warmup_epochs=1, momentum=0.9)
    lr = rates(config)
    peak = lr.index(max(lr))
    assert max(lr) == pytest.approx(0.1) and 3 <= peak <= 6 and lr[0] == pytest.approx(0.1 / 25)
    assert lr[-1] < 0.001
    optimizer = make_optimizer(nn.Linear(2, 2), config)
    make_schedule(optimizer, config, 5)
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.95)  # low rate, high momentum at the start


def test_plateau_cuts_the_rate_when_the_metric_stalls():
    config = TrainConfig(lr=0.1, epochs=6, schedule="plateau", plateau_patience=1, gamma=0.1, warmup_epochs=1)
    lr = rates(config, plateau_values=[0.5, 0.6, 0.6, 0.6, 0.7, 0.7])
    assert lr[0] < 0.1 and lr[5:10] == pytest.approx([0.1] * 5)
    # epochs 3 and 4 do not beat 0.6: after two bad epochs (patience 1) the rate drops for epoch 5
    assert lr[20:25] == pytest.approx([0.01] * 5)


@pytest.mark.parametrize(
    ("name", "nesterov", "kind"),
    [("sgd", True, torch.optim.SGD), ("sgd", False, torch.optim.SGD), ("adam", True, torch.optim.Adam),
     ("adamw", True, torch.optim.AdamW)],
)  # fmt: skip
def test_optimizers(name: str, nesterov: bool, kind: type):
    optimizer = make_optimizer(tiny(), TrainConfig(optimizer=name, nesterov=nesterov, weight_decay=0.01))
    assert type(optimizer) is kind
    if name == "sgd":
        assert optimizer.param_groups[0]["nesterov"] is nesterov and optimizer.param_groups[0]["momentum"] == 0.9
    # biases are not decayed
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def _one_epoch(model: nn.Module, batches: list, accumulate: int = 1, clip: float = 0.0, lr: float = 0.5) -> None:
    config = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=lr, schedule="constant", warmup_epochs=0)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, len(batches))
    updates = Updates(optimizer, schedule, accumulate=accumulate, clip_grad_norm=clip)
    train_one_epoch(model, batches, updates, CPU, Objective(NO_AUGMENT), progress=False)


def test_accumulating_two_half_batches_equals_one_full_batch():
    torch.manual_seed(1)
    images, labels = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 2, (16,))
    whole, halves = tiny(), tiny()
    _one_epoch(whole, [(images[:8], labels[:8]), (images[8:], labels[8:])])
    _one_epoch(halves, [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 16, 4)], accumulate=2)
    for a, b in zip(whole.parameters(), halves.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and a short last group is averaged over its own batches: 3 batches with accumulate 2 = steps of 2 and 1
    odd, plain = tiny(), tiny()
    _one_epoch(odd, [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)], accumulate=2)
    _one_epoch(plain, [(images[:8], labels[:8]), (images[8:12], labels[8:12])])
    for a, b in zip(odd.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_step():
    torch.manual_seed(1)
    batch = [(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 2, (8,)))]
    before, clipped, free = tiny(), tiny(), tiny()
    _one_epoch(clipped, batch, clip=1e-3)
    _one_epoch(free, batch)

    def moved(m):
        return torch.cat([(a - b).detach().flatten() for a, b in zip(m.parameters(), before.parameters(), strict=True)])

    assert moved(clipped).norm() == pytest.approx(0.5 * 1e-3, rel=1e-3)  # lr x max norm
    assert moved(free).norm() > 10 * moved(clipped).norm()


def test_early_stopping_min_delta_and_restore_best(two_class_dir: Path):
    samples = scan_folder(two_class_dir).samples
    train = Batches(samples, 8, 4, True, workers=0, drop_last=True)
    val = Batches(samples[::4], 8, 8, False, workers=0)
    # No later epoch can beat epoch 1 by 10 (accuracy is at most 1): patience 1 stops after epoch 2.
    config = TrainConfig(epochs=5, patience=1, min_delta=10.0, restore_best=True, lr=0.05, warmup_epochs=0)
    model, weights = tiny(), []
    keep = lambda history, improved, chosen: weights.append(copy.deepcopy(chosen))  # noqa: E731
    result = fit(model, train, val, config, CPU, 2, keep, False)
    assert result.stopped_early and len(result.history) == 2 and result.best_epoch == 1
    best, last = weights[0].state_dict(), weights[1].state_dict()
    assert any(not torch.equal(best[k], last[k]) for k in best)
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)  # the best epoch's weights, restored


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"schedule": "linear"}, r"schedule must be one of \{cosine, constant, step, onecycle, plateau\}"),
        ({"gamma": 1.5}, r"gamma \(learning-rate decay\) must be between 0 and 1. Received: gamma=1.5"),
        ({"accumulate": 0}, r"accumulate must be a positive integer. Received: accumulate=0"),
        ({"clip_grad_norm": -1.0}, r"clip_grad_norm must be 0 or more. Received: clip_grad_norm=-1.0"),
        ({"save_every_steps": -2}, r"save_every_steps must be 0 or more"),
    ],
)
def test_bad_recipe_settings(overrides: dict, message: str):
    with pytest.raises(UsageError, match=message):
        resolve(**overrides)
