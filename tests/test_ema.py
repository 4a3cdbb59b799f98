"""The exponential moving average of the weights (--ema): the average it holds, and exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_with_checkpoints
from safetensors.torch import load_file
from torch import nn

from vgg.cli import main
from vgg.inference import Step
from vgg.report import HISTORY_FIELDS, plot_curves, read_history, write_history
from vgg.scan import scan_folder
from vgg.training.config import TrainConfig
from vgg.training.ema import WeightAverage
from vgg.training.state import load_state


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_ema_equals_the_hand_computed_average_after_a_few_steps():
    model = _tiny_model()
    average = WeightAverage(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = [{k: v.detach().double().clone() for k, v in model.state_dict().items()}]
    for _ in range(5):
        inputs, targets = torch.randn(16, 4), torch.randint(0, 3, (16,))
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        average.update(model)
        snapshots.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})

    # By hand: the n-th update (n = 0, 1, ...) keeps min(0.5, (1 + n) / (10 + n)) of the old average.
    decays = [min(0.5, (1 + n) / (10 + n)) for n in range(5)]  # 0.1, 0.18, 0.25, 0.31, 0.36
    held = average.model.state_dict()
    for name, tensor in held.items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, model.state_dict()[name])  # num_batches_tracked: copied, not averaged
            continue
        expected = snapshots[0][name]
        for decay, snapshot in zip(decays, snapshots[1:], strict=True):
            expected = decay * expected + (1 - decay) * snapshot[name]
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-6)
        if not torch.allclose(snapshots[0][name], snapshots[-1][name]):  # (a bias before batch norm barely moves)
            assert not torch.allclose(tensor.double(), snapshots[-1][name]), name  # an average, not the last weights
    assert average.updates == 5


def test_ema_state_dict_continues_the_same_average_bit_for_bit():
    model = _tiny_model()
    unbroken, first = WeightAverage(model, decay=0.9), WeightAverage(model, decay=0.9)
    steps = [
        {k: v + 0.1 * (i + 1) if v.is_floating_point() else v + i for k, v in model.state_dict().items()}
        for i in range(6)
    ]
    for i, weights in enumerate(steps):
        model.load_state_dict(weights)
        unbroken.update(model)
        if i < 3:
            first.update(model)
    saved = first.state_dict()
    resumed = WeightAverage(_tiny_model(), decay=0.9)
    resumed.load_state_dict(saved)
    for weights in steps[3:]:
        model.load_state_dict(weights)
        resumed.update(model)
    for name, tensor in unbroken.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_ema_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(_tiny_model(), decay=1.0)


TINY = [
    "--arch", "vgg11", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu",
    "--precision", "fp32", "--seed", "3", "--rotation", "10", "--ema", "0.9",
]  # fmt: skip


class Tiny(nn.Module):
    """Trains in milliseconds; dropout makes the torch RNG matter, batch norm gives the average buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_ema_survives_resume_bit_identically(two_class_dir: Path):
    samples = scan_folder(two_class_dir).samples
    config = TrainConfig(epochs=3, batch_size=4, lr=0.05, save_every_steps=2, warmup_epochs=0.5, ema=0.9)
    step = Step(torch.device("cpu"), "fp32", (0.5,) * 3, (0.25,) * 3, memory_format=torch.contiguous_format)

    def run(state=None, stop_at: int | None = None):
        return fit_with_checkpoints(Tiny, samples, config, step, state, stop_at)[1]

    whole = run()
    final = whole[-1]["ema"]
    assert final["updates"] == whole[-1]["global_step"] > 0
    for k in (2, len(whole) // 2 + 1):  # a mid-epoch checkpoint and a later one
        taken = run(stop_at=k)[-1]
        last = run(state=copy.deepcopy(taken))[-1]
        resumed = last["ema"]
        assert resumed["updates"] == final["updates"]
        for name, tensor in final["model"].items():
            assert torch.equal(resumed["model"][name], tensor), name
        # and the average's validation, epoch by epoch, is the unbroken run's to the last bit
        assert [r["ema_val_loss"] for r in last["history"]] == [r["ema_val_loss"] for r in whole[-1]["history"]]


def test_the_saved_model_is_the_average_when_it_validates_better_and_history_keeps_both(
    two_class_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    assert main(["train", str(two_class_dir), "--out", str(run), "--epochs", "1", *TINY]) == 0
    state = load_state(run)
    row = state["history"][-1]
    saved = load_file(run / "last.safetensors")
    average = state["ema"]["model"]
    is_average = all(torch.equal(saved[k], average[k]) for k in saved)
    is_model = all(torch.equal(saved[k], state["model"][k]) for k in saved)
    assert is_average != is_model  # one of the two, never a mix
    assert is_average == (row["ema_val_accuracy"] > row["val_accuracy"])
    assert row["model_is_average"] == float(is_average)  # the history says which one it kept
    # history.csv (and so the curves and the HTML report) has the average's validation beside the model's
    written = read_history(run / "history.csv")
    assert [(r["val_accuracy"], r["ema_val_accuracy"], r["ema_val_loss"]) for r in written] == [
        (r["val_accuracy"], r["ema_val_accuracy"], r["ema_val_loss"]) for r in state["history"]
    ]


def test_ema_of_one_or_more_is_refused(two_class_dir: Path, tmp_path: Path, capsys):
    code = main(["train", str(two_class_dir), "--out", str(tmp_path / "run"), "--ema", "1"])
    assert code == 2 and "ema must be a decay from 0 (off) up to, not including, 1. Received: ema=1" in (
        capsys.readouterr().err
    )


def test_history_has_the_average_columns_only_when_the_run_averages(tmp_path: Path):
    row = {"epoch": 1.0, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85, "lr": 1e-3}
    row |= {"images_per_s": 150.0, "seconds": 380.0}
    write_history(tmp_path / "plain.csv", [row])
    assert (tmp_path / "plain.csv").read_text().splitlines()[0] == ",".join(HISTORY_FIELDS)
    averaged = [row | {"ema_val_loss": 0.3, "ema_val_accuracy": 0.9}, row | {"epoch": 2.0}]
    write_history(tmp_path / "ema.csv", averaged)
    assert read_history(tmp_path / "ema.csv") == averaged  # an epoch without the average reads back without it
    plot_curves(tmp_path / "curves.png", averaged)
    assert (tmp_path / "curves.png").stat().st_size > 0
