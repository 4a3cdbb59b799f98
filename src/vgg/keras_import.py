"""Keras VGG models and weights as vgg models that give Keras's predictions (``vgg import-keras``, ``--weights``).

The architecture is read from the file's own config (layer kinds, filters, kernel sizes, strides, units,
activations) or, for weights-only files, from the weight shapes, and must be one of our VGGs without batch norm.
The arithmetic is then identical to Keras's:

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
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ModelInfo, save_model
from .errors import UsageError
from .keras_files import KerasFile, KerasLayer, read_keras_file
from .models import ARCHS, CONFIGS, VGG, build

SUPPORTED = (
    "Supported: Keras VGG11/13/16/19 without batch norm (3x3 'same' ReLU Conv2D, 2x2 MaxPooling2D), then either "
    "Flatten -> Dense 4096 relu -> Dense 4096 relu -> Dense N softmax (or 1 sigmoid), or no classifier "
    "(include_top=False), as the tutorial's Sequential model and keras.applications.VGG16/VGG19 build them"
)
# Layers that carry Python code (a function or a module) in the file: never executed, so never imported.
CODE_LAYERS = {"Lambda", "TFOpLambda", "SlicingOpLambda", "TorchModuleWrapper", "JaxLayer", "FlaxLayer"}
CONV_KINDS = {"Conv2D", "Convolution2D"}
POOL_KINDS = {"MaxPooling2D", "MaxPool2D"}
# Identity at inference; the VGG has dropout in the same places when training continues.
IGNORED_KINDS = {"InputLayer", "Dropout"}
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


def summarize(layers: list[KerasLayer]) -> str:
    """Layer kinds in order, repeats counted: ``Conv2D x2, MaxPooling2D, Flatten, Dense x3``."""
    kinds = [layer.kind for layer in layers if layer.kind != "InputLayer"]
    return ", ".join(f"{kind} x{n}" if (n := len(list(run))) > 1 else kind for kind, run in groupby(kinds))


def _unsupported(kf: KerasFile, detail: str) -> UsageError:
    return UsageError(f"{kf.path} is not a supported VGG: {detail}. Found: {summarize(kf.layers)}. {SUPPORTED}.")


def _activation(value: Any) -> str:
    # Keras 3 may store a built-in activation as {"module": "keras.activations", "config": "relu", ...}.
    if isinstance(value, dict) and value.get("module") in ("keras.activations", "builtins"):
        value = value.get("config")
    return value if isinstance(value, str) else "custom"


def _pair(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value, value)


def _check_conv(kf: KerasFile, layer: KerasLayer) -> None:
    c = layer.config
    found = {
        "kernel_size": _pair(c.get("kernel_size", 3)),
        "strides": _pair(c.get("strides", 1)),
        "padding": c.get("padding", "valid"),
        "dilation_rate": _pair(c.get("dilation_rate", 1)),
        "groups": c.get("groups", 1),
        "activation": _activation(c.get("activation")),
        "use_bias": c.get("use_bias", True),
        "data_format": c.get("data_format") or "channels_last",
    }
    wanted = {"kernel_size": (3, 3), "strides": (1, 1), "padding": "same", "dilation_rate": (1, 1), "groups": 1,
              "activation": "relu", "use_bias": True, "data_format": "channels_last"}  # fmt: skip
    for key, value in wanted.items():
        if found[key] != value:
            raise _unsupported(kf, f"Conv2D {layer.name!r} has {key}={found[key]!r}, VGG's is {value!r}")


def _check_pool(kf: KerasFile, layer: KerasLayer) -> None:
    c = layer.config
    pool, strides = _pair(c.get("pool_size", 2)), c.get("strides")
    strides = pool if strides is None else _pair(strides)
    if pool != (2, 2) or strides != (2, 2) or c.get("padding", "valid") != "valid":
        raise _unsupported(kf, f"MaxPooling2D {layer.name!r} has pool_size={pool}, strides={strides}; VGG's are 2x2")


def _input_size(kf: KerasFile, shape: Any) -> int | None:
    """The square input side from a batch shape ``[None, H, W, 3]``; None where the file leaves it open."""
    if not isinstance(shape, list) or len(shape) != 4:
        return None
    height, width, channels = shape[1:]
    if channels not in (3, None) or height != width:
        raise _unsupported(kf, f"input shape {tuple(shape[1:])}; vgg models take square RGB images (H, H, 3)")
    return height


def _walk_config(kf: KerasFile) -> tuple[list[int | str], list[KerasLayer], list[KerasLayer], int | None]:
    """Convolution/pool plan, conv layers, dense layers and input side of a file with a config; refuses the rest."""
    plan: list[int | str] = []
    convs: list[KerasLayer] = []
    denses: list[KerasLayer] = []
    size: int | None = None
    flattened = False
    for layer in kf.layers:
        kind = layer.kind
        if kind in CODE_LAYERS or "function" in layer.config or "module" in layer.config:
            raise UsageError(
                f"{kf.path}: layer {layer.name!r} is a {kind} layer, which holds Python code; refused, nothing from "
                "the file was executed. Remove it in Keras (or save only the VGG part) and import again."
            )
        shape = layer.config.get("batch_shape") or layer.config.get("batch_input_shape")
        if shape is not None and size is None:
            size = _input_size(kf, shape)
        if kind in IGNORED_KINDS:
            continue
        if kind in CONV_KINDS and not flattened:
            _check_conv(kf, layer)
            plan.append(int(layer.config.get("filters", 0)))
            convs.append(layer)
        elif kind in POOL_KINDS and not flattened:
            _check_pool(kf, layer)
            plan.append("M")
        elif kind == "Flatten" and not flattened:
            if (layer.config.get("data_format") or "channels_last") != "channels_last":
                raise _unsupported(kf, f"Flatten {layer.name!r} is channels_first")
            flattened = True
        elif kind == "Dense" and flattened:
            denses.append(layer)
        else:
            where = "after Flatten" if flattened else "before Flatten"
            raise _unsupported(kf, f"layer {layer.name!r} ({kind}) {where} has no counterpart in a VGG")
    if flattened and not denses:
        raise _unsupported(kf, "Flatten without Dense layers")
    return plan, convs, denses, size


def _match_arch(kf: KerasFile, plan: list[int | str]) -> str:
    """The architecture whose configuration is ``plan`` (weights-only files: compared without the pools)."""
    for arch, (config, batch_norm) in ARCHS.items():
        wanted = CONFIGS[config] if kf.has_config else [c for c in CONFIGS[config] if c != "M"]
        if not batch_norm and plan == wanted:
            return arch
    shown = " ".join(str(item) for item in plan)
    raise _unsupported(kf, f"its convolutions ({shown}) are none of vgg11/vgg13/vgg16/vgg19")


def _check_shapes(kf: KerasFile, convs: list[KerasLayer], denses: list[KerasLayer]) -> None:
    channels = 3
    for layer in convs:
        shapes = [w.shape for w in layer.weights]
        if len(shapes) != 2 or shapes[0][:3] != (3, 3, channels) or shapes[1] != shapes[0][3:]:
            raise UsageError(
                f"{kf.path}: Conv2D {layer.name!r} has weights of shapes {shapes}; expected "
                f"[(3, 3, {channels}, filters), (filters,)]. The file's weights do not fit its architecture."
            )
        channels = shapes[0][3]
    for layer in denses:
        shapes = [w.shape for w in layer.weights]
        if len(shapes) != 2 or len(shapes[0]) != 2 or shapes[1] != shapes[0][1:]:
            raise UsageError(
                f"{kf.path}: Dense {layer.name!r} has weights of shapes {shapes}; expected [(inputs, units), (units,)]."
            )


def _check_head(kf: KerasFile, denses: list[KerasLayer]) -> str:
    """The output activation, after checking the classifier is VGG's: Dense 4096 relu, Dense 4096 relu, Dense N."""
    units = [layer.weights[0].shape[1] for layer in denses]
    activations = [_activation(layer.config.get("activation")) if kf.has_config else "" for layer in denses]
    if len(denses) != 3 or units[:2] != [4096, 4096] or (kf.has_config and activations[:2] != ["relu", "relu"]):
        found = ", ".join(f"Dense {u}" + (f" {a}" if a else "") for u, a in zip(units, activations, strict=True))
        raise _unsupported(
            kf, f"its classifier is {found or 'empty'}; VGG's is Dense 4096 relu, Dense 4096 relu, Dense N"
        )
    output = activations[2] or "softmax"  # weights-only files: keras.applications' head ends in softmax
    if output not in ("softmax", "linear") and not (output == "sigmoid" and units[2] == 1):
        raise _unsupported(kf, f"the output layer's activation is {output!r}; expected softmax (or a 1-unit sigmoid)")
    return output


def _feature_names(config: str) -> list[str]:
    """State-dict prefixes of the convolutions in ``make_features`` order (each conv is followed by its ReLU)."""
    names, index = [], 0
    for item in CONFIGS[config]:
        if item != "M":
            names.append(f"features.{index}")
            index += 1
        index += 1
    return names


def _tensors(
    arch: str, convs: list[KerasLayer], denses: list[KerasLayer], output: str, caffe: bool
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for i, (name, layer) in enumerate(zip(_feature_names(ARCHS[arch][0]), convs, strict=True)):
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
    if output == "sigmoid":
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


def _image_size(kf: KerasFile, denses: list[KerasLayer], size: int | None) -> int | None:
    if not denses:
        return size
    inputs = denses[0].weights[0].shape[0]
    side = round((inputs // 512) ** 0.5)
    if inputs % 512 or side * side * 512 != inputs:
        raise _unsupported(kf, f"the first Dense layer takes {inputs} inputs, not 512 x side x side")
    if size is not None and size // 32 != side:
        raise UsageError(
            f"{kf.path}: the input is {size} px but the first Dense layer takes a {side}x{side} map; the file is "
            "inconsistent."
        )
    if side > 7:
        raise _unsupported(
            kf,
            f"at {size or 32 * side} px Keras's Flatten sees a {side}x{side} map, vgg pools it to 7x7 (up to 255 px)",
        )
    return size or 32 * side


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
    if kf.has_config:
        plan, convs, denses, size = _walk_config(kf)
    else:
        unknown = next((layer for layer in kf.layers if layer.kind not in ("Conv2D", "Dense")), None)
        if unknown is not None:
            raise _unsupported(kf, f"layer {unknown.name!r} ({unknown.kind}) has no counterpart in a VGG")
        convs = [layer for layer in kf.layers if layer.kind == "Conv2D"]
        denses = [layer for layer in kf.layers if layer.kind == "Dense"]
        plan, size = [int(layer.weights[0].shape[-1]) for layer in convs], None
    arch = _match_arch(kf, plan)
    _check_shapes(kf, convs, denses)
    output = _check_head(kf, denses) if denses else ""
    image_size = _image_size(kf, denses, size)
    if preprocessing == "auto":
        preprocessing = "caffe" if any(re.fullmatch(r"block\d+_conv\d+", c.name) for c in convs) else "raw"
    num_classes = None
    if denses:
        num_classes = 2 if output == "sigmoid" else int(denses[2].weights[0].shape[1])
    state = _tensors(arch, convs, denses, output, preprocessing == "caffe")
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
    target = Path(out) if out is not None else default_output(path)
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists; pass --out to write elsewhere or --force to replace it.")
    model, info = load_keras(path, class_names, preprocessing)
    save_model(target, model, info)
    return target, info
