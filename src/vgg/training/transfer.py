"""Transfer learning: start from ImageNet (or any saved) weights, freeze the backbone, cache its features.

ImageNet weights are torchvision's (``VGG16_Weights.IMAGENET1K_V1`` and its siblings), fetched through
torchvision's own download and cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``), so a file
torchvision already downloaded is reused and an offline machine can be given the file by hand. Files are read
with ``torch.load(weights_only=True)`` or safetensors: loading weights never runs code.

With the backbone frozen and no augmentation, every epoch would push the same images through the same
convolutions; their pooled features are then computed once and later epochs train only the classifier.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from .checkpoint import FORMAT, read_info
from .config import TrainConfig
from .data import IMAGENET_MEAN, IMAGENET_STD, RAM_CACHE_LIMIT, Batches
from .engine import Step
from .errors import UsageError
from .models import VGG, check_arch
from .runtime import autocast

log = logging.getLogger(__name__)

# Set to 1 to never download: a missing ImageNet file is then reported at once instead of after a network timeout.
OFFLINE_ENV = "VGG_OFFLINE"


@dataclass
class Pretrained:
    """Weights to start from, with the preprocessing they were trained with."""

    state_dict: dict[str, torch.Tensor]
    source: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    class_names: list[str] | None = None


def imagenet_weights(arch: str):  # -> torchvision.models.WeightsEnum
    """torchvision's ImageNet-1K weights entry for a family member (its URL, categories and transforms)."""
    from torchvision.models import get_model_weights

    return get_model_weights(check_arch(arch)).IMAGENET1K_V1


def imagenet_cache_path(weights) -> Path:
    """Where torchvision keeps (and looks for) a downloaded weights file: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def imagenet_state_dict(arch: str, progress: bool = False) -> tuple[dict[str, torch.Tensor], object]:
    """torchvision's ImageNet state_dict for ``arch``: from its cache, else downloaded into it.

    Raises:
        UsageError: the file is not cached and cannot be downloaded; the message names the file and the folder.
    """
    weights = imagenet_weights(arch)
    path = imagenet_cache_path(weights)
    if path.is_file():
        return read_torch_file(path), weights
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        reason = f"{OFFLINE_ENV} is set"
    else:
        try:
            state = torch.hub.load_state_dict_from_url(
                weights.url, map_location="cpu", progress=progress, check_hash=True, weights_only=True
            )
            return _as_state_dict(state, path), weights
        except (OSError, HTTPException, RuntimeError) as error:
            reason = f"download failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    raise UsageError(
        f"ImageNet weights for {arch} are not cached and could not be fetched ({reason}). "
        f"Expected the file {path}: download {weights.url} on a machine with internet access and copy it there "
        "(the folder is $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), then run again."
    )


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict saved with ``torch.save``, read without executing code from the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as error:
        raise UsageError(
            f"Cannot read weights file {path} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Expected a state_dict saved with torch.save (loaded with weights_only=True, which runs no code)."
        ) from error
    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    # Training scripts often wrap the state_dict: {"state_dict": ...} or {"model": ...}.
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{path} holds a {type(obj).__name__}, not a state_dict. "
            "Expected a mapping of parameter names to tensors, as model.state_dict() gives."
        )
    return obj


def read_weights(spec: str, arch: str, progress: bool = False) -> Pretrained:
    """Resolve ``--weights``: ``imagenet``, a .pth/.pt state_dict, or a .safetensors file (a vgg model or plain)."""
    if spec == "imagenet":
        state, weights = imagenet_state_dict(arch, progress)
        transforms = weights.transforms()
        return Pretrained(
            state, f"imagenet ({weights})", tuple(transforms.mean), tuple(transforms.std), weights.meta["categories"]
        )
    path = Path(spec)
    if not path.is_file():
        raise UsageError(
            f"weights must be 'imagenet' or a .pth/.pt/.safetensors file. Received: weights={spec!r}, "
            "which is not a file."
        )
    if path.suffix in (".pth", ".pt", ".bin"):
        return Pretrained(read_torch_file(path), str(path))
    if path.suffix != ".safetensors":
        raise UsageError(f"weights file must end in .pth, .pt or .safetensors. Received: {path}.")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UsageError(f"Cannot read weights file {path} ({error}). Expected a .safetensors file.") from error
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        ours = (handle.metadata() or {}).get("format") == FORMAT
    if not ours:
        return Pretrained(state, str(path))
    info = read_info(path)
    if info.arch != arch:
        raise UsageError(
            f"{path} is a {info.arch} model but arch={arch}. Train with --arch {info.arch} or use {arch} weights."
        )
    return Pretrained(state, str(path), tuple(info.mean), tuple(info.std), info.class_names)


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


def maybe_unfreeze(model: VGG, config: TrainConfig, finished_epoch: int, log: Callable[[str], None] = print) -> None:
    """After epoch ``unfreeze_at - 1`` the features train too (the optimiser already holds them, see ``lr_groups``)."""
    if config.unfreeze_at is not None and finished_epoch == config.unfreeze_at - 1:
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
        return [([p for p in model.parameters() if p.requires_grad], config.lr)]
    later = config.unfreeze_at is not None
    backbone = [p for p in features.parameters() if p.requires_grad or later]
    in_backbone = {id(p) for p in features.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_backbone and p.requires_grad]
    return [(rest, config.lr), (backbone, config.lr * config.backbone_lr_scale)]


class FeatureStep(Step):
    """Cached features are already model inputs: no normalisation, augmentation or image layout."""

    def inputs(self, images: torch.Tensor, augment: object = None) -> torch.Tensor:
        return images.to(self.device, non_blocking=True)


class CachedFeatures:
    """Batches of precomputed features, drawn in exactly the order the image batches would have been.

    Sharing the image batches' generator keeps a cached run identical to an uncached one with the same seed.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, like: Batches) -> None:
        self.features, self.labels = features, labels
        self.batch_size, self.shuffle, self.generator = like.batch_size, like.shuffle, like.generator
        self.drop_last = like.drop_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.features[index], self.labels[index]


@torch.no_grad()  # not inference_mode: the head trains on these tensors, and autograd must be able to save them
def extract_features(model: VGG, batches: Batches, step: Step, progress: bool = False) -> CachedFeatures:
    """Run every image of ``batches`` through the frozen trunk once, in sample order."""
    model.eval()
    if batches.in_memory:
        source = ((batches.images[i : i + 64], batches.labels[i : i + 64]) for i in range(0, batches.num_images, 64))
        total = -(-batches.num_images // 64)
    else:
        # A separate reader: iterating ``batches`` itself would draw from the generator that orders training.
        reader = Batches(batches.samples, batches.image_size, 64, shuffle=False, workers=batches.workers, cache="none")
        source, total = reader, len(reader)
    features, labels = [], []
    for images, targets in tqdm(source, total=total, desc="features", leave=False, disable=not progress):
        with autocast(step.device, step.precision):
            out = model.forward_features(step.inputs(images))
        features.append(out.float().cpu())
        labels.append(targets)
    if not batches.in_memory:
        batches.skipped.extend(s for s in reader.skipped if s not in batches.skipped)
    return CachedFeatures(torch.cat(features), torch.cat(labels), batches)


def cache_blocker(config: TrainConfig) -> str | None:
    """Why the backbone's features cannot be cached in this run, or None when they can."""
    if config.freeze != "features":
        return "the features are not frozen"
    if config.unfreeze_at is not None:
        return "the features are unfrozen later (--unfreeze-at)"
    if config.augment.enabled:
        return "augmentation is on (turn it off with --shift 0 --no-hflip and the other augmentation flags at 0)"
    if config.augment.beyond_batch or config.sampler != "shuffle":
        return "a per-image augmentation policy, MixUp/CutMix, random erasing or --sampler balanced is on"
    if not config.cache_features:
        return "--no-cache-features was given"
    return None


def cached_fit_inputs(
    model: VGG,
    train_batches: Batches,
    val_batches: Batches,
    step: Step,
    config: TrainConfig,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> tuple[nn.Module, CachedFeatures, CachedFeatures, Step] | None:
    """(head, cached training features, cached validation features, step) for ``fit``, or None to train as usual."""
    blocker = cache_blocker(config)
    if blocker is not None:
        if config.freeze == "features":
            log(f"features are not cached: {blocker}")
        return None
    width = model.classifier[0].in_features
    nbytes = (train_batches.num_images + val_batches.num_images) * width * 4
    if nbytes > RAM_CACHE_LIMIT:
        log(f"features are not cached: they would take {nbytes / 1024**3:.1f} GB of memory")
        return None
    start = time.perf_counter()
    train = extract_features(model, train_batches, step, progress)
    val = extract_features(model, val_batches, step, progress)
    log(f"features cached: {len(train.labels)} + {len(val.labels)} images in {time.perf_counter() - start:.1f} s "
        f"({nbytes / 1024**2:.0f} MB); later epochs train only the classifier")  # fmt: skip
    feature_step = FeatureStep(step.device, step.precision, step.mean, step.std, memory_format=torch.contiguous_format)
    return model.classifier, train, val, feature_step
