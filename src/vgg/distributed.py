"""Several processes, one model: the torch.distributed setup that ``torchrun`` expects, and metric reduction.

``torchrun --nproc_per_node=N -m vgg train ...`` starts N copies of the command with RANK, WORLD_SIZE and
LOCAL_RANK set. Each copy trains on its own shard of every epoch (see ``data.Batches``), DDP averages the
gradients, and only rank 0 writes files and prints. Without those variables everything here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> World:
    """Read torchrun's variables; a single process when they are absent."""
    try:
        return World(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as error:
        raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them): {error}.") from error


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes: gloo on CPU, nccl on CUDA (one GPU per process)."""
    world = from_env()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK={world.local_rank} but only {torch.cuda.device_count()} CUDA devices: start at most "
                f"{torch.cuda.device_count()} processes per machine (--nproc_per_node)."
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return world, device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; unchanged in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` of all processes, on every process (``value`` itself in a single process).

    For sizes every process must share (the batch size: equal steps per epoch). ``device`` is where the process
    group communicates: the process's GPU under NCCL, the CPU under gloo.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return value
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=where)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather(value: object) -> list[object]:
    """Every process's ``value``, in rank order (``[value]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def finish(world: World, wait: bool = True) -> None:
    """Wait for every rank (rank 0 may still be writing files), then leave the process group.

    After an error there is no waiting: the other ranks may never arrive, and torchrun stops them.
    """
    if world.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def from_main(value: object) -> object:
    """Rank 0's ``value``, on every process (``value`` itself in a single process): for decisions only rank 0 makes."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
