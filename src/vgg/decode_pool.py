"""Decoding untrusted image bytes in worker processes that a crashing native decoder cannot take down with it.

A server decodes whatever a client sends. Native decoders are not all robust: torchvision 0.29's ``decode_image``
segfaults on a PNG whose chunks have valid CRCs but whose zlib stream is corrupt (libpng: "too many length or
distance symbols"; ``decoding`` now sends PNGs to Pillow for that reason, but the next such bug is unknown). In a
worker process a crash kills the worker, not the server: the pool breaks and is replaced by a fresh one, and each
image that was in flight is tried once more, alone, in a process of its own. The one that crashes that process
too is the culprit and is answered "decoder crashed".

Decoding is the same code as ``vgg predict`` (``decode_bytes`` then ``fit_to_model``), so the server's images
reach the model exactly as a file given to ``vgg predict`` would.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import signal
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .checkpoint import ModelInfo
from .decoding import decode_bytes
from .inference import fit_to_model


@dataclass(frozen=True)
class Limits:
    """What one image may be: pixels (width x height as its header says) and frames (animations)."""

    max_pixels: int = 40_000_000
    max_frames: int = 100


class DecodeError(ValueError):
    """An image that cannot be used; ``kind`` names the reason for metrics and the HTTP status."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keeps ``kind`` when the error crosses the process boundary
        return (DecodeError, (self.kind, str(self)))


def _kind(reason: str) -> str:
    for key, kind in (
        ("empty", "empty"),
        ("not an image", "not_an_image"),
        ("too large", "too_many_pixels"),
        ("truncated", "truncated"),
    ):
        if key in reason:
            return kind
    return "corrupt"


def decode_for_model(data: bytes, info: ModelInfo, limits: Limits) -> np.ndarray:
    """Image file bytes -> the model's 3 x S x S uint8 input (as ``vgg predict`` makes it), within ``limits``.

    Raises:
        DecodeError: the bytes are not a usable image, or exceed ``limits``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                frames = getattr(im, "n_frames", 1)
    except Exception:  # noqa: BLE001  what Pillow cannot open, decode_bytes names the reason for
        width = height = frames = 0
    if width * height > limits.max_pixels:
        raise DecodeError(
            "too_many_pixels", f"image too large: {width}x{height} px, the limit is {limits.max_pixels:,} px"
        )
    if frames > limits.max_frames:
        raise DecodeError("too_many_frames", f"too many frames: {frames}, the limit is {limits.max_frames}")
    try:
        image = decode_bytes(data)
    except ValueError as error:
        raise DecodeError(_kind(str(error)), str(error)) from None
    return fit_to_model(image, info).contiguous().numpy()


def _init_worker() -> None:
    # One image per worker at a time: threads would only compete with the model's for the same cores.
    torch.set_num_threads(1)
    # Ctrl-C goes to the server, which shuts the pool down; workers need not print their own tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DecoderCrashed(Exception):
    """The decoder process died on this image twice: once in the pool, once in a fresh one."""


class DecoderPool:
    """``await pool.decode(data)`` decodes in a worker process; the pool survives workers that crash.

    Args:
        workers: processes.
        info: the model's metadata (input size, resize mode).
        limits: pixel and frame limits.
        decode: what a worker runs, ``decode(data, info, limits)``; a module-level function (it is pickled by
            name). Tests pass one that crashes on purpose.
    """

    def __init__(
        self,
        workers: int,
        info: ModelInfo,
        limits: Limits,
        decode: Callable[[bytes, ModelInfo, Limits], np.ndarray] = decode_for_model,
    ):
        self.workers = workers
        self.info = info
        self.limits = limits
        self._decode = decode
        self.crashes = 0
        self._lock = threading.Lock()
        # forkserver: workers fork from a small process that has imported torch once, so a replacement pool
        # starts in a fraction of a second, and they do not inherit the server's threads (fork would).
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["vgg.decode_pool"])
        self._generation = 0
        self._pool = self._new_pool()
        self._quarantine: ProcessPoolExecutor | None = None
        self._quarantine_lock = asyncio.Lock()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=_init_worker)

    def _replace(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # another request already replaced it
            broken, self._pool = self._pool, self._new_pool()
            self._generation += 1
            self.crashes += 1
        broken.shutdown(wait=False, cancel_futures=True)

    async def decode(self, data: bytes) -> np.ndarray:
        """The model input for ``data``. Raises ``DecodeError`` or ``DecoderCrashed``."""
        generation = self._generation
        try:
            return await asyncio.wrap_future(self._pool.submit(self._decode, data, self.info, self.limits))
        except BrokenProcessPool:
            self._replace(generation)
        # This image was in flight when a worker died: it or another one killed it. Tried again alone, in a
        # process of its own, a culprit can only crash itself; innocent images are answered.
        async with self._quarantine_lock:
            if self._quarantine is None:
                self._quarantine = ProcessPoolExecutor(1, mp_context=self._context, initializer=_init_worker)
            try:
                return await asyncio.wrap_future(self._quarantine.submit(self._decode, data, self.info, self.limits))
            except BrokenProcessPool:
                self._quarantine.shutdown(wait=False, cancel_futures=True)
                self._quarantine = None
                raise DecoderCrashed("the image decoder crashed on this image") from None

    async def warm_up(self) -> None:
        """Start every worker now rather than on the first requests (each imports torch)."""
        tiny = io.BytesIO()
        Image.new("RGB", (8, 8)).save(tiny, format="PNG")
        await asyncio.gather(*(self.decode(tiny.getvalue()) for _ in range(self.workers)))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._quarantine is not None:
            self._quarantine.shutdown(wait=True, cancel_futures=True)
