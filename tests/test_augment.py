from __future__ import annotations

import math

import pytest
import torch

from vgg.training.augment import AugmentConfig, augment_batch, batch_mixer, image_transform


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


def test_none_preset_turns_every_augmentation_off():
    config = AugmentConfig(policy="none", rotation=30, hflip=True, mixup=0.2, erasing=0.5)
    images = _batch()
    assert augment_batch(images, config) is images
    assert image_transform(config) is None and batch_mixer(config, 3) is None


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_policies_change_uint8_images_one_by_one(policy: str):
    transform = image_transform(AugmentConfig(policy=policy))
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    out = torch.stack([transform(image) for image in images])
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert sum(not torch.equal(o, i) for o, i in zip(out, images, strict=True)) > 16
    assert image_transform(AugmentConfig(policy="basic")) is None


def test_random_erasing_blacks_out_one_rectangle_per_chosen_image():
    images = torch.rand(400, 3, 32, 32) * 0.5 + 0.5  # nothing is 0 before erasing
    generator = torch.Generator().manual_seed(3)
    out = augment_batch(images, AugmentConfig(hflip=False, erasing=0.5), generator)
    zero = (out == 0).all(1)  # every channel of an erased pixel
    assert torch.equal(out[~zero.unsqueeze(1).expand_as(out)], images[~zero.unsqueeze(1).expand_as(out)])
    erased = zero.flatten(1).any(1)
    assert 160 < erased.sum() < 240  # about half of 400
    for mask in zero[erased]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width  # one solid rectangle
        assert mask.sum() == height * width
        assert 0.02 * 1024 * 0.5 <= height * width <= 0.33 * 1024 * 1.5
    # The same generator state erases the same rectangles (a resumed run repeats its augmentation).
    again = augment_batch(images, AugmentConfig(hflip=False, erasing=0.5), torch.Generator().manual_seed(3))
    assert torch.equal(again, out)
    assert augment_batch(images, AugmentConfig(hflip=False, erasing=1.0)).eq(0).all(1).flatten(1).any(1).all()
    assert image_transform(AugmentConfig(erasing=1.0)) is None  # no per-image step: the loaders keep their fast paths


def test_mixup_and_cutmix_give_soft_targets_the_loss_accepts():
    images = _batch(16)
    labels = torch.arange(16) % 4
    for config in (AugmentConfig(mixup=0.4), AugmentConfig(cutmix=1.0), AugmentConfig(mixup=0.2, cutmix=1.0)):
        mixed, targets = batch_mixer(config, 4)(images, labels)
        assert mixed.shape == images.shape and targets.shape == (16, 4)
        assert torch.allclose(targets.sum(1), torch.ones(16))
        assert not torch.equal(mixed, images)
        loss = torch.nn.functional.cross_entropy(torch.zeros(16, 4), targets)
        assert loss.item() == pytest.approx(math.log(4), rel=1e-5)
    assert batch_mixer(AugmentConfig(), 4) is None


def test_feature_cache_is_refused_when_presets_change_images_every_epoch():
    from vgg.training.config import resolve
    from vgg.training.features import cache_blocker

    still = {"shift": 0.0, "hflip": False}
    assert cache_blocker(resolve(freeze="features", augment=still)) is None
    for changes in ({"policy": "randaugment"}, {"mixup": 0.2}):
        assert "per-image augmentation policy" in cache_blocker(resolve(freeze="features", augment=still | changes))
    assert "augmentation is on" in cache_blocker(resolve(freeze="features", augment=still | {"erasing": 0.5}))
    assert "--sampler balanced" in cache_blocker(resolve(freeze="features", sampler="balanced", augment=still))
    assert "--tta validates on mirrored images" in cache_blocker(resolve(freeze="features", tta=True, augment=still))
