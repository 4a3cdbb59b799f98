"""The epoch loop's guard against divergence: a loss that leaves the numbers stops the run, and no NaN is saved."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import saved_and_loaded
from torch import nn

from vgg.batches import Batches
from vgg.cli import main
from vgg.inference import Step
from vgg.scan import scan_folder
from vgg.training.config import TrainConfig
from vgg.training.loop import CHECK_LOSS_EVERY, Diverged, fit

TINY = ["--arch", "vgg11", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
STEP = Step(torch.device("cpu"), "fp32", (0.5,) * 3, (0.25,) * 3, memory_format=torch.contiguous_format)


class BlowsUp(nn.Module):
    """Trains normally until its ``at``-th training forward pass, where its weights become NaN (as an overflow
    would make them)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, 2)
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                with torch.no_grad():
                    self.head.weight.fill_(math.nan)
        return self.head(self.body(x))


def _fit(samples: list, model: nn.Module, config: TrainConfig, saved: list[dict], epochs_ended: list[int]) -> None:
    batches = Batches(samples, 16, 4, shuffle=True, seed=1, workers=0, drop_last=True)
    val = Batches(samples[::3], 16, 8, shuffle=False, workers=0)
    fit(
        model, batches, val, config, STEP, 2, progress=False,
        on_epoch_end=lambda history, improved, chosen: epochs_ended.append(history[-1]["epoch"]),
        on_checkpoint=lambda state: saved.append(saved_and_loaded(state)),
    )  # fmt: skip


def _finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_a_rate_that_overflows_ends_the_run_with_one_line_and_no_model(two_class_dir: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    code = main(["train", str(two_class_dir), "--out", str(run), *TINY, "--epochs", "2", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: Training diverged in epoch 1: ") and err.count("\n") == 1, err
    assert "no model was saved. Lower the learning rate (peak 1e+30; `vgg lr-find` suggests one)" in err
    assert not (run / "best.safetensors").exists() and not (run / "last.safetensors").exists()


def test_divergence_after_a_good_epoch_keeps_that_epoch_and_says_so(two_class_dir: Path):
    samples = scan_folder(two_class_dir).samples  # len(samples) // 4 training batches an epoch
    saved: list[dict] = []
    ended: list[int] = []
    config = TrainConfig(epochs=3, batch_size=4, lr=0.01, warmup_epochs=0)
    with pytest.raises(Diverged) as raised:
        _fit(samples, BlowsUp(at=len(samples) // 4 + 3), config, saved, ended)
    message = str(raised.value)
    assert message.startswith("Training diverged in epoch 2: the training loss became nan (expected finite numbers)")
    assert "nothing of epoch 2 is saved; the run folder keeps the state of epoch 1 and the best model (epoch 1)" in (
        message
    )
    assert ended == [1]  # epoch 2 reached neither the model files nor the history
    assert [s["epoch"] for s in saved] == [1] and _finite(saved[0]["model"])


def test_no_checkpoint_is_taken_of_weights_that_are_not_numbers(two_class_dir: Path):
    samples = scan_folder(two_class_dir).samples
    saved: list[dict] = []
    config = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_epochs=0, save_every_steps=1)
    with pytest.raises(Diverged, match="Training diverged in epoch 1: the weights after step 3 became nan"):
        _fit(samples, BlowsUp(at=3), config, saved, [])
    assert len(saved) == 2 and all(_finite(s["model"]) for s in saved)  # steps 1 and 2; step 3's state never written


def test_a_run_that_diverges_early_in_a_long_epoch_stops_within_a_few_steps(two_class_dir: Path):
    samples = scan_folder(two_class_dir).samples * 20  # 120 batches of 4 in the epoch
    model = BlowsUp(at=3)
    config = TrainConfig(epochs=1, batch_size=4, lr=0.01, warmup_epochs=0)
    with pytest.raises(Diverged) as raised:
        _fit(samples, model, config, [], [])
    assert str(raised.value).startswith(
        f"Training diverged in epoch 1: the training loss by batch {CHECK_LOSS_EVERY} became nan (expected finite"
    )
    assert model.calls == CHECK_LOSS_EVERY < len(samples) // 4
