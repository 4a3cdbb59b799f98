"""Loading images through DataLoader workers that a crashing native decoder may kill, without losing the run.

When a worker dies, the batch it was decoding is decoded again file by file in isolated processes (``surviving``),
and the file that kills its process again is skipped with the reason ``CRASHED``. Also here: the loader of evaluation
and prediction (``fitted_batches``: files decoded at full size and brought to the model by its own resizing rule).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .decoding import decode
from .errors import UsageError
from .isolation import map_isolated

log = logging.getLogger(__name__)

# torch raises a dead loader worker's error from a SIGCHLD handler, wherever this process happens to be (in the middle
# of a training step). Marked as installed, the handler never is: the loader then finds a dead worker itself while it
# waits for a batch (within torch's 5 s status interval) and raises there, inside ``surviving``, which recovers.
if hasattr(torch.utils.data._utils.signal_handling, "_SIGCHLD_handler_set"):
    torch.utils.data._utils.signal_handling._SIGCHLD_handler_set = True

CRASHED = "decoder crashed (the process decoding this file died)"


def _worker_died(error: BaseException) -> bool:
    """Whether a DataLoader error says that a worker process died (killed by a signal, or exited)."""
    text = str(error)
    return "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text)


def surviving(
    make_loader: Callable[[list[list[int]]], DataLoader],
    batches: list[list[int]],
    workers: int,
    isolated_batch: Callable[[list[int]], tuple],
) -> Iterator[tuple[bool, tuple]]:
    """``(isolated, loader batch)`` for each batch, in order, even when a native decoder kills a loader worker.

    Then the loader raises; the batch it was waiting for is decoded file by file in isolated processes
    (``isolated_batch``, with ``isolation.map_isolated``: the file that kills its process again is skipped as
    "decoder crashed") and a new loader carries on after it. Each crash costs one batch decoded this way, so a crash
    in a batch further on (workers prefetch) is reached after a few restarts. With ``workers=0`` decoding runs in
    this process and nothing can be isolated. vgg decodes no format with a known crashing decoder (``decoding.py``):
    this is the second line of defence.
    """
    done = 0
    while done < len(batches):
        try:
            for batch in make_loader(batches[done:]):
                done += 1
                yield False, batch
            return
        except RuntimeError as error:
            if workers == 0 or not _worker_died(error):
                raise
            log.warning("a loader worker died (%s): decoding its batch file by file in isolated processes", error)
            yield True, isolated_batch(batches[done])
            done += 1


def isolated_rows(
    files: list[tuple[str, int]], decode_one: Callable[[tuple], torch.Tensor | str], items: list, workers: int
) -> list[tuple[torch.Tensor | None, int, str, str]]:
    """``(image, label, path, reason)`` rows, each file decoded in a process of its own that may die."""
    decoded = map_isolated(decode_one, items, max(1, workers), lambda item: CRASHED, chunk=1)
    return [
        (result, label, path, "") if isinstance(result, torch.Tensor) else (None, label, path, result)
        for (path, label), result in zip(files, decoded, strict=True)
    ]


def collate(items: list[tuple[torch.Tensor | None, int, str, str]]) -> tuple[torch.Tensor, torch.Tensor, list]:
    good = [(image, label) for image, label, _, _ in items if image is not None]
    bad = [(path, reason) for image, _, path, reason in items if image is None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([image for image, _ in good])
    return images, torch.tensor([label for _, label in good]), bad


class FittedImages(Dataset):
    """Files decoded at full size, then brought to the model's input by ``fit`` (its own resizing rule).

    What evaluation and prediction read: a bad file yields ``None`` with its reason instead of raising.
    """

    def __init__(self, samples: Sequence[tuple[str | Path, int]], fit: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.samples, self.fit = list(samples), fit

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str, str]:
        path, label = self.samples[index]
        try:
            return self.fit(decode(path)), label, str(path), ""
        except (OSError, ValueError) as error:
            return None, label, str(path), str(error)


def _collate_with_paths(items: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], list[str]]:
    """``collate`` plus the paths of the images that decoded, in batch order."""
    images, labels, bad = collate(items)
    return images, labels, bad, [path for image, _, path, _ in items if image is not None]


def _fitted_alone(item: tuple[str, Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor | str:
    """One file decoded and fitted in an isolated process: the image, or the reason it is bad."""
    path, fit = item
    try:
        return fit(decode(path))
    except (OSError, ValueError) as error:
        return str(error)


class FittedBatches:
    """Batches ``(images, labels, bad, paths)`` of ``FittedImages`` in sample order, decoded by loader workers; a
    worker killed by a native decoder costs the file that killed it (``surviving``), not the evaluation."""

    def __init__(self, samples: Sequence[tuple[str | Path, int]], fit: Callable, batch_size: int, workers: int):
        self.samples, self.fit, self.batch_size, self.workers = list(samples), fit, batch_size, workers
        self.dataset = FittedImages(self.samples, fit)

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def _loader(self, batches: list[list[int]]) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate_with_paths)

    def _isolated(self, indices: list[int]) -> tuple:
        files = [(str(self.samples[i][0]), self.samples[i][1]) for i in indices]
        rows = isolated_rows(files, _fitted_alone, [(path, self.fit) for path, _ in files], self.workers)
        return _collate_with_paths(rows)

    def __iter__(self) -> Iterator[tuple]:
        n = len(self.samples)
        batches = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        for _, batch in surviving(self._loader, batches, self.workers, self._isolated):
            yield batch


def fitted_batches(
    samples: Sequence[tuple[str | Path, int]],
    fit: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    workers: int | None = None,
) -> FittedBatches:
    """Batches ``(images, labels, bad, paths)`` of ``FittedImages`` in sample order, decoded by loader workers."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer. Received: batch_size={batch_size}.")
    return FittedBatches(samples, fit, batch_size, default_workers() if workers is None else workers)


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)))
