"""Reading Keras model and weight files as plain data: layer configs (JSON) and weight arrays (HDF5 datasets).

Nothing in a file is executed: configs are parsed with ``json`` and never deserialised into Keras objects, weights
are numeric HDF5 datasets read with h5py, and nothing is unpickled. Four layouts are recognised by content:

- legacy full model (``model.save("x.h5")``, Keras 2's ``ModelCheckpoint``): a ``model_config`` attribute and a
  ``model_weights`` group whose ``layer_names`` / ``weight_names`` attributes list the weights in model order;
- legacy weights (Keras 2's ``save_weights("x.h5")`` and the keras.applications downloads such as
  ``vgg16_weights_tf_dim_ordering_tf_kernels.h5``): the same groups at the root, no config;
- Keras 3 weights (``save_weights("x.weights.h5")``): ``layers/<class>_<i>/vars/<j>``, where ``<class>_<i>`` is
  the i-th layer of that class in the model's layer list (so the order comes from the key, not the layer name);
- Keras 3 archives (``model.save("x.keras")``): a zip of ``config.json`` and ``model.weights.h5`` (Keras 3 weights).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Suffixes a user means as Keras files; content decides the layout.
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
# Keras 3.0 named the layer list `_layer_checkpoint_dependencies`, later versions `layers`.
KERAS3_LAYER_GROUPS = ("layers", "_layer_checkpoint_dependencies")
MAX_CONFIG_BYTES = 64 * 2**20


@dataclass
class KerasLayer:
    """One layer: its Keras class, name, config (JSON, as stored) and weight arrays in Keras's order."""

    kind: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    weights: list[np.ndarray] = field(default_factory=list)


@dataclass
class KerasFile:
    """What a file holds: its layers in model order, and whether they came with a config (else from weights only)."""

    path: Path
    layout: str
    layers: list[KerasLayer]
    has_config: bool
    model_class: str = ""
    keras_version: str = ""


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as error:
        raise UsageError(
            "Reading Keras files needs h5py, which is not installed. Install it with: pip install 'vgg[keras]'"
        ) from error
    return h5py


def is_keras_file(path: str | Path) -> bool:
    """True for an HDF5 file or a zip holding ``config.json`` (a ``.keras`` archive); content, not name, decides."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head == HDF5_SIGNATURE:
        return True
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                return "config.json" in archive.namelist()
        except zipfile.BadZipFile:
            return False
    return False


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _names(attrs: Any, key: str) -> list[str]:
    """A list-of-names attribute; Keras splits one over 64 KB into ``key0``, ``key1``, ... (HDF5's header limit)."""
    if key in attrs:
        parts = [attrs[key]]
    else:
        parts, index = [], 0
        while f"{key}{index}" in attrs:
            parts.append(attrs[f"{key}{index}"])
            index += 1
    return [_text(item) for part in parts for item in np.asarray(part).reshape(-1)]


def _has_names(attrs: Any, key: str) -> bool:
    return key in attrs or f"{key}0" in attrs


def _array(dataset: Any, where: str) -> np.ndarray:
    # Only numbers are read: an object or string dataset could hold anything, and VGG weights are floats.
    if dataset.dtype.kind not in "fiu":
        raise UsageError(f"{where} holds {dataset.dtype} data; expected the float weights of a Keras layer.")
    return np.asarray(dataset[()], dtype=np.float32)


def _legacy_weights(group: Any) -> list[KerasLayer]:
    """Layers of a legacy HDF5 weights group, in model order, each with its arrays in ``weight_names`` order."""
    layers = []
    for name in _names(group.attrs, "layer_names"):
        sub = group[name]
        weights = [_array(sub[w], f"{name}/{w}") for w in _names(sub.attrs, "weight_names")]
        layers.append(KerasLayer(kind="", name=name, weights=weights))
    return layers


def _keras3_weights(root: Any) -> dict[str, KerasLayer]:
    """Keras 3 weights keyed by ``<class>_<i>`` (e.g. ``conv2d_3``); ``name`` is the layer's own name if stored."""
    group = next((root[key] for key in KERAS3_LAYER_GROUPS if key in root), None)
    if group is None:
        return {}
    out = {}
    for key in group:
        sub = group[key]
        variables = sub.get("vars")
        arrays: list[np.ndarray] = []
        name = key
        if variables is not None:
            name = _text(variables.attrs.get("name", key))
            arrays = [_array(variables[str(i)], f"{key}/vars/{i}") for i in range(len(variables))]
        if any(k in KERAS3_LAYER_GROUPS for k in sub):
            arrays = []  # a nested model: its layers are not flattened here, the caller refuses it by kind
            name = _text(variables.attrs.get("name", key)) if variables is not None else key
        out[key] = KerasLayer(kind="", name=name, weights=arrays)
    return out


def snake_case(kind: str) -> str:
    """Keras's key for a class in a weights file: ``Conv2D`` -> ``conv2d``, ``MaxPooling2D`` -> ``max_pooling2d``."""
    words = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", kind)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", words).lower()


def _config_layers(model_config: dict[str, Any]) -> tuple[str, list[KerasLayer]]:
    """The model's class and its layer list (Sequential or Functional; Keras 2.2's bare-list Sequential too)."""
    if not isinstance(model_config, dict) or "class_name" not in model_config:
        raise UsageError("The Keras model config is not a model (no class_name); expected a Sequential or Functional.")
    body = model_config.get("config", {})
    raw = body if isinstance(body, list) else body.get("layers")
    if not isinstance(raw, list):
        raise UsageError(
            f"The Keras model is a {model_config['class_name']} without a layer list; "
            "expected a Sequential or Functional model."
        )
    layers = []
    for item in raw:
        config = item.get("config", {}) if isinstance(item.get("config"), dict) else {}
        name = str(item.get("name") or config.get("name") or "")
        layers.append(KerasLayer(kind=str(item.get("class_name", "?")), name=name, config=config))
    return str(model_config["class_name"]), layers


def _attach_by_name(layers: list[KerasLayer], weights: list[KerasLayer]) -> None:
    by_name = {w.name: w.weights for w in weights}
    for layer in layers:
        layer.weights = by_name.get(layer.name, [])


def _attach_by_class(layers: list[KerasLayer], weights: dict[str, KerasLayer]) -> None:
    seen: dict[str, int] = {}
    for layer in layers:
        key = snake_case(layer.kind)
        index = seen.get(key, 0)
        seen[key] = index + 1
        stored = weights.get(key if index == 0 else f"{key}_{index}")
        layer.weights = stored.weights if stored is not None else []


def _weights_only(layers: dict[str, KerasLayer]) -> list[KerasLayer]:
    """Keras 3 weights without a config: layers ordered by class, then by their index within the class."""

    def order(key: str) -> tuple[str, int]:
        match = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
        assert match is not None
        return match.group(1), int(match.group(2) or 0)

    out = []
    for key in sorted(layers, key=order):
        layer = layers[key]
        if not layer.weights:
            continue  # pooling, flatten, input: nothing to load, and their places are fixed in a VGG
        layer.kind = {"conv2d": "Conv2D", "dense": "Dense"}.get(order(key)[0], order(key)[0])
        out.append(layer)
    return out


def _read_hdf5(handle: Any, path: Path, config_text: str | None) -> KerasFile:
    attrs = handle.attrs
    version = _text(attrs.get("keras_version", ""))
    if config_text is None and "model_config" in attrs:
        config_text = _text(attrs["model_config"])
        group = handle["model_weights"] if "model_weights" in handle else handle
        model_class, layers = _config_layers(json.loads(config_text))
        if _has_names(group.attrs, "layer_names"):
            _attach_by_name(layers, _legacy_weights(group))
        else:  # Keras 3 writes legacy .h5 models with Keras 2's layout, but be lenient
            _attach_by_class(layers, _keras3_weights(group))
        return KerasFile(path, "legacy HDF5 model", layers, True, model_class, version)
    if config_text is not None:
        model_class, layers = _config_layers(json.loads(config_text))
        _attach_by_class(layers, _keras3_weights(handle))
        return KerasFile(path, ".keras archive", layers, True, model_class, version)
    if _has_names(attrs, "layer_names"):
        layers = [layer for layer in _legacy_weights(handle) if layer.weights]
        for layer in layers:
            # Without a config the kind follows from the kernel: 4-D for a convolution, 2-D for a dense layer.
            kernel_dims = max(w.ndim for w in layer.weights)
            layer.kind = {4: "Conv2D", 2: "Dense"}.get(kernel_dims, f"unknown layer with {len(layer.weights)} arrays")
        return KerasFile(path, "legacy HDF5 weights", layers, False, "", version)
    stored = _keras3_weights(handle)
    if stored:
        return KerasFile(path, "Keras 3 weights", _weights_only(stored), False)
    raise UsageError(
        f"{path} is an HDF5 file but not a Keras model or weights file (no model_config, layer_names or layers "
        "group). Expected a file written by Keras's model.save or save_weights."
    )


def read_keras_file(path: str | Path) -> KerasFile:
    """Read a Keras model or weights file as data (see the module docstring for the layouts).

    Raises:
        UsageError: missing file, h5py not installed, or not a Keras file.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Keras file not found: {path}. Expected a .h5, .weights.h5 or .keras file.")
    if not is_keras_file(path):
        raise UsageError(
            f"{path} is not a Keras file: expected an HDF5 file (.h5, .weights.h5) or a .keras zip archive."
        )
    h5py = _h5py()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if "model.weights.h5" not in names:
                    raise UsageError(f"{path} is a .keras archive without model.weights.h5. Found: {', '.join(names)}.")
                if archive.getinfo("config.json").file_size > MAX_CONFIG_BYTES:
                    raise UsageError(f"{path}: config.json is over {MAX_CONFIG_BYTES:,} bytes; not a Keras config.")
                config_text = archive.read("config.json").decode("utf-8")
                data = io.BytesIO(archive.read("model.weights.h5"))
            with h5py.File(data, "r") as handle:
                return _read_hdf5(handle, path, config_text)
        with h5py.File(path, "r") as handle:
            return _read_hdf5(handle, path, None)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise UsageError(
            f"{path} could not be read as a Keras file ({type(error).__name__}: {error}). "
            "Expected a file written by Keras's model.save or save_weights."
        ) from error
