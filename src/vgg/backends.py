"""What ``vgg serve`` runs a batch on: PyTorch (``vgg.load``, what ``vgg predict`` runs) or onnxruntime (an ONNX
file, or the ONNX export of a model file, made once and cached by content)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import ModelInfo, existing_model_file
from .errors import UsageError
from .export import export, info_from_metadata, onnx_session, read_onnx_metadata
from .predict import load
from .runtime import pick_device

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
# What `auto` means on a CPU: onnxruntime ran VGG11 at 32 px 3-19x faster than PyTorch's default (2 threads, bf16
# or fp32) at batch 1-32 on a busy 2-core CPU, and as fast as PyTorch on one thread (benchmarks/RESULTS.md,
# "Serving"). PyTorch where onnxruntime is not installed.
CPU_BACKEND = "onnxruntime"


class Backend:
    """Runs the model on a batch of uint8 N x 3 x S x S images and returns N x C float probabilities."""

    name: str
    info: ModelInfo
    details: dict[str, Any]
    run: Callable[[torch.Tensor], np.ndarray]


def make_backend(model: str, backend: str, device: str) -> Backend:
    """``torch``: ``vgg.load`` (what ``vgg predict`` runs); ``onnxruntime``: an ONNX file, exported if need be."""
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}. Received: backend={backend!r}.")
    is_onnx = str(model).endswith(".onnx")
    if backend == "auto":
        if is_onnx:
            backend = "onnxruntime"
        elif pick_device(device).type == "cuda" or importlib.util.find_spec("onnxruntime") is None:
            backend = "torch"
        else:
            backend = CPU_BACKEND
    if is_onnx and backend == "torch":
        raise UsageError(f"{model} is an ONNX file: serve it with --backend onnxruntime (or give a .safetensors).")
    result = Backend()
    result.name = backend
    if backend == "torch":
        classifier = load(model, device=device)
        result.info = classifier.info
        result.details = {"device": str(classifier.device), "precision": classifier.step.precision}
        result.run = lambda images: classifier.probabilities(images).numpy()
        return result
    path = Path(model) if is_onnx else _onnx_for(model)
    result.info = info_from_metadata(read_onnx_metadata(path))
    session = onnx_session(path)
    result.details = {"device": "cpu", "precision": "fp32", "onnx_file": str(path)}
    result.run = lambda images: session.run(None, {"image": images.float().div(255).numpy()})[0]
    return result


def _onnx_for(model: str) -> Path:
    """The ONNX export of a model file, made on first use and kept in the cache folder, keyed by its content."""
    if str(model).startswith("imagenet:"):
        key = str(model).replace(":", "-")
    else:
        digest = hashlib.sha256()
        with open(existing_model_file(model), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        key = digest.hexdigest()[:32]
    path = Path(os.environ.get("VGG_CACHE_DIR") or Path.home() / ".cache" / "vgg") / "onnx" / f"{key}.onnx"
    if not path.is_file():
        log.warning("vgg serve: exporting %s to ONNX for onnxruntime, once (kept as %s)", model, path)
        result = export(model, "onnx", out=path)
        if not result.ok:
            path.unlink(missing_ok=True)
            raise RuntimeError(f"the ONNX export of {model} does not match PyTorch: {result.summary()}")
    return path
