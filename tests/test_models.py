from __future__ import annotations

import pytest
import torch
import torchvision

from vgg import models
from vgg.errors import UsageError


def _on_meta(builder, **kwargs):
    with torch.device("meta"):
        return builder(**kwargs)


@pytest.mark.parametrize(
    ("arch", "classes", "size", "expected"),
    [
        ("vgg16", 1000, 224, 138_357_544),
        ("vgg16_bn", 1000, 224, 138_365_992),
        ("vgg16", 2, 224, 134_268_738),  # the tutorial's model
    ],
)
def test_parameter_counts(arch, classes, size, expected):
    model = _on_meta(models.build, arch=arch, num_classes=classes, image_size=size, init_weights=False)
    assert models.count_parameters(model) == expected


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_state_dict_names_and_shapes_match_torchvision(arch):
    ours = _on_meta(models.build, arch=arch, init_weights=False).state_dict()
    theirs = _on_meta(getattr(torchvision.models, arch), weights=None, init_weights=False).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_weights_load_both_ways_with_identical_outputs(arch):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)(weights=None).eval()
    ours = models.build(arch).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        other = models.build(arch).eval()  # fresh random weights, then theirs <- ours
        theirs.load_state_dict(other.state_dict())
        assert torch.equal(other(x), theirs(x))


def test_small_images_flatten_the_pooled_map_not_25088_inputs():
    model = models.vgg16(num_classes=10, image_size=32)
    assert model.classifier[0].in_features == 512
    assert models.vgg16(num_classes=10, image_size=64).classifier[0].in_features == 512 * 2 * 2
    assert models.vgg16(num_classes=10, image_size=448).classifier[0].in_features == 512 * 7 * 7
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_every_member_runs_at_32_px(arch):
    model = models.build(arch, num_classes=5, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_reset_classifier_changes_only_the_output_layer():
    model = models.vgg11(num_classes=10, image_size=32)
    before = model.classifier[0].weight.clone()
    model.reset_classifier(3)
    assert model.num_classes == 3
    assert torch.equal(model.classifier[0].weight, before)


def test_bad_arch_and_size_are_clear_errors():
    with pytest.raises(UsageError, match=r"arch must be one of .* Received: arch='vgg17'"):
        models.build("vgg17")
    with pytest.raises(UsageError, match="image_size must be at least 32 px"):
        models.vgg16(image_size=28)
