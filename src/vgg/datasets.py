"""Real datasets written out as class-per-folder image trees, the layout ``vgg train`` reads."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

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
# The upstream repository itself, over https (the S3 address in Fashion-MNIST's README is plain http).
FASHION_MNIST_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# SHA-256 and size of each file's IDX content (after gunzip), checked on every file used from Debian's package, the
# cache or a download. The content, not the .gz: Debian recompressed the files (their .gz differ from the README's
# MD5s by the 24-byte name field of the gzip header), and the pixels are what must not change. Computed from
# Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    "train-labels-idx1-ubyte.gz": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    "t10k-images-idx3-ubyte.gz": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    "t10k-labels-idx1-ubyte.gz": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
}
# No download may be bigger than this (the largest file is 26 MB), and no IDX file may unpack to more than
# MAX_IDX_BYTES (a gzip bomb); both are read in pieces and stopped at the limit.
MAX_DOWNLOAD_BYTES = 64 * 1024**2
MAX_IDX_BYTES = 256 * 1024**2
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _unpacked(path: Path, limit: int = MAX_IDX_BYTES, name: str | None = None) -> bytes:
    """The content of an IDX file, gunzipped when its ``name`` (by default its own) ends in .gz, at most ``limit``."""
    opener = gzip.open if (name or path.name).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read(limit + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise UsageError(f"Cannot read IDX file {path}: {error}.") from error
    if len(data) > limit:
        raise UsageError(f"{path} unpacks to more than {limit:,} bytes: not an IDX file of this dataset.")
    return data


def parse_idx(data: bytes, path: str | Path) -> np.ndarray:
    """An IDX file's content (the MNIST family's format) as a uint8 array; ``path`` names it in errors."""
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 000008xx).")
    ndim = data[3]
    if not 1 <= ndim <= 4 or len(data) < 4 + 4 * ndim:
        raise UsageError(f"{path} is not an IDX file: its header names {ndim} dimensions in {len(data)} bytes.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape, dtype=np.int64)):
        raise UsageError(f"{path} is truncated: header says {shape}, found {body.size} values.")
    return body.reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped or not, as a uint8 array.

    Raises:
        UsageError: the file is unreadable, not gzip when named .gz, not IDX, truncated, or over ``MAX_IDX_BYTES``.
    """
    return parse_idx(_unpacked(Path(path)), path)


def _verified(path: Path, name: str | None = None) -> bool:
    """Whether ``path`` holds the official content of the Fashion-MNIST file ``name`` (by default its own name)."""
    expected, size = FASHION_MNIST_SHA256[name or path.name]
    try:
        data = _unpacked(path, size, name)
    except UsageError:
        return False
    return len(data) == size and hashlib.sha256(data).hexdigest() == expected


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` (through a temporary file), at most ``MAX_DOWNLOAD_BYTES``, and check it.

    Only https is fetched (plain http only from this machine, as the tests serve it); the content must have the
    SHA-256 in ``FASHION_MNIST_SHA256``, so even a compromised server cannot change a pixel.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in LOOPBACK):
        raise UsageError(f"Refusing to download {url}: expected an https:// address.")
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
        received = 0
        while chunk := response.read(1024 * 1024):
            received += len(chunk)
            if received > MAX_DOWNLOAD_BYTES:
                out.close()
                part.unlink()
                raise UsageError(f"Download of {url} passed {MAX_DOWNLOAD_BYTES:,} bytes: refused (not Fashion-MNIST).")
            out.write(chunk)
    if not _verified(part, dest.name):
        part.unlink()
        raise UsageError(
            f"Download of {url} does not have the SHA-256 of Fashion-MNIST's {dest.name}: refused and deleted. "
            "Try again later, or pass --source FOLDER with the IDX files."
        )
    os.replace(part, dest)


def _find_source(source: str | Path | None, cache: Path) -> Path:
    """The folder of the four files: ``source`` as given (the user's own files: not checksummed), else Debian's
    package or the cache when every file there has the official content, else a fresh download into the cache."""
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    if source:
        missing = [name for name in names if not (Path(source) / name).is_file()]
        if missing:
            raise UsageError(f"Fashion-MNIST files missing in {source}: {', '.join(missing)}.")
        return Path(source)
    if all((FASHION_MNIST_DEBIAN / name).is_file() and _verified(FASHION_MNIST_DEBIAN / name) for name in names):
        return FASHION_MNIST_DEBIAN
    cache.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            if (cache / name).is_file() and not _verified(cache / name):
                log.warning("%s is not the official file (damaged or changed): downloading it again", cache / name)
                (cache / name).unlink()
            if not (cache / name).is_file():
                log.info("downloading %s", FASHION_MNIST_URL + name)
                _download(FASHION_MNIST_URL + name, cache / name)
    except (urllib.error.URLError, OSError) as error:
        raise UsageError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DEBIAN} and the download failed ({error}). "
            "Install it with `apt-get install dataset-fashion-mnist` or pass --source FOLDER with the IDX files."
        ) from error
    return cache


def fashion_mnist(
    dest: str | Path, source: str | Path | None = None, limit_per_class: int | None = None, progress: bool = False
) -> Path:
    """Write Fashion-MNIST as ``dest/train/<class>/<n>.png`` and ``dest/test/<class>/<n>.png``.

    Args:
        dest: output folder; written atomically (a temp folder renamed at the end), skipped if already complete.
        source: folder with the four IDX files; by default Debian's package, then a download.
        limit_per_class: write at most this many images per class and split (for quick trials).
        progress: a bar (images/s) while the PNGs are written.

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
        pairs = tqdm(zip(images, labels, strict=True), total=len(images), desc=split, unit="img", leave=False,
                     disable=not progress)  # fmt: skip
        for index, (image, label) in enumerate(pairs):
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
