"""Batch JPEG decoding where the model runs (jpeg_batches.py), checked on the CPU against the loader workers' decoding.

On CUDA the same code hands the batch to nvJPEG; here ``decode_jpeg(device="cpu")`` runs it, so everything but the
decoder itself (reading in workers, EXIF orientation, fallbacks, order, skipped files) is the code a GPU runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MESSY_BAD, small_run, write_messy_dataset
from PIL import Image

from vgg import jpeg_batches as jpeg
from vgg.batches import Batches
from vgg.decoding import decode
from vgg.scan import scan_folder
from vgg.training.augment import AugmentConfig, image_transform


def _noise(height: int = 24, width: int = 40) -> Image.Image:
    # Random pixels: any wrong flip or rotation changes almost every pixel.
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_batch_decoding_applies_exif_orientation_as_the_host_decoder_does(tmp_path, orientation):
    image = _noise()
    exif = image.getexif()
    exif[jpeg.ORIENTATION_TAG] = orientation
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif, quality=95)

    item = jpeg.read_jpeg(path, 32)
    assert isinstance(item, jpeg.Encoded) and item.orientation == orientation
    [decoded] = jpeg.decode_batch([item], 32, "cpu")
    assert torch.equal(decoded, decode(path, 32))


def test_non_jpeg_and_cmyk_files_are_decoded_by_the_worker(tmp_path):
    _noise().save(tmp_path / "a.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (40, 30), 90).save(tmp_path / "grey.jpg")
    for name in ("a.png", "cmyk.jpg"):
        read = jpeg.read_jpeg(tmp_path / name, 32)
        assert isinstance(read, torch.Tensor) and torch.equal(read, decode(tmp_path / name, 32))
    grey = jpeg.read_jpeg(tmp_path / "grey.jpg", 32)
    assert isinstance(grey, jpeg.Encoded)
    assert torch.equal(jpeg.decode_batch([grey], 32, "cpu")[0], decode(tmp_path / "grey.jpg", 32))


def _drain(batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batches, strict=True)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_decoded_on_device_equal_the_workers_batches_on_a_messy_folder(tmp_path, workers):
    samples = scan_folder(write_messy_dataset(tmp_path / "messy")).samples
    host = Batches(samples, 32, 5, shuffle=False, cache="none", workers=workers)
    device = Batches(samples, 32, 5, shuffle=False, cache="none", workers=workers, decode_device="cpu")
    assert device.decode_device == torch.device("cpu")

    host_images, host_labels = _drain(host)
    device_images, device_labels = _drain(device)
    assert torch.equal(device_images, host_images) and torch.equal(device_labels, host_labels)
    assert device_images.dtype == torch.uint8 and device_images.shape[1:] == (3, 32, 32)
    # The truncated JPEG is read as bytes, fails the batch decoder and the host decoder, and is skipped with the
    # reason the workers give (the other bad files never get past the scan).
    assert sorted(device.skipped) == sorted(host.skipped)
    assert [reason for path, reason in device.skipped if path.endswith("broken.jpg")][0].startswith(
        MESSY_BAD["cat/broken.jpg"]
    )


def test_a_batch_with_a_corrupt_jpeg_keeps_its_good_images_in_order(tmp_path):
    for i in range(3):
        _noise(30 + i, 40).save(tmp_path / f"{i}.jpg")
    good = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(good[: len(good) // 2])
    items = [jpeg.read_jpeg(tmp_path / f"{i}.jpg", 32) for i in range(3)]
    images, labels, bad = jpeg.assemble(items, torch.tensor([0, 1, 2]), ["0", "1", "2"], 32, torch.device("cpu"))
    assert labels.tolist() == [0, 2]
    assert torch.equal(images[1], decode(tmp_path / "2.jpg", 32))
    assert [path for path, _ in bad] == ["1"] and bad[0][1].startswith("truncated jpeg")


def test_per_image_transforms_keep_decoding_in_the_workers(tmp_path):
    samples = scan_folder(write_messy_dataset(tmp_path / "messy")).samples
    transform = image_transform(AugmentConfig(policy="randaugment"))
    batches = Batches(samples, 32, 4, shuffle=False, cache="none", workers=0, transform=transform, decode_device="cpu")
    assert batches.decode_device is None


def test_train_with_decode_device_runs_and_predicts(tmp_path):
    from vgg.cli import main

    out = small_run(tmp_path, 1, "--decode", "device", "--cache", "none")
    assert json.loads((out / "config.json").read_text())["config"]["decode"] == "device"
    assert main(["predict", str(out / "best.safetensors"), str(tmp_path / "data" / "cat" / "cat_000.jpg")]) == 0


def test_unknown_decode_is_an_error_naming_the_choices(tmp_path, capsys):
    from vgg.cli import main

    assert main(["train", str(tmp_path), "--decode", "gpu"]) == 2
    assert "decode must be one of {auto, workers, device}. Received: decode='gpu'" in capsys.readouterr().err
