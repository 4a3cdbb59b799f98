"""Model files: safetensors weights plus the metadata needed to use them, in one file, written atomically.

safetensors holds only tensors and a string-to-string header, so loading a model file never executes code from
it (unlike a pickled ``torch.save`` file). The header carries the architecture, class names, image size,
normalisation and the versions that wrote it. Every header value is checked by type and range, and against the
shapes of the tensors it describes, before a model is built or a weight is read (``parse_info``): a header cannot
ask for a 120,000 px input or two million classes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import UsageError
from .files import atomic_write
from .models import ARCHS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, VGG, build, pooled_size

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
    """Read only the metadata of a model file (cheap: the weights are not loaded), checked against its tensors."""
    return _open(path, weights=False)[0]


_OUTPUT = "classifier.6.weight"  # the output layer: one row per class
_FIRST_DENSE = "classifier.0.weight"  # its inputs follow from image_size
_RESIZE = ("squash", "crop")
_INTERPOLATION = ("bilinear", "nearest")
_NORMALISATION_LIMIT = 1e4


def parse_info(raw: Any, shapes: dict[str, list[int]] | None = None, where: str = "model file") -> ModelInfo:
    """A ``ModelInfo`` from a header's decoded ``info``, every field checked by type and range, and (with
    ``shapes``: tensor name -> shape) against the tensors: as many classes as outputs, the image size the first
    dense layer was built for.

    Raises:
        UsageError: one line naming the first bad field, what it must be and what it is.
    """

    def bad(name: str, wanted: str, value: Any) -> UsageError:
        text = repr(value)
        text = text if len(text) <= 80 else text[:80] + "..."
        return UsageError(f"{where}: {name} in the header must be {wanted}. Received: {text}.")

    if not isinstance(raw, dict):
        raise bad("info", "a JSON object", raw)
    known = {f.name: f for f in dataclasses.fields(ModelInfo)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r} in the header (written by a newer vgg?).")
    required = [
        name
        for name, f in known.items()
        if dataclasses.MISSING is f.default and dataclasses.MISSING is f.default_factory
    ]
    missing = [name for name in required if name not in raw]
    if missing:
        raise UsageError(f"{where}: the header has no {missing[0]!r}.")
    arch, names, size = raw["arch"], raw["class_names"], raw["image_size"]
    if not isinstance(arch, str) or arch not in ARCHS:
        raise bad("arch", f"one of {{{', '.join(ARCHS)}}}", arch)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("class_names", "a list of names", names)
    if type(size) is not int or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise bad("image_size", f"an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}", size)
    for name in ("mean", "std"):
        value = raw[name]
        if not (isinstance(value, list) and len(value) == 3 and all(_finite(v) for v in value)):
            raise bad(name, "3 finite numbers (R, G, B)", value)
    # Pixels are (x / 255 - mean) / std: means far outside [0, 1] or a vanishing std turn every pixel into an
    # overflow, and every probability into NaN.
    if not all(-_NORMALISATION_LIMIT <= v <= _NORMALISATION_LIMIT for v in raw["mean"]):
        raise bad("mean", f"3 numbers from -{_NORMALISATION_LIMIT:g} to {_NORMALISATION_LIMIT:g}", raw["mean"])
    if not all(1 / _NORMALISATION_LIMIT <= v <= _NORMALISATION_LIMIT for v in raw["std"]):
        raise bad(
            "std", f"3 positive numbers from {1 / _NORMALISATION_LIMIT:g} to {_NORMALISATION_LIMIT:g}", raw["std"]
        )
    checks: dict[str, tuple[Any, str]] = {
        "dropout": (lambda v: _finite(v) and 0 <= v <= 1, "a number from 0 to 1"),
        "resize": (lambda v: v in _RESIZE, f"one of {{{', '.join(_RESIZE)}}}"),
        "interpolation": (lambda v: v in _INTERPOLATION, f"one of {{{', '.join(_INTERPOLATION)}}}"),
        "extra": (lambda v: isinstance(v, dict), "a JSON object"),
        "temperature": (lambda v: _finite(v) and 0 < v <= 1e4, "a positive number"),
    }
    for name, (ok, wanted) in checks.items():
        if name in raw and not ok(raw[name]):
            raise bad(name, wanted, raw[name])
    if raw.get("resize") == "crop":
        crop_from = raw.get("extra", {}).get("resize_size", size)
        if type(crop_from) is not int or not size <= crop_from <= MAX_IMAGE_SIZE:
            raise bad("extra.resize_size", f"an integer from image_size ({size}) to {MAX_IMAGE_SIZE}", crop_from)
    if shapes is not None:
        _match_tensors(names, size, shapes, where)
    return ModelInfo(**raw)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _match_tensors(names: list[str], size: int, shapes: dict[str, list[int]], where: str) -> None:
    output, first = shapes.get(_OUTPUT), shapes.get(_FIRST_DENSE)
    if output is None or first is None or len(output) != 2 or len(first) != 2:
        raise UsageError(f"{where}: no VGG classifier weights ({_OUTPUT}, {_FIRST_DENSE}) in the file.")
    if output[0] != len(names):
        raise UsageError(
            f"{where}: the header names {len(names)} classes but the output layer has {output[0]} outputs."
        )
    inputs = 512 * pooled_size(size) ** 2
    if first[1] != inputs:
        raise UsageError(
            f"{where}: image_size {size} in the header needs {inputs} inputs to the first dense layer, but the "
            f"weights have {first[1]}."
        )


def existing_model_file(path: str | Path) -> Path:
    """``path`` if it is a file; else a clear error (for a run folder, naming the model inside it)."""
    path = Path(path)
    if path.is_dir():
        best = path / "best.safetensors"
        hint = f" Did you mean {best}?" if best.is_file() else ""
        raise UsageError(
            f"{path} is a folder, not a model file.{hint} Expected a .safetensors file written by `vgg train`."
        )
    if not path.is_file():
        raise UsageError(f"Model file not found: {path}. Expected a .safetensors file written by `vgg train`.")
    return path


def _open(path: str | Path, weights: bool = True) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    path = existing_model_file(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != FORMAT:
                raise UsageError(
                    f"{path} is a safetensors file but not a vgg model (no '{FORMAT}' metadata). "
                    "Expected a file written by `vgg train`."
                )
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
            info = parse_info(json.loads(header["info"]), shapes, str(path))
            if weights:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except UsageError:
        raise
    except RecursionError as error:
        raise UsageError(f"{path} is not a vgg model file (its header is nested too deeply).") from error
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as error:
        kind = _other_kind(path)
        raise UsageError(
            f"{path} is not a vgg model file ({kind or f'{type(error).__name__}: {error}'}). "
            "Expected a .safetensors file written by `vgg train`."
        ) from error
    return info, tensors


# The first bytes of the files most often given where a model belongs.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def _other_kind(path: Path) -> str:
    """What a file that is not a model file is, when its first bytes or its name say so, and what to do instead."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return ""
    best = path.with_name("best.safetensors")
    instead = f"; did you mean {best}?" if best.is_file() else ""
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "it is an image: the model file comes first on the command line"
    if head.startswith(b"vgg.state/"):  # training/state.py's header
        return f"it is the training state of a run, for `vgg train --resume`{instead}"
    if head.startswith(b"\x89HDF\r\n\x1a\n") or path.suffix.lower() == ".keras":
        return f"it is a Keras file: convert it with `vgg import-keras {path}`"
    if head.startswith(b"PK\x03\x04"):
        return f"it is a PyTorch file (torch.save), which vgg never loads as a model: loading one can run code{instead}"
    if path.suffix.lower() == ".onnx":
        return "it is an ONNX file: give the .safetensors model it was exported from"
    if head.lstrip().startswith((b"{", b"[")):
        return f"it is a JSON file{instead}"
    return ""


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[VGG, ModelInfo]:
    """Build the model a file describes and load its weights; no code from the file is executed."""
    info, tensors = _open(path)
    for name, tensor in tensors.items():
        # A flipped exponent bit makes a weight inf or NaN, and every probability NaN. Any NaN or inf makes the sum
        # NaN or inf: one pass, no mask as large as the tensor.
        if tensor.is_floating_point() and not math.isfinite(tensor.sum(dtype=torch.float64).item()):
            raise UsageError(
                f"{path}: the weights {name} are not finite numbers (NaN or infinity): the file is damaged."
            )
    model = build(
        info.arch, num_classes=info.num_classes, image_size=info.image_size, dropout=info.dropout, init_weights=False
    )
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise UsageError(f"{path}: weights do not match {info.arch} ({str(error).splitlines()[0]}).") from error
    return model.to(device).eval(), info
