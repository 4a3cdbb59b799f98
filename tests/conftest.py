"""Shared fixtures: small class-per-folder image datasets written to a temp dir, as a user would have them."""

from __future__ import annotations

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
