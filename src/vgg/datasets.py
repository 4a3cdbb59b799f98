"""Real datasets written out as class-per-folder image trees, the layout ``vgg train`` reads."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UsageError

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not, as a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise UsageError(f"Cannot read IDX file {path}: {error}.") from error
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 000008xx).")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UsageError(f"{path} is truncated: header says {shape}, found {body.size} values.")
    return body.reshape(shape)


def _find_source(source: str | Path | None, cache: Path) -> Path:
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    candidates = [Path(source)] if source else [FASHION_MNIST_DEBIAN, cache]
    for folder in candidates:
        if all((folder / name).is_file() for name in names):
            return folder
    if source:
        missing = [name for name in names if not (Path(source) / name).is_file()]
        raise UsageError(f"Fashion-MNIST files missing in {source}: {', '.join(missing)}.")
    cache.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            if not (cache / name).is_file():
                log.info("downloading %s", FASHION_MNIST_URL + name)
                with urllib.request.urlopen(FASHION_MNIST_URL + name, timeout=30) as response:
                    (cache / f"{name}.part").write_bytes(response.read())
                os.replace(cache / f"{name}.part", cache / name)
    except (urllib.error.URLError, OSError) as error:
        raise UsageError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DEBIAN} and the download failed ({error}). "
            "Install it with `apt-get install dataset-fashion-mnist` or pass --source FOLDER with the IDX files."
        ) from error
    return cache


def fashion_mnist(dest: str | Path, source: str | Path | None = None, limit_per_class: int | None = None) -> Path:
    """Write Fashion-MNIST as ``dest/train/<class>/<n>.png`` and ``dest/test/<class>/<n>.png``.

    Args:
        dest: output folder; written atomically (a temp folder renamed at the end), skipped if already complete.
        source: folder with the four IDX files; by default Debian's package, then a download.
        limit_per_class: write at most this many images per class and split (for quick trials).

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    marker = dest / ".complete"
    if marker.is_file():
        log.info("%s already holds Fashion-MNIST", dest)
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise UsageError(f"{dest} exists and is not a finished Fashion-MNIST export: expected an empty or new folder.")
    folder = _find_source(source, Path.home() / ".cache" / "vgg" / "fashion-mnist")
    temp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(folder / images_name), read_idx(folder / labels_name)
        if len(images) != len(labels):
            raise UsageError(f"{images_name} has {len(images)} images but {labels_name} has {len(labels)} labels.")
        for name in FASHION_MNIST_CLASSES:
            (temp / split / name).mkdir(parents=True, exist_ok=True)
        written = [0] * len(FASHION_MNIST_CLASSES)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            if limit_per_class is not None and written[label] >= limit_per_class:
                continue
            written[label] += 1
            Image.fromarray(image).save(temp / split / FASHION_MNIST_CLASSES[label] / f"{index:05d}.png")
    (temp / ".complete").write_text("fashion-mnist\n")
    if dest.exists():
        dest.rmdir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(temp, dest)
    return dest
