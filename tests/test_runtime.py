"""Precision choices on CPU, --deterministic, and TensorBoard logging."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, write_images
from torch import nn

from vgg import runtime
from vgg.cli import main
from vgg.errors import UsageError
from vgg.inference import Step
from vgg.training.config import TrainConfig
from vgg.training.epoch import Updates, train_one_epoch
from vgg.training.loop import make_optimizer
from vgg.training.rundir import _tensorboard
from vgg.training.schedules import make_schedule

CPU = torch.device("cpu")


def _step_with(precision: str) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    config = TrainConfig(lr=0.1, warmup_epochs=0)
    optimizer = make_optimizer(model, config)
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))]
    step = Step(CPU, runtime.pick_precision(precision, CPU), (0.5,) * 3, (0.25,) * 3)
    metrics = train_one_epoch(
        model, batches, Updates(optimizer, make_schedule(optimizer, config, 1)), step, progress=False
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # it learned
    return metrics["loss"]


def test_epoch_reports_the_learning_rate_of_its_last_step():
    # history.csv's lr column: after a one-epoch warm-up it shows the rate the warm-up reached, not its first step.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    config = TrainConfig(lr=0.1, warmup_epochs=1, schedule="cosine", epochs=2)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, 4)
    batches = [(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1]))] * 4
    step = Step(CPU, "fp32", (0.5,) * 3, (0.25,) * 3)
    first = train_one_epoch(model, batches, Updates(optimizer, schedule), step, progress=False)
    assert first["lr"] == pytest.approx(0.1 * 4 / 5)  # warm-up factor (step + 1) / (warmup + 1) at step 3 of 4
    second = train_one_epoch(model, batches, Updates(optimizer, schedule), step, progress=False)
    assert 0 < second["lr"] < first["lr"]  # cosine: the rate of step 7, 3/4 of the way down


def test_each_precision_trains_a_step_on_cpu_and_fp16_is_refused():
    fp32, bf16 = _step_with("fp32"), _step_with("bf16")
    assert 0 < fp32 < 10 and bf16 == pytest.approx(fp32, abs=0.05)  # bf16 keeps ~3 significant digits
    assert _step_with("auto") == pytest.approx(fp32, abs=0.05)
    with pytest.raises(UsageError, match=r"precision=fp16 needs a CUDA device; on CPU use bf16 or fp32"):
        _step_with("fp16")


def test_auto_picks_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    assert runtime.cpu_has_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert runtime.cpu_has_bf16("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert not runtime.cpu_has_bf16("flags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not runtime.cpu_has_bf16("model name\t: avx512_bf16 in a name is not a flag\nflags\t: fpu\n")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda native=native: native)
        assert runtime.pick_precision("auto", CPU) == expected
        assert runtime.pick_precision("fp32", CPU) == "fp32" and runtime.pick_precision("bf16", CPU) == "bf16"


def test_deterministic_tensorboard_run(tmp_path: Path, capsys, monkeypatch):
    importlib.import_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []
    real = torch.use_deterministic_algorithms
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, **kw: (seen.append(on), real(on, **kw)))
    data = write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=8)
    argv = ["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "2", "--arch", "vgg11", "--image-size",
            "32", "--batch-size", "4", "--workers", "0", "--deterministic", "--tensorboard", "--optimizer", "adamw",
            "--lr", "1e-4", "--schedule", "step", "--step-size", "1", "--warmup-epochs", "0", "--accumulate", "2",
            "--clip-grad-norm", "1"]  # fmt: skip
    assert main(argv) == 0
    assert seen[0] is True and not torch.are_deterministic_algorithms_enabled()  # on for the run, off after it
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss", "val_loss", "accuracy", "val_accuracy", "lr"} <= set(events.Tags()["scalars"])
    lrs = [e.value for e in events.Scalars("lr")]
    assert [e.step for e in events.Scalars("val_loss")] == [1, 2] and lrs[1] == pytest.approx(lrs[0] * 0.1)


def test_tensorboard_missing_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an import of a missing package does
    with pytest.raises(
        UsageError, match=r"--tensorboard needs the tensorboard package.*pip install 'vgg\[tensorboard\]'"
    ):
        _tensorboard(TrainConfig(out=str(tmp_path), tensorboard=True), None)


def test_training_layout_is_nchw_only_for_fp32_cpu_training_at_large_sizes():
    from vgg.runtime import training_memory_format

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_memory_format(cpu, "fp32", 32) == torch.channels_last
    assert training_memory_format(cpu, "fp32", 224) == torch.contiguous_format
    assert training_memory_format(cpu, "bf16", 224) == torch.channels_last
    assert training_memory_format(cuda, "fp32", 224) == torch.channels_last
