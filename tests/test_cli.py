"""The command line, called in-process as a user would type it."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, small_run, write_images
from PIL import Image
from test_datasets import fake_fashion_mnist

import vgg
from vgg.cli import main

TINY = ["--arch", "vgg11", "--image-size", "32", "--batch-size", "8", "--workers", "0"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One small training run shared by the tests that read its outputs."""
    return small_run(tmp_path_factory.mktemp("trained"), epochs=2)


def test_summary_prints_keras_style_table_and_totals(capsys):
    code, out, _ = run(capsys, "summary", "--arch", "vgg16", "--classes", "2", "--image-size", "224")
    assert code == 0
    assert "features.0 (Conv2d)" in out and "(N, 64, 224, 224)" in out and "1,792" in out
    assert "flatten (Flatten)" in out and "(N, 25088)" in out
    assert "classifier.6 (Linear)" in out and "8,194" in out
    assert "Total params: 134,268,738" in out
    assert len([line for line in out.splitlines() if "(Conv2d)" in line]) == 13
    assert len([line for line in out.splitlines() if "(MaxPool2d)" in line]) == 5


def test_train_writes_models_history_curves_and_config(trained: Path):
    for name in ("best.safetensors", "last.safetensors", "history.csv", "curves.png", "config.json"):
        assert (trained / name).is_file(), name
    rows = list(csv.DictReader(open(trained / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    config = json.loads((trained / "config.json").read_text())
    assert config["class_names"] == ["cat", "dog"]
    assert config["config"]["arch"] == "vgg11" and config["config"]["image_size"] == 32
    assert "torch" in config["versions"]
    assert (trained / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_train_prints_summary_and_epoch_metrics(two_class_dir: Path, tmp_path: Path, capsys):
    code, out, _ = run(capsys, "train", two_class_dir, "--out", tmp_path / "r", "--epochs", "1", *TINY)
    assert code == 0
    assert "Total params:" in out
    assert "epoch 1/1: loss" in out and "val_accuracy" in out and "img/s" in out
    assert "classes are balanced (10 images each)" in out


def test_early_stopping_with_patience(two_class_dir: Path, tmp_path: Path, capsys):
    # a zero learning rate can never improve after epoch 1, so patience 1 stops at epoch 2
    code, out, _ = run(
        capsys, "train", two_class_dir, "--out", tmp_path / "r", "--epochs", "6", "--patience", "1",
        "--lr", "1e-12", "--optimizer", "sgd", "--monitor", "val_loss", *TINY,
    )  # fmt: skip
    assert code == 0
    assert "stopped early" in out
    assert len(list(csv.DictReader(open(tmp_path / "r" / "history.csv")))) == 2


def test_predict_text_and_json(trained: Path, two_class_dir: Path, capsys):
    image = two_class_dir / "cat" / "cat_000.jpg"
    code, out, _ = run(capsys, "predict", trained / "best.safetensors", image)
    assert code == 0
    assert out.startswith(f"{image}: ") and out.split(": ")[1].split()[0] in {"cat", "dog"}
    code, out, _ = run(capsys, "predict", trained / "best.safetensors", two_class_dir / "dog", "--top-k", "2", "--json")
    assert code == 0
    answers = json.loads(out)
    assert len(answers) == 12
    for answer in answers:
        assert [t["label"] for t in answer["top_k"]] in (["cat", "dog"], ["dog", "cat"])
        assert sum(t["probability"] for t in answer["top_k"]) == pytest.approx(1, abs=1e-3)


def test_evaluate_reports_loss_accuracy_and_per_class(trained: Path, two_class_dir: Path, capsys):
    code, out, _ = run(capsys, "evaluate", trained / "best.safetensors", two_class_dir, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["images"] == 24 and result["class_names"] == ["cat", "dog"]
    assert 0 <= result["accuracy"] <= 1 and len(result["per_class_accuracy"]) == 2
    assert sum(map(sum, result["confusion"])) == 24
    code, out, _ = run(capsys, "evaluate", trained / "best.safetensors", two_class_dir)
    assert code == 0 and "accuracy" in out and "cat" in out and "dog" in out


def test_tta_flag_reaches_evaluate_and_predict(trained: Path, two_class_dir: Path, capsys):
    model = trained / "best.safetensors"
    code, out, _ = run(capsys, "evaluate", model, two_class_dir, "--tta", "--json")
    assert code == 0
    expected = vgg.load(model, device="cpu", tta=True).evaluate(two_class_dir)
    assert json.loads(out)["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    image = two_class_dir / "cat" / "cat_000.jpg"
    code, out, _ = run(capsys, "predict", model, image, "--tta", "--json", "--top-k", "2")
    assert code == 0
    probability = {t["label"]: t["probability"] for t in json.loads(out)[0]["top_k"]}
    expected = vgg.load(model, device="cpu", tta=True).probabilities([image])[0]
    assert [probability["cat"], probability["dog"]] == pytest.approx(expected.tolist(), abs=1e-5)


def test_train_tta_validates_as_evaluate_tta_scores(two_class_dir: Path, tmp_path: Path, capsys):
    val = write_images(tmp_path / "val", {k: COLOURS[k] for k in ("cat", "dog")}, per_class=5, seed=1)
    for path in val.rglob("*.*"):  # the left third dark: the mirror image looks different to the model
        pixels = np.array(Image.open(path).convert("RGB"))
        pixels[:, : pixels.shape[1] // 3] //= 4
        Image.fromarray(pixels).save(path)
    argv = ["train", two_class_dir, "--val", val, "--out", tmp_path / "r", "--epochs", "1", "--precision", "fp32"]
    code, out, _ = run(capsys, *argv, "--tta", *TINY)
    assert code == 0 and "(flip-averaged: evaluate and predict with --tta to match)" in out
    (row,) = csv.DictReader(open(tmp_path / "r" / "history.csv"))
    model = tmp_path / "r" / "best.safetensors"
    mirrored = vgg.load(model, device="cpu", precision="fp32", tta=True).evaluate(val)
    plain = vgg.load(model, device="cpu", precision="fp32").evaluate(val)
    assert float(row["val_loss"]) == pytest.approx(mirrored["loss"], rel=1e-6)
    assert float(row["val_accuracy"]) == mirrored["accuracy"]
    # the images are not mirror-symmetric: the two scores differ, so the history shows the flip-averaged one
    assert plain["loss"] != pytest.approx(mirrored["loss"], rel=1e-4)


def test_a_refusal_of_the_file_system_is_one_line_naming_the_path(tmp_path: Path, capsys):
    source = fake_fashion_mnist(tmp_path / "idx")
    (tmp_path / "a.txt").write_text("a file where a folder is wanted")
    code, _, err = run(capsys, "datasets", "fashion-mnist", tmp_path / "a.txt" / "fm", "--source", source)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.fullmatch(r"error: .*a\.txt/\S*: Not a directory\n", err), err


def test_datasets_fashion_mnist_from_idx_files(tmp_path: Path, capsys):
    source = fake_fashion_mnist(tmp_path / "idx")
    dest = tmp_path / "fm"
    code, out, _ = run(capsys, "datasets", "fashion-mnist", dest, "--source", source)
    assert code == 0
    classes = sorted(p.name for p in (dest / "train").iterdir())
    assert classes == sorted(["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                              "bag", "ankle-boot"])  # fmt: skip
    assert len(list((dest / "train").rglob("*.png"))) == 30 and len(list((dest / "test").rglob("*.png"))) == 20
    assert len(list((dest / "test" / "trouser").glob("*.png"))) == 2
    code, out, _ = run(capsys, "datasets", "fashion-mnist", dest, "--source", source)  # again: nothing to do
    assert code == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "{tmp}/missing"], r"error: Data folder not found: .*missing is nothing\. Expected a folder"),
        (["train", "{tmp}/flat"], r"error: No class folders in .*flat/: expected .* Found 2 files and 0 folders"),
        (["train", "{tmp}/one"], r"error: Only one class in .*one/ \('cat'\): expected at least 2"),
        (["train", "{data}", "--monitor", "val_acc"], r"error: monitor must be one of .*Did you mean 'val_accuracy'"),
        (["predict", "{model}", "{tmp}/nope.jpg"], r"error: Image not found: .*nope.jpg\. Expected an image file"),
        (["predict", "{tmp}/flat/a.txt", "{data}/cat"], r"error: .*a.txt is not a vgg model file"),
        (["evaluate", "{tmp}/nomodel.safetensors", "{data}"], r"error: Model file not found: .*nomodel"),
        (
            ["predict", "{run}", "{data}/cat"],
            r"error: .* is a folder, not a model file\. Did you mean .*best\.safetensors\?",
        ),
        (
            ["evaluate", "{tmp}/flat", "{data}"],
            r"error: .*flat is a folder, not a model file\. Expected a \.safetensors",
        ),
        (["summary", "--arch", "vgg15"], r"error: arch must be one of .*Received: arch='vgg15'"),
        (["train"], r"error: vgg train: the following arguments are required: data"),
        (["datasets", "fashion-mnist", "{tmp}/fm", "--source", "{tmp}"], r"error: Fashion-MNIST files missing in"),
        (
            ["explain", "{model}", "{data}/cat", "--out", "{tmp}/flat/a.txt"],
            r"error: --out .*a.txt is a file: expected a",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, tmp_path, two_class_dir, trained, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    (tmp_path / "flat" / "b.txt").write_text("y")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    argv = [a.format(tmp=tmp_path, data=two_class_dir, run=trained, model=trained / "best.safetensors") for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_compiled_training_writes_ordinary_model_files(two_class_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "compiled"
    code, _, _ = run(capsys, "train", two_class_dir, "--out", out, "--epochs", "1", "--compile", *TINY)
    assert code == 0
    code, printed, _ = run(capsys, "predict", out / "best.safetensors", two_class_dir / "cat", "--json")
    assert code == 0 and len(json.loads(printed)) == 12


def test_validation_files_that_are_training_files_are_named(two_class_dir: Path, tmp_path: Path, capsys):
    val = tmp_path / "val"
    for cls in ("cat", "dog"):  # links to three training images a class, and one new image a class
        (val / cls).mkdir(parents=True)
        files = sorted((two_class_dir / cls).iterdir())
        for file in files[:3]:
            (val / cls / file.name).symlink_to(file)
        shutil.copy(files[3], val / cls / "copy.png")
    code, out, _ = run(capsys, "train", two_class_dir, "--val", val, "--out", tmp_path / "r", "--epochs", "1", *TINY)
    assert code == 0
    assert f"warning: 6 of the 8 validation images in {val} are training images too (the same files)" in out
    code, out, _ = run(capsys, "train", two_class_dir, "--out", tmp_path / "r2", "--epochs", "1", *TINY)
    assert code == 0 and "are training images too" not in out
