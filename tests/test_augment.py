from __future__ import annotations

import torch

from vgg.augment import AugmentConfig, augment_batch


def _batch(n=64):
    return torch.rand(n, 3, 16, 16)


def test_disabled_is_identity():
    images = _batch()
    config = AugmentConfig(shift=0, hflip=False)
    assert augment_batch(images, config) is images


def test_flips_are_exact_and_per_image():
    images = _batch()
    out = augment_batch(images, AugmentConfig(shift=0, hflip=True), torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def _shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[:, max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = image[
        :, max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)
    ]
    return out


def test_shifts_move_whole_pixels_without_blur():
    images = _batch(16)
    out = augment_batch(images, AugmentConfig(shift=0.25, hflip=False), torch.Generator().manual_seed(1))
    moved = 0
    for o, i in zip(out, images, strict=True):
        # each output is its input shifted by whole pixels, zero-filled: no interpolation blur
        matches = [
            (dx, dy) for dx in range(-4, 5) for dy in range(-4, 5) if torch.allclose(o, _shifted(i, dx, dy), atol=1e-4)
        ]
        assert len(matches) == 1
        moved += matches[0] != (0, 0)
    assert moved >= 12


def test_rotation_zoom_shear_and_brightness_change_images_and_keep_range():
    images = _batch()
    config = AugmentConfig(rotation=30, zoom=0.2, shear=10, shift=0.1, vflip=True, brightness=0.3)
    out = augment_batch(images, config)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, images)
