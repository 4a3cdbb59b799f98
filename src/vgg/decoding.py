"""Reading image files into uint8 RGB tensors, every format, on the host (JPEG batches where the model runs:
``jpeg_batches.py``).

``decode`` recognises the format by content. JPEGs go through torchvision's native decoder (libjpeg-turbo, the
fastest we have); every other format through Pillow, which raises a clean error on a corrupt file where
torchvision 0.29's PNG decoder kills the process (any libpng error after the header: a flipped bit in the
compressed data, a bad filter byte) and its GIF decoder decodes every frame of an animation, where one is used.
Measured on clean data, Pillow for PNG costs nothing (benchmarks/RESULTS.md, "Decoding untrusted files").
Limits are checked before anything is allocated: only regular files of at most ``MAX_FILE_BYTES`` are read
(``scan.read_regular``), and only images of at most ``MAX_PIXELS`` (width x height from the header) are decoded,
only their first frame. Grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from .scan import MAX_FILE_BYTES, read_regular, sniff

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they remain the fastest decoders in our stack.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
# Pillow warns from 89 Mpx (its MAX_IMAGE_PIXELS, our MAX_PIXELS) and raises from twice that; we refuse both from
# the header. Filtered once here: a ``catch_warnings`` around each decode cost 10% of a small PNG's decode time.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Images bigger than this are refused rather than decoded (decompression bombs); Pillow warns at 89 Mpx.
MAX_PIXELS = 89_478_485
# EXIF tag 0x0112: how the camera was held.
ORIENTATION_TAG = 0x0112
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
