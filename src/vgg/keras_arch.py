"""Which VGG a Keras file holds: its layers checked against VGG's, then the architecture, classifier and input side.

A file with a config is walked layer by layer (kinds, filters, kernel sizes, strides, paddings, activations); a
weights-only file is judged by its weight shapes. Anything that is not one of our VGGs without batch norm is refused
with the layers found, and a layer that holds Python code is refused before anything else is looked at.
``keras_import`` turns what is read here into vgg tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Any

from .errors import UsageError
from .keras_files import KerasFile, KerasLayer
from .models import ARCHS, CONFIGS

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


@dataclass
class KerasArch:
    """What a Keras file's layers are as one of our VGGs: ``output`` is the last Dense layer's activation ("" when the
    file has no classifier) and ``image_size`` is None where neither the input shape nor a classifier fixes it."""

    arch: str
    convs: list[KerasLayer]
    denses: list[KerasLayer]
    output: str
    image_size: int | None


def read_arch(kf: KerasFile) -> KerasArch:
    """The VGG that ``kf`` holds, refusing anything else.

    Raises:
        UsageError: not a supported VGG (the message lists the layers found), weights that do not fit the
            architecture, or a layer that holds code.
    """
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
    return KerasArch(arch, convs, denses, output, _image_size(kf, denses, size))
