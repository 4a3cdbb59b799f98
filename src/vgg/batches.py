"""Batching decoded images for training and validation (evaluation and prediction read through ``loading.py``).

Images are decoded once to ``image_size`` x ``image_size`` uint8 tensors (squashed, as the tutorial's
``target_size`` does) and either kept in memory, when they fit, or decoded again by loader workers every epoch.
Batch augmentation (random erasing included) happens in the training loop, where the batch is; per-image policies
(RandAugment, TrivialAugment) run in the loader or the training process, as the ``transform`` given here.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .decoding import decode
from .errors import UsageError
from .jpeg_batches import Fallbacks, Packed, assemble, read_jpeg
from .loading import ImageFiles, collate, default_workers, isolated_rows, surviving
from .scan import Sample

log = logging.getLogger(__name__)

# Decoded datasets up to this size stay in memory as uint8 (60,000 images at 32 px take 184 MB).
RAM_CACHE_LIMIT = 4 * 1024**3


def limit_per_class(samples: list[Sample], limit: int, seed: int = 0) -> list[Sample]:
    """Keep at most ``limit`` samples of each class, chosen at random with ``seed``."""
    rng = random.Random(seed)
    shuffled = samples[:]
    rng.shuffle(shuffled)
    kept: Counter[int] = Counter()
    out = []
    for s in shuffled:
        if kept[s.label] < limit:
            kept[s.label] += 1
            out.append(s)
    return sorted(out, key=lambda s: (s.label, str(s.path)))


def _collate_mixed(items: list) -> tuple[Packed, torch.Tensor, list, list[str]]:
    """Like ``loading.collate``, but for decoded tensors and ``Encoded`` bytes packed into a few tensors, with paths.

    Packed, a batch crosses from a loader worker as five shared-memory descriptors whatever its size (one per image
    ran out of file descriptors at large batches: ``jpeg_batches.Packed``).
    """
    good = [(image, label, path) for image, label, path, _ in items if image is not None]
    bad = [(path, reason) for image, _, path, reason in items if image is None]
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.long)
    return Packed.pack([image for image, _, _ in good]), labels, bad, [path for _, _, path in good]


SAMPLERS = ("shuffle", "balanced")


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights inversely proportional to the size of the sample's class."""
    counts = torch.bincount(labels).double()
    return 1.0 / counts[labels]


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Loss weights inversely proportional to class frequency, averaging 1 over the samples (sklearn's "balanced")."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


class Resumable:
    """Where an epoch's shuffled order stands, so that a resumed run replays it and skips what was handed out.

    Subclasses draw each epoch's order from ``self.generator`` right after ``_begin_epoch()``, count handed-out
    batches in ``position`` and call ``_end_epoch()`` when the epoch is over.
    """

    generator: torch.Generator
    position: int = 0
    _resume_at: int = 0

    def _begin_epoch(self) -> int:
        """Start an epoch; returns how many batches to skip (those handed out before a resume)."""
        self._epoch_state = self.generator.get_state()
        self.position, self._resume_at = self._resume_at, 0
        return self.position

    def _end_epoch(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Where the shuffling stands: mid-epoch, the state this epoch's order came from and how far it got."""
        generator = self._epoch_state if self.position else self.generator.get_state()
        return {"generator": generator.clone(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration replays the saved epoch's order and skips the batches already handed out."""
        self.generator.set_state(state["generator"])
        self._resume_at = int(state["position"])


class Batches(Resumable):
    """Iterable of ``(uint8 images N x 3 x S x S, labels)`` batches, from memory or from disk.

    Small datasets are decoded once (in parallel) and kept in memory; larger ones are decoded by loader workers
    every epoch. Files that fail to decode are skipped and listed in ``skipped`` (path, reason), never fatal.

    Both paths draw each epoch's order from ``generator``. With ``world_size`` > 1 (torchrun), every process
    draws the same order and takes every ``world_size``-th image of it, so the shards are disjoint and, with
    ``drop_last``, equally long (DDP needs every process to take the same number of steps).
    ``state_dict()`` / ``load_state_dict()`` save and restore where the shuffling stands, mid-epoch included.

    Args:
        transform: a per-image transform of uint8 3 x S x S tensors (RandAugment, TrivialAugment), applied every
            epoch: by the loader workers when streaming, in this process when the images are in memory.
        sampler: ``shuffle`` (each image once per epoch) or ``balanced`` (images drawn with replacement with
            probability inversely proportional to their class's size, so every class is seen equally often).
        decode_device: when streaming without a per-image transform, the loader workers only read plain JPEGs and
            they are decoded a batch at a time on this device (nvJPEG on CUDA; ``jpeg_batches.py``), so batches arrive
            there already decoded. ``None``: workers decode everything.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        batch_size: int,
        shuffle: bool,
        *,
        seed: int = 0,
        workers: int | None = None,
        cache: str = "auto",
        drop_last: bool = False,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sampler: str = "shuffle",
        decode_device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        if cache not in ("auto", "ram", "none"):
            raise UsageError(f"cache must be one of {{auto, ram, none}}. Received: cache={cache!r}.")
        if sampler not in SAMPLERS:
            raise UsageError(f"sampler must be one of {{{', '.join(SAMPLERS)}}}. Received: sampler={sampler!r}.")
        self.transform = transform
        self.sampler = sampler
        # Per-image transforms need decoded images in the workers, so they keep host decoding.
        self.decode_device = torch.device(decode_device) if decode_device is not None and transform is None else None
        self.samples = list(samples)
        self._pairs = [(str(s.path), s.label) for s in self.samples]
        self.image_size = image_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.workers = default_workers() if workers is None else workers
        self.pin_memory = pin_memory
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped: list[tuple[str, str]] = []
        # JPEGs the batch decoder handed to the host decoder, by reason: the run reports them at its end.
        self.fallbacks = Fallbacks()
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        nbytes = len(self.samples) * 3 * image_size * image_size
        if cache == "ram" or (cache == "auto" and nbytes <= RAM_CACHE_LIMIT):
            self._decode_all(progress)

    def _loader(self, batches: list[list[int]], transform: Callable | None = None, raw: bool = False) -> DataLoader:
        return DataLoader(
            ImageFiles(self._pairs, partial(read_jpeg if raw else decode, image_size=self.image_size), transform),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate_mixed if raw else collate,
            generator=self.generator,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def _surviving(
        self, batches: list[list[int]], transform: Callable | None = None, raw: bool = False
    ) -> Iterator[tuple[bool, tuple]]:
        """``loading.surviving`` over this dataset's loader; a batch decoded in isolation is collated, transformed."""

        def isolated(indices: list[int]) -> tuple:
            read = partial(decode, image_size=self.image_size)
            rows = isolated_rows([self._pairs[i] for i in indices], read, self.workers)
            if transform is not None:
                rows = [(transform(image) if image is not None else None, *rest) for image, *rest in rows]
            return collate(rows)

        return surviving(lambda todo: self._loader(todo, transform, raw=raw), batches, self.workers, isolated)

    def _decode_all(self, progress: bool = False) -> None:
        images, labels = [], []
        chunks = [list(range(i, min(i + 256, len(self.samples)))) for i in range(0, len(self.samples), 256)]
        with tqdm(total=len(self.samples), desc="decode", unit="img", leave=False, disable=not progress) as bar:
            for _, (batch_images, batch_labels, bad) in self._surviving(chunks):
                if not len(batch_labels):
                    batch_images = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
                images.append(batch_images)
                labels.append(batch_labels)
                self._record(bad)
                bar.update(len(batch_labels) + len(bad))
        self.images = torch.cat(images) if images else torch.empty(0, 3, self.image_size, self.image_size)
        self.labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)

    def _record(self, bad: list[tuple[str, str]]) -> None:
        for path, reason in bad:
            if (path, reason) not in self.skipped:
                log.warning("skipping %s: %s", path, reason)
                self.skipped.append((path, reason))

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def num_images(self) -> int:
        return len(self.images) if self.images is not None else len(self.samples)

    def _shard(self, order: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return order
        if self.drop_last:
            order = order[: len(order) - len(order) % self.world_size]
        return order[self.rank :: self.world_size]

    def _drops_last(self, n: int) -> bool:
        return self.drop_last and n > self.batch_size

    def __len__(self) -> int:
        n = len(self._shard(torch.arange(self.num_images)))
        return n // self.batch_size if self._drops_last(n) else -(-n // self.batch_size)

    def _epoch_order(self) -> torch.Tensor:
        n = self.num_images
        if not self.shuffle:
            return torch.arange(n)
        if self.sampler == "balanced":
            labels = self.labels if self.labels is not None else torch.tensor([s.label for s in self.samples])
            return torch.multinomial(balanced_weights(labels), n, replacement=True, generator=self.generator)
        return torch.randperm(n, generator=self.generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip = self._begin_epoch()
        order = self._shard(self._epoch_order())
        stop = len(order) - len(order) % self.batch_size if self._drops_last(len(order)) else len(order)
        starts = range(skip * self.batch_size, stop, self.batch_size)
        if self.images is not None:
            for start in starts:
                index = order[start : start + self.batch_size]
                images, labels = self.images[index], self.labels[index]
                if self.transform is not None:
                    images = torch.stack([self.transform(image) for image in images])
                self.position += 1
                yield (images.pin_memory(), labels.pin_memory()) if self.pin_memory else (images, labels)
        else:
            batches = [order[start : start + self.batch_size].tolist() for start in starts]
            raw = self.decode_device is not None
            for isolated, (images, labels, bad, *paths) in self._surviving(batches, self.transform, raw=raw):
                self._record(bad)
                if raw and not isolated:
                    images, labels, bad = assemble(
                        images, labels, paths[0], self.image_size, self.decode_device, self.fallbacks
                    )
                    self._record(bad)
                elif raw:  # decoded on the host, file by file, after a loader worker died
                    images = images.to(self.decode_device)
                self.position += 1
                if len(labels):
                    yield images, labels
                elif self.world_size > 1:
                    # Every file of this process's batch was bad. The batch is still handed out (empty): under DDP
                    # every process must take the same number of steps, or the others wait forever in an all-reduce.
                    size = self.image_size
                    yield torch.empty(0, 3, size, size, dtype=torch.uint8, device=images.device), labels[:0]
        self._end_epoch()
