"""The VGG family (Simonyan & Zisserman, 2014) with torchvision-compatible parameter names.

Every member is built from one configuration table: numbers are 3x3 'same' convolutions (+ ReLU, optionally
batch norm) of that many output channels, "M" is a 2x2 max-pool. The classifier is the paper's
Dense 4096 -> Dense 4096 -> N, fed by the last feature map pooled down to at most 7x7: at 224 px this is
exactly the Keras tutorial's Flatten and torchvision's model, while at 32 px the first dense layer sees 512
inputs instead of 25,088 (a 1x1 map would otherwise be upsampled 49 times; measured over 2x faster to train).

Builders (``vgg11`` ... ``vgg19_bn``) take ``num_classes``, ``image_size``, ``dropout`` and ``batch_norm``-free
keyword arguments; ``build(arch, ...)`` picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import UsageError, did_you_mean

CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

# name -> (configuration, batch norm)
ARCHS: dict[str, tuple[str, bool]] = {
    "vgg11": ("A", False),
    "vgg11_bn": ("A", True),
    "vgg13": ("B", False),
    "vgg13_bn": ("B", True),
    "vgg16": ("D", False),
    "vgg16_bn": ("D", True),
    "vgg19": ("E", False),
    "vgg19_bn": ("E", True),
}

MIN_IMAGE_SIZE = 32  # five 2x2 pools need at least 32 px to leave a 1x1 map
# VGG16's first feature map alone is 1 GiB per image at 2048 px (64 x 2048 x 2048 floats); past that a model file's
# header (or a typo) would ask for memory no machine has.
MAX_IMAGE_SIZE = 2048


def pooled_size(image_size: int) -> int:
    """Side of the feature map the classifier flattens: the last map, pooled down to at most 7x7."""
    return min(7, image_size // 32)


class _SpreadKernel(torch.autograd.Function):
    """A 3x3 kernel (out, in, 3, 3) spread into the dense matrix of its 'same' convolution over an H x W map with
    H, W <= 2, rows ordered (output pixel, out channel) and columns (input pixel, in channel).

    On such a map every output pixel sees every input pixel, each through one tap of the kernel, so the matrix
    holds every weight; written by hand so that both directions are one block copy per pixel pair (16 at 2x2)
    rather than a gather whose backward scatters into (or permutes) a tensor of the whole matrix's size.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
        pairs = _tap_pairs(height, width)
        pixels = height * width
        out_channels, in_channels = weight.shape[:2]
        dense = weight.new_empty(pixels, out_channels, pixels, in_channels)
        for (to, frm), (row, col) in pairs:
            dense[to, :, frm, :] = weight[:, :, row, col]
        ctx.pairs, ctx.shape = pairs, weight.shape
        return dense.view(pixels * out_channels, pixels * in_channels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        out_channels, in_channels = ctx.shape[:2]
        pixels = grad.shape[0] // out_channels
        blocks = grad.view(pixels, out_channels, pixels, in_channels)
        # Summed in float32: a tap shared by up to four pixel pairs would lose bits in bfloat16.
        weight_grad = torch.zeros(ctx.shape, dtype=torch.float32, device=grad.device)
        for (to, frm), (row, col) in ctx.pairs:
            weight_grad[:, :, row, col] += blocks[to, :, frm, :]
        return weight_grad.to(grad.dtype), None, None


def _tap_pairs(height: int, width: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((output pixel, input pixel), (kernel row, kernel column)) for every pair of pixels of an H x W map."""
    pixels = [(y, x) for y in range(height) for x in range(width)]
    return [
        ((i, j), (yi - yo + 1, xi - xo + 1)) for i, (yo, xo) in enumerate(pixels) for j, (yi, xi) in enumerate(pixels)
    ]


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1)`` (same parameters and names) that trains tiny maps faster.

    When training on the CPU on a map of at most 2x2 px (VGG's last block at 32-63 px), the layer is one dense
    matrix product: every output pixel sees every input pixel there, so the kernel spreads into an
    (H*W*out) x (H*W*in) matrix with no zero-padding work, where oneDNN's convolution computes 9 taps per pixel,
    5 of them on padding, and its backward is slow on such tiny maps (benchmarks/RESULTS.md, "Design
    measurements"). At 4x4 px and above oneDNN is faster, so everything else stays with it, as does inference
    (so that exports trace a plain convolution). Results equal oneDNN's up to float rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        if not (
            height <= 2
            and width <= 2
            and x.device.type == "cpu"
            and torch.is_grad_enabled()
            and (self.weight.requires_grad or x.requires_grad)  # a backward pass will follow: the slow part
            and self.bias is not None
        ):
            return super().forward(x)
        weight = self.weight
        if torch.is_autocast_enabled("cpu"):
            # Spread the kernel in the precision the product runs in: half the bytes to copy, both ways.
            weight = weight.to(torch.get_autocast_dtype("cpu"))
        dense = _SpreadKernel.apply(weight, height, width)
        # Channels-last input is already (N, H, W, C) in memory, so this is a view; the output is channels-last too.
        columns = x.permute(0, 2, 3, 1).reshape(n, -1)
        out = torch.addmm(self.bias.repeat(height * width), columns, dense.t())
        return out.view(n, height, width, self.out_channels).permute(0, 3, 1, 2)


def make_features(config: list[int | str], batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(Conv3x3(in_channels, int(item), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(item)))
        layers.append(nn.ReLU(inplace=True))
        in_channels = int(item)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """A VGG network: ``features`` (convolutions), ``avgpool`` and ``classifier``, named as in torchvision.

    Args:
        features: the convolutional trunk, typically from ``make_features``.
        num_classes: size of the output layer.
        image_size: input side in pixels (>= 32); fixes the pooled map the classifier flattens.
        dropout: dropout probability after each hidden dense layer.
        init_weights: apply the standard initialisation (He for convolutions, N(0, 0.01) for dense layers).
    """

    def __init__(
        self,
        features: nn.Sequential,
        num_classes: int = 1000,
        image_size: int = 224,
        dropout: float = 0.5,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        if image_size < MIN_IMAGE_SIZE:
            raise UsageError(f"image_size must be at least {MIN_IMAGE_SIZE} px for VGG. Received: {image_size}.")
        if image_size > MAX_IMAGE_SIZE:
            raise UsageError(f"image_size must be at most {MAX_IMAGE_SIZE} px for VGG. Received: {image_size}.")
        if num_classes < 1:
            raise UsageError(f"num_classes must be at least 1. Received: {num_classes}.")
        side = pooled_size(image_size)
        self.features = features
        self.features_frozen = False
        self.avgpool = nn.AdaptiveAvgPool2d((side, side))
        self.classifier = nn.Sequential(
            nn.Linear(512 * side * side, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                # He initialisation keeps the signal's scale through the hidden dense layers. torchvision's
                # N(0, 0.01) matches it only for the 25,088-input layer at 224 px; at 32 px (512 inputs) it shrinks
                # the logits ~10x and plain VGG16 never leaves chance (measured on Fashion-MNIST).
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier[-1].weight, 0, 0.01)

    @property
    def num_classes(self) -> int:
        return self.classifier[-1].out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def freeze_features(self, frozen: bool = True) -> None:
        """Stop (or resume) training the convolutional trunk: no gradients, and batch-norm statistics held fixed."""
        self.features.requires_grad_(not frozen)
        self.features_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> VGG:
        super().train(mode)
        if self.features_frozen:
            # Running batch-norm statistics are part of the pretrained trunk: updating them would change it.
            self.features.eval()
        return self

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the output layer (transfer learning to a new set of classes)."""
        old = self.classifier[-1]
        self.classifier[-1] = nn.Linear(old.in_features, num_classes, device=old.weight.device)
        nn.init.normal_(self.classifier[-1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[-1].bias)


def _builder(arch: str) -> Callable[..., VGG]:
    config, batch_norm = ARCHS[arch]

    def build_arch(num_classes: int = 1000, image_size: int = 224, dropout: float = 0.5, **kwargs: bool) -> VGG:
        return VGG(make_features(CONFIGS[config], batch_norm), num_classes, image_size, dropout, **kwargs)

    build_arch.__name__ = arch
    build_arch.__doc__ = f"{arch}: configuration {config}{' with batch norm' if batch_norm else ''} (see module doc)."
    return build_arch


vgg11 = _builder("vgg11")
vgg11_bn = _builder("vgg11_bn")
vgg13 = _builder("vgg13")
vgg13_bn = _builder("vgg13_bn")
vgg16 = _builder("vgg16")
vgg16_bn = _builder("vgg16_bn")
vgg19 = _builder("vgg19")
vgg19_bn = _builder("vgg19_bn")


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise UsageError(
            f"arch must be one of {{{', '.join(ARCHS)}}}. Received: arch={arch!r}.{did_you_mean(arch, ARCHS)}"
        )
    return arch


def build(arch: str, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.5, **kwargs: bool) -> VGG:
    """Build a family member by name, e.g. ``build("vgg16", num_classes=2, image_size=224)``."""
    return _builder(check_arch(arch))(num_classes=num_classes, image_size=image_size, dropout=dropout, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class MatrixPool(nn.Module):
    """Adaptive average pooling as two matrix products, for ``--deterministic`` on CUDA.

    CUDA's adaptive average pooling has no deterministic backward pass (under ``torch.use_deterministic_algorithms``
    the first backward would stop the run), while matrix products are deterministic once cuBLAS has a fixed
    workspace. The windows are adaptive pooling's own; a map already of the output size passes through untouched
    (VGG below 256 px).
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    @staticmethod
    def _windows(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
        """``out`` x ``size``: row i averages input positions floor(i*size/out) to ceil((i+1)*size/out)."""
        matrix = torch.zeros(out, size, dtype=like.dtype, device=like.device)
        for i in range(out):
            start, end = i * size // out, -(-(i + 1) * size // out)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (height, width), (out_h, out_w) = x.shape[-2:], self.output_size
        if (height, width) == (out_h, out_w):
            return x
        rows, columns = self._windows(height, out_h, x), self._windows(width, out_w, x)
        return torch.einsum("ih,nchw,jw->ncij", rows, x, columns)
