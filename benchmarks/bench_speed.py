"""Training and inference speed of `vgg` against this machine's limit and against plain PyTorch.

The limit is the measured rate of a large 3x3 convolution (the operation that is >99% of VGG's arithmetic), in
fp32 and bf16, channels-last. Each row reports images/s and the fraction of that limit it reaches, counting
VGG's multiply-adds (training = 3x forward). `vgg` rows go through the real code path (`Step`,
`train_one_epoch`, `Batches`); the baseline is a plain fp32 NCHW PyTorch loop over the same model.

Usage: python benchmarks/bench_speed.py [--quick] [--no-append]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import vgg
from vgg.batches import Batches
from vgg.inference import Step
from vgg.models import build
from vgg.runtime import autocast, cpu_has_bf16, pick_precision, training_memory_format
from vgg.scan import scan_folder
from vgg.training.config import TrainConfig
from vgg.training.epoch import Updates, train_one_epoch
from vgg.training.loop import make_optimizer
from vgg.training.schedules import make_schedule

RESULTS = Path(__file__).with_name("RESULTS.md")
SPEED_SECTION = "Speed (`make bench`)"


def conv_limit(dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> float:
    """Best GFLOP/s of large 3x3 convolutions shaped like VGG's conv2-conv5 blocks, channels-last."""
    best = 0.0
    for channels, side in ((128, 112), (256, 56), (512, 28), (512, 14)):
        batch = 4096 * 56 * 56 // (channels * side * side) * (8 if device.type == "cuda" else 1)
        x = torch.randn(batch, channels, side, side, device=device).to(memory_format=torch.channels_last)
        conv = nn.Conv2d(channels, channels, 3, padding=1).to(device, memory_format=torch.channels_last)
        flops = 2 * batch * channels * channels * 9 * side * side
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            conv(x)
            _sync(device)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                conv(x)
                n += 1
            _sync(device)
        best = max(best, flops * n / (time.perf_counter() - start) / 1e9)
    return best


def append_to_section(path: Path, heading: str, text: str) -> None:
    """Insert ``text`` at the end of the ``## heading`` section of a Markdown file (the section is made if absent)."""
    lines = path.read_text().splitlines() if path.exists() else ["# Results"]
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == f"## {heading}")
    except StopIteration:
        lines += ["", f"## {heading}"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    lines[end:end] = text.rstrip("\n").splitlines()
    path.write_text("\n".join(lines) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_gflop(arch: str, image_size: int, num_classes: int = 10) -> float:
    """Forward GFLOP (2 x multiply-adds) of convolutions and dense layers for one image."""
    with torch.device("meta"):
        model = build(arch, num_classes=num_classes, image_size=image_size, init_weights=False)
    total = 0

    def hook(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += 2 * out[0].numel() * module.in_channels * 9
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for h in handles:
        h.remove()
    return total / 1e9


class Synthetic:
    """The same uint8 batch over and over: measures the model path without any data loading."""

    def __init__(self, batch: int, size: int, steps: int, classes: int = 10) -> None:
        self.images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        self.labels = torch.randint(0, classes, (batch,))
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels


def vgg_train_rate(arch: str, size: int, batches, device: torch.device, precision: str) -> float:
    config = TrainConfig(arch=arch, image_size=size, epochs=1, warmup_epochs=0)
    layout = training_memory_format(device, precision, size)  # as `vgg train` chooses
    model = build(arch, num_classes=10, image_size=size).to(device, memory_format=layout)
    optimizer = make_optimizer(model, config)
    updates = Updates(optimizer, make_schedule(optimizer, config, len(batches)))
    step = Step(device, precision, (0.5,) * 3, (0.25,) * 3, memory_format=layout)
    warm = Synthetic(next(iter(batches))[0].shape[0], size, 1)
    train_one_epoch(model, warm, updates, step, progress=False)
    return train_one_epoch(model, batches, updates, step, progress=False)["images_per_s"]


def vgg_infer_rate(arch: str, size: int, batch: int, steps: int, device: torch.device, precision: str) -> float:
    model = build(arch, num_classes=10, image_size=size).to(device, memory_format=torch.channels_last).eval()
    step = Step(device, precision, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode(), autocast(device, precision):
        model(step.inputs(images))
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(step.inputs(images))
        _sync(device)
    return batch * steps / (time.perf_counter() - start)


def plain_rates(arch: str, size: int, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """The baseline: fp32, NCHW, torch.optim.SGD, no autocast. Returns (train, inference) images/s."""
    model = build(arch, num_classes=10, image_size=size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def train_step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train = batch * steps / (time.perf_counter() - start)
    model.eval()
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        _sync(device)
    return train, batch * steps / (time.perf_counter() - start)


def keras_rates(size: int, batch: int, steps: int) -> dict | None:
    """The tutorial's Keras model (keras_vgg16.py) in its own interpreter: KERAS_PYTHON, or this one if it has Keras."""
    python = os.environ.get("KERAS_PYTHON") or (sys.executable if importlib.util.find_spec("keras") else None)
    if not python:
        return None
    script = Path(__file__).with_name("keras_vgg16.py")
    run = subprocess.run([python, str(script), str(size), str(batch), str(steps)], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"Keras {size} px: failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}", file=sys.stderr)
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def image_folder(root: Path, size: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(10):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The same model name covers CPUs with and without native bf16 (2x apart here), so say which this is.
    name += " (native bf16)" if cpu_has_bf16() else " (no native bf16: fp32)"
    if torch.cuda.is_available():
        name = f"{torch.cuda.get_device_name()} (host: {name})"
    return f"{name}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--quick", action="store_true", help="shorter measurements (a smoke run, noisier numbers)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precision = pick_precision("auto", device)
    # Each training measurement lasts about this long, whatever the machine: a 2-core CPU without bf16 trains
    # VGG16 at 224 px 4x slower than one with it, and a GPU hundreds of times faster.
    seconds = 5.0 if args.quick else 20.0
    gpu = device.type == "cuda"
    cases = [(32, 512 if gpu else 128), (224, 256 if gpu else 8)]

    limit32 = conv_limit(torch.float32, device)
    limit16 = conv_limit(torch.bfloat16, device)
    best_limit = max(limit32, limit16)
    rows = []
    print(f"machine: {machine()}; precision auto -> {precision}")
    print(f"limit: 3x3 conv fp32 {limit32:.0f} GFLOP/s, bf16 {limit16:.0f} GFLOP/s")
    for size, batch in cases:
        start = len(rows)
        gflop = model_gflop(args.arch, size)
        first = vgg_train_rate(args.arch, size, Synthetic(batch, size, 1), device, precision)
        steps = max(2, min(100, round(seconds * first / batch)))
        print(f"{size} px: {steps} steps of {batch} per measurement", flush=True)
        ceiling_train = best_limit / (3 * gflop)
        ceiling_infer = best_limit / gflop
        train = vgg_train_rate(args.arch, size, Synthetic(batch, size, steps), device, precision)
        infer = vgg_infer_rate(args.arch, size, batch, steps, device, precision)
        base_train, base_infer = plain_rates(args.arch, size, batch, steps, device)
        with tempfile.TemporaryDirectory() as tmp:
            per_class = max(2, batch * min(steps, 30) // 10)  # writing the files is the slow part on a GPU host
            folder = scan_folder(image_folder(Path(tmp), size, per_class))
            batches = Batches(folder.samples, size, batch, shuffle=True, cache="none", drop_last=True)
            real = vgg_train_rate(args.arch, size, batches, device, precision)
            if gpu:  # the loader workers only read the files; nvJPEG decodes each batch (vgg/jpeg.py)
                batches = Batches(
                    folder.samples, size, batch, shuffle=True, cache="none", drop_last=True, decode_device=device
                )
                on_gpu = vgg_train_rate(args.arch, size, batches, device, precision)
        rows += [
            (f"{size} px b{batch}", "vgg train (synthetic)", train, train / ceiling_train),
            (f"{size} px b{batch}", "vgg train (jpeg folder)", real, real / ceiling_train),
        ]
        if gpu:
            case = (f"{size} px b{batch}", "vgg train (jpeg folder, decoded on GPU)")
            rows.append((*case, on_gpu, on_gpu / ceiling_train))
        keras = keras_rates(size, batch, max(2, steps // 2))
        if keras:
            name = f"Keras {keras['keras']} ({keras['backend']}) tutorial model"
            rows += [
                (f"{size} px b{batch}", f"{name} train", keras["train"], keras["train"] / ceiling_train),
                (f"{size} px b{batch}", f"{name} inference", keras["infer"], keras["infer"] / ceiling_infer),
            ]
        rows += [
            (f"{size} px b{batch}", "plain fp32 NCHW train", base_train, base_train / ceiling_train),
            (f"{size} px b{batch}", "vgg inference", infer, infer / ceiling_infer),
            (f"{size} px b{batch}", "plain fp32 NCHW inference", base_infer, base_infer / ceiling_infer),
        ]
        # Each case's rows as soon as they are measured: a run stopped by its time limit keeps what it measured.
        for case, path, rate, fraction in rows[start:]:
            print(f"| {case} | {path} | {rate:.1f} | {fraction:.0%} |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if gpu:
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20
    table = ["| case | path | img/s | fraction of limit |", "| --- | --- | ---: | ---: |"]
    table += [f"| {case} | {path} | {rate:.1f} | {frac:.0%} |" for case, path, rate, frac in rows]
    header = (
        f"### {datetime.date.today()} `{args.arch}` on {machine()}\n\n"
        f"commit {commit()}, vgg {vgg.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {sys.version.split()[0]}; precision auto -> {precision}; `make bench`\n\n"
        f"Limit (3x3 conv, channels-last): fp32 {limit32:.0f} GFLOP/s, bf16 {limit16:.0f} GFLOP/s. "
        f"Peak host memory {peak:.0f} MiB" + (f", peak GPU memory {peak_gpu:.0f} MiB" if gpu else "") + ".\n"
    )
    text = header + "\n" + "\n".join(table) + "\n"
    print(text)
    if not args.no_append:
        append_to_section(RESULTS, SPEED_SECTION, "\n" + text)
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
