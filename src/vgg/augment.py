"""Augmentation of whole batches, with different random parameters for every image.

The tutorial's ImageDataGenerator options (rotation, width/height shift, zoom, shear, flips, brightness) are one
affine warp per image, so a batch is warped by one ``grid_sample`` call. This runs where the batch already is
(the GPU, or the training process on CPU): on 2 cores, per-image transforms in loader workers would take the
cores the model needs. torchvision's v2 transforms draw one set of parameters per call, i.e. per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Random transformations applied to training images (never to validation or prediction).

    Attributes:
        rotation: maximum rotation in degrees (uniform in [-rotation, rotation]).
        shift: maximum shift as a fraction of the side, horizontally and vertically (rounded to whole pixels).
        zoom: zoom range: scale drawn uniformly in [1 - zoom, 1 + zoom].
        shear: maximum shear angle in degrees.
        hflip: flip left-right with probability 1/2.
        vflip: flip upside down with probability 1/2.
        brightness: brightness factor drawn in [1 - brightness, 1 + brightness].
    """

    rotation: float = 0.0
    shift: float = 0.125
    zoom: float = 0.0
    shear: float = 0.0
    hflip: bool = True
    vflip: bool = False
    brightness: float = 0.0

    @property
    def geometric(self) -> bool:
        return any((self.rotation, self.shift, self.zoom, self.shear))

    @property
    def enabled(self) -> bool:
        return self.geometric or self.hflip or self.vflip or bool(self.brightness)


def _uniform(n: int, bound: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=device) * 2 - 1) * bound


def _signs(n: int, enabled: bool, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    if not enabled:
        return torch.ones(n, device=device)
    return torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)


def augment_batch(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Randomly transform a float batch N x C x H x W with values in [0, 1]; returns a new batch.

    Areas uncovered by a warp are filled with black (0), as a zero-padded random crop would be.
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
    return images
