"""Transfer learning: load weights into a model, freeze and unfreeze its backbone, per-part learning rates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..models import VGG
from ..weights import IMAGENET_MEAN, IMAGENET_STD, Pretrained, read_weights
from .config import TrainConfig


def load_pretrained(model: VGG, pretrained: Pretrained, class_names: list[str]) -> list[str]:
    """Copy every layer whose tensors all fit into ``model``; returns what was not loaded, with the reason.

    The output layer is kept only when the weights were trained on exactly ``class_names``; otherwise it is a new
    head for the user's classes. Every feature layer must load: a trunk of another depth is an error.
    """
    head = f"classifier.{len(model.classifier) - 1}"
    own = model.state_dict()
    layers: dict[str, list[str]] = {}
    for name in own:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    keep_head = pretrained.class_names == list(class_names)
    chosen: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for layer, names in layers.items():
        if layer == head and not keep_head:
            skipped.append(f"{layer} (new output layer for {len(class_names)} classes)")
            continue
        problem = next((n for n in names if n not in pretrained.state_dict), None)
        if problem is not None:
            reason = f"{problem} is not in the weights"
        else:
            bad = next((n for n in names if pretrained.state_dict[n].shape != own[n].shape), None)
            reason = (
                f"shape {tuple(pretrained.state_dict[bad].shape)} in the weights, {tuple(own[bad].shape)} in the model"
                if bad
                else ""
            )
        if not reason:
            chosen.update({n: pretrained.state_dict[n] for n in names})
        elif layer.startswith("features"):
            raise UsageError(
                f"Weights {pretrained.source} do not fit this architecture's features: {layer}: {reason}. "
                "Expected weights of the same family member (pass the --arch they were trained with)."
            )
        else:
            skipped.append(f"{layer} ({reason})")
    model.load_state_dict(chosen, strict=False)
    return skipped


@dataclass
class Preprocessing:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str | None = None


def prepare(
    model: VGG, config: TrainConfig, class_names: list[str], log: Callable[[str], None] = print
) -> Preprocessing:
    """Load ``config.weights`` into ``model`` and freeze its features as asked; returns the input normalisation."""
    prep = Preprocessing(IMAGENET_MEAN, IMAGENET_STD)
    if config.weights:
        pretrained = read_weights(config.weights, config.arch, progress=True)
        skipped = load_pretrained(model, pretrained, class_names)
        prep = Preprocessing(pretrained.mean, pretrained.std, pretrained.source)
        log(f"weights: {pretrained.source}" + (f"; not loaded: {', '.join(skipped)}" if skipped else "; all loaded"))
        if config.weights == "imagenet" and config.image_size != 224:
            log(f"note: ImageNet's classifier was trained on 224 px images; at {config.image_size} px its first "
                "dense layer does not fit and starts from scratch")  # fmt: skip
    if config.freeze == "features":
        model.freeze_features(True)
        until = f" until epoch {config.unfreeze_at}" if config.unfreeze_at else ""
        log(f"features frozen{until}; training {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
            "parameters")  # fmt: skip
    return prep


def unfreeze_if_due(model: VGG, config: TrainConfig, epoch: int, log: Callable[[str], None] = print) -> None:
    """From epoch ``unfreeze_at`` on, the features train too (the optimiser already holds them, see ``lr_groups``).

    Called before every epoch, so a run resumed after that epoch unfreezes as well.
    """
    if config.unfreeze_at is None or epoch < config.unfreeze_at:
        return
    if not all(p.requires_grad for p in model.features.parameters()):
        model.freeze_features(False)
        log(f"features unfrozen from epoch {config.unfreeze_at} (lr x {config.backbone_lr_scale})")


def lr_groups(model: nn.Module, config: TrainConfig) -> list[tuple[list[nn.Parameter], float]]:
    """Parameters to optimise with their learning rates: the classifier at ``lr``, the features at
    ``lr * backbone_lr_scale``.

    Frozen features that ``unfreeze_at`` releases later are included from the start: without gradients the
    optimisers skip them, so neither the optimiser nor the LR schedule has to be rebuilt mid-run.
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Module):
        return [([p for p in model.parameters() if p.requires_grad], config.peak_lr)]
    later = config.unfreeze_at is not None
    backbone = [p for p in features.parameters() if p.requires_grad or later]
    in_backbone = {id(p) for p in features.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_backbone and p.requires_grad]
    return [(rest, config.peak_lr), (backbone, config.peak_lr * config.backbone_lr_scale)]
