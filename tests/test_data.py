from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import write_images
from PIL import Image

from vgg.data import Batches, decode, scan_folder, stratified_split
from vgg.errors import UsageError


def test_classes_are_sorted_folders_and_clutter_is_ignored(two_class_dir: Path):
    (two_class_dir / ".ipynb_checkpoints").mkdir()
    (two_class_dir / "__MACOSX").mkdir()
    (two_class_dir / "cat" / ".DS_Store").write_bytes(b"\x00junk")
    (two_class_dir / "cat" / "notes.txt").write_text("not an image")
    nested = two_class_dir / "dog" / "more"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "extra.PNG")
    folder = scan_folder(two_class_dir)
    assert folder.classes == ["cat", "dog"]
    assert folder.counts() == {"cat": 12, "dog": 13}


def test_missing_folder(tmp_path: Path):
    with pytest.raises(UsageError, match=r"Data folder not found: .*nowhere is nothing\. Expected a folder"):
        scan_folder(tmp_path / "nowhere")


def test_folder_without_class_folders(tmp_path: Path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(UsageError, match=r"No class folders in .*: expected .*/<class>/<image>\. Found 3 files and 0"):
        scan_folder(tmp_path)


def test_one_class_only(tmp_path: Path):
    write_images(tmp_path, {"cat": (1, 2, 3)}, per_class=2)
    with pytest.raises(UsageError, match=r"Only one class in .* \('cat'\): expected at least 2 class folders"):
        scan_folder(tmp_path)


def test_class_without_images(two_class_dir: Path):
    (two_class_dir / "emu").mkdir()
    with pytest.raises(UsageError, match=r"Class folder .*emu/ has no images"):
        scan_folder(two_class_dir)


def test_validation_classes_must_match(two_class_dir: Path, three_class_dir: Path):
    with pytest.raises(UsageError, match=r"differ from the training classes: missing \[\], unexpected \['fox'\]"):
        scan_folder(three_class_dir, classes=scan_folder(two_class_dir).classes)


def test_split_is_stratified_and_reproducible(tmp_path: Path):
    write_images(tmp_path, {"a": (0, 0, 0), "b": (255, 255, 255)}, per_class=20)
    write_images(tmp_path, {"c": (9, 9, 9)}, per_class=5)
    folder = scan_folder(tmp_path)
    train, val = stratified_split(folder, 0.2, seed=3)
    assert Counter(s.label for s in val) == {0: 4, 1: 4, 2: 1}
    assert not {s.path for s in train} & {s.path for s in val}
    again, _ = stratified_split(folder, 0.2, seed=3)
    other, _ = stratified_split(folder, 0.2, seed=4)
    assert [s.path for s in again] == [s.path for s in train]
    assert {s.path for s in other} != {s.path for s in train}


def test_decode_makes_rgb_squares_and_names_missing_files(tmp_path: Path):
    Image.new("L", (50, 20), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (20, 50), (255, 0, 0, 0)).save(tmp_path / "alpha.png")
    for name in ("grey.png", "alpha.png"):
        image = decode(tmp_path / name, 32)
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    with pytest.raises(FileNotFoundError, match=r"Image not found: .*ghost.jpg"):
        decode(tmp_path / "ghost.jpg")


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_bad_files_are_skipped_and_named(two_class_dir: Path, cache: str):
    (two_class_dir / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (two_class_dir / "dog" / "empty.png").write_bytes(b"")
    folder = scan_folder(two_class_dir)
    batches = Batches(folder.samples, 32, batch_size=8, shuffle=True, workers=0, cache=cache)
    seen = sum(len(labels) for _, labels in batches)
    assert seen == 24
    reasons = dict(batches.skipped)
    assert set(reasons) == {str(two_class_dir / "cat" / "broken.jpg"), str(two_class_dir / "dog" / "empty.png")}
    assert "empty file" in reasons[str(two_class_dir / "dog" / "empty.png")]


def test_in_memory_and_streamed_batches_agree(two_class_dir: Path):
    folder = scan_folder(two_class_dir)
    ram = Batches(folder.samples, 32, batch_size=5, shuffle=False, workers=0, cache="ram")
    disk = Batches(folder.samples, 32, batch_size=5, shuffle=False, workers=0, cache="none")
    assert ram.in_memory and not disk.in_memory
    for (a, la), (b, lb) in zip(ram, disk, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
