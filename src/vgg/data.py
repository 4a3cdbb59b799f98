"""Image folders: scanning, checking, splitting, decoding and batching.

A dataset is a folder with one subfolder per class (``data/cat/*.jpg``, ``data/dog/*.jpg``); labels are the
sorted folder names. Images are decoded once to ``image_size`` x ``image_size`` uint8 tensors (squashed, as the
tutorial's ``target_size`` does) and either kept in memory, when they fit, or decoded again by loader workers.
Augmentation happens on whole batches (see ``augment.py``), so both paths feed the model the same way.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from .errors import UsageError

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they remain the fastest decoders in our stack.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images bigger than this are refused rather than decoded (decompression bombs); Pillow warns at 89 Mpx.
MAX_PIXELS = 89_478_485
# Decoded datasets up to this size stay in memory as uint8 (60,000 images at 32 px take 184 MB).
RAM_CACHE_LIMIT = 4 * 1024**3


@dataclass
class Sample:
    path: Path
    label: int


@dataclass
class ImageFolder:
    """The result of scanning a class-per-folder dataset."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counter = Counter(s.label for s in self.samples)
        return {name: counter.get(i, 0) for i, name in enumerate(self.classes)}


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in IGNORED_NAMES


def _image_files(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for name in sorted(filenames):
            if _visible(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


def scan_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageFolder:
    """Index ``root/<class>/**/<image>``.

    Args:
        root: the dataset folder.
        classes: the class names to expect (a validation folder must have the training classes); by default
            the sorted names of the visible subfolders.

    Raises:
        UsageError: the folder is missing, has fewer than two classes, or a class has no images.
    """
    root = Path(root)
    if not root.is_dir():
        what = "a file" if root.exists() else "nothing"
        raise UsageError(
            f"Data folder not found: {root} is {what}. Expected a folder with one subfolder per class: "
            f"{root}/<class>/<image>."
        )
    entries = [e for e in os.scandir(root) if _visible(e.name)]
    found = sorted(e.name for e in entries if e.is_dir())
    if not found:
        files = sum(1 for e in entries if e.is_file())
        raise UsageError(
            f"No class folders in {root}/: expected {root}/<class>/<image>. Found {files} files and 0 folders."
        )
    if classes is None:
        if len(found) < 2:
            raise UsageError(
                f"Only one class in {root}/ ({found[0]!r}): expected at least 2 class folders, "
                f"e.g. {root}/cat/ and {root}/dog/."
            )
        classes = found
    else:
        classes = list(classes)
        if sorted(found) != sorted(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise UsageError(
                f"Classes in {root}/ differ from the training classes: missing {missing}, unexpected {extra}."
            )
    samples = [Sample(path, label) for label, name in enumerate(classes) for path in _image_files(root / name)]
    empty = [name for label, name in enumerate(classes) if not any(s.label == label for s in samples)]
    if empty:
        raise UsageError(
            f"Class folder {root / empty[0]}/ has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    return ImageFolder(root, list(classes), samples)


def stratified_split(
    folder: ImageFolder, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split each class separately so train and validation keep the class proportions; seeded, reproducible."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"val_fraction must be between 0 and 1. Received: {val_fraction}.")
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label, name in enumerate(folder.classes):
        members = [s for s in folder.samples if s.label == label]
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            raise UsageError(
                f"Class {name!r} has only 1 image: a validation split needs at least 2 per class "
                "(add images or pass --val VAL_DIR)."
            )
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return train, val


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


def _decode_pil(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"image too large ({im.width}x{im.height} px, limit {MAX_PIXELS:,} px)")
        im = ImageOps.exif_transpose(im)
        if im.mode in ("P", "LA", "RGBA", "PA") or "transparency" in im.info:
            im = im.convert("RGBA").convert("RGB")
        im = im.convert("RGB")
        return TF.pil_to_tensor(im)


def decode(path: str | Path, image_size: int | None = None) -> torch.Tensor:
    """Read an image file as a 3 x H x W uint8 RGB tensor, EXIF orientation applied, optionally squashed to a square.

    torchvision's native decoders are tried first (faster); Pillow handles what they cannot (CMYK, 16-bit, ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a decodable image, or is too large.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image not found: {path}. Expected an image file (jpg, png, ...).")
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        if image.shape[-1] * image.shape[-2] > MAX_PIXELS:
            raise ValueError(f"image too large ({image.shape[-1]}x{image.shape[-2]} px, limit {MAX_PIXELS:,} px)")
    except (RuntimeError, ValueError) as native_error:
        if "too large" in str(native_error):
            raise
        try:
            image = _decode_pil(path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"not a decodable image ({error})") from error
    if image_size is not None and tuple(image.shape[-2:]) != (image_size, image_size):
        image = TF.resize(image, [image_size, image_size], antialias=True)
    return image


class DecodedImages(Dataset):
    """Decodes samples on access; a bad file yields ``None`` with its reason instead of raising."""

    def __init__(self, samples: Sequence[Sample], image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str, str]:
        sample = self.samples[index]
        try:
            return decode(sample.path, self.image_size), sample.label, str(sample.path), ""
        except (OSError, ValueError) as error:
            return None, sample.label, str(sample.path), str(error)


def _collate(items: list[tuple[torch.Tensor | None, int, str, str]]) -> tuple[torch.Tensor, torch.Tensor, list]:
    good = [(image, label) for image, label, _, _ in items if image is not None]
    bad = [(path, reason) for image, _, path, reason in items if image is None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([image for image, _ in good])
    return images, torch.tensor([label for _, label in good]), bad


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)))


class Batches:
    """Iterable of ``(uint8 images N x 3 x S x S, labels)`` batches, from memory or from disk.

    Small datasets are decoded once (in parallel) and kept in memory; larger ones are decoded by loader workers
    every epoch. Files that fail to decode are skipped and listed in ``skipped`` (path, reason), never fatal.

    Both paths draw each epoch's order from ``generator``. With ``world_size`` > 1 (torchrun), every process
    draws the same order and takes every ``world_size``-th image of it, so the shards are disjoint and, with
    ``drop_last``, equally long (DDP needs every process to take the same number of steps).
    ``state_dict()`` / ``load_state_dict()`` save and restore where the shuffling stands, mid-epoch included.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        workers: int | None = None,
        cache: str = "auto",
        drop_last: bool = False,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if cache not in ("auto", "ram", "none"):
            raise UsageError(f"cache must be one of {{auto, ram, none}}. Received: cache={cache!r}.")
        self.samples = list(samples)
        self.image_size = image_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.workers = default_workers() if workers is None else workers
        self.pin_memory = pin_memory
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped: list[tuple[str, str]] = []
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        # Batches handed out in the current epoch, and the generator state its order was drawn from.
        self.position = 0
        self._epoch_state = self.generator.get_state()
        self._resume_at = 0
        nbytes = len(self.samples) * 3 * image_size * image_size
        if cache == "ram" or (cache == "auto" and nbytes <= RAM_CACHE_LIMIT):
            self._decode_all()

    def _loader(self, batches: list[list[int]]) -> DataLoader:
        return DataLoader(
            DecodedImages(self.samples, self.image_size),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            generator=self.generator,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    def _decode_all(self) -> None:
        images, labels = [], []
        chunks = [list(range(i, min(i + 256, len(self.samples)))) for i in range(0, len(self.samples), 256)]
        for batch_images, batch_labels, bad in self._loader(chunks):
            images.append(batch_images)
            labels.append(batch_labels)
            self._record(bad)
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

    def state_dict(self) -> dict[str, Any]:
        """Where the shuffling stands: mid-epoch, the state this epoch's order came from and how far it got."""
        generator = self._epoch_state if self.position else self.generator.get_state()
        return {"generator": generator.clone(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration replays the saved epoch's order and skips the batches already handed out."""
        self.generator.set_state(state["generator"])
        self._resume_at = int(state["position"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._epoch_state = self.generator.get_state()
        n = self.num_images
        order = self._shard(torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n))
        stop = len(order) - len(order) % self.batch_size if self._drops_last(len(order)) else len(order)
        starts = range(self._resume_at * self.batch_size, stop, self.batch_size)
        self.position, self._resume_at = self._resume_at, 0
        if self.images is not None:
            for start in starts:
                index = order[start : start + self.batch_size]
                images, labels = self.images[index], self.labels[index]
                self.position += 1
                yield (images.pin_memory(), labels.pin_memory()) if self.pin_memory else (images, labels)
        else:
            batches = [order[start : start + self.batch_size].tolist() for start in starts]
            for images, labels, bad in self._loader(batches):
                self._record(bad)
                self.position += 1
                if len(labels):
                    yield images, labels
        self.position = 0


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float32 (channels-last friendly, no copy of the layout)."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s
