"""The images of a run: scanning and splitting the dataset, batching it (sharded under DDP), and what it holds per
class (usable counts, balance, loss weights)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batches import Batches, class_weights, limit_per_class
from ..distributed import World
from ..errors import UsageError
from ..scan import Sample, scan_folder
from ..splits import read_split, stratified_split
from .augment import image_transform
from .config import TrainConfig
from .state import SavedRun


@dataclass
class Data:
    """The images of a run: class names, training and validation samples, files skipped while scanning."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]]


def imbalance_line(counts: dict[str, int], config: TrainConfig) -> str:
    """One line on class balance: the largest/smallest ratio and what this run does about it."""
    largest = max(counts, key=counts.__getitem__)
    smallest = min(counts, key=counts.__getitem__)
    ratio = counts[largest] / max(1, counts[smallest])
    remedy = []
    if config.class_weight == "auto":
        remedy.append("class-weighted loss")
    if config.sampler == "balanced":
        remedy.append("balanced sampling")
    if counts[largest] == counts[smallest]:
        return f"classes are balanced ({counts[largest]} images each)"
    line = f"imbalance: {ratio:.1f}x ({largest}: {counts[largest]}, {smallest}: {counts[smallest]})"
    if remedy:
        return line + "; using " + " and ".join(remedy)
    if ratio >= 3:
        return line + "; consider --class-weight auto or --sampler balanced"
    return line


def loss_weights(
    config: TrainConfig, data: Data, counts: dict[str, int], log: Callable[[str], None]
) -> torch.Tensor | None:
    """``--class-weight auto``: loss weights inversely proportional to the usable images per class."""
    if config.class_weight != "auto":
        return None
    labels = torch.arange(len(data.classes)).repeat_interleave(torch.tensor(list(counts.values())))
    weights = class_weights(labels, len(data.classes))
    log("class weights: " + ", ".join(f"{n}: {w:.2f}" for n, w in zip(data.classes, weights.tolist(), strict=True)))
    return weights


def data_line(
    config: TrainConfig, data: Data, counts: dict[str, int], batches: Batches, device: torch.device, precision: str,
    world: World,
) -> str:  # fmt: skip
    return (
        f"classes: {len(data.classes)} ({', '.join(f'{n}: {c}' for n, c in counts.items())})\n"
        f"{imbalance_line(counts, config)}\n"
        f"train: {len(data.train)} images ({'in memory' if batches.in_memory else 'streamed'}), "
        f"validation: {len(data.val)} images, device: {device}, precision: {precision}"
        + (f", {world.world_size} processes" if world.distributed else "")
    )


def read_data(config: TrainConfig, saved: SavedRun | None = None, log: Callable[[str], None] = print) -> Data:
    """Scan the dataset and split it: ``--val`` folder, ``--split`` file, or a seeded stratified split.

    A resumed run (``saved``) reads its own RUN_DIR/split.csv: images added since it started are left out (a new
    split would move validation images into training), and a dataset that moved is followed (``--data``).
    """
    folder = scan_folder(config.data)
    skipped = list(folder.skipped)
    if saved is not None:
        if folder.classes != saved.class_names:
            raise UsageError(
                f"Cannot resume {config.out}: {config.data} has classes {folder.classes} but the run was trained on "
                f"{saved.class_names}. Resume with the run's data, or start a new run with another --out."
            )
        train_samples, val_samples = read_split(Path(config.out) / "split.csv", folder.classes, _moved(config, saved))
        if config.val:
            skipped += scan_folder(config.val, classes=folder.classes).skipped
        listed = {str(s.path) for s in (*train_samples, *val_samples)}
        new = sum(1 for s in folder.samples if str(s.path) not in listed)
        if new:
            log(f"{new} images in {config.data} are not in the run's split.csv: the resumed run leaves them out")
    elif config.val:
        train_samples = folder.samples
        val_folder = scan_folder(config.val, classes=folder.classes)
        val_samples = val_folder.samples
        skipped += val_folder.skipped
        _warn_shared(config, train_samples, val_samples, log)
    elif config.split:
        train_samples, val_samples = read_split(config.split, folder.classes)
    else:
        train_samples, val_samples = stratified_split(folder, config.val_fraction, config.seed)
    if config.max_per_class:
        train_samples = limit_per_class(train_samples, config.max_per_class, config.seed)
        val_samples = limit_per_class(val_samples, max(1, round(config.max_per_class * config.val_fraction)))
    return Data(folder.classes, train_samples, val_samples, skipped)


def _warn_shared(config: TrainConfig, train: list[Sample], val: list[Sample], log: Callable[[str], None]) -> None:
    """A --val folder that holds training files (the same folder, or links to the same files) makes validation
    accuracy training accuracy: say so, since the run itself cannot tell."""
    training_files = {os.path.realpath(s.path) for s in train}
    shared = sum(1 for s in val if os.path.realpath(s.path) in training_files)
    if shared:
        log(
            f"warning: {shared} of the {len(val)} validation images in {config.val} are training images too (the "
            f"same files), so validation accuracy will overstate the model; `vgg doctor {config.data} --val "
            f"{config.val}` also finds copies by content"
        )


def _moved(config: TrainConfig, saved: SavedRun) -> dict[str, str]:
    """Old data folder -> new one, when a resume names another folder than the run was started with."""
    moved = {}
    for key in ("data", "val"):
        old, new = saved.settings.get(key), getattr(config, key)
        if isinstance(old, str) and old and new and Path(old) != Path(new):
            moved[str(Path(old))] = str(Path(new))
    return moved


def make_batches(
    config: TrainConfig, data: Data, device: torch.device, world: World, progress: bool = False
) -> tuple[Batches, Batches]:
    """Training batches (shuffled, augmented per image if asked) and validation batches, sharded under DDP.

    ``progress``: a bar over the one-time decoding pass of datasets small enough to keep in memory.
    """
    pin = device.type == "cuda"
    decode_device = device if config.decode == "device" or (config.decode == "auto" and device.type == "cuda") else None
    common = dict(
        workers=config.workers, cache=config.cache, pin_memory=pin, rank=world.rank, world_size=world.world_size,
        decode_device=decode_device, progress=progress,
    )  # fmt: skip
    train_batches = Batches(
        data.train, config.image_size, config.batch_size, shuffle=True, seed=config.seed, drop_last=True,
        transform=image_transform(config.augment), sampler=config.sampler, **common,
    )  # fmt: skip
    val_batches = Batches(data.val, config.image_size, max(config.batch_size, 128), shuffle=False, **common)
    return train_batches, val_batches


def usable_counts(data: Data, train_batches: Batches, config: TrainConfig) -> dict[str, int]:
    """Training images per class; what decoded, not what was listed, when they are in memory.

    Raises:
        UsageError: a class has no readable training image (it could not be learned).
    """
    counts = {name: sum(1 for s in data.train if s.label == i) for i, name in enumerate(data.classes)}
    if train_batches.in_memory:
        decoded = torch.bincount(train_batches.labels, minlength=len(data.classes)).tolist()
        counts = dict(zip(data.classes, decoded, strict=True))
    unusable = [name for name, n in counts.items() if n == 0]
    if unusable:
        raise UsageError(
            f"Class {unusable[0]!r} has no usable training images: every file failed to decode (see the warnings "
            f"above). Expected at least one readable image per class in {config.data}/{unusable[0]}/."
        )
    return counts
