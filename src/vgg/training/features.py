"""Training a head on a frozen backbone: its features are computed once and cached, not every epoch.

With the backbone frozen and no augmentation, every epoch would push the same images through the same
convolutions; their pooled features are then computed once and later epochs train only the classifier.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..batches import RAM_CACHE_LIMIT, Batches, Resumable
from ..inference import Step
from ..models import VGG
from ..runtime import autocast
from .config import TrainConfig


class FeatureStep(Step):
    """Cached features are already model inputs: no normalisation, augmentation or image layout."""

    def inputs(self, images: torch.Tensor, transform: object = None) -> torch.Tensor:
        return images.to(self.device, non_blocking=True)


class CachedFeatures(Resumable):
    """Batches of precomputed features, drawn in exactly the order the image batches would have been.

    Sharing the image batches' generator keeps a cached run identical to an uncached one with the same seed.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, like: Batches) -> None:
        self.features, self.labels = features, labels
        self.batch_size, self.shuffle, self.generator = like.batch_size, like.shuffle, like.generator
        self.drop_last = like.drop_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip = self._begin_epoch()
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(skip * self.batch_size, stop, self.batch_size):
            index = order[start : start + self.batch_size]
            self.position += 1
            yield self.features[index], self.labels[index]
        self._end_epoch()


@torch.no_grad()  # not inference_mode: the head trains on these tensors, and autograd must be able to save them
def extract_features(model: VGG, batches: Batches, step: Step, progress: bool = False) -> CachedFeatures:
    """Run every image of ``batches`` through the frozen trunk once, in sample order."""
    model.eval()
    if batches.in_memory:
        source = ((batches.images[i : i + 64], batches.labels[i : i + 64]) for i in range(0, batches.num_images, 64))
        total = -(-batches.num_images // 64)
    else:
        # A separate reader: iterating ``batches`` itself would draw from the generator that orders training.
        reader = Batches(batches.samples, batches.image_size, 64, shuffle=False, workers=batches.workers, cache="none")
        source, total = reader, len(reader)
    features, labels = [], []
    for images, targets in tqdm(source, total=total, desc="features", leave=False, disable=not progress):
        with autocast(step.device, step.precision):
            out = model.forward_features(step.inputs(images))
        features.append(out.float().cpu())
        labels.append(targets)
    if not batches.in_memory:
        batches.skipped.extend(s for s in reader.skipped if s not in batches.skipped)
    return CachedFeatures(torch.cat(features), torch.cat(labels), batches)


def cache_blocker(config: TrainConfig) -> str | None:
    """Why the backbone's features cannot be cached in this run, or None when they can."""
    if config.freeze != "features":
        return "the features are not frozen"
    if config.unfreeze_at is not None:
        return "the features are unfrozen later (--unfreeze-at)"
    if config.augment.enabled:
        return "augmentation is on (turn it off with --shift 0 --no-hflip and the other augmentation flags at 0)"
    if config.augment.beyond_batch or config.sampler != "shuffle":
        return "a per-image augmentation policy, MixUp/CutMix or --sampler balanced is on"
    if not config.cache_features:
        return "--no-cache-features was given"
    if config.ema:
        return "--ema averages the whole model"
    if config.tta:
        return "--tta validates on mirrored images, not on their cached features"
    return None


def cached_fit_inputs(
    model: VGG,
    train_batches: Batches,
    val_batches: Batches,
    step: Step,
    config: TrainConfig,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> tuple[nn.Module, CachedFeatures, CachedFeatures, Step] | None:
    """(head, cached training features, cached validation features, step) for ``fit``, or None to train as usual."""
    blocker = cache_blocker(config)
    if blocker is not None:
        if config.freeze == "features":
            log(f"features are not cached: {blocker}")
        return None
    width = model.classifier[0].in_features
    nbytes = (train_batches.num_images + val_batches.num_images) * width * 4
    if nbytes > RAM_CACHE_LIMIT:
        log(f"features are not cached: they would take {nbytes / 1024**3:.1f} GB of memory")
        return None
    start = time.perf_counter()
    train = extract_features(model, train_batches, step, progress)
    val = extract_features(model, val_batches, step, progress)
    log(f"features cached: {len(train.labels)} + {len(val.labels)} images in {time.perf_counter() - start:.1f} s "
        f"({nbytes / 1024**2:.0f} MB); later epochs train only the classifier")  # fmt: skip
    feature_step = FeatureStep(step.device, step.precision, step.mean, step.std, memory_format=torch.contiguous_format)
    return model.classifier, train, val, feature_step
