"""Why the model decided: Grad-CAM heat maps (Selvaraju et al., 2017) over the input image.

Grad-CAM weighs each channel of a convolution block's activation map by the mean gradient of the class score
with respect to it, sums the channels and keeps the positive part: the regions whose activation raises that
class's score. Written here in a few lines instead of taking a library: ``grad-cam`` needs opencv (61 MB wheel)
and ttach, captum and torchcam add a package each for the same ten lines, and a VGG's layers are plain and
named, so splitting the network at a block needs no hooks. Splitting (not hooking) also keeps the in-place ReLUs
safe: the activation the gradient is taken against is a fresh tensor no later layer overwrites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import UsageError, did_you_mean
from .metrics import apply_temperature

DISPLAY_SIZE = 224  # overlays of 32 px inputs are upscaled so a person can see them


class _Classifier(Protocol):
    """What explain needs from ``vgg.predict.Classifier`` (typed here so this module does not import it)."""

    model: nn.Module
    device: torch.device

    @property
    def class_names(self) -> list[str]: ...


def conv_layers(model: nn.Module) -> list[tuple[str, int]]:
    """The convolutions of ``model.features`` as (name, index in features), e.g. ("features.28", 28)."""
    return [(f"features.{i}", i) for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]


MIN_MAP_SIDE = 8


def resolve_layer(model: nn.Module, layer: str | int | None = None, image_size: int = 224) -> int:
    """Index in ``model.features`` just after the chosen convolution's block (its batch norm and ReLU).

    Args:
        layer: ``None`` for the default: the last convolution whose map is at least 8x8 px at this
            ``image_size``. At 224 px that is the last block (14x14), as Grad-CAM is usually run; at 32 px the
            last block's map is 2x2 and each of its cells sees the whole image, so its Grad-CAM cannot say where:
            on a square-on-noise task (tests/test_explain.py) its peak missed the square in 16 of 16 images, while
            the 8x8 block found it in 16 of 16. An int counts convolutions (0 the first, -1 the last); a string is
            a convolution's name (``features.28``) or the same count written as text.
        image_size: the input side in pixels, for the default.
    """
    convs = conv_layers(model)
    names = [name for name, _ in convs]
    if layer is None:
        sides = [image_size // 2 ** _pools_before(model, index) for _, index in convs]
        fine_enough = [i for i, side in enumerate(sides) if side >= MIN_MAP_SIDE]
        position = fine_enough[-1] if fine_enough else 0
    elif isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
        position = int(layer)
        if not -len(convs) <= position < len(convs):
            raise UsageError(
                f"layer must count one of the {len(convs)} convolutions (0 to {len(convs) - 1}, or -1 for the "
                f"last) or name one ({names[0]} ... {names[-1]}). Received: layer={layer}."
            )
        position %= len(convs)
    elif layer in names:
        position = names.index(layer)
    else:
        raise UsageError(
            f"layer must name a convolution ({', '.join(names)}) or count one (0 to {len(convs) - 1}). "
            f"Received: layer={layer!r}."
        )
    end = convs[position][1] + 1
    while end < len(model.features) and isinstance(model.features[end], nn.BatchNorm2d | nn.ReLU):
        end += 1
    return end


def _pools_before(model: nn.Module, index: int) -> int:
    return sum(isinstance(m, nn.MaxPool2d) for m in list(model.features)[:index])


def grad_cam(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor, layer: str | int | None = None) -> tuple:
    """Grad-CAM maps of normalised ``inputs`` (N x 3 x H x W) for ``classes`` (N indices), upsampled to H x W.

    Args:
        layer: which convolution's block to explain at (see ``resolve_layer``).

    Returns:
        ``(maps, log_probabilities)``: maps are N x H x W in [0, 1] (all zero where no region raises the
        class score); log-probabilities are N x classes, from the same forward pass.
    """
    end = resolve_layer(model, layer, inputs.shape[-1])
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            head = model.features[:end](inputs)
            activations = head.detach().requires_grad_(True)
            tail = model.features[end:](activations)
            logits = model.forward_head(torch.flatten(model.avgpool(tail), 1)).float()
            score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        model.train(was_training)
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations.detach().float()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    peak = cam.flatten(1).amax(1).view(-1, 1, 1)
    cam = torch.where(peak > 0, cam / peak.clamp(min=1e-12), torch.zeros_like(cam))
    return cam.cpu(), logits.detach().log_softmax(1).cpu()


@dataclass
class Explanation:
    """One image's Grad-CAM for one class.

    Attributes:
        image: the image as the model saw it (3 x H x W uint8, resized).
        heatmap: H x W in [0, 1].
        class_name: the class explained (the predicted one unless another was asked for).
        probability: the model's probability of that class.
        label: the predicted class; probability_label its probability.
    """

    image: torch.Tensor
    heatmap: torch.Tensor
    class_name: str
    probability: float
    label: str
    label_probability: float
    source: str = ""

    def overlay(self, size: int = DISPLAY_SIZE, alpha: float = 0.5) -> Image.Image:
        """The image with the heat map blended over it (matplotlib's ``jet``: red is where the class is)."""
        return overlay(self.image, self.heatmap, size, alpha)

    def save(self, path: str | Path, size: int = DISPLAY_SIZE) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.overlay(size).save(path, format="PNG")
        return path


def overlay(image: torch.Tensor, heatmap: torch.Tensor, size: int = DISPLAY_SIZE, alpha: float = 0.5) -> Image.Image:
    """Blend a [0, 1] heat map over a 3 x H x W uint8 image, both upscaled to at least ``size`` px."""
    from matplotlib import colormaps

    height, width = image.shape[-2:]
    scale = max(1.0, size / max(height, width))
    out_size = (round(width * scale), round(height * scale))
    base = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(out_size, Image.Resampling.BICUBIC)
    heat = F.interpolate(heatmap[None, None].float(), size=out_size[::-1], mode="bilinear", align_corners=False)
    colours = colormaps["jet"](heat[0, 0].clamp(0, 1).numpy())[..., :3]
    colour_image = Image.fromarray((colours * 255).round().astype("uint8"))
    return Image.blend(base.convert("RGB"), colour_image, alpha)


def explain(
    classifier: _Classifier,
    images: Sequence[torch.Tensor],
    normalise: torch.nn.Module | None = None,
    class_name: str | None = None,
    layer: str | int | None = None,
    sources: Sequence[str] | None = None,
) -> list[Explanation]:
    """Grad-CAM of each image (3 x H x W uint8, already at the model's size) for the predicted or named class.

    Args:
        classifier: a loaded model (``vgg.load``).
        images: the images, as ``Classifier`` prepares them.
        normalise: maps a float [0, 1] batch to the model's input; mean/std from ``classifier.info`` if None.
        class_name: explain this class instead of the predicted one.
        layer: which convolution (see ``resolve_layer``).
        sources: names to carry into each explanation (file paths).
    """
    names = classifier.class_names
    if class_name is not None and class_name not in names:
        raise UsageError(
            f"class must be one of the model's classes ({', '.join(names)}). Received: {class_name!r}."
            + did_you_mean(class_name, names)
        )
    if not images:
        return []
    batch = torch.stack(list(images)).to(classifier.device).float().div(255)
    if normalise is None:
        info = classifier.info  # type: ignore[attr-defined]
        mean = torch.tensor(info.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=batch.device).view(1, -1, 1, 1)
        inputs = (batch - mean) / std
    else:
        inputs = normalise(batch)
    model = classifier.model
    param = next(model.parameters())
    inputs = inputs.to(param.dtype)
    with torch.no_grad():
        predicted = model(inputs).argmax(1)
    classes = predicted if class_name is None else torch.full_like(predicted, names.index(class_name))
    maps, log_p = grad_cam(model, inputs, classes, layer)
    probabilities = apply_temperature(log_p, float(getattr(classifier, "temperature", 1.0))).exp()
    out = []
    for i, image in enumerate(images):
        c, p = int(classes[i]), int(predicted[i])
        out.append(
            Explanation(
                image.cpu(),
                maps[i],
                names[c],
                probabilities[i, c].item(),
                names[p],
                probabilities[i, p].item(),
                str(sources[i]) if sources else "",
            )
        )
    return out
