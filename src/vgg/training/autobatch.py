"""``--batch-size auto``: the largest batch that fits in memory, found without risking the run.

On CUDA, trial training steps on a throwaway copy of the model try doubling batch sizes until one runs out of
memory (a recoverable error there). On the CPU running out of memory is not an error but the kernel's OOM
killer, so nothing is tried at the limit: the memory one image costs is measured from two small trial steps and
the batch is sized to half of the memory available.
"""

from __future__ import annotations

import copy
import logging
import resource
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import autocast

log = logging.getLogger(__name__)

MAX_BATCH = 512  # beyond this, larger batches only cost optimisation steps per epoch


def available_memory() -> int:
    """Bytes of host memory available to new allocations (MemAvailable), or 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trial_step(
    model: nn.Module, batch: int, image_size: int, device: torch.device, precision: str, layout: torch.memory_format
) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    with autocast(device, precision):
        loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def activation_bytes(model: nn.Module, image_size: int) -> int:
    """Bytes of every layer's output for one image in fp32, doubled for their gradients: a lower bound."""
    total = 0

    def count(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * 4 * 2

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


def _power_of_two_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def find_batch_size(
    model: nn.Module,
    image_size: int,
    device: torch.device,
    precision: str,
    limit: int = MAX_BATCH,
    layout: torch.memory_format = torch.channels_last,
) -> int:
    """The largest power-of-two batch (at most ``limit``) whose training step fits in memory.

    ``layout`` is the memory format training will keep the model and activations in (runtime.training_memory_format).
    """
    limit = max(1, min(limit, MAX_BATCH))
    trial = copy.deepcopy(model).to(device, memory_format=layout).train()
    if device.type == "cuda":
        best, batch = 0, 1
        while batch <= limit:
            try:
                _trial_step(trial, batch, image_size, device, precision, layout)
                torch.cuda.synchronize(device)
                best = batch
                batch *= 2
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
        # The trials ran beside the real model's copy on the device: that copy is the margin.
        chosen = max(1, best)
    else:
        _trial_step(trial, 1, image_size, device, precision, layout)  # weights, gradients and optimizer state
        small, large = 2, 6
        _trial_step(trial, small, image_size, device, precision, layout)
        before = _peak_rss()
        _trial_step(trial, large, image_size, device, precision, layout)
        # The allocator may serve a trial from memory freed by an earlier one, hiding its cost: never estimate
        # below the activations the forward pass must keep for the backward pass.
        per_image = max((_peak_rss() - before) / (large - small), activation_bytes(trial, image_size))
        budget = available_memory() // 2
        chosen = _power_of_two_at_most(min(limit, max(1, budget / per_image)))
        log.info("about %.1f MB per image; %.1f GB available", per_image / 1e6, budget * 2 / 1e9)
    del trial
    return chosen
