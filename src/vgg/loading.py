"""Loading images through DataLoader workers that a crashing native decoder may kill, without losing the run.

When a worker dies, the batch it was decoding is decoded again file by file in isolated processes (``surviving``),
and the file that kills its process again is skipped with the reason ``CRASHED``. Also here: the loader of evaluation
and prediction (``fitted_batches``: files decoded at full size and brought to the model by its own resizing rule).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


def read_or_reason(read: Callable[[str], torch.Tensor], path: str) -> torch.Tensor | str:
    """The image ``read`` makes of the file at ``path`` (or its ``Encoded`` bytes), or the reason the file is bad."""
    try:
        return read(path)
    except (OSError, ValueError) as error:
        return str(error)


def _read_alone(item: tuple[Callable[[str], torch.Tensor], str]) -> torch.Tensor | str:
    return read_or_reason(*item)


def isolated_rows(
    files: list[tuple[str, int]], read: Callable[[str], torch.Tensor], workers: int
) -> list[tuple[torch.Tensor | None, int, str, str]]:
    """``(image, label, path, reason)`` rows, each file read in a process of its own that may die (``read`` must
    pickle: a module-level function, a ``functools.partial`` of one, or ``DecodeThenFit``)."""
    items = [(read, path) for path, _ in files]
    decoded = map_isolated(_read_alone, items, max(1, workers), lambda item: CRASHED, chunk=1)
    return [
        (result, label, path, "") if isinstance(result, torch.Tensor) else (None, label, path, result)
        for (path, label), result in zip(files, decoded, strict=True)
    ]


class ImageFiles(Dataset):
    """``(image, label, path, reason)`` items: each file made an image by ``read``, then ``transform`` when given.

    A bad file yields ``None`` with its reason instead of raising. Training reads files decoded at its image size
    (``batches.py``); evaluation and prediction decode them whole and fit them to the model (``DecodeThenFit``).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, int]],
        read: Callable[[str], torch.Tensor],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.samples, self.read, self.transform = [(str(p), label) for p, label in samples], read, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str, str]:
        path, label = self.samples[index]
        image = read_or_reason(self.read, path)
        if isinstance(image, str):
            return None, label, path, image
        return (self.transform(image) if self.transform is not None else image), label, path, ""


@dataclass(frozen=True)
class DecodeThenFit:
    """Read a file at full size, then bring it to the model's input by ``fit`` (its own resizing rule)."""

    fit: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, path: str) -> torch.Tensor:
        return self.fit(decode(path))


def collate(items: list[tuple[torch.Tensor | None, int, str, str]]) -> tuple[torch.Tensor, torch.Tensor, list]:
    good = [(image, label) for image, label, _, _ in items if image is not None]
    bad = [(path, reason) for image, _, path, reason in items if image is None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([image for image, _ in good])
    return images, torch.tensor([label for _, label in good]), bad


def _collate_with_paths(items: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], list[str]]:
    """``collate`` plus the paths of the images that decoded, in batch order."""
    images, labels, bad = collate(items)
    return images, labels, bad, [path for image, _, path, _ in items if image is not None]


class FittedBatches:
    """Batches ``(images, labels, bad, paths)`` of files fitted to the model (``DecodeThenFit``) in sample order,
    decoded by loader workers; a worker killed by a native decoder costs the file that killed it (``surviving``), not
    the evaluation."""

    def __init__(self, samples: Sequence[tuple[str | Path, int]], fit: Callable, batch_size: int, workers: int):
        self.dataset = ImageFiles(samples, DecodeThenFit(fit))
        self.batch_size, self.workers = batch_size, workers

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def _loader(self, batches: list[list[int]]) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate_with_paths)

    def _isolated(self, indices: list[int]) -> tuple:
        rows = isolated_rows([self.dataset.samples[i] for i in indices], self.dataset.read, self.workers)
        return _collate_with_paths(rows)

    def __iter__(self) -> Iterator[tuple]:
        n = len(self.dataset)
        batches = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        for _, batch in surviving(self._loader, batches, self.workers, self._isolated):
            yield batch


def fitted_batches(
    samples: Sequence[tuple[str | Path, int]],
    fit: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    workers: int | None = None,
) -> FittedBatches:
    """Batches ``(images, labels, bad, paths)`` of files fitted to the model by ``fit``, in sample order, decoded by
    loader workers."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer. Received: batch_size={batch_size}.")
    return FittedBatches(samples, fit, batch_size, default_workers() if workers is None else workers)


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)))
