"""Transfer learning and the pretrained ImageNet classifier, from a weights file made here and placed where
torchvision's cache looks for it. Nothing here uses the network: downloads are switched off or sent to a closed port.
"""

from __future__ import annotations

import csv
import json
import math
import re
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import COLOURS, write_images
from safetensors import safe_open

from vgg.checkpoint import ModelInfo, load_model, save_model
from vgg.cli import main
from vgg.errors import UsageError
from vgg.models import build
from vgg.training.config import TrainConfig, resolve
from vgg.training.loop import make_optimizer
from vgg.training.run import train
from vgg.training.transfer import load_pretrained
from vgg.weights import read_weights

TINY = ["--arch", "vgg11", "--image-size", "32", "--batch-size", "8", "--workers", "0"]
NO_AUGMENT = ["--shift", "0", "--no-hflip"]
WINNER = 207  # the fake ImageNet head always answers this class ...
RUNNERS_UP = (0, 1, 2, 3)  # ... then these, in this order


def fake_imagenet_state() -> dict[str, torch.Tensor]:
    """A state_dict with exactly the names and shapes of torchvision's vgg11: random He-scaled convolutions.

    The two big dense layers are single columns broadcast to their full shapes (stride 0): torch.save then
    writes 40 MB instead of torchvision's 507 MB, and the file is read exactly like the real one.
    """
    with torch.device("meta"):
        reference = torchvision.models.vgg11().state_dict()
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, meta in reference.items():
        shape = meta.shape
        if name.startswith("features") and name.endswith("weight"):
            state[name] = torch.randn(shape, generator=generator) * math.sqrt(2 / shape[1:].numel())
        elif name.endswith("bias"):
            state[name] = torch.randn(shape, generator=generator) * 0.01
        else:
            state[name] = (torch.randn(shape[0], 1, generator=generator) * 0.01).expand(shape)
    head_bias = torch.zeros(1000)
    head_bias[WINNER] = 10.0
    head_bias[list(RUNNERS_UP)] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    state["classifier.6.weight"] = torch.zeros(1, 1).expand(1000, 4096)
    state["classifier.6.bias"] = head_bias
    return state


@pytest.fixture(scope="module")
def imagenet_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds vgg11's ImageNet file under the name torchvision downloads it as."""
    home = tmp_path_factory.mktemp("torch_home")
    name = Path(torchvision.models.VGG11_Weights.IMAGENET1K_V1.url).name
    assert name == "vgg11-8a719046.pth"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(fake_imagenet_state(), home / "hub" / "checkpoints" / name)
    return home


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("VGG_OFFLINE", "1")
    # Should anything still try to download, it meets a closed local port instead of the internet.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    yield
    urllib.request.install_opener(None)  # urlopen kept an opener with the closed proxy port: not for later tests


@pytest.fixture
def cached(monkeypatch, imagenet_home: Path) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("TORCH_HOME", str(imagenet_home))
    return torch.load(imagenet_home / "hub" / "checkpoints" / "vgg11-8a719046.pth", weights_only=True)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def features_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("features")}


def test_torchvision_itself_finds_the_placed_file(cached):
    # The file is where torchvision's own loader looks: it loads without a download (the network is closed).
    state = torchvision.models.VGG11_Weights.IMAGENET1K_V1.get_state_dict(progress=False, weights_only=True)
    assert torch.equal(state["features.0.weight"], cached["features.0.weight"])


def test_imagenet_weights_frozen_features_new_head(cached, two_class_dir: Path, tmp_path: Path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(
        capsys, "train", two_class_dir, "--out", out_dir, "--epochs", "1", "--weights", "imagenet",
        "--freeze", "features", *TINY,
    )  # fmt: skip
    assert code == 0
    assert "weights: imagenet (VGG11_Weights.IMAGENET1K_V1)" in out
    assert "classifier.0 (shape (4096, 25088) in the weights, (4096, 512) in the model)" in out
    assert "classifier.6 (new output layer for 2 classes)" in out
    assert "classifier.3" not in next(line for line in out.splitlines() if line.startswith("weights:"))
    assert "features frozen" in out and "features are not cached: augmentation is on" in out
    trained = tensors(out_dir / "last.safetensors")
    for name, value in features_of(cached).items():
        assert torch.equal(trained[name], value), name  # loaded, then left alone by a whole epoch of training
    assert trained["classifier.6.weight"].shape == (2, 4096)
    assert not torch.equal(trained["classifier.3.weight"], cached["classifier.3.weight"])  # loaded, then trained
    model, info = load_model(out_dir / "last.safetensors")
    assert info.mean == [0.485, 0.456, 0.406] and info.std == [0.229, 0.224, 0.225]
    assert info.extra["weights"] == "imagenet (VGG11_Weights.IMAGENET1K_V1)"
    assert model.num_classes == 2


def test_unfreeze_at_trains_features_from_that_epoch(cached, two_class_dir: Path, tmp_path: Path):
    out_dir = tmp_path / "run"
    config = resolve(
        data=str(two_class_dir), out=str(out_dir), arch="vgg11", image_size=32, batch_size=8, workers=0, epochs=2,
        weights="imagenet", freeze="features", unfreeze_at=2, backbone_lr_scale=0.5, schedule="constant",
        warmup_epochs=0.0, lr=0.01,
    )  # fmt: skip
    snapshots, lines = {}, []

    def log(line: str) -> None:
        lines.append(line)
        found = re.match(r"epoch (\d)/2:", line)
        if found:  # the epoch's model file is written just before its line is logged
            snapshots[int(found.group(1))] = features_of(tensors(out_dir / "last.safetensors"))

    train(config, log=log, progress=False)
    assert any(line.startswith("features unfrozen from epoch 2") for line in lines)
    for name, value in features_of(cached).items():
        assert torch.equal(snapshots[1][name], value), name
    changed = [name for name, value in features_of(cached).items() if not torch.equal(snapshots[2][name], value)]
    assert changed == list(features_of(cached))


def test_backbone_learning_rate_is_scaled(cached):
    model = build("vgg11", num_classes=2, image_size=32)
    model.freeze_features(True)
    config = TrainConfig(lr=0.1, backbone_lr_scale=0.1, freeze="features", unfreeze_at=3, epochs=5)
    optimizer = make_optimizer(model, config)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert [lr_of[id(p)] for p in model.features.parameters()] == pytest.approx([0.01] * 16)
    assert {lr_of[id(p)] for p in model.classifier.parameters()} == {0.1}


def test_frozen_batch_norm_keeps_its_statistics():
    model = build("vgg11_bn", num_classes=2, image_size=32)
    model.freeze_features(True)
    model.train()
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert model.classifier.training and not model.features.training
    assert all(torch.equal(before[k], v) for k, v in model.features.state_dict().items())
    assert all(p.grad is None for p in model.features.parameters())
    model.freeze_features(False)
    assert model.features.training and all(p.requires_grad for p in model.features.parameters())


def test_cached_features_train_like_uncached(cached, two_class_dir: Path, tmp_path: Path, capsys):
    common = ["--epochs", "2", "--weights", "imagenet", "--freeze", "features", *NO_AUGMENT, *TINY]
    code, out, _ = run(capsys, "train", two_class_dir, "--out", tmp_path / "cached", *common)
    assert code == 0 and "features cached: 20 + 4 images" in out
    code, out, _ = run(capsys, "train", two_class_dir, "--out", tmp_path / "plain", *common, "--no-cache-features")
    assert code == 0 and "features are not cached: --no-cache-features was given" in out
    rows = [list(csv.DictReader(open(tmp_path / r / "history.csv"))) for r in ("cached", "plain")]
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5), key
    a, b = tensors(tmp_path / "cached" / "last.safetensors"), tensors(tmp_path / "plain" / "last.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_weights_from_local_files(cached, two_class_dir: Path, tmp_path: Path, capsys):
    # A plain state_dict .pth at another size and class count: features load, what does not fit is named.
    other = build("vgg11", num_classes=3, image_size=64)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    model = build("vgg11", num_classes=2, image_size=32)
    skipped = load_pretrained(model, read_weights(str(tmp_path / "other.pth"), "vgg11"), ["cat", "dog"])
    assert skipped == [
        "classifier.0 (shape (4096, 2048) in the weights, (4096, 512) in the model)",
        "classifier.6 (new output layer for 2 classes)",
    ]
    assert torch.equal(model.features[0].weight, other.features[0].weight)
    assert torch.equal(model.classifier[3].weight, other.classifier[3].weight)
    # Our own model file with the same classes: everything loads, the head included, and its normalisation is kept.
    code, _, _ = run(capsys, "train", two_class_dir, "--out", tmp_path / "first", "--epochs", "1", *TINY)
    assert code == 0
    first = tmp_path / "first" / "best.safetensors"
    pretrained = read_weights(str(first), "vgg11")
    model = build("vgg11", num_classes=2, image_size=32)
    assert load_pretrained(model, pretrained, ["cat", "dog"]) == []
    assert all(torch.equal(v, tensors(first)[k]) for k, v in model.state_dict().items())
    assert pretrained.mean == (0.485, 0.456, 0.406)


def test_predict_imagenet_answers_with_category_names(cached, tmp_path: Path, capsys):
    image = write_images(tmp_path / "img", {"cat": COLOURS["cat"]}, per_class=1, size=50) / "cat" / "cat_000.jpg"
    code, out, _ = run(capsys, "predict", "imagenet:vgg11", image, "--top-k", "2")
    assert code == 0
    categories = torchvision.models.VGG11_Weights.IMAGENET1K_V1.meta["categories"]
    assert categories[WINNER] == "golden retriever"
    assert re.fullmatch(rf"{re.escape(str(image))}: golden retriever 0\.9\d\d  tench 0\.0\d\d\n", out), out


def test_evaluate_imagenet_folder_by_category_names(cached, tmp_path: Path, capsys):
    folder = write_images(tmp_path / "val", {"golden_retriever": (200, 160, 80), "tench": (90, 90, 60)}, 2)
    code, out, _ = run(capsys, "evaluate", "imagenet:vgg11", folder, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["images"] == 4 and result["folder_naming"] == "name"
    assert result["accuracy"] == 0.5 and result["top5_accuracy"] == 1.0
    assert result["per_class_accuracy"] == {"golden_retriever": 1.0, "tench": 0.0}
    assert result["published"] == {"acc@1": 69.02, "acc@5": 88.628}
    code, out, _ = run(capsys, "evaluate", "imagenet:vgg11", folder)
    assert code == 0 and "top-1: 0.5000   top-5: 1.0000" in out and "top-1 0.69020, top-5 0.88628" in out


def test_evaluate_imagenet_folder_by_class_index(cached, tmp_path: Path, capsys):
    folder = write_images(tmp_path / "val", {str(WINNER): (200, 160, 80), "1": (90, 90, 60)}, 1)
    code, out, _ = run(capsys, "evaluate", "imagenet:vgg11", folder, "--json")
    result = json.loads(out)
    assert code == 0 and result["folder_naming"] == "index" and result["accuracy"] == 0.5


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    torch.save([1, 2], root / "list.pth")
    vgg13 = build("vgg13", image_size=32, num_classes=2).state_dict()
    torch.save({k: v for k, v in vgg13.items() if k.startswith("features")}, root / "v13.pth")
    write_images(root / "wnids", {"n01440764": (0, 0, 0), "n01443537": (0, 0, 0)}, 1)
    write_images(root / "names", {"golden retreiver": (0, 0, 0)}, 1)
    write_images(root / "index", {"7": (0, 0, 0), "1000": (0, 0, 0)}, 1)
    (root / "empty" / "tench").mkdir(parents=True)
    (root / "weights.txt").write_text("not weights")
    (root / "broken.pth").write_text("not a zip or pickle")
    (root / "broken.safetensors").write_text("not safetensors")
    info = ModelInfo("vgg13", ["cat", "dog"], 32, [0.5] * 3, [0.25] * 3)
    save_model(root / "vgg13.safetensors", build("vgg13", num_classes=2, image_size=32), info)
    (root / "wrong_home" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(
        {"features.0.weight": torch.zeros(1)}, root / "wrong_home" / "hub" / "checkpoints" / "vgg13-19584684.pth"
    )
    return root


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "{data}", "--weights", "imagenet", *TINY], r"Expected the file .*empty_torch_home/hub/checkpoints/"
         r"vgg11-8a719046\.pth: download https://download\.pytorch\.org/models/vgg11-8a719046\.pth"),
        (["predict", "imagenet:vgg16", "{data}/cat"], r"ImageNet weights for vgg16 are not cached .*VGG_OFFLINE is set"
         r".*empty_torch_home/hub/checkpoints/vgg16-397923af\.pth"),
        (["predict", "imagenet:vgg15", "{data}/cat"], r"arch must be one of .*Received: arch='vgg15'"),
        (["train", "{data}", "--weights", "{tmp}/nope.pth", *TINY],
         r"weights must be 'imagenet' or a \.pth/\.pt/\.safetensors file\. Received: weights='.*nope\.pth'"),
        (["train", "{data}", "--weights", "{tmp}/list.pth", *TINY], r"list.pth holds a list, not a state_dict"),
        (["train", "{data}", "--weights", "{tmp}/v13.pth", *TINY], r"do not fit this architecture's features: "
         r"features\.3: features\.3\.weight is not in the weights"),
        (["train", "{data}", "--unfreeze-at", "2"], r"unfreeze_at needs frozen features\. .*add --freeze features"),
        (["train", "{data}", "--freeze", "features", "--unfreeze-at", "9", "--epochs", "3"],
         r"unfreeze_at must be an epoch from 2 to epochs=3\. Received: unfreeze_at=9"),
        (["train", "{data}", "--freeze", "backbone"], r"freeze must be one of \{none, features\}"),
        (["train", "{data}", "--backbone-lr-scale", "0"], r"backbone_lr_scale must be positive"),
        (["train", "{data}", "--weights", "{tmp}/weights.txt", *TINY], r"must end in \.pth, \.pt or \.safetensors"),
        (["train", "{data}", "--weights", "{tmp}/broken.pth", *TINY], r"Cannot read weights file .*broken\.pth .*"
         r"Expected a state_dict saved with torch\.save"),
        (["train", "{data}", "--weights", "{tmp}/broken.safetensors", *TINY], r"Cannot read weights file .*broken\."
         r"safetensors .*Expected a \.safetensors file"),
        (["train", "{data}", "--weights", "{tmp}/vgg13.safetensors", *TINY], r"vgg13\.safetensors is a vgg13 model but "
         r"arch=vgg11\. Train with --arch vgg13"),
        (["evaluate", "imagenet:vgg11", "{tmp}/wnids"], r"has 2 WordNet-id folders; expected all 1000"),
        (["evaluate", "imagenet:vgg11", "{tmp}/index"], r"Class index folders must be 0 to 999\. Received: 1000"),
        (["evaluate", "imagenet:vgg11", "{tmp}/empty"], r"No images in the class folders of .*empty/"),
        (["evaluate", "imagenet:vgg11", "{tmp}/nothing"], r"Data folder not found: .*nothing\. Expected an ImageNet"),
        (["predict", "imagenet:vgg13", "{data}/cat"], r"The cached ImageNet file for vgg13 does not hold vgg13's "
         r"weights .*Delete it to download it again"),
        (["evaluate", "imagenet:vgg11", "{tmp}/names"], r"Folder .*golden retreiver/ is not an ImageNet category.*"
         r"Did you mean 'golden retriever'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(argv, message, bad_inputs, two_class_dir, imagenet_home, monkeypatch, capsys):
    if "imagenet:vgg11" in argv:
        monkeypatch.setenv("TORCH_HOME", str(imagenet_home))
    if "imagenet:vgg13" in argv:
        monkeypatch.setenv("TORCH_HOME", str(bad_inputs / "wrong_home"))
    code, _, err = run(capsys, *[a.format(tmp=bad_inputs, data=two_class_dir) for a in argv])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_failed_download_names_the_file_to_place(monkeypatch, two_class_dir: Path, capsys):
    monkeypatch.delenv("VGG_OFFLINE")  # a real download attempt, through the closed proxy port
    code, _, err = run(capsys, "train", two_class_dir, "--weights", "imagenet", *TINY)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "could not be fetched (download failed: URLError" in err
    assert re.search(r"Expected the file .*empty_torch_home/hub/checkpoints/vgg11-8a719046\.pth", err)
    with pytest.raises(UsageError, match=r"vgg11-8a719046\.pth"):
        read_weights("imagenet", "vgg11")
