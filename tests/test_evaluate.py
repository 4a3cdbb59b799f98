"""Evaluate, predict --threshold/--csv and temperature scaling, on small generated datasets with known answers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import write_images
from safetensors import safe_open
from safetensors.torch import save_file

import vgg
from vgg import metrics
from vgg.calibration import calibrate_model_file
from vgg.checkpoint import ModelInfo, read_info, save_model
from vgg.cli import main
from vgg.errors import UsageError
from vgg.models import build
from vgg.scan import scan_folder

SIX = {
    "red": (220, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 40, 220),
    "yellow": (220, 220, 40),
    "cyan": (40, 220, 220),
    "magenta": (220, 40, 220),
}


@pytest.fixture
def six_class_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "six", SIX, per_class=4)


def six_class_model(path: Path, scale: float = 1.0, temperature: float = 1.0) -> Path:
    """An untrained vgg11 for the six colours; ``scale`` multiplies its output layer (over-confidence)."""
    torch.manual_seed(0)
    model = build("vgg11", 6, 32)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(scale)
        model.classifier[-1].bias.normal_(0, 0.1 * scale)
    info = ModelInfo("vgg11", list(SIX), 32, [0.5] * 3, [0.25] * 3, temperature=temperature)
    save_model(path, model, info)
    return path


def test_evaluate_six_classes_matches_metrics_of_its_own_probabilities(tmp_path: Path, six_class_dir: Path):
    model = six_class_model(tmp_path / "m.safetensors", scale=30)
    classifier = vgg.load(model, device="cpu", precision="fp32")
    result = classifier.evaluate(six_class_dir, workers=0)
    assert result["images"] == 24
    assert sum(map(sum, result["confusion"])) == 24  # every image counted once
    scanned = scan_folder(six_class_dir, classes=list(SIX))
    probs = classifier.probabilities([s.path for s in scanned.samples])
    targets = torch.tensor([s.label for s in scanned.samples])
    assert result["top5_accuracy"] == pytest.approx(metrics.top_k_accuracy(probs, targets, 5))
    assert result["accuracy"] == pytest.approx(metrics.top_k_accuracy(probs, targets, 1))
    scores = metrics.per_class_scores(metrics.confusion_matrix(targets, probs.argmax(1), 6))
    assert result["per_class"]["f1"] == pytest.approx(scores.f1)
    assert result["per_class"]["support"] == [4] * 6
    wrong = 24 - sum(result["confusion"][i][i] for i in range(6))
    assert len(result["misclassified"]) == wrong
    losses = [row["loss"] for row in result["misclassified"]]
    assert losses == sorted(losses, reverse=True)


def test_evaluate_cli_writes_files_and_json(tmp_path: Path, six_class_dir: Path, capsys):
    model = six_class_model(tmp_path / "m.safetensors", scale=30)
    out = tmp_path / "eval"
    assert main(["evaluate", str(model), str(six_class_dir), "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "top-5:" in text and "balanced accuracy:" in text and "macro avg" in text and "weighted avg" in text
    for name in ("confusion.png", "confusion.csv", "misclassified.csv", "metrics.json"):
        assert (out / name).stat().st_size > 0
    with open(out / "confusion.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == list(SIX) and sum(int(v) for row in rows[1:] for v in row[1:]) == 24
    with open(out / "misclassified.csv", newline="") as handle:
        mistakes = list(csv.DictReader(handle))
    assert list(mistakes[0]) == ["path", "true", "predicted", "probability", "loss"]
    assert [float(r["loss"]) for r in mistakes] == sorted((float(r["loss"]) for r in mistakes), reverse=True)
    assert all(r["true"] != r["predicted"] for r in mistakes)
    assert main(["evaluate", str(model), str(six_class_dir), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(mistakes) == len(result["misclassified"]) == 24 - sum(result["confusion"][i][i] for i in range(6))


def test_threshold_answers_unknown_below_it(tmp_path: Path, six_class_dir: Path, capsys):
    model = six_class_model(tmp_path / "m.safetensors", scale=1)  # untrained: top probabilities ~1/6
    classifier = vgg.load(model, device="cpu")
    image = six_class_dir / "red" / "red_000.jpg"
    plain = classifier.predict(image)
    assert plain.label in SIX
    below = classifier.predict(image, threshold=plain.probability + 0.01)
    assert below.label == "unknown" and below.top_k[0][0] == plain.label
    assert classifier.predict(image, threshold=plain.probability - 0.01).label == plain.label
    with pytest.raises(UsageError, match="threshold must be a probability between 0 and 1. Received: threshold=1.5"):
        classifier.predict(image, threshold=1.5)
    argv = ["predict", str(model), str(six_class_dir / "red"), "--csv", "--threshold", "0.99", "--top-k", "2"]
    assert main(argv) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(rows) == 4 and {r["label"] for r in rows} == {"unknown"}
    assert list(rows[0]) == ["image", "label", "probability", "top1_label", "top1_probability", "top2_label",
                             "top2_probability"]  # fmt: skip


def test_temperature_is_stored_applied_and_old_files_load(tmp_path: Path):
    path = six_class_model(tmp_path / "t.safetensors", temperature=2.0)
    assert read_info(path).temperature == 2.0
    images = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    calibrated = vgg.load(path, device="cpu", precision="fp32")
    raw = calibrated.probabilities(images, calibrated=False)
    assert calibrated.probabilities(images) == pytest.approx((raw.log() / 2).softmax(1), abs=1e-5)
    # A file written before the field existed: its header has no "temperature"; it loads with 1.0.
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    info = json.loads(header["info"])
    del info["temperature"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**header, "info": json.dumps(info)})
    assert read_info(old).temperature == 1.0
    assert vgg.load(old, device="cpu", precision="fp32").probabilities(images) == pytest.approx(raw, abs=1e-5)


def test_calibration_lowers_ece_of_an_overconfident_model(tmp_path: Path, six_class_dir: Path):
    path = six_class_model(tmp_path / "over.safetensors", scale=300)  # near one-hot answers, mostly wrong
    samples = [(s.path, s.label) for s in scan_folder(six_class_dir, classes=list(SIX)).samples]
    calibration = calibrate_model_file(path, samples, device="cpu")
    assert calibration is not None and calibration.images == 24
    assert calibration.temperature > 1
    assert calibration.ece_after < calibration.ece_before / 2
    assert read_info(path).temperature == pytest.approx(calibration.temperature)
    result = vgg.load(path, device="cpu").evaluate(six_class_dir, workers=0)
    assert result["ece_calibrated"] < result["ece"]
