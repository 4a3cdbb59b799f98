"""Weight files to start from: torchvision's ImageNet weights (downloaded once, cached), .pth/.pt, .safetensors and
Keras VGG files (``.h5``, ``.weights.h5``, ``.keras``; read by ``keras_import``).

ImageNet weights are torchvision's (``VGG16_Weights.IMAGENET1K_V1`` and its siblings), fetched through
torchvision's own download and cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``), so a file
torchvision already downloaded is reused and an offline machine can be given the file by hand. Files are read
with ``torch.load(weights_only=True)`` or safetensors: reading weights never runs code.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .checkpoint import FORMAT, read_info
from .errors import UsageError
from .keras_files import is_keras_file
from .keras_import import find_class_names, read_keras
from .models import check_arch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Set to 1 to never download: a missing ImageNet file is then reported at once instead of after a network timeout.
OFFLINE_ENV = "VGG_OFFLINE"


@dataclass
class Pretrained:
    """Weights to start from, with the preprocessing they were trained with."""

    state_dict: dict[str, torch.Tensor]
    source: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    class_names: list[str] | None = None


def imagenet_weights(arch: str):  # -> torchvision.models.WeightsEnum
    """torchvision's ImageNet-1K weights entry for a family member (its URL, categories and transforms)."""
    from torchvision.models import get_model_weights

    return get_model_weights(check_arch(arch)).IMAGENET1K_V1


def imagenet_cache_path(weights) -> Path:
    """Where torchvision keeps (and looks for) a downloaded weights file: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def imagenet_state_dict(arch: str, progress: bool = False) -> tuple[dict[str, torch.Tensor], object]:
    """torchvision's ImageNet state_dict for ``arch``: from its cache, else downloaded into it.

    Raises:
        UsageError: the file is not cached and cannot be downloaded; the message names the file and the folder.
    """
    weights = imagenet_weights(arch)
    path = imagenet_cache_path(weights)
    if path.is_file():
        return read_torch_file(path), weights
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        reason = f"{OFFLINE_ENV} is set"
    else:
        try:
            state = torch.hub.load_state_dict_from_url(
                weights.url, map_location="cpu", progress=progress, check_hash=True, weights_only=True
            )
            return _as_state_dict(state, path), weights
        except (OSError, HTTPException, RuntimeError) as error:
            reason = f"download failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    raise UsageError(
        f"ImageNet weights for {arch} are not cached and could not be fetched ({reason}). "
        f"Expected the file {path}: download {weights.url} on a machine with internet access and copy it there "
        "(the folder is $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), then run again."
    )


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict saved with ``torch.save``, read without executing code from the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as error:
        raise UsageError(
            f"Cannot read weights file {path} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Expected a state_dict saved with torch.save (loaded with weights_only=True, which runs no code)."
        ) from error
    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    # Training scripts often wrap the state_dict: {"state_dict": ...} or {"model": ...}.
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{path} holds a {type(obj).__name__}, not a state_dict. "
            "Expected a mapping of parameter names to tensors, as model.state_dict() gives."
        )
    return obj


def read_weights(spec: str, arch: str, progress: bool = False) -> Pretrained:
    """Resolve ``--weights``: ``imagenet``, a .pth/.pt state_dict, a .safetensors file (a vgg model or plain), or a
    Keras VGG file (with the preprocessing its weights expect)."""
    if spec == "imagenet":
        state, weights = imagenet_state_dict(arch, progress)
        transforms = weights.transforms()
        return Pretrained(
            state, f"imagenet ({weights})", tuple(transforms.mean), tuple(transforms.std), weights.meta["categories"]
        )
    path = Path(spec)
    if not path.is_file():
        raise UsageError(
            f"weights must be 'imagenet' or a .pth/.pt/.safetensors file. Received: weights={spec!r}, which is not a "
            "file. (Keras .h5/.keras files work too.)"
        )
    if is_keras_file(path):
        return _keras_pretrained(path, arch)
    if path.suffix in (".pth", ".pt", ".bin"):
        return Pretrained(read_torch_file(path), str(path))
    if path.suffix != ".safetensors":
        raise UsageError(
            f"weights file must end in .pth, .pt or .safetensors, or be a Keras .h5/.keras file. Received: {path}."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UsageError(f"Cannot read weights file {path} ({error}). Expected a .safetensors file.") from error
    with safe_open(str(path), framework="pt") as handle:
        ours = (handle.metadata() or {}).get("format") == FORMAT
    if not ours:
        return Pretrained(state, str(path))
    info = read_info(path)
    if info.arch != arch:
        raise UsageError(
            f"{path} is a {info.arch} model but arch={arch}. Train with --arch {info.arch} or use {arch} weights."
        )
    return Pretrained(state, str(path), tuple(info.mean), tuple(info.std), info.class_names)


def _keras_pretrained(path: Path, arch: str) -> Pretrained:
    """A Keras VGG file's tensors under our names; a class-indices file beside it names its output layer."""
    keras = read_keras(path)
    if keras.arch != arch:
        raise UsageError(
            f"{path} is a {keras.arch} Keras file but arch={arch}. "
            f"Train with --arch {keras.arch} or use {arch} weights."
        )
    names = find_class_names(path, keras.num_classes) if keras.num_classes else None
    return Pretrained(keras.state_dict, keras.source, tuple(keras.mean), tuple(keras.std), names)
