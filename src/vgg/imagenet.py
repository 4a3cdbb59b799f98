"""torchvision's pretrained ImageNet classifiers as ``vgg`` models: ``imagenet:vgg16`` (or any family member).

Predictions are ImageNet's 1,000 category names from the weights' metadata; images get the weights' own
evaluation preprocessing (resize the short side to 256, center-crop 224, ImageNet mean/std).

``evaluate`` reads an ImageNet-style validation folder, one subfolder per class, named in one of three ways:

- WordNet ids (``n01440764`` ...): all 1,000 must be present, since the class index of a wnid is its position
  in the sorted list of the 1,000 (the ILSVRC-2012 order torchvision's weights use);
- class indices ``0`` ... ``999``;
- category names as in ``weights.meta["categories"]`` (``tench``, ``golden retriever``; ``_`` may stand for a
  space, case is ignored); any subset of classes.
"""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import ModelInfo
from .errors import UsageError, did_you_mean
from .models import VGG, build, check_arch
from .scan import image_files
from .weights import imagenet_state_dict

PREFIX = "imagenet:"
WNID = re.compile(r"n\d{8}")


def is_imagenet(spec: str | Path) -> bool:
    return str(spec).startswith(PREFIX)


def folder_labels(folder: str | Path, categories: list[str]) -> tuple[dict[str, int], str]:
    """Map the class folders of an ImageNet-style folder to class indices; returns the mapping and its kind."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"Data folder not found: {root}. Expected an ImageNet-style folder {root}/<class>/<image>.")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UsageError(f"No class folders in {root}/: expected {root}/<wnid or category>/<image>.")
    if all(WNID.fullmatch(name) for name in names):
        if len(names) != len(categories):
            raise UsageError(
                f"{root}/ has {len(names)} WordNet-id folders; expected all {len(categories)}, because a wnid's class "
                "index is its position among all of them. Name the folders by class index (0-999) or category "
                "name to evaluate a subset."
            )
        return {name: i for i, name in enumerate(names)}, "wnid"
    if all(name.isdigit() for name in names):
        out = {name: int(name) for name in names}
        wrong = [name for name, i in out.items() if i >= len(categories)]
        if wrong:
            raise UsageError(f"Class index folders must be 0 to {len(categories) - 1}. Received: {wrong[0]}.")
        return out, "index"
    lookup = {category.lower(): i for i, category in enumerate(categories)}
    out = {}
    for name in names:
        key = name.replace("_", " ").lower()
        if key not in lookup:
            raise UsageError(
                f"Folder {root / name}/ is not an ImageNet category, class index or WordNet id. Expected names like "
                f"'tench' or 'golden retriever'.{did_you_mean(key, lookup)}"
            )
        out[name] = lookup[key]
    return out, "name"


def load_imagenet(spec: str) -> tuple[VGG, ModelInfo]:
    """``imagenet:ARCH``: torchvision's ImageNet model for ARCH, with its categories and preprocessing."""
    arch = check_arch(spec[len(PREFIX) :])
    state, weights = imagenet_state_dict(arch, progress=True)
    transforms = weights.transforms()
    crop = int(transforms.crop_size[0])
    model = build(arch, num_classes=len(weights.meta["categories"]), image_size=crop, init_weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(
            f"The cached ImageNet file for {arch} does not hold {arch}'s weights ({str(error).splitlines()[0]}). "
            "Delete it to download it again."
        ) from error
    info = ModelInfo(
        arch=arch,
        class_names=list(weights.meta["categories"]),
        image_size=crop,
        mean=list(transforms.mean),
        std=list(transforms.std),
        resize="crop",
        extra={
            "weights": str(weights),
            "resize_size": int(transforms.resize_size[0]),
            "published": weights.meta.get("_metrics", {}).get("ImageNet-1K"),
            "labels": "imagenet",
        },
    )
    return model.eval(), info


def imagenet_samples(folder: str | Path, categories: list[str]) -> tuple[list[tuple[Path, int]], dict[str, int], str]:
    """The images of an ImageNet-style folder with their class indices, the folder-to-index map and its naming."""
    labels, naming = folder_labels(folder, categories)
    samples = [(path, index) for name, index in labels.items() for path in image_files(Path(folder) / name)]
    if not samples:
        raise UsageError(f"No images in the class folders of {folder}/: expected {folder}/<class>/<image>.")
    return samples, labels, naming
