"""Where VGG16's training time goes, layer by layer: forward and backward GFLOP/s of each convolution.

Each 3x3 convolution of VGG16 is timed alone at the given image size and batch (channels-last, the precision
`vgg train` would pick here), forward and forward+backward, and its rate is set against the machine's best
convolution rate. Layers far below it are where a training step loses to the limit. The last column times the
layer `vgg` trains with (`models.Conv3x3`, a dense product on maps of at most 2x2 px) forward+backward.

Usage: python benchmarks/conv_layers.py [--size 32] [--batch 128] [--precision auto]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from vgg.models import CONFIGS, Conv3x3
from vgg.runtime import autocast, pick_precision


def timed(fn, seconds: float = 1.5) -> float:
    """Seconds per call of ``fn``, after one warm-up call."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    device = torch.device("cpu")
    precision = pick_precision(args.precision, device)
    print(f"VGG16 convolutions at {args.size} px, batch {args.batch}, {precision}, channels-last")
    print("| layer | in -> out | side | forward ms | GFLOP/s | fwd+bwd ms | GFLOP/s | bwd / fwd | Conv3x3 fwd+bwd ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    side, channels, layer = args.size, 3, 0
    totals = [0.0, 0.0, 0.0]
    for item in CONFIGS["D"]:  # VGG16
        if item == "M":
            side //= 2
            continue
        layer += 1
        conv = nn.Conv2d(channels, item, 3, padding=1).to(memory_format=torch.channels_last)
        ours = Conv3x3(channels, item, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, channels, side, side).to(memory_format=torch.channels_last)
        x.requires_grad_(layer > 1)  # the first layer's input is the image: no gradient, as in training
        flop = 2 * args.batch * side * side * channels * item * 9

        def forward(conv: nn.Module = conv, x: torch.Tensor = x) -> None:
            with torch.no_grad(), autocast(device, precision):
                conv(x)

        def train(conv: nn.Module = conv, x: torch.Tensor = x) -> None:
            with autocast(device, precision):
                out = conv(x)
            out.float().sum().backward()

        fwd, both, vgg = timed(forward), timed(train), timed(lambda ours=ours, x=x: train(ours, x))
        totals[0] += fwd
        totals[1] += both
        totals[2] += vgg
        print(
            f"| conv{layer} | {channels} -> {item} | {side} | {fwd * 1e3:.1f} | {flop / fwd / 1e9:.0f} | "
            f"{both * 1e3:.1f} | {3 * flop / both / 1e9:.0f} | {(both - fwd) / fwd:.1f} | {vgg * 1e3:.1f} |",
            flush=True,
        )
        channels = item
    fwd, both, vgg = totals
    print(f"| all 13 | | | {fwd * 1e3:.0f} | | {both * 1e3:.0f} | | {(both - fwd) / fwd:.1f} | {vgg * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
