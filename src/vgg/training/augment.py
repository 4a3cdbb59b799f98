"""Augmentation of whole batches, with different random parameters for every image.

The tutorial's ImageDataGenerator options (rotation, width/height shift, zoom, shear, flips, brightness) are one
affine warp per image, so a batch is warped by one ``grid_sample`` call. This runs where the batch already is
(the GPU, or the training process on CPU): on 2 cores, per-image transforms in loader workers would take the
cores the model needs. torchvision's v2 transforms draw one set of parameters per call, i.e. per batch.

Random erasing (Zhong et al., 2017) is part of the batch warp too: one rectangle of zeros per chosen image, drawn
as torchvision's ``RandomErasing`` draws it, so it needs no per-image step and keeps the loaders' fast paths.
The presets add torchvision's per-image policies (RandAugment, TrivialAugmentWide), run on uint8 images before
batching (``image_transform``), and MixUp / CutMix, which mix whole batches and their labels (``batch_mixer``);
the loss then takes soft targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .settings import check_settings, setting

POLICIES = ("none", "basic", "randaugment", "trivialaugment")

# Random erasing's rectangle: this share of the image's area, at an aspect ratio (height / width) drawn
# log-uniformly from this range (torchvision's RandomErasing defaults).
ERASE_AREA = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


@dataclass
class AugmentConfig:
    """Random transformations applied to training images (never to validation or prediction).

    ``policy`` ``none`` turns all of them off whatever the other settings; ``basic`` is the ImageDataGenerator-like
    options; ``randaugment`` and ``trivialaugment`` add torchvision's per-image policy before them. With both MixUp
    and CutMix on, each batch uses one of them.
    """

    rotation: float = setting(0.0, "max rotation in degrees", low=0)
    # Off by default: 4-pixel shifts at 32 px cost 4-7 points of test accuracy after 2 epochs on Fashion-MNIST,
    # while flips cost nothing (benchmarks/RESULTS.md, "Recipe search at a small budget").
    shift: float = setting(0.0, "max shift as a fraction of the side", low=0, high=1)
    zoom: float = setting(0.0, "zoom range: scale drawn in [1-zoom, 1+zoom]", low=0, high=1)
    shear: float = setting(0.0, "max shear in degrees", low=0)
    hflip: bool = setting(True, "random left-right flips")
    vflip: bool = setting(False, "random upside-down flips")
    brightness: float = setting(0.0, "brightness factor drawn in [1-b, 1+b]", low=0, high=1)
    policy: Literal["none", "basic", "randaugment", "trivialaugment"] = setting(
        "basic", "augmentation preset: basic is the options above, none turns them all off", flag="augment"
    )
    mixup: float = setting(0.0, "MixUp alpha (e.g. 0.2); 0 is off")
    cutmix: float = setting(0.0, "CutMix alpha (e.g. 1.0); 0 is off")
    erasing: float = setting(0.0, "random erasing probability per image")

    def validate(self) -> AugmentConfig:
        if self.policy not in POLICIES:
            raise UsageError(f"augment must be one of {{{', '.join(POLICIES)}}}. Received: augment={self.policy!r}.")
        check_settings(self)  # types before ranges: a hand-edited config.json may hold a table where a number belongs
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be 0 (off) or a positive alpha. Received: {name}={getattr(self, name)}.")
        if not 0 <= self.erasing <= 1:
            raise UsageError(f"erasing must be a probability in [0, 1]. Received: erasing={self.erasing}.")
        return self

    @property
    def geometric(self) -> bool:
        return self.policy != "none" and any((self.rotation, self.shift, self.zoom, self.shear))

    @property
    def beyond_batch(self) -> bool:
        """Whether a per-image policy or MixUp/CutMix is on (the presets beyond ``basic``)."""
        if self.policy == "none":
            return False
        return self.policy != "basic" or bool(self.mixup or self.cutmix)

    @property
    def enabled(self) -> bool:
        """Whether ``augment_batch`` changes images."""
        if self.policy == "none":
            return False
        return self.geometric or self.hflip or self.vflip or bool(self.brightness or self.erasing)


def image_transform(config: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The per-image policy of ``config`` for uint8 3 x H x W tensors, or ``None`` when there is none."""
    from torchvision.transforms import v2

    if config.policy == "randaugment":
        return v2.RandAugment()
    if config.policy == "trivialaugment":
        return v2.TrivialAugmentWide()
    return None


def batch_mixer(
    config: AugmentConfig, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp and/or CutMix of a float batch and its labels, giving soft targets; ``None`` when both are off."""
    from torchvision.transforms import v2

    if config.policy == "none":
        return None
    mixers = []
    if config.mixup:
        mixers.append(v2.MixUp(alpha=config.mixup, num_classes=num_classes))
    if config.cutmix:
        mixers.append(v2.CutMix(alpha=config.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def _between(n: int, low: float, high: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` values drawn uniformly from [low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _uniform(n: int, bound: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` values drawn uniformly from [-bound, bound)."""
    return _between(n, -bound, bound, device, generator)


def _signs(n: int, enabled: bool, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    if not enabled:
        return torch.ones(n, device=device)
    return torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)


def augment_batch(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Randomly transform a float batch N x C x H x W with values in [0, 1]; returns a new batch.

    Areas uncovered by a warp are filled with black (0), as a zero-padded random crop would be; random erasing
    comes last, so its rectangle is black too.
    """
    if not config.enabled:
        return images
    n, _, height, width = images.shape
    device = images.device
    flip_x = _signs(n, config.hflip, device, generator)
    flip_y = _signs(n, config.vflip, device, generator)
    if config.geometric:
        angle = _uniform(n, math.radians(config.rotation), device, generator)
        shear = _uniform(n, math.radians(config.shear), device, generator)
        scale = 1 + _uniform(n, config.zoom, device, generator)
        # Whole-pixel shifts keep a pure shift exact (no interpolation blur), like a padded random crop.
        shift_x = torch.round(_uniform(n, config.shift * width, device, generator)) * 2 / width
        shift_y = torch.round(_uniform(n, config.shift * height, device, generator)) * 2 / height
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        # theta maps output coordinates to input coordinates: rotate, shear, then zoom (scale > 1 zooms in), flip.
        theta = torch.stack(
            [
                torch.stack([cos * flip_x / scale, (cos * tan - sin) * flip_y / scale, shift_x], dim=1),
                torch.stack([sin * flip_x / scale, (sin * tan + cos) * flip_y / scale, shift_y], dim=1),
            ],
            dim=1,
        ).to(images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    else:
        images = torch.where((flip_x < 0).view(-1, 1, 1, 1), images.flip(-1), images)
        images = torch.where((flip_y < 0).view(-1, 1, 1, 1), images.flip(-2), images)
    if config.brightness:
        factor = 1 + _uniform(n, config.brightness, device, generator)
        images = (images * factor.view(-1, 1, 1, 1).to(images.dtype)).clamp_(0, 1)
    if config.erasing:
        images = erase(images, config.erasing, generator)
    return images


def erase(images: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random erasing: each image of N x C x H x W, with ``probability``, gets one rectangle set to 0.

    The rectangle covers a share of the area drawn from ``ERASE_AREA`` at an aspect ratio drawn log-uniformly from
    ``ERASE_RATIO``, clipped to the image (where torchvision's ``RandomErasing`` draws again, up to 10 times, and
    then leaves the image alone), at a uniformly drawn position where it fits.
    """
    n, _, height, width = images.shape
    device = images.device

    area = _between(n, *ERASE_AREA, device, generator) * height * width
    ratio = torch.exp(_between(n, math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), device, generator))
    rect_h = torch.sqrt(area * ratio).round().clamp(1, height)
    rect_w = torch.sqrt(area / ratio).round().clamp(1, width)
    top = torch.floor(_between(n, 0, 1, device, generator) * (height - rect_h + 1))
    left = torch.floor(_between(n, 0, 1, device, generator) * (width - rect_w + 1))
    chosen = (_between(n, 0, 1, device, generator) < probability).view(-1, 1, 1)
    rows = torch.arange(height, device=device).view(1, -1, 1) - top.view(-1, 1, 1)
    cols = torch.arange(width, device=device).view(1, 1, -1) - left.view(-1, 1, 1)
    inside = (rows >= 0) & (rows < rect_h.view(-1, 1, 1)) & (cols >= 0) & (cols < rect_w.view(-1, 1, 1))
    return images.masked_fill((inside & chosen).unsqueeze(1), 0)
