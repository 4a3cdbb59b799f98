"""Shared fixtures: small class-per-folder image datasets written to a temp dir, as a user would have them."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = {"cat": (220, 40, 40), "dog": (40, 40, 220), "fox": (40, 200, 40)}


def write_images(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int, size: int = 40, seed: int = 0):
    """Images whose class shows in their colour (plus noise), so a model can learn them in a few steps."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.{ext}")
    return root


@pytest.fixture
def two_class_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=12)


@pytest.fixture
def three_class_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "data3", COLOURS, per_class=10)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _index_cache(tmp_path_factory, monkeypatch):
    """Index caches go to a temp folder, never the user's ~/.cache."""
    monkeypatch.setenv("VGG_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb, without the memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# What a messy real-world folder holds. Bad files, with the reason skipped.csv must give for each:
MESSY_BAD = {
    "cat/broken.jpg": "truncated jpeg",
    "cat/empty.jpg": "empty file",
    "cat/notes.jpg": "not an image",
    "dog/huge.png": "too large",
}
# Good files in unusual formats, each of which must be used:
MESSY_UNUSUAL = [
    "cat/png_named.jpg",
    "cat/cmyk.jpg",
    "cat/rotated.JPG",
    "cat/nested/deeper/cat_nested.png",
    "dog/grey16.png",
    "dog/palette.png",
    "dog/anim.gif",
    "dog/photo_without_extension",
]


def write_messy_dataset(root: Path, per_class: int = 8) -> Path:
    """Two classes (cat, dog) of ``per_class`` plain images each, plus every bad, unusual and clutter case."""
    import io

    write_images(root, {k: COLOURS[k] for k in ("cat", "dog")}, per_class=per_class)
    cat, dog = root / "cat", root / "dog"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (cat / "broken.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("these are my notes, not a photo\n")
    Image.new("RGB", (40, 40), COLOURS["cat"]).save(cat / "png_named.jpg", format="PNG")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(cat / "cmyk.jpg")
    rotated = Image.new("RGB", (40, 20), COLOURS["cat"])
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    rotated.save(cat / "rotated.JPG", exif=exif)
    (cat / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 60, 60)).save(cat / "nested" / "deeper" / "cat_nested.png")
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (cat / "readme.txt").write_text("downloaded from somewhere")
    (dog / "huge.png").write_bytes(_png_claiming(20_000, 20_000))
    Image.fromarray(np.full((40, 40), 40_000, np.uint16)).save(dog / "grey16.png")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, *COLOURS["dog"]] + [0] * 762)
    palette.save(dog / "palette.png", transparency=0)
    frames = [Image.new("RGB", (40, 40), colour) for colour in (COLOURS["dog"], (0, 255, 0))]
    frames[0].save(dog / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (40, 40), COLOURS["dog"]).save(dog / "photo_without_extension", format="JPEG")
    for hidden in (root / ".hidden_class", root / "__MACOSX" / "cat", root / ".ipynb_checkpoints"):
        hidden.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(hidden / "x.png")
    (cat / "._cat_000.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    return root


def small_run(root: Path, epochs: int, *extra: str) -> Path:
    """Train vgg11 at 32 px on two small colour classes with the CLI; returns the run folder."""
    from vgg.cli import main

    data = write_images(root / "data", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=12)
    out = root / "run"
    argv = ["train", str(data), "--out", str(out), "--epochs", str(epochs), "--arch", "vgg11", "--image-size", "32"]
    assert main([*argv, "--batch-size", "8", "--workers", "0", *extra]) == 0
    return out


def crashing_png() -> bytes:
    """A PNG with valid CRCs whose IDAT zlib stream has invalid Huffman code lengths.

    libpng reports "too many length or distance symbols", and torchvision 0.29's native ``decode_image`` then
    segfaults (the whole process dies); Pillow raises an ``OSError`` on the same bytes.
    """
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    stream = zlib.compress(b"\x00" + b"\x07" * 96, 9)
    idat = stream[:2] + b"\x05" + b"\xff" * 40 + stream[-4:]
    header = struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def saved_and_loaded(state: dict, map_location: str | None = None) -> dict:
    """``state`` written as save_state writes it and read back as load_state reads it (weights only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True, map_location=map_location)


class Interrupted(Exception):
    """Stops ``fit`` at a chosen checkpoint, as a kill would."""


def fit_with_checkpoints(
    make_model: Callable[[], torch.nn.Module],
    samples: list,
    config,
    step,
    state: dict | None = None,
    stop_at: int | None = None,
    cache: str = "auto",
) -> tuple[object | None, list[dict], torch.nn.Module]:
    """``fit`` on ``samples`` keeping every checkpoint as ``load_state`` would read it back; ``stop_at`` interrupts
    the run at that checkpoint. Returns (fit's result, or None when interrupted; the checkpoints; the model)."""
    from vgg.batches import Batches
    from vgg.training.loop import fit

    torch.manual_seed(0)
    model = make_model()
    batches = Batches(samples, 16, 4, shuffle=True, seed=1, workers=0, cache=cache, drop_last=True)
    val = Batches(samples[::3], 16, 8, shuffle=False, workers=0, cache=cache)
    saved: list[dict] = []

    def keep(s: dict) -> None:
        saved.append(saved_and_loaded(s))
        if stop_at is not None and len(saved) == stop_at:
            raise Interrupted

    try:
        result = fit(model, batches, val, config, step, 2, progress=False, state=state, on_checkpoint=keep)
    except Interrupted:
        return None, saved, model
    return result, saved, model
