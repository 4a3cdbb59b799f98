"""The Python API a user calls after training: vgg.load(path).predict(...) and .evaluate(...)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import vgg
from vgg.checkpoint import ModelInfo, save_model
from vgg.decoding import decode
from vgg.errors import UsageError
from vgg.models import build


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_model(path, build("vgg11", 3, 32), ModelInfo("vgg11", ["cat", "dog", "fox"], 32, [0.5] * 3, [0.25] * 3))
    return path


def test_paths_pil_images_and_tensors_give_the_same_answer(model_file: Path, three_class_dir: Path):
    classifier = vgg.load(model_file, device="cpu", precision="fp32")
    path = three_class_dir / "fox" / "fox_001.png"
    pil = Image.open(path)
    uint8 = decode(path)
    as_float = uint8.float() / 255
    answers = classifier.predict([path, pil, uint8, as_float], top_k=3)
    assert len({a.label for a in answers}) == 1
    probs = [dict(a.top_k) for a in answers]
    for p in probs[1:]:
        assert p == pytest.approx(probs[0], abs=1e-3)
    assert sum(probs[0].values()) == pytest.approx(1, abs=1e-4)
    single = classifier.predict(str(path))
    assert isinstance(single, vgg.Prediction) and single.label == answers[0].label and single.source == str(path)


def test_batch_tensor_and_top_k_bounds(model_file: Path):
    classifier = vgg.load(model_file, device="cpu")
    answers = classifier.predict(torch.rand(5, 3, 40, 40), top_k=10)
    assert len(answers) == 5 and all(len(a.top_k) == 3 for a in answers)
    with pytest.raises(UsageError, match="top_k must be at least 1. Received: 0"):
        classifier.predict(torch.rand(3, 32, 32), top_k=0)


def test_bad_inputs_are_named(model_file: Path, tmp_path: Path):
    classifier = vgg.load(model_file, device="cpu")
    (tmp_path / "fake.jpg").write_text("this is text")
    with pytest.raises(UsageError, match=r"Cannot read image .*fake.jpg: not an image \(its content is text\)"):
        classifier.predict(tmp_path / "fake.jpg")
    with pytest.raises(
        UsageError, match=r"Image tensors must be C x H x W with 1 or 3 channels. Received: \(4, 8, 8\)"
    ):
        classifier.predict(torch.rand(4, 8, 8))
    with pytest.raises(UsageError, match="Cannot predict on int"):
        classifier.predict([3])


def test_evaluate_counts_every_image(model_file: Path, three_class_dir: Path):
    result = vgg.load(model_file, device="cpu").evaluate(three_class_dir)
    assert result["images"] == 30
    assert torch.tensor(result["confusion"]).sum(1).tolist() == [10, 10, 10]
    assert result["accuracy"] == pytest.approx(sum(torch.tensor(result["confusion"]).diag().tolist()) / 30)


def test_trained_model_predicts_its_classes(three_class_dir: Path, tmp_path: Path):
    """The whole workflow in Python: a few epochs on clearly separable images give a model that is right."""
    config = vgg.TrainConfig(
        data=str(three_class_dir), out=str(tmp_path / "run"), arch="vgg11_bn", image_size=32, epochs=4,
        batch_size=8, workers=0, lr=1e-3, warmup_epochs=0, device="cpu",
    )  # fmt: skip
    result = vgg.train(config, log=lambda _: None, progress=False)
    classifier = vgg.load(result.best_model, device="cpu")
    assert classifier.evaluate(three_class_dir)["accuracy"] >= 0.9


def test_tta_averages_the_image_and_its_mirror_image(model_file: Path):
    plain = vgg.load(model_file, device="cpu", precision="fp32")
    tta = vgg.load(model_file, device="cpu", precision="fp32", tta=True)
    images = torch.rand(4, 3, 32, 32)
    expected = (plain.probabilities(images) + plain.probabilities(images.flip(3))) / 2
    averaged = tta.probabilities(images)
    torch.testing.assert_close(averaged, expected, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(averaged, plain.probabilities(images), atol=1e-7, rtol=0)
    # A left-right symmetric image is its own mirror image: nothing to average.
    symmetric = torch.cat([images[:, :, :, :16], images[:, :, :, :16].flip(3)], dim=3)
    torch.testing.assert_close(tta.probabilities(symmetric), plain.probabilities(symmetric), atol=1e-6, rtol=1e-4)


def test_evaluate_with_tta_scores_the_averaged_probabilities(model_file: Path, three_class_dir: Path):
    classifier = vgg.load(model_file, device="cpu", precision="fp32", tta=True)
    result = classifier.evaluate(three_class_dir)
    paths = [path for name in classifier.class_names for path in sorted((three_class_dir / name).iterdir())]
    probs = classifier.probabilities(paths)
    truth = torch.arange(3).repeat_interleave(10)
    confusion = torch.bincount(truth * 3 + probs.argmax(1), minlength=9).view(3, 3)
    assert result["confusion"] == confusion.tolist()
    nll = -probs[torch.arange(30), truth].log().mean().item()
    assert result["loss"] == pytest.approx(nll, rel=1e-4)
