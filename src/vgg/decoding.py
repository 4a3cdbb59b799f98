"""Reading image files into uint8 RGB tensors: every format, on the host, and JPEG batches where the model runs.

``decode`` recognises the format by content. JPEGs go through torchvision's native decoder (libjpeg-turbo, the
fastest we have); every other format through Pillow, which raises a clean error on a corrupt file where
torchvision 0.29's PNG decoder kills the process (any libpng error after the header: a flipped bit in the
compressed data, a bad filter byte) and its GIF decoder decodes every frame of an animation, where one is used.
Measured on clean data, Pillow for PNG costs nothing (benchmarks/RESULTS.md, "Decoding untrusted files").
Limits are checked before anything is allocated: only regular files of at most ``MAX_FILE_BYTES`` are read
(``scan.read_regular``), and only images of at most ``MAX_PIXELS`` (width x height from the header) are decoded,
only their first frame. Grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB.

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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from .runtime import device_failure
from .scan import MAX_FILE_BYTES, read_regular, sniff

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they remain the fastest decoders in our stack.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
# Pillow warns from 89 Mpx (its MAX_IMAGE_PIXELS, our MAX_PIXELS) and raises from twice that; we refuse both from
# the header. Filtered once here: a ``catch_warnings`` around each decode cost 10% of a small PNG's decode time.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Images bigger than this are refused rather than decoded (decompression bombs); Pillow warns at 89 Mpx.
MAX_PIXELS = 89_478_485
# Formats torchvision decodes natively; the rest go through Pillow (see the module docstring for why not PNG, GIF
# or WebP). A file of a format not listed here never reaches a native torchvision decoder.
NATIVE_FORMATS = {"jpeg"}


def _header(data: bytes, kind: str) -> tuple[int, int]:
    """Width and height from the header alone, so a decompression bomb is refused before it is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as error:
        # Pillow refuses to even read the header past twice its own limit, which is our limit.
        raise ValueError(f"image too large (over {2 * MAX_PIXELS:,} px, limit {MAX_PIXELS:,} px)") from error
    except Exception as error:  # noqa: BLE001  any failure to parse untrusted bytes makes the file bad
        raise ValueError(_reason(error, kind)) from error


class _Refused(ValueError):
    """An image refused by a limit (not a decoder failure): its message is the reason as it stands."""


def _too_many_pixels(width: int, height: int) -> _Refused:
    return _Refused(f"image too large ({width}x{height} px, limit {MAX_PIXELS:,} px)")


def _reason(error: BaseException, kind: str) -> str:
    return f"{'truncated' if 'truncat' in str(error).lower() else 'corrupt'} {kind} image ({error})"


def _pil_pixels(im: Image.Image) -> torch.Tensor:
    """The current frame of an open Pillow image as 8-bit RGB (or gray: 1 x H x W), EXIF orientation applied."""
    im.load()  # the first frame only: an animation's other frames are never decoded
    # Only where EXIF can be (parsing an absent one cost 5% of a small PNG's decode): JPEG, WebP and PNG's eXIf
    # chunk put it in ``info``, ImageMagick writes it as PNG text, TIFF's orientation is a tag of its own.
    if im.format == "TIFF" or "exif" in im.info or "Raw profile type exif" in im.info:
        if im.getexif().get(ORIENTATION_TAG, 1) != 1:
            im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # Pillow's own conversion clips 16-bit values at 255 (a white image); scale them instead.
        pixels = np.asarray(im, dtype=np.float32)
        pixels = pixels / 257 if im.mode.startswith("I;16") or pixels.max() > 255 else pixels
        im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if im.mode == "L" and "transparency" not in im.info:
        return torch.from_numpy(np.array(im)).unsqueeze(0)  # made RGB after resizing
    if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
        im = im.convert("RGBA")
    # H x W x 3 seen as 3 x H x W: resizing reads this layout directly (torch's fast uint8 path), with no copy.
    return torch.from_numpy(np.array(im if im.mode == "RGB" else im.convert("RGB"))).permute(2, 0, 1)


def _decode_pil(data: bytes, kind: str) -> torch.Tensor:
    """Decode with Pillow, the pixel limit checked on the header before any pixel is decoded.

    Whatever Pillow raises on a damaged file (OSError mostly, but struct, index and zero-division errors come out
    of its parsers on fuzzed input) makes the file bad, never the caller's crash.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise _too_many_pixels(width, height)
            return _pil_pixels(im)
    except _Refused:
        raise
    except Image.DecompressionBombError as error:
        # Pillow refuses to even read the header past twice its own limit, which is our limit.
        raise _Refused(f"image too large (over {2 * MAX_PIXELS:,} px, limit {MAX_PIXELS:,} px)") from error
    except MemoryError as error:
        raise _Refused(f"{kind} image needs more memory than there is ({error})") from error
    except Exception as error:  # noqa: BLE001  any failure to parse untrusted bytes makes the file bad
        raise ValueError(_reason(error, kind)) from error


def decode(path: str | Path, image_size: int | None = None) -> torch.Tensor:
    """Read an image file as a 3 x H x W uint8 RGB tensor, EXIF orientation applied, optionally squashed to a square.

    The format is recognised by content. Grayscale, palette (with transparency), RGBA, CMYK and 16-bit images
    become 8-bit RGB; an animated GIF, WebP or PNG gives its first frame (the only one decoded). JPEGs go through
    torchvision's native decoder (faster); everything else through Pillow.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a regular file (a named pipe, a device: never opened for blocking reads), is
            over ``MAX_FILE_BYTES``, empty, not an image, truncated or corrupt, or over ``MAX_PIXELS`` pixels; the
            message is the reason, as written to ``skipped.csv``.
        OSError: the file cannot be read (permissions).
    """
    try:
        data = read_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image not found: {path}. Expected an image file (jpg, png, ...).") from None
    return decode_bytes(data, image_size)


def decode_bytes(data: bytes, image_size: int | None = None) -> torch.Tensor:
    """``decode`` for an image file's content already in memory.

    Raises:
        ValueError: as ``decode``, for the content.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"file too large ({len(data):,} bytes, limit {MAX_FILE_BYTES:,} bytes)")
    kind = sniff(data[:16])
    if kind is None:
        text = all(32 <= b < 127 or b in (9, 10, 13) for b in data[:64])
        raise ValueError("not an image (its content is text)" if text else "not an image (unknown content)")
    image = None
    if kind in NATIVE_FORMATS:
        width, height = _header(data, kind)
        if width * height > MAX_PIXELS:
            raise _too_many_pixels(width, height)
        try:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            image = decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            image = None  # Pillow tries too (CMYK JPEGs, and it shows what a truncated file holds)
    if image is None:
        image = _decode_pil(data, kind)
    if image.ndim == 4:
        image = image[0]
    if image.dtype != torch.uint8:
        image = TF.to_dtype(image, torch.uint8, scale=True)
    if image_size is not None and tuple(image.shape[-2:]) != (image_size, image_size):
        image = squash(image, image_size)
    return image.expand(3, -1, -1).contiguous()


def squash(image: torch.Tensor, size: int) -> torch.Tensor:
    """A C x H x W uint8 image resized to ``size`` x ``size``: ``TF.resize(..., antialias=True)``, pixel for pixel.

    Called directly, torch's antialiased bilinear takes 50 us where torchvision's dispatch around it adds 30 us:
    a tenth of a 28 px PNG's whole decode.
    """
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


# EXIF tag 0x0112: how the camera was held. nvJPEG does not apply it, so it is applied after decoding.
ORIENTATION_TAG = 0x0112


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
