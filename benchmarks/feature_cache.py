"""Per-epoch time of frozen-backbone training with and without cached features (``vgg train --freeze features``).

Writes a small 3-class image folder, places a vgg11 weights file with torchvision's names and shapes in a temporary
TORCH_HOME (speed does not depend on the values, and this needs no network), then trains the same run twice:
features cached (the default with a frozen backbone and no augmentation) and ``--no-cache-features``.

    PYTHONPATH=src python benchmarks/feature_cache.py [--per-class 80] [--image-size 224] [--epochs 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import COLOURS, write_images  # noqa: E402
from test_transfer import fake_imagenet_state  # noqa: E402

from vgg.cli import main  # noqa: E402


def run(argv: list[str]) -> float:
    start = time.perf_counter()
    assert main(argv) == 0
    return time.perf_counter() - start


def main_() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=80)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["TORCH_HOME"] = str(root / "torch")
        os.environ["VGG_OFFLINE"] = "1"
        (root / "torch" / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(fake_imagenet_state(), root / "torch" / "hub" / "checkpoints" / "vgg11-8a719046.pth")
        data = write_images(root / "data", COLOURS, args.per_class, size=64)
        common = [
            "train", str(data), "--arch", "vgg11", "--image-size", str(args.image_size), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--weights", "imagenet", "--freeze", "features",
            "--shift", "0", "--no-hflip", "--workers", "0",
        ]  # fmt: skip
        totals = {}
        for name, extra in (("cached", []), ("uncached", ["--no-cache-features"])):
            totals[name] = run([*common, "--out", str(root / name), *extra])
        for name in ("cached", "uncached"):
            rows = list(csv.DictReader(open(root / name / "history.csv")))
            epochs = ", ".join(f"{float(r['seconds']):.2f}" for r in rows)
            print(f"{name}: whole run {totals[name]:.1f} s; per-epoch seconds (train + validation): {epochs}")


if __name__ == "__main__":
    main_()
