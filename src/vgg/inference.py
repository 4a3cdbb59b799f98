"""Feeding a model: images to normalised inputs, the forward pass (with flip test-time augmentation), evaluation.

Training, prediction, evaluation and ImageNet's classifiers all go through ``Step`` and ``evaluate``, so a model is
fed the same way wherever it runs. Nothing here knows about optimisers or augmentation: training hands its batch
augmentation in as a ``transform`` of float images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .checkpoint import ModelInfo
from .distributed import all_reduce_sum
from .metrics import confusion_matrix
from .runtime import autocast


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float32 (channels-last friendly, no copy of the layout)."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass
class Step:
    """How batches become model inputs and class probabilities, shared by training, evaluation and prediction."""

    device: torch.device
    precision: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    memory_format: torch.memory_format = torch.channels_last
    # Test-time augmentation for evaluation and prediction: also classify each image mirrored left-right and
    # average the two probability vectors. Right only where mirroring keeps the class (clothes, not text).
    tta: bool = False

    def inputs(
        self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """A uint8 batch -> normalised float inputs on the device; ``transform`` acts on [0, 1] floats first."""
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if transform is not None:
            images = transform(images)
        images = normalize(images, self.mean, self.std)
        return images.contiguous(memory_format=self.memory_format)

    def log_probabilities(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Float32 class log-probabilities of a batch, averaged over the mirror image too when ``tta`` is on.

        Being normalised, they can stand in for logits: cross-entropy, argmax and softmax give the same answers.
        """
        inputs = self.inputs(images)
        with autocast(self.device, self.precision):
            log_p = model(inputs).float().log_softmax(1)
            if not self.tta:
                return log_p
            mirrored = model(inputs.flip(3)).float().log_softmax(1)
        return torch.logaddexp(log_p, mirrored) - math.log(2)


def fit_to_model(image: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """Bring a C x H x W image to the model's input size the way its preprocessing says.

    ``squash`` (models trained here) resizes to a square, as training did; ``crop`` (ImageNet's evaluation
    transform) resizes the short side to ``extra["resize_size"]`` and takes the central square. ``interpolation``
    "nearest" picks source pixels as Pillow's NEAREST does (``nearest-exact``), for models imported from Keras.
    """
    size = info.image_size
    nearest = info.interpolation == "nearest"
    mode = InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode.BILINEAR
    if info.resize == "crop":
        image = TF.resize(image, [int(info.extra.get("resize_size", size))], interpolation=mode, antialias=not nearest)
        return TF.center_crop(image, [size, size])
    if tuple(image.shape[-2:]) != (size, size):
        image = TF.resize(image, [size, size], interpolation=mode, antialias=not nearest)
    return image


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple],
    step: Step,
    num_classes: int,
    progress: bool = False,
) -> dict:
    """Loss, top-1 (and top-5 with 5+ classes) accuracy, per-class accuracy and the confusion matrix.

    ``batches`` yields tuples whose first two items are images and labels. The confusion matrix has true classes
    as rows and predicted classes as columns. Under DDP the sums cover every process's shard.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=step.device)
    loss_sum = torch.zeros((), device=step.device)
    top5 = torch.zeros((), dtype=torch.long, device=step.device)
    # Counted in images, so that the bar shows images/s as training's does.
    bar = tqdm(desc="evaluate", leave=False, disable=not progress, unit="img", dynamic_ncols=True)
    for images, labels, *_ in batches:
        bar.update(len(labels))
        if len(labels) == 0:
            continue
        labels = labels.to(step.device)
        logits = step.log_probabilities(model, images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        confusion += confusion_matrix(labels, logits.argmax(1), num_classes)
        if num_classes >= 5:
            top5 += (logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum()
    bar.close()
    for tensor in (confusion, loss_sum, top5):
        all_reduce_sum(tensor)
    confusion = confusion.cpu()
    total = int(confusion.sum())
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    result = {
        "loss": loss_sum.item() / max(total, 1),
        "accuracy": float(confusion.diag().sum()) / max(total, 1),
        "images": total,
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }
    if num_classes >= 5:
        result["top5_accuracy"] = int(top5) / max(total, 1)
    return result
