"""``--batch-size auto``: the largest batch that fits in memory, found without risking the run.

On CUDA, trial training steps on a throwaway copy of the model try doubling batch sizes while each step's peak
stays under ``1 - CUDA_MARGIN`` of the memory that was free, stopping at the first that runs out of memory (a
recoverable error there, whichever library reports it: the allocator, cuDNN or cuBLAS). The margin is for what the
trials do not see: the allocator's fragmentation over a long run, the workspaces cuDNN's benchmark mode picks
later, batches decoded on the device. On the CPU running out of memory is not an error but the kernel's OOM
killer, so nothing is tried at the limit: the memory one image costs is measured from two small trial steps and
the batch is sized to half of the memory available.

The trial copy trains every layer when the run will (``unfrozen``: ``--unfreeze-at``), so the batch still fits
after unfreezing; and under DDP every process takes the smallest size any of them found (each must take the
same number of steps per epoch, or the others wait forever).
"""

from __future__ import annotations

import copy
import logging
import resource
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import agree_min
from ..runtime import autocast, out_of_memory

log = logging.getLogger(__name__)

MAX_BATCH = 512  # beyond this, larger batches only cost optimisation steps per epoch
CUDA_MARGIN = 0.15  # share of the free device memory the chosen batch leaves unused


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
    unfrozen: bool = False,
) -> int:
    """The largest power-of-two batch (at most ``limit``) whose training step fits in memory, with a margin.

    ``layout`` is the memory format training will keep the model and activations in (runtime.training_memory_format);
    ``unfrozen`` sizes for training every layer (frozen ones too: they will be unfrozen). Under DDP, a collective
    call: every process gets the smallest answer.
    """
    limit = max(1, min(limit, MAX_BATCH))
    free = _free_device_memory(device)
    trial = copy.deepcopy(model).to(device, memory_format=layout).train()
    if unfrozen:
        for parameter in trial.parameters():
            parameter.requires_grad_(True)
    if device.type == "cuda":
        chosen = _cuda_search(trial, image_size, device, precision, limit, layout, free)
    else:
        chosen = _cpu_estimate(trial, image_size, device, precision, limit, layout)
    del trial
    return agree_min(chosen, device)


def _free_device_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def _cuda_search(
    trial: nn.Module, image_size: int, device: torch.device, precision: str, limit: int,
    layout: torch.memory_format, free: int,
) -> int:  # fmt: skip
    """Double the batch while a trial step's peak (the trial model's weights, gradients and optimizer state
    included, as the real model's will be) stays under the budget; ``free`` was measured before the trial copy."""
    budget = free * (1 - CUDA_MARGIN)
    base = torch.cuda.memory_allocated(device) - sum(
        t.numel() * t.element_size() for t in (*trial.parameters(), *trial.buffers())
    )
    best, batch = 0, 1
    while batch <= limit:
        try:
            torch.cuda.reset_peak_memory_stats(device)
            _trial_step(trial, batch, image_size, device, precision, layout)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        except RuntimeError as error:  # OutOfMemoryError is one; cuDNN and cuBLAS raise plain RuntimeErrors
            if not out_of_memory(error):
                raise
            log.info("batch %d ran out of memory (%s)", batch, str(error).splitlines()[0][:200])
            break
        finally:
            trial.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        if peak > budget:
            log.info("batch %d peaks at %.2f GB, over the budget of %.2f GB", batch, peak / 1e9, budget / 1e9)
            break
        best = batch
        batch *= 2
    return max(1, best)


def _cpu_estimate(
    trial: nn.Module, image_size: int, device: torch.device, precision: str, limit: int, layout: torch.memory_format
) -> int:
    _trial_step(trial, 1, image_size, device, precision, layout)  # weights, gradients and optimizer state
    small, large = 2, 6
    _trial_step(trial, small, image_size, device, precision, layout)
    before = _peak_rss()
    _trial_step(trial, large, image_size, device, precision, layout)
    # The allocator may serve a trial from memory freed by an earlier one, hiding its cost: never estimate
    # below the activations the forward pass must keep for the backward pass.
    per_image = max((_peak_rss() - before) / (large - small), activation_bytes(trial, image_size))
    budget = available_memory() // 2
    log.info("about %.1f MB per image; %.1f GB available", per_image / 1e6, budget * 2 / 1e9)
    return _power_of_two_at_most(min(limit, max(1, budget / per_image)))
