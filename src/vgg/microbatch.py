"""Micro-batching: single images from concurrent requests become batches for one inference thread.

A model call costs much less per image in a batch (benchmarks/RESULTS.md, "Serving"), but clients send one image
at a time. ``MicroBatcher.predict`` queues an image and awaits its row of probabilities; one task takes the
first waiting image, waits at most ``max_wait_ms`` for up to ``max_batch - 1`` more, and runs the batch in its
own thread, so the event loop keeps accepting requests (which fill the next batch) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue of images waiting for the model is full."""


class MicroBatcher:
    """Collects single images from concurrent requests into batches for one inference thread."""

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray], max_batch: int, max_wait_ms: float, size: int):
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue(size)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="vgg-inference")
        self.on_batch: Callable[[int], None] = lambda n: None

    async def predict(self, image: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((image, future))
        except asyncio.QueueFull:
            raise Busy(f"the server is busy: {self.queue.maxsize} images are waiting; try again shortly") from None
        return await future

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                if not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            items = [(image, future) for image, future in items if not future.done()]  # clients that left
            if not items:
                continue
            batch = torch.from_numpy(np.stack([image for image, _ in items]))
            self.on_batch(len(items))
            try:
                probabilities = await loop.run_in_executor(self.thread, self.run, batch)
            except Exception as error:  # noqa: BLE001  one failed batch answers its requests, not the server
                log.exception("inference failed")
                for _, future in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), row in zip(items, probabilities, strict=True):
                if not future.done():
                    future.set_result(row)
