"""The small-map convolution (models.Conv3x3) is nn.Conv2d: same parameters, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vgg.models import Conv3x3, build


@pytest.mark.parametrize("side", [1, 2, 4])
def test_outputs_and_gradients_equal_nn_conv2d(side):
    torch.manual_seed(0)
    reference = nn.Conv2d(16, 8, 3, padding=1)
    conv = Conv3x3(16, 8, 3, padding=1)
    conv.load_state_dict(reference.state_dict())
    x = torch.randn(5, 16, side, side).to(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    weights = torch.randn(5, 8, side, side)
    (conv(x) * weights).sum().backward()
    (reference(x_ref) * weights).sum().backward()
    torch.testing.assert_close(conv(x), reference(x_ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)


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
