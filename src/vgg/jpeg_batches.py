"""JPEG batches decoded where the model runs (nvJPEG on a GPU), for training's loader (``batches.py``).

On a GPU, decoding JPEGs on the host is what starves VGG (one host core decodes and resizes a few dozen images/s
at 224 px, benchmarks/RESULTS.md), while ``torchvision.io.decode_jpeg`` with a CUDA device decodes a list of JPEGs
in one nvJPEG call. So loader workers may only read plain JPEGs (``read_jpeg`` -> ``Encoded``) and the training
process decodes whole batches (``decode_batch``, ``assemble``). The same path runs on the CPU, which is how it is
tested without a GPU. Only baseline or progressive JPEGs in RGB or grayscale travel as bytes; anything else is
decoded by the worker as usual, and a JPEG the batch decoder rejects is decoded again on the host, so this path
accepts and skips exactly what ``decode`` does.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from .decoding import MAX_PIXELS, ORIENTATION_TAG, decode, decode_bytes
from .runtime import device_failure
from .scan import read_regular, sniff

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """A JPEG file's bytes, read by a loader worker, with the EXIF orientation to apply after decoding."""

    data: torch.Tensor
    orientation: int = 1


def read_jpeg(path: str | Path, image_size: int) -> Encoded | torch.Tensor:
    """A plain RGB or grayscale JPEG as :class:`Encoded`; any other image decoded on the host.

    Raises:
        FileNotFoundError, ValueError: as ``decode`` does, for the same files and with the same reasons.
    """
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return decode(path, image_size)  # decode's own "not found" error
    if sniff(data[:16]) != "jpeg":
        return decode_bytes(data, image_size)  # empty, not an image, or another format: decode's own answer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                mode = im.mode
                orientation = int(im.getexif().get(ORIENTATION_TAG, 1))
        except Exception:  # noqa: BLE001  decode_bytes names the reason for whatever Pillow cannot open
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


def _raise_if_device_failure(error: RuntimeError) -> None:
    """Re-raise what is the device's fault (out of memory, CUDA errors): only a file's fault may fall back."""
    if device_failure(error):
        raise error


class Fallbacks:
    """Counts what the batch decoder handed to the host decoder, saying each reason once (a log warning).

    The run reports the counts at its end (``summary``): a slow host path taken silently is a slow run unexplained.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def note(self, reason: str, error: BaseException | None = None) -> None:
        if reason not in self.counts:
            log.warning("%s%s (said once; counted in the run's output)", reason, f": {error}" if error else "")
        self.counts[reason] += 1

    def summary(self) -> str:
        """One line with the count of each reason, or "" when nothing fell back."""
        if not self.counts:
            return ""
        return "decoder fallbacks: " + "; ".join(f"{n} x {reason}" for reason, n in self.counts.most_common())


# The process's fallbacks: decode_batch counts here unless given its own.
FALLBACKS = Fallbacks()


@contextmanager
def _ordered(device: torch.device) -> Iterator[None]:
    """Order a device decode after the queued work and the queued work after it.

    nvJPEG decodes on its own stream (and the H100's hardware JPEG engine ignores stream order), while its output
    comes from the caching allocator, which may hand out memory that kernels queued on the training stream still
    read: without a wait, the decoder can write into a live gradient (pytorch/vision#9606). So the device finishes
    its queue first, and the decode finishes before anything queued later reads its output.
    """
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    yield
    torch.cuda.synchronize(device)


def _decode_on(datas: list[torch.Tensor], device: torch.device, fallbacks: Fallbacks) -> list[torch.Tensor | None]:
    """Decode in one batched call; when it fails, each half is tried again, so an odd file costs only itself.

    ``None`` marks a file the device decoder rejects (left to the host decoder).
    """
    try:
        with _ordered(device):
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as error:
        _raise_if_device_failure(error)
        if len(datas) == 1:
            fallbacks.note("a JPEG the batch decoder rejects, decoded on the host", error)
            return [None]
    half = len(datas) // 2
    return _decode_on(datas[:half], device, fallbacks) + _decode_on(datas[half:], device, fallbacks)


def decode_batch(
    items: list[Encoded], image_size: int, device: torch.device | str, fallbacks: Fallbacks | None = None
) -> list[torch.Tensor | tuple[None, str]]:
    """Decode JPEGs on ``device`` in one call and squash each to ``image_size``; a failure gives ``(None, reason)``.

    One corrupt file fails a whole batched call, so then the batch is split until the odd files are alone (the
    rest still decoded in batched calls), and each of those is decoded on the host, whose decoder is more
    forgiving (libjpeg-turbo shows what a truncated file holds). Each fallback is counted in ``fallbacks`` (the
    process's ``FALLBACKS`` by default). Out-of-memory and CUDA errors are raised, never taken for a bad file.
    """
    if not items:
        return []
    device = torch.device(device)
    fallbacks = FALLBACKS if fallbacks is None else fallbacks
    decoded = _decode_on([item.data for item in items], device, fallbacks)
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


@dataclass
class Packed:
    """A loader batch of ``Encoded`` JPEGs and host-decoded images as four tensors, whatever its size.

    A tensor sent from a loader worker travels as one shared-memory file descriptor: one per image ran out of
    descriptors at large batches (a batch of 300 held 317; with ``ulimit -n 1024`` and 8 workers the workers died
    and the training process waited forever). So a worker packs the JPEG bytes back to back (``offsets`` mark where
    each starts) and stacks the images it decoded itself.
    """

    data: torch.Tensor  # every JPEG's bytes, back to back (uint8)
    offsets: torch.Tensor  # where each JPEG starts, and where the last ends (int64, one more than the JPEGs)
    orientations: torch.Tensor  # each JPEG's EXIF orientation (int64)
    decoded: torch.Tensor  # the images decoded in the worker, N x 3 x S x S uint8
    is_jpeg: torch.Tensor  # per batch position: an Encoded JPEG (True) or the next decoded image (False)

    @classmethod
    def pack(cls, items: list[torch.Tensor | Encoded]) -> Packed:
        jpegs = [item for item in items if isinstance(item, Encoded)]
        images = [item for item in items if not isinstance(item, Encoded)]
        sizes = torch.tensor([0] + [len(item.data) for item in jpegs], dtype=torch.int64)
        return cls(
            data=torch.cat([item.data for item in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8),
            offsets=sizes.cumsum(0),
            orientations=torch.tensor([item.orientation for item in jpegs], dtype=torch.int64),
            decoded=torch.stack(images) if images else torch.empty(0, dtype=torch.uint8),
            is_jpeg=torch.tensor([isinstance(item, Encoded) for item in items], dtype=torch.bool),
        )

    def unpack(self) -> list[torch.Tensor | Encoded]:
        """The batch's items in order: ``Encoded`` views into ``data`` and the decoded images."""
        bounds, orientations = self.offsets.tolist(), self.orientations.tolist()
        jpegs = iter(Encoded(self.data[a:b], o) for a, b, o in zip(bounds, bounds[1:], orientations, strict=False))
        images = iter(self.decoded)
        return [next(jpegs) if is_jpeg else next(images) for is_jpeg in self.is_jpeg.tolist()]

    def __len__(self) -> int:
        return len(self.is_jpeg)


def assemble(
    items: list[torch.Tensor | Encoded] | Packed,
    labels: torch.Tensor,
    paths: list[str],
    image_size: int,
    device: torch.device,
    fallbacks: Fallbacks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """A loader batch of decoded images and JPEG bytes -> one uint8 batch on ``device``, in the loader's order.

    Returns the images, their labels and the (path, reason) of each JPEG that could not be decoded at all. A batch
    where nothing decoded is an empty 0 x 3 x S x S batch (never left out: under DDP every process must take the
    same number of steps).
    """
    if isinstance(items, Packed):
        items = items.unpack()
    encoded = [i for i, item in enumerate(items) if isinstance(item, Encoded)]
    images: list = list(items)
    decoded = decode_batch([items[i] for i in encoded], image_size, device, fallbacks)
    for i, image in zip(encoded, decoded, strict=True):
        images[i] = image
    keep = [i for i, image in enumerate(images) if isinstance(image, torch.Tensor)]
    bad = [(paths[i], image[1]) for i, image in enumerate(images) if not isinstance(image, torch.Tensor)]
    if not keep:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8, device=device), labels[:0], bad
    batch = torch.stack([images[i].to(device, non_blocking=True) for i in keep])
    return batch, labels[keep], bad
