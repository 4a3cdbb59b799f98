"""Keras files as vgg models: the tutorial's Sequential VGG16 and keras.applications' VGG16/VGG19 give Keras's
predictions after import, and anything else is refused in one line.

Keras 3 runs here on its torch backend (no TensorFlow). Models use 64 px inputs so the last map is 2x2 and the
first dense layer's flatten order matters; weights are He-scaled and the output layer is scaled so logits spread
over a few units: near-uniform probabilities would agree whatever the mapping.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["KERAS_BACKEND"] = "torch"
keras = importlib.import_module("keras")
importlib.import_module("h5py")

from vgg.checkpoint import ModelInfo, read_info  # noqa: E402
from vgg.cli import main  # noqa: E402
from vgg.errors import UsageError  # noqa: E402
from vgg.inference import fit_to_model  # noqa: E402
from vgg.keras_files import is_keras_file  # noqa: E402
from vgg.keras_import import find_class_names, import_keras, load_keras, read_keras  # noqa: E402
from vgg.predict import load  # noqa: E402
from vgg.weights import read_weights  # noqa: E402

# Keras 3's torch backend trips NumPy 2's copy-keyword deprecation on every weight it reads; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

SIZE = 64
TOLERANCE = 1e-4
# Sizes around the model's: equal, smaller, larger, and different aspect ratios, so nearest resizing is exercised.
IMAGE_SIZES = [(64, 64), (40, 50), (130, 97), (71, 23)]


def randomize(model, rng: np.random.Generator, inputs: np.ndarray) -> None:
    """He-scaled random kernels and biases, then an output layer scaled so the logits have a spread of ~3."""
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            fan_in = int(np.prod(kernel.shape[:-1]))
            layer.set_weights(
                [rng.normal(0, np.sqrt(2 / fan_in), kernel.shape).astype(np.float32),
                 rng.normal(0, 0.1, bias.shape).astype(np.float32)]
            )  # fmt: skip
    last = model.layers[-1]
    features = keras.Model(model.inputs, model.layers[-2].output).predict(inputs, verbose=0)
    kernel, bias = last.get_weights()
    scale = 3 / (np.sqrt((features**2).mean()) * np.sqrt(kernel.shape[0]))
    last.set_weights([rng.normal(0, scale, kernel.shape).astype(np.float32), bias])


def tutorial_vgg16(classes: int, size: int = SIZE, head: tuple[int, int] = (4096, 4096), output: str = "softmax"):
    """The tutorial's Sequential VGG16, layer for layer (Conv2D/MaxPool2D/Flatten/Dense as it writes them)."""
    layers = keras.layers
    model = keras.Sequential([keras.Input((size, size, 3))])
    for filters, repeat in [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]:
        for _ in range(repeat):
            model.add(layers.Conv2D(filters=filters, kernel_size=(3, 3), padding="same", activation="relu"))
        model.add(layers.MaxPool2D(pool_size=(2, 2), strides=(2, 2)))
    model.add(layers.Flatten())
    model.add(layers.Dense(units=head[0], activation="relu"))
    model.add(layers.Dense(units=head[1], activation="relu"))
    model.add(layers.Dense(units=classes, activation=output))
    return model


def keras_inputs(paths: list[Path], size: int = SIZE) -> np.ndarray:
    """Images as the tutorial feeds them: load_img (Pillow, nearest resize) to raw 0-255 arrays."""
    return np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size))) for p in paths])


def ours(path: Path, images: list[Path]) -> np.ndarray:
    return load(path, device="cpu", precision="fp32").probabilities(images).numpy()


def assert_same(theirs: np.ndarray, mine: np.ndarray) -> float:
    # The comparison only means something when the probabilities are far from uniform.
    assert (theirs.max(axis=1) - theirs.min(axis=1) > 0.2).all(), theirs
    difference = float(np.abs(theirs - mine).max())
    print(f"max |p_keras - p_vgg| = {difference:.3g}")  # shown with pytest -s: the measured agreement
    assert difference <= TOLERANCE, difference
    return difference


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keras")


@pytest.fixture(scope="module")
def images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for i, (width, height) in enumerate(IMAGE_SIZES):
        # Smooth colour gradients plus noise: images that differ, with structure nearest resizing must keep.
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 60 * i)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"image_{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def tutorial(folder: Path, images: list[Path]) -> tuple[dict[str, Path], np.ndarray]:
    """The tutorial's model with 3 classes saved as legacy .h5 and .keras, and Keras's probabilities."""
    model = tutorial_vgg16(3)
    inputs = keras_inputs(images)
    randomize(model, np.random.default_rng(0), inputs)
    files = {"h5": folder / "vgg16_1.h5", "keras": folder / "vgg16_1.keras"}
    for path in files.values():
        model.save(path)
    return files, model.predict(inputs, verbose=0)


@pytest.fixture(scope="module")
def applications(folder: Path, images: list[Path]) -> tuple[dict[str, Path], np.ndarray]:
    """keras.applications.VGG16 for 5 classes: Keras 3 and Keras 2 (the downloads' layout) weights files, with the
    probabilities Keras gives after its own caffe preprocessing."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    model = keras.applications.VGG16(weights=None, classes=5, input_shape=(SIZE, SIZE, 3))
    inputs = keras.applications.vgg16.preprocess_input(keras_inputs(images))
    randomize(model, np.random.default_rng(2), inputs)
    files = {"weights.h5": folder / "app.weights.h5", "legacy": folder / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"}
    model.save_weights(files["weights.h5"])
    with h5py.File(files["legacy"], "w") as handle:
        save_weights_to_hdf5_group(handle, model)
    return files, model.predict(inputs, verbose=0)


@pytest.mark.parametrize("kind", ["h5", "keras"])
def test_tutorial_model_predicts_as_keras(tutorial, images, tmp_path: Path, kind: str) -> None:
    files, theirs = tutorial
    out, info = import_keras(files[kind], tmp_path / "model.safetensors", class_names=["cat", "dog", "fox"])
    assert (info.arch, info.image_size, info.interpolation) == ("vgg16", SIZE, "nearest")
    assert (info.mean, info.std) == ([0.0] * 3, [1 / 255] * 3)  # raw 0-255 pixels, as the tutorial feeds them
    assert read_info(out).class_names == ["cat", "dog", "fox"]
    assert_same(theirs, ours(out, images))


@pytest.mark.parametrize("kind", ["weights.h5", "legacy"])
def test_applications_weights_predict_as_keras_with_caffe_preprocessing(applications, images, tmp_path, kind) -> None:
    files, theirs = applications
    out, info = import_keras(files[kind], tmp_path / "app.safetensors")
    assert (info.arch, info.image_size, info.class_names[0], info.extra["preprocessing"]) == (
        "vgg16",
        SIZE,
        "class_0",
        "caffe",
    )
    assert_same(theirs, ours(out, images))


def test_keras2_file_of_the_tutorial(tutorial, images, tmp_path: Path) -> None:
    """The layout Keras 2 wrote for the tutorial's ``Conv2D(input_shape=...)`` model: ``batch_input_shape`` on the
    first layer, Keras 2.2's bare layer list, weight names ``conv2d/kernel:0``, byte-string attributes."""
    import h5py

    files, theirs = tutorial
    with h5py.File(files["h5"], "r") as source, h5py.File(tmp_path / "keras2.h5", "w") as target:
        config = json.loads(source.attrs["model_config"])
        layers = config["config"]["layers"]
        input_shape = layers.pop(0)["config"]["batch_shape"]  # Keras 2 had no InputLayer entry here
        layers[0]["config"]["batch_input_shape"] = input_shape
        config["config"] = layers
        target.attrs["model_config"] = json.dumps(config).encode()
        target.attrs["keras_version"] = b"2.2.4"
        weights = target.create_group("model_weights")
        names = [layer["config"]["name"] for layer in layers]
        weights.attrs["layer_names"] = np.array([name.encode() for name in names])
        for name in names:
            group, stored = weights.create_group(name), source["model_weights"][name]
            paths = [path.decode() if isinstance(path, bytes) else path for path in stored.attrs["weight_names"]]
            renamed = [f"{name}/{path.rsplit('/', 1)[1]}:0" for path in paths]
            for path, new in zip(paths, renamed, strict=True):
                group.create_dataset(new, data=stored[path][()])
            group.attrs["weight_names"] = np.array([new.encode() for new in renamed])
    out, info = import_keras(tmp_path / "keras2.h5")
    assert (info.arch, info.image_size) == ("vgg16", SIZE)
    assert_same(theirs, ours(out, images))


def test_vgg19_and_sigmoid_output(images: list[Path], tmp_path: Path) -> None:
    """keras.applications.VGG19 maps onto vgg19; a 1-unit sigmoid output becomes two classes (1 - p, p)."""
    vgg19 = keras.applications.VGG19(weights=None, include_top=False, input_shape=(32, 32, 3))
    vgg19.save(tmp_path / "v19.keras")
    features = read_keras(tmp_path / "v19.keras")
    assert (features.arch, features.num_classes, len(features.state_dict)) == ("vgg19", None, 2 * 16)

    model = tutorial_vgg16(1, size=32, output="sigmoid")
    inputs = keras_inputs(images, 32)
    randomize(model, np.random.default_rng(3), inputs)
    model.save(tmp_path / "binary.h5")
    p = model.predict(inputs, verbose=0)[:, 0]
    out, info = import_keras(tmp_path / "binary.h5", class_names=["cat", "dog"])
    assert out == tmp_path / "binary.safetensors" and info.num_classes == 2
    assert_same(np.stack([1 - p, p], axis=1), ours(out, images))


def test_class_indices_file_beside_the_model(tutorial, tmp_path: Path) -> None:
    files, _ = tutorial
    target = tmp_path / "m.h5"
    target.symlink_to(files["h5"])
    (tmp_path / "class_indices.json").write_text(json.dumps({"dog": 1, "cat": 0, "fox": 2}))
    _, info = load_keras(target)
    assert info.class_names == ["cat", "dog", "fox"]
    (tmp_path / "m.class_indices.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(UsageError, match="names 2 classes but the model has 3 outputs"):
        load_keras(target)
    with pytest.raises(UsageError, match="--classes names 2 classes but .* has 3 outputs"):
        load_keras(target, class_names=["x", "y"])


def test_nearest_resize_matches_pillow() -> None:
    """Keras's load_img resizes with Pillow's NEAREST; torch's "nearest" picks other pixels, "nearest-exact" these."""
    rng = np.random.default_rng(0)
    info = ModelInfo("vgg16", ["a"], 64, [0.0] * 3, [1.0] * 3, interpolation="nearest")
    for height, width in [(50, 40), (17, 23), (130, 97), (64, 200)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pillow = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.NEAREST))
        mine = fit_to_model(torch.from_numpy(pixels).permute(2, 0, 1), info).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(mine, pillow)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_non_vgg_and_unsupported_variants_are_refused_in_one_line(tmp_path: Path) -> None:
    small = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Conv2D(8, 3),
         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")]
    )  # fmt: skip
    small.save(tmp_path / "small.keras")
    with pytest.raises(UsageError, match="Conv2D x2, GlobalAveragePooling2D, Dense. Supported: Keras VGG") as error:
        read_keras(tmp_path / "small.keras")
    assert "padding='valid'" in one_line(error)

    narrow = tutorial_vgg16(2, size=32, head=(256, 256))  # a common variant: a smaller classifier
    narrow.save(tmp_path / "narrow.h5")
    with pytest.raises(UsageError, match="classifier is Dense 256 relu, Dense 256 relu, Dense 2 softmax") as error:
        read_keras(tmp_path / "narrow.h5")
    assert "Conv2D x2, MaxPooling2D, Conv2D x2" in one_line(error)

    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(UsageError, match="is not a Keras file: expected an HDF5 file"):
        read_keras(tmp_path / "junk.h5")


def legacy_file(path: Path, layers: list[dict], weights: dict[str, list[np.ndarray]]) -> Path:
    """A small hand-made legacy HDF5 model file: ``layers`` as Keras configs, ``weights`` by layer name."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {"layers": layers}})
        group = handle.create_group("model_weights")
        group.attrs["layer_names"] = np.array([layer["config"]["name"].encode() for layer in layers])
        for layer in layers:
            name = layer["config"]["name"]
            sub = group.create_group(name)
            arrays = weights.get(name, [])
            for i, array in enumerate(arrays):
                sub.create_dataset(f"{name}/w{i}", data=array)
            sub.attrs["weight_names"] = np.array([f"{name}/w{i}".encode() for i in range(len(arrays))])
    return path


def conv(name: str, **config) -> dict:
    base = {"name": name, "filters": 64, "kernel_size": [3, 3], "padding": "same", "activation": "relu"}
    return {"class_name": "Conv2D", "config": {**base, **config}}


@pytest.mark.parametrize(
    ("layers", "weights", "message"),
    [
        ([{"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [None, 32, 48, 3]}}, conv("c")], {},
         r"input shape \(32, 48, 3\); vgg models take square RGB images"),
        ([conv("c"), {"class_name": "MaxPooling2D", "config": {"name": "p", "pool_size": [3, 3]}}], {},
         r"MaxPooling2D 'p' has pool_size=\(3, 3\), strides=\(3, 3\); VGG's are 2x2"),
        ([conv("c", activation="tanh")], {}, "Conv2D 'c' has activation='tanh', VGG's is 'relu'"),
        ([conv("c"), {"class_name": "MaxPooling2D", "config": {"name": "p"}}], {},
         r"its convolutions \(64 M\) are none of vgg11/vgg13/vgg16/vgg19. Found: Conv2D, MaxPooling2D"),
        ([conv("c")], {"c": [np.array([b"code"]), np.zeros(64)]}, r"holds \|S4 data; expected the float weights"),
    ],
)  # fmt: skip
def test_refusals_name_what_was_found(tmp_path: Path, layers, weights, message) -> None:
    with pytest.raises(UsageError, match=message) as error:
        read_keras(legacy_file(tmp_path / "m.h5", layers, weights))
    one_line(error)


def test_files_that_are_not_keras_models(tmp_path: Path) -> None:
    import zipfile

    import h5py

    h5py.File(tmp_path / "other.h5", "w").create_dataset("x", data=np.zeros(3))
    with pytest.raises(UsageError, match="is an HDF5 file but not a Keras model or weights file"):
        read_keras(tmp_path / "other.h5")
    with zipfile.ZipFile(tmp_path / "m.keras", "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(UsageError, match=r"\.keras archive without model.weights.h5. Found: config.json"):
        read_keras(tmp_path / "m.keras")
    with pytest.raises(
        UsageError, match=r"preprocessing must be one of \{auto, raw, caffe\}. Received: preprocessing='bgr'"
    ):
        read_keras(tmp_path / "m.keras", preprocessing="bgr")
    with pytest.raises(UsageError, match="Keras file not found"):
        read_keras(tmp_path / "missing.h5")


def test_class_indices_files_are_checked(tmp_path: Path) -> None:
    model = tmp_path / "m.weights.h5"
    assert find_class_names(model, 2) is None
    (tmp_path / "m.class_indices.json").write_text('["cat", "dog"]')
    assert find_class_names(model, 2) == ["cat", "dog"]
    (tmp_path / "m.class_indices.json").write_text('{"cat": 0, "dog": 2}')
    with pytest.raises(UsageError, match=r"indices must be 0..1, each once"):
        find_class_names(model, 2)
    (tmp_path / "m.class_indices.json").write_text("{cat: 0")
    with pytest.raises(UsageError, match="m.class_indices.json is not JSON"):
        find_class_names(model, 2)


def test_lambda_layer_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Lambda(lambda x: x * 2.0)])
    for name in ("lambda.h5", "lambda.keras"):
        model.save(tmp_path / name)
        with pytest.raises(UsageError, match="'lambda' is a Lambda layer, which holds Python code; refused") as error:
            read_keras(tmp_path / name)
        one_line(error)


def test_notop_weights_train_from_keras(tmp_path: Path, two_class_dir: Path, capsys) -> None:
    notop = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    notop.save_weights(tmp_path / "notop.weights.h5")
    (tmp_path / "notop.weights.h5").rename(path)
    assert is_keras_file(path)
    with pytest.raises(UsageError, match="no classifier .*vgg train DATA --arch vgg16 --weights"):
        import_keras(path)
    pretrained = read_weights(str(path), "vgg16")
    kernel = notop.get_layer("block2_conv1").get_weights()[0]
    assert torch.equal(pretrained.state_dict["features.5.weight"], torch.from_numpy(kernel).permute(3, 2, 0, 1))
    assert pretrained.mean == pytest.approx((123.68 / 255, 116.779 / 255, 103.939 / 255))
    with pytest.raises(UsageError, match="is a vgg16 Keras file but arch=vgg19"):
        read_weights(str(path), "vgg19")

    args = ["train", str(two_class_dir), "--out", str(tmp_path / "run"), "--arch", "vgg16", "--image-size", "32"]
    args += ["--epochs", "1", "--batch-size", "8", "--weights", str(path), "--freeze", "features"]
    assert main(args) == 0
    assert "keras" in capsys.readouterr().out.lower()
    trained = load(tmp_path / "run" / "best.safetensors", device="cpu", precision="fp32")
    assert torch.equal(trained.model.features[5].weight.detach().cpu(), pretrained.state_dict["features.5.weight"])


def test_cli_import_then_predict(tutorial, images, tmp_path: Path, capsys) -> None:
    files, theirs = tutorial
    source = tmp_path / "vgg16_1.h5"
    source.symlink_to(files["h5"])
    assert main(["import-keras", str(source), "--classes", "cat,dog,fox"]) == 0
    assert "vgg16_1.safetensors" in capsys.readouterr().out
    model = str(tmp_path / "vgg16_1.safetensors")
    assert main(["predict", model, *map(str, images), "--json", "--top-k", "3", "--precision", "fp32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ranked = [{top["label"]: top["probability"] for top in row["top_k"]} for row in printed]
    assert_same(theirs, np.array([[row[name] for name in ("cat", "dog", "fox")] for row in ranked]))
    capsys.readouterr()

    # The Keras file itself works too (converted in memory; no class-indices file here, so class_0...).
    assert main(["predict", str(source), str(images[1]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] == f"class_{int(theirs[1].argmax())}"

    assert main(["import-keras", str(source)]) == 2  # never overwrites without being told
    assert "already exists; pass --out to write elsewhere or --force" in capsys.readouterr().err
    assert main(["import-keras", str(source), "--force", "--classes", "a,b"]) == 2
    assert "--classes names 2 classes" in capsys.readouterr().err


def test_missing_h5py_says_how_to_install(tutorial, monkeypatch) -> None:
    files, _ = tutorial
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(UsageError, match=r"pip install 'vgg\[keras\]'"):
        read_keras(files["h5"])
