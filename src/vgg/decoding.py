"""JPEG decoding where the model runs: loader workers only read bytes, the training process decodes whole batches.

On a GPU, decoding JPEGs on the host is what starves VGG: one host core decodes and resizes ~75 images/s at
224 px (benchmarks/bench_data.py), a data-centre GPU trains VGG16 at thousands. ``torchvision.io.decode_jpeg``
with a CUDA device decodes a list of JPEGs in one nvJPEG call, so the loader workers are left with reading files
and parsing headers. The same path runs on the CPU (``device="cpu"``), which is how it is tested without a GPU.

Only the common case travels as bytes: a baseline or progressive JPEG in RGB or grayscale. CMYK JPEGs, other
formats and anything whose header does not parse are decoded by the worker as usual (``data.decode``), and a JPEG
the batch decoder rejects is decoded again on the host, so this path accepts and skips exactly what ``decode``
does.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

# EXIF tag 0x0112: how the camera was held. nvJPEG does not apply it, so it is applied after decoding.
ORIENTATION_TAG = 0x0112


@dataclass
class Encoded:
    """A JPEG file's bytes, read by a loader worker, with the EXIF orientation to apply after decoding."""

    data: torch.Tensor
    orientation: int = 1


def read(path: str | Path, image_size: int) -> Encoded | torch.Tensor:
    """A plain RGB or grayscale JPEG as :class:`Encoded`; any other image decoded on the host.

    Raises:
        FileNotFoundError, ValueError: as ``data.decode`` does, for the same files and with the same reasons.
    """
    from .data import MAX_PIXELS, decode, decode_bytes
    from .scan import sniff

    path = Path(path)
    if not path.is_file():
        return decode(path, image_size)  # decode's own "not found" error
    data = path.read_bytes()
    if sniff(data[:16]) != "jpeg":
        return decode_bytes(data, image_size)  # empty, not an image, or another format: decode's own answer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                mode = im.mode
                orientation = int(im.getexif().get(ORIENTATION_TAG, 1))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return decode_bytes(data, image_size)
    if mode not in ("RGB", "L") or width * height > MAX_PIXELS or not 1 <= orientation <= 8:
        return decode_bytes(data, image_size)
    return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF orientation 1-8 to a C x H x W image (what Pillow's ``exif_transpose`` does on the host)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-2, -1)  # 5 is a transpose; 6, 7, 8 are a transpose and a flip
    if orientation in (2, 3, 6, 7):
        image = image.flip(-1)
    if orientation in (3, 4, 7, 8):
        image = image.flip(-2)
    return image


def decode_batch(
    items: list[Encoded], image_size: int, device: torch.device | str
) -> list[torch.Tensor | tuple[None, str]]:
    """Decode JPEGs on ``device`` in one call and squash each to ``image_size``; a failure gives ``(None, reason)``.

    One corrupt file fails a whole batched call, so then each image is decoded on its own, and one that still fails
    is decoded on the host, whose decoder is more forgiving (libjpeg-turbo shows what a truncated file holds).
    """
    from .data import decode_bytes

    if not items:
        return []
    try:
        decoded: list[torch.Tensor | None] = list(
            decode_jpeg([item.data for item in items], mode=ImageReadMode.RGB, device=device)
        )
    except RuntimeError:
        decoded = []
        for item in items:
            try:
                decoded.append(decode_jpeg(item.data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    out: list[torch.Tensor | tuple[None, str]] = []
    for item, image in zip(items, decoded, strict=True):
        if image is None:
            try:
                image = decode_bytes(item.data.numpy().tobytes(), image_size).to(device)
            except ValueError as error:
                out.append((None, str(error)))
                continue
        else:
            image = orient(image, item.orientation)
        if tuple(image.shape[-2:]) != (image_size, image_size):
            image = TF.resize(image, [image_size, image_size], antialias=True)
        out.append(image.contiguous())
    return out


def assemble(
    items: list[torch.Tensor | Encoded], labels: torch.Tensor, paths: list[str], image_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """A loader batch of decoded images and JPEG bytes -> one uint8 batch on ``device``, in the loader's order.

    Returns the images, their labels and the (path, reason) of each JPEG that could not be decoded at all.
    """
    encoded = [i for i, item in enumerate(items) if isinstance(item, Encoded)]
    images: list = list(items)
    for i, image in zip(encoded, decode_batch([items[i] for i in encoded], image_size, device), strict=True):
        images[i] = image
    keep = [i for i, image in enumerate(images) if isinstance(image, torch.Tensor)]
    bad = [(paths[i], image[1]) for i, image in enumerate(images) if not isinstance(image, torch.Tensor)]
    if not keep:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8, device=device), labels[:0], bad
    batch = torch.stack([images[i].to(device, non_blocking=True) for i in keep])
    return batch, labels[keep], bad
