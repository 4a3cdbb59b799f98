"""Model files: safetensors weights plus the metadata needed to use them, in one file, written atomically.

safetensors holds only tensors and a string-to-string header, so loading a model file never executes code from
it (unlike a pickled ``torch.save`` file). The header carries the architecture, class names, image size,
normalisation and the versions that wrote it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import UsageError
from .files import atomic_write
from .models import VGG, build

FORMAT = "vgg.model/1"


@dataclass
class ModelInfo:
    """What a model file says about its model: how to build it and how to feed it."""

    arch: str
    class_names: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    dropout: float = 0.5
    resize: str = "squash"
    # How images are brought to ``image_size``: "bilinear" (antialiased, as training decodes) or "nearest"
    # (what Keras's load_img does, for models imported from Keras).
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict)
    # Temperature scaling (Guo et al., 2017), fitted on the validation images at the end of training: prediction
    # divides the logits by it. 1.0 (files written before it existed) leaves probabilities as the model gives them.
    temperature: float = 1.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def save_model(path: str | Path, model: VGG, info: ModelInfo) -> None:
    """Write ``model``'s weights and ``info`` to a .safetensors file, atomically."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model.state_dict().items()}
    header = {
        "format": FORMAT,
        "info": json.dumps(asdict(info)),
        "versions": json.dumps({"vgg": __version__, "torch": torch.__version__}),
    }
    atomic_write(path, lambda temp: save_file(tensors, temp, metadata=header))


def read_info(path: str | Path) -> ModelInfo:
    """Read only the metadata of a model file (cheap: the weights are not loaded)."""
    return _open(path)[0]


def _open(path: str | Path) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Model file not found: {path}. Expected a .safetensors file written by `vgg train`.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != FORMAT:
                raise UsageError(
                    f"{path} is a safetensors file but not a vgg model (no '{FORMAT}' metadata). "
                    "Expected a file written by `vgg train`."
                )
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        info = ModelInfo(**json.loads(header["info"]))
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as error:
        raise UsageError(
            f"{path} is not a vgg model file ({type(error).__name__}: {error}). "
            "Expected a .safetensors file written by `vgg train`."
        ) from error
    return info, tensors


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[VGG, ModelInfo]:
    """Build the model a file describes and load its weights; no code from the file is executed."""
    info, tensors = _open(path)
    model = build(info.arch, num_classes=info.num_classes, image_size=info.image_size, dropout=info.dropout)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise UsageError(f"{path}: weights do not match {info.arch} ({str(error).splitlines()[0]}).") from error
    return model.to(device).eval(), info
