"""Is the model ever waiting on data? Data images/s per core against the model's training images/s.

Measures, on synthetic photos (Dogs vs Cats sized JPEGs, 500 x 375):
  index    seconds to index a folder of N files (first scan, then from the cache)
  decode   decode + resize images/s on ONE core, at 32 and 224 px
  augment  the same plus RandAugment per image / plus the batch augmentation (flip + shift)
  model    training images/s of the model (forward + backward + step) at 32 and 224 px

Usage:
  python benchmarks/bench_data.py [--index-files 200000] [--images 200] [--device auto] [--arch vgg16]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vgg import scan
from vgg.decoding import decode
from vgg.inference import Step
from vgg.models import build
from vgg.runtime import autocast, pick_device, pick_precision
from vgg.training.augment import AugmentConfig, augment_batch, image_transform
from vgg.training.config import TrainConfig
from vgg.training.loop import make_optimizer
from vgg.weights import IMAGENET_MEAN, IMAGENET_STD


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise compress like a photo (about 30 kB), unlike pure noise.
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([(x * 0.5 + seed) % 256, (y * 0.6) % 256, ((x + y) * 0.3) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def bench_index(root: Path, files: int) -> dict[str, float]:
    # Indexing reads 16 bytes a file, so small files measure it fairly without writing gigabytes.
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG")
    photo = buffer.getvalue()
    for c in range(2):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(files // 2):
            (folder / f"{i:06d}.jpg").write_bytes(photo)
    start = time.perf_counter()
    index = scan.index_folder(root)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = scan.index_folder(root)
    cached = time.perf_counter() - start
    assert len(index.files) == len(again.files) == files
    return {"files": files, "first_scan_s": first, "cached_s": cached}


def bench_decode(folder: Path, images: int, size: int, policy: str) -> float:
    paths = []
    for i in range(images):
        path = folder / f"{i}.jpg"
        if not path.exists():
            path.write_bytes(_photo(i))
        paths.append(path)
    transform = image_transform(AugmentConfig(policy=policy)) if policy != "basic" else None
    batch_augment = AugmentConfig() if policy == "basic" else None
    start = time.perf_counter()
    decoded = []
    for path in paths:
        image = decode(path, size)
        decoded.append(transform(image) if transform else image)
    if batch_augment is not None:
        for i in range(0, len(decoded), 64):
            augment_batch(torch.stack(decoded[i : i + 64]).float().div_(255), batch_augment)
    return images / (time.perf_counter() - start)


def bench_model(arch: str, size: int, device: torch.device, batch: int, steps: int) -> float:
    precision = pick_precision("auto", device)
    model = build(arch, num_classes=2, image_size=size).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, TrainConfig())
    step = Step(device, precision, IMAGENET_MEAN, IMAGENET_STD)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch,))

    def one() -> None:
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(step.inputs(images)).float(), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    one()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-files", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=200, help="images decoded per measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per size")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="vgg-bench-"))
    os.environ["VGG_CACHE_DIR"] = str(work / "cache")
    results: dict = {"cores": len(os.sched_getaffinity(0)), "device": str(device), "arch": args.arch}
    try:
        if args.index_files:
            results["index"] = bench_index(work / "index", args.index_files)
            print("index", results["index"], flush=True)
        (work / "photos").mkdir()
        for size in (32, 224):
            row = {
                policy: bench_decode(work / "photos", args.images, size, policy)
                for policy in ("none", "basic", "randaugment")
            }
            batch = 128 if device.type == "cuda" else (32 if size == 32 else 8)
            row["model_train"] = bench_model(args.arch, size, device, batch, args.steps)
            row["cores_needed"] = row["model_train"] / row["randaugment"]
            results[f"{size}px"] = row
            print(f"{size}px", {k: round(v, 1) for k, v in row.items()}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
