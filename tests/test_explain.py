from __future__ import annotations

import pytest
import torch

from vgg.checkpoint import ModelInfo
from vgg.explain import explain, resolve_layer
from vgg.models import build
from vgg.predict import Classifier

SIZE = 32
SQUARE = 8


def square_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Noise; every other image also has a bright square inside one random quadrant. Returns images, labels, corners."""
    images = (torch.rand(n, 3, SIZE, SIZE, generator=generator) * 160).to(torch.uint8)
    labels = torch.arange(n) % 2
    corners = []
    for i in range(n):
        qy, qx = torch.randint(0, 2, (2,), generator=generator).tolist()
        y = qy * 16 + int(torch.randint(0, 16 - SQUARE + 1, (1,), generator=generator))
        x = qx * 16 + int(torch.randint(0, 16 - SQUARE + 1, (1,), generator=generator))
        corners.append((y, x))
        if labels[i]:
            images[i, :, y : y + SQUARE, x : x + SQUARE] = 255
    return images, labels, corners


@pytest.fixture(scope="module")
def square_classifier() -> Classifier:
    """vgg11_bn trained for a few seconds to tell "square" from "noise"; it must find the square to answer."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build("vgg11_bn", num_classes=2, image_size=SIZE, dropout=0.0)
    info = ModelInfo("vgg11_bn", ["noise", "square"], SIZE, [0.5] * 3, [0.25] * 3, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(15):  # measured: the training batches are all right from about the 10th step
        images, labels, _ = square_images(32, generator)
        loss = torch.nn.functional.cross_entropy(model((images.float() / 255 - 0.5) / 0.25), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Classifier(model.eval(), info, device="cpu", precision="fp32")


def test_grad_cam_peak_lies_on_the_square(square_classifier):
    images, labels, corners = square_images(32, torch.Generator().manual_seed(123))
    keep = [i for i in range(32) if labels[i] == 1]
    explanations = explain(square_classifier, [images[i] for i in keep])
    assert sum(e.label == "square" for e in explanations) >= len(keep) - 1  # the model learned the task
    hits = sum(_peak_on_square(e.heatmap, corners[i], margin=1) for i, e in zip(keep, explanations, strict=True))
    assert hits >= len(keep) - 1, f"Grad-CAM peak on the square in only {hits} of {len(keep)} images"
    # and for "noise", the class the square argues against, the peak is elsewhere
    against = explain(square_classifier, [images[i] for i in keep], class_name="noise")
    assert sum(_peak_on_square(e.heatmap, corners[i], margin=1) for i, e in zip(keep, against, strict=True)) < hits


def _peak_on_square(heatmap: torch.Tensor, corner: tuple[int, int], margin: int) -> bool:
    peak = int(heatmap.flatten().argmax())
    y, x = divmod(peak, SIZE)
    top, left = corner
    return top - margin <= y < top + SQUARE + margin and left - margin <= x < left + SQUARE + margin


def test_named_class_and_overlay(square_classifier, tmp_path):
    image = square_images(2, torch.Generator().manual_seed(5))[0][1]
    (e,) = explain(square_classifier, [image], class_name="noise")
    assert e.class_name == "noise"
    assert 0.0 <= e.probability <= 1.0 and e.heatmap.shape == (SIZE, SIZE)
    path = e.save(tmp_path / "cam.png")
    from PIL import Image

    with Image.open(path) as saved:
        assert saved.size == (224, 224) and saved.mode == "RGB"


def test_bad_class_and_layer_are_usage_errors(square_classifier):
    from vgg.errors import UsageError

    image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    with pytest.raises(UsageError, match="class must be one of the model's classes.*Received: 'sqare'.*'square'"):
        explain(square_classifier, [image], class_name="sqare")
    with pytest.raises(UsageError, match="layer must name a convolution.*Received: layer='features.3'"):
        resolve_layer(square_classifier.model, "features.3")
    with pytest.raises(UsageError, match="Received: layer=8"):
        resolve_layer(square_classifier.model, 8)
    # vgg11_bn: the last convolution is features.25; its block ends after batch norm and ReLU
    assert resolve_layer(square_classifier.model, -1) == resolve_layer(square_classifier.model, "features.25") == 28
    # the default is the last block with a map of at least 8x8: the last one at 224 px, features.11 at 32 px
    assert resolve_layer(square_classifier.model, image_size=224) == 28
    assert resolve_layer(square_classifier.model, image_size=32) == 14


def test_explain_cli_writes_one_overlay_per_image(square_classifier, tmp_path, capsys):
    from PIL import Image

    from vgg.checkpoint import save_model
    from vgg.cli import main

    model = tmp_path / "squares.safetensors"
    save_model(model, square_classifier.model, square_classifier.info)
    images = square_images(4, torch.Generator().manual_seed(9))[0]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    out = tmp_path / "cams"
    assert (
        main(["explain", str(model), *map(str, paths), "--out", str(out), "--class", "square", "--device", "cpu"]) == 0
    )
    written = sorted(out.glob("*.png"))
    assert len(written) == 4 and all(p.name.endswith("-square.png") for p in written)
    assert capsys.readouterr().out.count("Grad-CAM of square") == 4
    assert main(["explain", str(model), str(paths[0]), "--layer", "features.3", "--out", str(out)]) == 2
    assert "layer must name a convolution" in capsys.readouterr().err
