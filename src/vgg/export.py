"""Export a model to ONNX, TorchScript or a ``torch.export`` ExportedProgram, checked against PyTorch.

What every export takes and gives (the same for all three formats, and written into its metadata):

- input ``image``: float32, N x 3 x S x S, RGB in [0, 1] (a uint8 image divided by 255), any batch size N.
  Resizing to S x S stays outside the graph (it depends on the image), as the metadata's ``preprocessing``
  describes; the model's normalisation (mean, std) is inside it, so a caller never has to know it.
- output ``probabilities``: float32, N x C, softmax over the classes in ``class_names`` order (of the logits
  divided by the model's fitted ``temperature``, as ``vgg predict`` gives them).

The metadata goes into the ONNX file's ``metadata_props`` (key ``vgg``, a JSON object); TorchScript and
ExportedProgram files have no portable place for it, so it is written to a JSON file beside them (``FILE.json``),
and also as the archive's extra file ``vgg.json``.

ONNX goes through ``torch.onnx.export(dynamo=True)``: in torch 2.14.1 both it and the older TorchScript-based
exporter (``dynamo=False``, deprecated) gave a correct dynamic-batch graph for VGG11 at 32 px (checked at batch
1, 5 and 7 in onnxruntime: max abs difference 9e-8 for both); the dynamo one is the maintained path.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import ModelInfo
from .errors import UsageError
from .files import atomic_write, check_out_file, write_json
from .predict import load

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
METADATA_KEY = "vgg"
METADATA_FORMAT = "vgg.export/1"
# fp32 end to end: what is left is the order of float additions, about 1e-7 on VGG11 (measured).
TOLERANCE = 1e-4
CHECK_BATCHES = (1, 5)


class Normalised(nn.Module):
    """The network with its normalisation in front and softmax behind: [0, 1] RGB in, probabilities out.

    The logits are divided by the model's fitted temperature first, as ``vgg predict`` does.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model((image - self.mean) / self.std)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


@dataclass
class ExportResult:
    """What was written and how closely it reproduces PyTorch (max abs difference of probabilities per batch)."""

    path: Path
    format: str
    metadata_path: Path | None
    max_abs_diff: dict[int, float] = field(default_factory=dict)
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        return all(diff <= self.tolerance for diff in self.max_abs_diff.values())

    def summary(self) -> str:
        checks = ", ".join(f"batch {n}: {d:.2e}" for n, d in self.max_abs_diff.items())
        verdict = "OK" if self.ok else "FAILED"
        beside = f" (metadata: {self.metadata_path})" if self.metadata_path else ""
        return (
            f"wrote {self.path}{beside}\n"
            f"check against PyTorch, max abs difference of probabilities ({checks}; tolerance {self.tolerance:g}): "
            f"{verdict}"
        )


def metadata(info: ModelInfo) -> dict[str, Any]:
    """What a user of the export needs to feed it and read its output."""
    size = info.image_size
    preprocessing: dict[str, Any] = {
        "resize": info.resize,
        "interpolation": info.interpolation,
        "mean": list(info.mean),
        "std": list(info.std),
    }
    if info.resize == "crop":
        preprocessing["resize_size"] = int(info.extra.get("resize_size", size))
    return {
        "format": METADATA_FORMAT,
        "arch": info.arch,
        "class_names": list(info.class_names),
        "image_size": size,
        "input": {
            "name": "image",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "channels": "RGB",
            "normalisation": "inside the graph (mean and std below are applied by the model)",
        },
        "output": {"name": "probabilities", "shape": ["batch", info.num_classes], "meaning": "softmax"},
        "temperature": float(info.temperature),
        "preprocessing": preprocessing,
        "versions": {"vgg": __version__, "torch": torch.__version__},
    }


def export(
    model_path: str | Path, format: str, out: str | Path | None = None, opset: int | None = None
) -> ExportResult:
    """Write ``model_path`` (a model file or ``imagenet:ARCH``) as ``format`` and check it against PyTorch.

    Args:
        model_path: a ``.safetensors`` file written by ``vgg train``, or ``imagenet:ARCH``.
        format: ``onnx``, ``torchscript`` or ``exported-program``.
        out: the file to write; default: beside the model file, suffix ``.onnx``, ``.torchscript.pt`` or ``.pt2``.
        opset: ONNX opset version (ONNX only); default: the exporter's.

    Returns:
        The paths written and the check: the export run on random images at batch sizes 1 and 5 against
        ``vgg.load(model_path, precision="fp32")`` on the same images.
    """
    if format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}. Received: format={format!r}.")
    if opset is not None and format != "onnx":
        raise UsageError(f"--opset applies to ONNX only. Received: opset={opset} with format={format!r}.")
    out = check_out_file(out if out is not None else default_out(model_path, format), f"the {format} export")
    reference = load(model_path, device="cpu", precision="fp32")
    # The classifier keeps its copy in channels-last for speed; the export gets the plain layout.
    model = copy.deepcopy(reference.model).to(memory_format=torch.contiguous_format).float().eval()
    model.requires_grad_(False)
    info = reference.info
    wrapped = Normalised(model, info.mean, info.std, info.temperature).eval()
    meta = metadata(reference.info)
    size = reference.info.image_size
    example = torch.rand(2, 3, size, size)
    writer = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported-program": _write_exported}[format]
    with torch.no_grad():
        metadata_path = writer(wrapped, example, meta, out, opset)
    result = ExportResult(out, format, metadata_path)
    run = runner(out, format)
    generator = torch.Generator().manual_seed(0)
    for n in CHECK_BATCHES:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        expected = reference.probabilities(images).numpy()
        got = run(images.float().div(255).numpy())
        if got.shape != expected.shape:
            raise RuntimeError(f"{out}: batch {n} gave shape {got.shape}, expected {expected.shape}")
        result.max_abs_diff[n] = float(np.abs(got - expected).max())
    return result


# The public name (``vgg.export_model``): ``vgg.export`` is this module once anything has imported it.
export_model = export


def default_out(model_path: str | Path, format: str) -> Path:
    text = str(model_path)
    if text.startswith("imagenet:"):
        return Path(text.split(":", 1)[1] + SUFFIXES[format])
    path = Path(text)
    return path.with_name(path.name.removesuffix(".safetensors") + SUFFIXES[format])


def _write_json_beside(out: Path, meta: dict[str, Any]) -> Path:
    path = out.with_name(out.name + ".json")
    write_json(path, meta)
    return path


def _write_onnx(model: nn.Module, example: torch.Tensor, meta: dict, out: Path, opset: int | None) -> None:
    try:
        import onnx
    except ImportError as error:
        raise UsageError("ONNX export needs the onnx package: pip install 'vgg[export]'.") from error
    batch = torch.export.Dim("batch")
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                dynamo=True,
                opset_version=opset,
                input_names=["image"],
                output_names=["probabilities"],
                dynamic_shapes={"image": {0: batch}},
                verbose=False,
            )
        proto = onnx.load(str(raw))
    del proto.metadata_props[:]
    for key, value in {METADATA_KEY: json.dumps(meta), "class_names": json.dumps(meta["class_names"])}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    atomic_write(out, lambda temp: onnx.save(proto, temp))
    return None


def _write_torchscript(model: nn.Module, example: torch.Tensor, meta: dict, out: Path, opset: int | None) -> Path:
    with warnings.catch_warnings():
        # Conv3x3's training-only branch reads shapes and grad mode: traced under no_grad it is always the
        # plain convolution, which is what inference wants, and it does not depend on the batch size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch 2.14 marks TorchScript deprecated (FutureWarning); it is still what C++ and older runtimes load.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        extra = {"vgg.json": json.dumps(meta)}
        atomic_write(out, lambda temp: torch.jit.save(traced, temp, _extra_files=extra))
    return _write_json_beside(out, meta)


def _write_exported(model: nn.Module, example: torch.Tensor, meta: dict, out: Path, opset: int | None) -> Path:
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes={"image": {0: batch}})
    extra = {"vgg.json": json.dumps(meta)}

    def write(temp: str) -> None:
        # Through a file object: given a path, torch.export.save warns about any name not ending in .pt2.
        with open(temp, "wb") as handle:
            torch.export.save(program, handle, extra_files=extra)

    atomic_write(out, write)
    return _write_json_beside(out, meta)


def runner(path: str | Path, format: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a float32 N x 3 x S x S array in [0, 1] to N x C probabilities, running the export."""
    path = str(path)
    if format == "onnx":
        session = onnx_session(path)
        return lambda images: session.run(None, {"image": images})[0]
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location="cpu").eval()
    else:
        module = torch.export.load(path).module()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()

    return run


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for an exported file."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise UsageError("Running ONNX files needs onnxruntime: pip install 'vgg[export]'.") from error
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # onnxruntime's threads spin while waiting for work by default: in a server they would take the cores that
    # decode images and answer HTTP between model calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``vgg`` metadata of an ONNX file written by ``export``."""
    try:
        import onnx
    except ImportError as error:
        raise UsageError("Reading ONNX files needs the onnx package: pip install 'vgg[export]'.") from error
    if not Path(path).is_file():
        raise UsageError(f"ONNX file not found: {path}. Expected a file written by `vgg export`.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises several unrelated types for a file that is not ONNX
        raise UsageError(
            f"{path} is not an ONNX file ({type(error).__name__}). Expected a file from `vgg export`."
        ) from None
    props = {entry.key: entry.value for entry in proto.metadata_props}
    if METADATA_KEY not in props:
        raise UsageError(f"{path} has no '{METADATA_KEY}' metadata. Expected an ONNX file written by `vgg export`.")
    return json.loads(props[METADATA_KEY])


def info_from_metadata(meta: dict[str, Any]) -> ModelInfo:
    """The ``ModelInfo`` an export's metadata describes (to preprocess images exactly as ``vgg predict`` does)."""
    pre = meta["preprocessing"]
    extra = {"resize_size": pre["resize_size"]} if "resize_size" in pre else {}
    return ModelInfo(
        arch=meta["arch"],
        class_names=list(meta["class_names"]),
        image_size=int(meta["image_size"]),
        mean=list(pre["mean"]),
        std=list(pre["std"]),
        resize=pre["resize"],
        interpolation=pre.get("interpolation", "bilinear"),
        extra=extra,
        temperature=float(meta.get("temperature", 1.0)),
    )


__all__ = ["FORMATS", "ExportResult", "export", "export_model", "metadata", "read_onnx_metadata", "runner"]
