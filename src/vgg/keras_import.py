"""Keras VGG models and weights as vgg models that give Keras's predictions (``vgg import-keras``, ``--weights``).

The architecture is read from the file's own config or, for weights-only files, from the weight shapes, and must be
one of our VGGs without batch norm (``keras_arch``). The arithmetic is then identical to Keras's:

- convolutions: Keras stores kernels as (height, width, in, out), torch as (out, in, height, width); both
  cross-correlate, and 3x3 'same' is padding 1 on each side;
- the first dense layer: Keras's ``Flatten`` reads the last map in (height, width, channel) order, ours in
  (channel, height, width) order, so its input rows are permuted. Our classifier pools the map down to at most
  7x7 before flattening, which is the identity below 256 px (the map is ``size // 32`` wide), so files for
  32-255 px import exactly; at 256 px and above Keras's Flatten sees more than 7x7 and the file is refused;
- preprocessing travels in the model file as ``(x / 255 - mean) / std`` on RGB. The tutorial feeds raw 0-255
  pixels: mean 0, std 1/255. keras.applications weights expect caffe-style BGR minus the ImageNet mean
  (``keras.applications.vgg16.preprocess_input``): the first convolution's input channels are reversed and the
  mean is given in RGB order, so no channel-order setting is needed. Keras's ``load_img`` resizes with Pillow's
  nearest neighbour, so the model says ``interpolation="nearest"``;
- a one-unit sigmoid output (binary ``class_mode``) becomes two softmax outputs with logits (0, z):
  softmax gives (1 - sigmoid(z), sigmoid(z)), exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ModelInfo, save_model
from .errors import UsageError
from .files import check_out_file
from .keras_arch import KerasArch, read_arch
from .keras_files import read_keras_file
from .models import ARCHS, CONFIGS, VGG, build

# Mean (RGB order, fraction of 255) and std such that (x / 255 - mean) / std is what the Keras model was fed.
PREPROCESSING = {
    "raw": ([0.0, 0.0, 0.0], [1 / 255] * 3),
    "caffe": ([123.68 / 255, 116.779 / 255, 103.939 / 255], [1 / 255] * 3),
}
CLASS_INDEX_FILES = ("{stem}.class_indices.json", "class_indices.json")
KERAS_NAME_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")


@dataclass
class KerasVGG:
    """A Keras VGG as vgg tensors: ``state_dict`` uses our names (the classifier only when the file has one)."""

    arch: str
    image_size: int | None
    num_classes: int | None
    state_dict: dict[str, torch.Tensor]
    preprocessing: str
    source: str

    @property
    def mean(self) -> list[float]:
        return list(PREPROCESSING[self.preprocessing][0])

    @property
    def std(self) -> list[float]:
        return list(PREPROCESSING[self.preprocessing][1])


def _feature_names(config: str) -> list[str]:
    """State-dict prefixes of the convolutions in ``make_features`` order (each conv is followed by its ReLU)."""
    names, index = [], 0
    for item in CONFIGS[config]:
        if item != "M":
            names.append(f"features.{index}")
            index += 1
        index += 1
    return names


def _tensors(found: KerasArch, caffe: bool) -> dict[str, torch.Tensor]:
    convs, denses = found.convs, found.denses
    state: dict[str, torch.Tensor] = {}
    for i, (name, layer) in enumerate(zip(_feature_names(ARCHS[found.arch][0]), convs, strict=True)):
        kernel = torch.from_numpy(layer.weights[0]).permute(3, 2, 0, 1)
        if i == 0 and caffe:
            kernel = kernel.flip(1)  # the weights expect BGR; reversing their input channels makes them take RGB
        state[f"{name}.weight"] = kernel.contiguous()
        state[f"{name}.bias"] = torch.from_numpy(layer.weights[1])
    if not denses:
        return state
    first, second, last = (torch.from_numpy(layer.weights[0]) for layer in denses)
    side = round((first.shape[0] // 512) ** 0.5)
    # Rows are in Keras's flatten order (H, W, C); ours is (C, H, W).
    first = first.reshape(side, side, 512, -1).permute(2, 0, 1, 3).reshape(first.shape[0], -1)
    last_weight, last_bias = last.t(), torch.from_numpy(denses[2].weights[1])
    if found.output == "sigmoid":
        last_weight = torch.cat([torch.zeros_like(last_weight), last_weight])
        last_bias = torch.cat([torch.zeros_like(last_bias), last_bias])
    for index, weight, bias in (
        (0, first.t(), denses[0].weights[1]),
        (3, second.t(), denses[1].weights[1]),
        (6, last_weight, last_bias),
    ):
        state[f"classifier.{index}.weight"] = weight.contiguous()
        state[f"classifier.{index}.bias"] = torch.as_tensor(bias)
    return state


def read_keras(path: str | Path, preprocessing: str = "auto") -> KerasVGG:
    """Read a Keras VGG model or weights file into vgg tensors, refusing anything that is not one of our VGGs.

    Args:
        path: a legacy ``.h5`` model or weights file, a ``.weights.h5`` file or a ``.keras`` archive.
        preprocessing: ``raw`` (0-255 RGB, the tutorial), ``caffe`` (keras.applications' ``preprocess_input``) or
            ``auto``: caffe when the layers have keras.applications' names (``block1_conv1``...), else raw.

    Raises:
        UsageError: not a Keras file, not a supported VGG (the message lists the layers found), or a layer that
            holds code.
    """
    if preprocessing not in ("auto", *PREPROCESSING):
        raise UsageError(
            f"preprocessing must be one of {{auto, raw, caffe}}. Received: preprocessing={preprocessing!r}."
        )
    kf = read_keras_file(path)
    found = read_arch(kf)
    arch, denses, image_size = found.arch, found.denses, found.image_size
    if preprocessing == "auto":
        preprocessing = "caffe" if any(re.fullmatch(r"block\d+_conv\d+", c.name) for c in found.convs) else "raw"
    num_classes = None
    if denses:
        num_classes = 2 if found.output == "sigmoid" else int(denses[2].weights[0].shape[1])
    state = _tensors(found, preprocessing == "caffe")
    described = f"{arch}, {image_size} px, {num_classes} classes" if denses else f"{arch} features (no classifier)"
    source = f"{Path(path).name} ({kf.layout}: {described}, {preprocessing} preprocessing)"
    return KerasVGG(arch, image_size, num_classes, state, preprocessing, source)


def keras_stem(path: str | Path) -> str:
    """The file name without its Keras suffix: ``vgg16_1.h5`` -> ``vgg16_1``, ``m.weights.h5`` -> ``m``."""
    name = Path(path).name
    suffix = next((s for s in KERAS_NAME_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)] if suffix else Path(path).stem


def find_class_names(path: str | Path, num_classes: int) -> list[str] | None:
    """Class names from ``<stem>.class_indices.json`` or ``class_indices.json`` beside ``path``, if there is one.

    The file holds Keras's ``generator.class_indices`` (``{"cat": 0, "dog": 1}``) or a list of names.
    """
    folder = Path(path).parent
    for pattern in CLASS_INDEX_FILES:
        candidate = folder / pattern.format(stem=keras_stem(path))
        if not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UsageError(f'{candidate} is not JSON ({error}); expected {{"class": index, ...}}.') from error
        if isinstance(data, dict):
            ordered = sorted(data.items(), key=lambda item: item[1])
            if [index for _, index in ordered] != list(range(len(ordered))):
                raise UsageError(f"{candidate}: indices must be 0..{len(ordered) - 1}, each once. Received: {data}.")
            names = [str(name) for name, _ in ordered]
        elif isinstance(data, list):
            names = [str(name) for name in data]
        else:
            raise UsageError(f'{candidate}: expected {{"class": index, ...}} or a list of names.')
        if len(names) != num_classes:
            raise UsageError(
                f"{candidate} names {len(names)} classes but the model has {num_classes} outputs; fix the file or "
                "pass --classes."
            )
        return names
    return None


def load_keras(
    path: str | Path, class_names: list[str] | None = None, preprocessing: str = "auto"
) -> tuple[VGG, ModelInfo]:
    """A Keras VGG file as a ready vgg model and the ``ModelInfo`` that feeds it exactly as Keras was fed.

    Class names: ``class_names``, else a class-indices file beside ``path`` (``find_class_names``), else
    ``class_0``... Raises ``UsageError`` for files without a classifier (``include_top=False``).
    """
    keras = read_keras(path, preprocessing)
    if keras.num_classes is None or keras.image_size is None:
        raise UsageError(
            f"{path} has no classifier (include_top=False weights): nothing to predict with. Use it for transfer "
            f"learning: vgg train DATA --arch {keras.arch} --weights {path}"
        )
    if class_names is not None and len(class_names) != keras.num_classes:
        raise UsageError(
            f"--classes names {len(class_names)} classes but {path} has {keras.num_classes} outputs. "
            f"Received: {','.join(class_names)}."
        )
    names = class_names or find_class_names(path, keras.num_classes)
    names = names or [f"class_{i}" for i in range(keras.num_classes)]
    if "" in names or len(set(names)) != len(names):
        raise UsageError(f"Class names must be distinct and not empty. Received: {','.join(names)}.")
    model = build(keras.arch, num_classes=keras.num_classes, image_size=keras.image_size, init_weights=False)
    model.load_state_dict(keras.state_dict)
    info = ModelInfo(
        arch=keras.arch,
        class_names=names,
        image_size=keras.image_size,
        mean=keras.mean,
        std=keras.std,
        interpolation="nearest",
        extra={"imported_from": keras.source, "preprocessing": keras.preprocessing},
    )
    return model.eval(), info


def default_output(path: str | Path) -> Path:
    return Path(path).with_name(keras_stem(path) + ".safetensors")


def import_keras(
    path: str | Path,
    out: str | Path | None = None,
    class_names: list[str] | None = None,
    preprocessing: str = "auto",
    overwrite: bool = False,
) -> tuple[Path, ModelInfo]:
    """Convert a Keras VGG file to a vgg model file (default: beside it, ``.safetensors``); returns its path and info.

    Raises:
        UsageError: see ``load_keras``; also when ``out`` exists and ``overwrite`` is not set.
    """
    target = check_out_file(out if out is not None else default_output(path), "the model file")
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; pass --out to write elsewhere or --force to replace it.")
    model, info = load_keras(path, class_names, preprocessing)
    save_model(target, model, info)
    return target, info
