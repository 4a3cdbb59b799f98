from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vgg.cli import main
from vgg.models import build
from vgg.training import autobatch


def test_cpu_batch_is_a_power_of_two_within_the_limit():
    model = build("vgg11", num_classes=3, image_size=32)
    batch = autobatch.find_batch_size(model, 32, torch.device("cpu"), "fp32", limit=48)
    assert batch in (1, 2, 4, 8, 16, 32)


def test_cpu_batch_follows_available_memory(monkeypatch):
    model = build("vgg11", num_classes=3, image_size=32)
    per_image = autobatch.activation_bytes(model, 32)
    # room for about 10 images' activations: half of it is used, so the batch is 4
    monkeypatch.setattr(autobatch, "available_memory", lambda: 10 * per_image)
    monkeypatch.setattr(autobatch, "_peak_rss", lambda: 0)  # trials that seem free: the lower bound decides
    assert autobatch.find_batch_size(model, 32, torch.device("cpu"), "fp32", limit=512) == 4


def test_activation_bytes_grow_with_image_area():
    small = autobatch.activation_bytes(build("vgg11", 3, 32), 32)
    large = autobatch.activation_bytes(build("vgg11", 3, 64), 64)
    assert 3.5 < large / small < 4.5


def test_train_with_auto_batch_records_the_chosen_size(two_class_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    args = ["train", str(two_class_dir), "--out", str(out), "--arch", "vgg11", "--image-size", "32"]
    assert main([*args, "--epochs", "1", "--batch-size", "auto", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    chosen = json.loads((out / "config.json").read_text())["config"]["batch_size"]
    assert isinstance(chosen, int) and 1 <= chosen <= 20  # never more than the training images
    assert f"batch size: {chosen} (auto" in printed


def test_bad_batch_size_is_one_line(capsys, two_class_dir: Path):
    assert main(["train", str(two_class_dir), "--batch-size", "big"]) == 2
    err = capsys.readouterr().err
    assert "expected a positive integer or 'auto', received 'big'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_search_stops_before_running_out_of_memory():
    model = build("vgg16", num_classes=10, image_size=224)
    batch = autobatch.find_batch_size(model, 224, torch.device("cuda"), "bf16", limit=4096)
    assert batch >= 8 and batch & (batch - 1) == 0
