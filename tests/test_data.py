from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, MESSY_BAD, MESSY_UNUSUAL, write_images, write_messy_dataset
from PIL import Image

from vgg import scan
from vgg.batches import Batches, class_weights
from vgg.cli import main
from vgg.decoding import decode
from vgg.errors import UsageError
from vgg.scan import scan_folder
from vgg.splits import read_split, stratified_split, write_split
from vgg.training.config import resolve
from vgg.training.run import train


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
    reasons = dict(folder.skipped + batches.skipped)
    assert set(reasons) == {str(two_class_dir / "cat" / "broken.jpg"), str(two_class_dir / "dog" / "empty.png")}
    assert "empty file" in reasons[str(two_class_dir / "dog" / "empty.png")]


def test_in_memory_and_streamed_batches_agree(two_class_dir: Path):
    folder = scan_folder(two_class_dir)
    ram = Batches(folder.samples, 32, batch_size=5, shuffle=False, workers=0, cache="ram")
    disk = Batches(folder.samples, 32, batch_size=5, shuffle=False, workers=0, cache="none")
    assert ram.in_memory and not disk.in_memory
    for (a, la), (b, lb) in zip(ram, disk, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


# --- messy folders: content sniffing, unusual formats, bad files, caching -----------------------------------


def test_messy_folder_uses_every_good_file_and_names_every_bad_one(tmp_path: Path):
    root = write_messy_dataset(tmp_path / "messy")
    folder = scan_folder(root)
    assert folder.classes == ["cat", "dog"]  # .hidden_class, __MACOSX, .ipynb_checkpoints are not classes
    used = {str(s.path.relative_to(root)) for s in folder.samples}
    assert set(MESSY_UNUSUAL) <= used
    assert folder.counts() == {"cat": 8 + 4 + 1, "dog": 8 + 4 + 1}  # plain + unusual + the two undetected bad files
    assert [str(Path(p).relative_to(root)) for p in folder.ignored] == ["cat/readme.txt"]
    batches = Batches(folder.samples, 32, batch_size=8, shuffle=False, workers=0, cache="ram")
    assert batches.num_images == 24
    reasons = {str(Path(p).relative_to(root)): r for p, r in folder.skipped + batches.skipped}
    assert set(reasons) == set(MESSY_BAD)
    for name, reason in MESSY_BAD.items():
        assert reason in reasons[name], (name, reasons[name])
    assert "limit 89,478,485 px" in reasons["dog/huge.png"]


def test_unusual_formats_decode_to_the_right_rgb(tmp_path: Path):
    root = write_messy_dataset(tmp_path / "messy", per_class=1)
    cmyk = decode(root / "cat/cmyk.jpg")
    assert cmyk.shape == (3, 40, 40) and cmyk[:, 20, 20].tolist()[0] > 240 and cmyk[1:, 20, 20].max() < 20
    grey16 = decode(root / "dog/grey16.png")
    assert grey16.dtype == torch.uint8 and abs(int(grey16[0, 0, 0]) - 40_000 // 257) <= 1  # scaled, not clipped
    assert decode(root / "dog/palette.png")[:, 5, 5].tolist() == list(COLOURS["dog"])
    gif = decode(root / "dog/anim.gif")
    assert gif.shape == (3, 40, 40) and gif[:, 0, 0].tolist() == list(COLOURS["dog"])  # the first frame
    assert decode(root / "cat/rotated.JPG").shape == (3, 40, 20)  # stored 40 wide, shown 20 wide
    assert decode(root / "dog/photo_without_extension", 32).shape == (3, 32, 32)
    assert decode(root / "cat/png_named.jpg")[:, 0, 0].tolist() == list(COLOURS["cat"])


def test_class_with_only_bad_files_is_named(two_class_dir: Path):
    bad = two_class_dir / "emu"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.txt").write_text("x")
    with pytest.raises(UsageError, match=r"Class folder .*emu/ has no images: .* Found 1 bad image files and 1 other"):
        scan_folder(two_class_dir)


def test_index_is_cached_until_a_folder_changes(two_class_dir: Path, monkeypatch):
    calls = []
    real = scan.classify
    monkeypatch.setattr(scan, "classify", lambda path: calls.append(path) or real(path))
    first = scan.index_folder(two_class_dir, cache_min_files=1)
    assert len(calls) == 24
    again = scan.index_folder(two_class_dir, cache_min_files=1)
    assert again.files == first.files and len(calls) == 24  # nothing was read again
    Image.new("RGB", (8, 8)).save(two_class_dir / "dog" / "new.png")
    changed = scan.index_folder(two_class_dir, cache_min_files=1)
    assert ("dog/new.png", "image", "png") in changed.files and len(calls) == 49


def test_split_manifest_round_trips_and_checks_its_classes(two_class_dir: Path, tmp_path: Path):
    folder = scan_folder(two_class_dir)
    train, val = stratified_split(folder, 0.25, seed=1)
    write_split(tmp_path / "split.csv", folder.classes, train, val)
    again_train, again_val = read_split(tmp_path / "split.csv", folder.classes)
    assert again_train == train and again_val == val
    with pytest.raises(UsageError, match=r"Classes in split file .* differ .*: missing \['emu'\], unexpected \[\]"):
        read_split(tmp_path / "split.csv", ["cat", "dog", "emu"])
    (two_class_dir / "cat" / "cat_000.jpg").unlink()
    with pytest.raises(UsageError, match=r"lists 1 files that do not exist \(first: .*cat_000.jpg\)"):
        read_split(tmp_path / "split.csv", folder.classes)
    with pytest.raises(UsageError, match=r"Split file not found: .*nope.csv\. Expected a split.csv"):
        read_split(tmp_path / "nope.csv", folder.classes)
    (tmp_path / "bad.csv").write_text("file,label\n")
    with pytest.raises(UsageError, match=r"must have the columns path,class,split\. Received: \['file', 'label'\]"):
        read_split(tmp_path / "bad.csv", folder.classes)


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_balanced_sampler_draws_classes_equally(tmp_path: Path, cache: str):
    write_images(tmp_path, {"a": (0, 0, 0)}, per_class=30, size=8)
    write_images(tmp_path, {"b": (255, 255, 255)}, per_class=3, size=8)
    folder = scan_folder(tmp_path)
    drawn = Counter()
    batches = Batches(folder.samples, 8, batch_size=11, shuffle=True, workers=0, cache=cache, sampler="balanced")
    for _ in range(6):
        for _, labels in batches:
            drawn.update(labels.tolist())
    assert sum(drawn.values()) == 6 * 33
    assert 0.4 < drawn[1] / sum(drawn.values()) < 0.6  # 3 of 33 images, drawn about half the time
    with pytest.raises(UsageError, match=r"sampler must be one of \{shuffle, balanced\}\. Received: sampler='even'"):
        Batches(folder.samples, 8, batch_size=4, shuffle=True, sampler="even")


def test_class_weights_are_inverse_frequency():
    weights = class_weights(torch.tensor([0] * 30 + [1] * 10), 2)
    assert torch.allclose(weights, torch.tensor([40 / 60, 40 / 20]))


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_per_image_transform_runs_every_epoch_on_training_batches(two_class_dir: Path, cache: str):
    folder = scan_folder(two_class_dir)
    inverted = Batches(folder.samples, 32, 8, shuffle=False, workers=0, cache=cache, transform=lambda im: 255 - im)
    plain = Batches(folder.samples, 32, 8, shuffle=False, workers=0, cache=cache)
    for _ in range(2):
        for (a, _), (b, _) in zip(inverted, plain, strict=True):
            assert torch.equal(a, 255 - b)


# --- whole training runs on messy folders ----------------------------------------------------------------------

TINY = ["--arch", "vgg11", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "1"]


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path, newline="")))


def test_training_on_a_messy_folder_completes_and_names_every_bad_file(tmp_path: Path):
    root = write_messy_dataset(tmp_path / "messy")
    out = tmp_path / "run"
    assert main(["train", str(root), "--out", str(out), *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["class_names"] == ["cat", "dog"]
    skipped = {str(Path(r["path"]).relative_to(root)): r["reason"] for r in _rows(out / "skipped.csv")}
    assert set(skipped) == set(MESSY_BAD)
    for name, reason in MESSY_BAD.items():
        assert reason in skipped[name]
    split = _rows(out / "split.csv")
    assert Counter((r["class"], r["split"]) for r in split) == {
        ("cat", "train"): 10, ("cat", "val"): 3, ("dog", "train"): 10, ("dog", "val"): 3,
    }  # fmt: skip
    used = {str(Path(r["path"]).relative_to(root)) for r in split}
    assert set(MESSY_UNUSUAL) <= used


def test_split_manifest_of_a_run_is_reused_by_another(two_class_dir: Path, tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", str(two_class_dir), "--out", str(first), "--seed", "3", *TINY]) == 0
    reuse = ["--split", str(first / "split.csv"), "--seed", "4"]  # another seed would split differently
    assert main(["train", str(two_class_dir), "--out", str(second), *reuse, *TINY]) == 0
    assert _rows(second / "split.csv") == _rows(first / "split.csv")
    assert stratified_split(scan_folder(two_class_dir), 0.2, seed=4) != stratified_split(
        scan_folder(two_class_dir), 0.2, seed=3
    )


def test_a_class_whose_files_all_fail_to_decode_is_an_error(two_class_dir: Path, tmp_path: Path):
    emu = two_class_dir / "emu"
    emu.mkdir()
    for i in range(3):  # JPEG headers, so only decoding finds them broken
        (emu / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    with pytest.raises(UsageError, match=r"Class 'emu' has no usable training images: every file failed to decode"):
        train(resolve(data=str(two_class_dir), out=str(tmp_path / "run"), arch="vgg11", image_size=32, workers=0))


def test_imbalance_remedies_and_augment_presets_train(tmp_path: Path, capsys):
    data = write_images(tmp_path / "data", {"cat": COLOURS["cat"]}, per_class=16, size=32)
    write_images(data, {"dog": COLOURS["dog"]}, per_class=4, size=32, seed=1)
    argv = ["train", str(data), *TINY, "--class-weight", "auto", "--sampler", "balanced", "--augment", "randaugment"]
    assert main([*argv, "--out", str(tmp_path / "r1"), "--mixup", "0.2", "--cutmix", "1.0", "--erasing", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "imbalance: 4.3x (cat: 13, dog: 3); using class-weighted loss and balanced sampling" in out
    assert "class weights: cat: 0.62, dog: 2.67" in out
    assert main(["train", str(data), *TINY, "--out", str(tmp_path / "r2"), "--augment", "trivialaugment"]) == 0
    assert "consider --class-weight auto or --sampler balanced" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r1" / "config.json").read_text())["config"]
    assert saved["sampler"] == "balanced" and saved["class_weight"] == "auto"
    assert saved["augment"]["policy"] == "randaugment" and saved["augment"]["mixup"] == 0.2
