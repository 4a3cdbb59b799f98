"""The small-map convolution (models.Conv3x3) is nn.Conv2d: same parameters, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vgg.models import Conv3x3, build


def _both(height: int, width: int, memory_format: torch.memory_format, bf16: bool = False):
    """Conv3x3 and nn.Conv2d with the same weights, run forward and backward on the same input."""
    torch.manual_seed(0)
    reference = nn.Conv2d(16, 8, 3, padding=1)
    conv = Conv3x3(16, 8, 3, padding=1)
    conv.load_state_dict(reference.state_dict())
    x = torch.randn(5, 16, height, width).contiguous(memory_format=memory_format)
    weights = torch.randn(5, 8, height, width)
    results = []
    for layer in (conv, reference):
        inputs = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = layer(inputs)
        (out.float() * weights).sum().backward()
        results.append((out, inputs.grad, layer.weight.grad, layer.bias.grad))
    return results


@pytest.mark.parametrize("height, width", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 3), (4, 4)])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_outputs_and_gradients_equal_nn_conv2d(height, width, memory_format):
    ours, theirs = _both(height, width, memory_format)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("height, width", [(1, 1), (2, 2)])
def test_under_bf16_autocast_it_matches_nn_conv2d_to_bf16_rounding(height, width):
    (out, x_grad, w_grad, b_grad), theirs = _both(height, width, torch.channels_last, bf16=True)
    assert out.dtype == theirs[0].dtype == torch.bfloat16
    assert w_grad.dtype == torch.float32  # the parameters' gradients stay in their own precision
    for name, a, b in zip(
        ("output", "input grad", "weight grad", "bias grad"), (out, x_grad, w_grad, b_grad), theirs, strict=True
    ):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2, msg=name)


def test_vgg_trains_the_same_with_either_convolution_at_32_px():
    torch.manual_seed(0)
    model = build("vgg11", num_classes=3, image_size=32, dropout=0.0)
    reference = build("vgg11", num_classes=3, image_size=32, dropout=0.0)
    reference.features = nn.Sequential(
        *[
            nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1) if isinstance(m, Conv3x3) else m
            for m in reference.features
        ]
    )
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for net in (model, reference):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    assert [type(m) for m in model.features if isinstance(m, nn.Conv2d)] == [Conv3x3] * 8
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
