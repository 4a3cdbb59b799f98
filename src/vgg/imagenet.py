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

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .checkpoint import ModelInfo
from .data import _collate, decode, default_workers
from .errors import UsageError, did_you_mean
from .models import build, check_arch
from .predict import Classifier, fit_to_model
from .scan import image_files
from .transfer import imagenet_state_dict

PREFIX = "imagenet:"
WNID = re.compile(r"n\d{8}")


def is_imagenet(spec: str | Path) -> bool:
    return str(spec).startswith(PREFIX)


class ImageNetClassifier(Classifier):
    """A pretrained ImageNet model; ``evaluate`` also reports top-5 accuracy, as torchvision publishes it."""

    def evaluate(self, folder: str | Path, batch_size: int = 64, workers: int | None = None) -> dict:
        """Loss, top-1 and top-5 accuracy and per-class top-1 accuracy on an ImageNet-style folder."""
        labels, naming = folder_labels(folder, self.class_names)
        samples = [(path, index) for name, index in labels.items() for path in image_files(Path(folder) / name)]
        if not samples:
            raise UsageError(f"No images in the class folders of {folder}/: expected {folder}/<class>/<image>.")
        loader = DataLoader(
            _Cropped(samples, self.info),
            batch_size=batch_size,
            num_workers=default_workers() if workers is None else workers,
            collate_fn=_collate,
        )
        self.model.eval()
        n = len(self.class_names)
        seen, hits1, hits5 = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        loss_sum, skipped = 0.0, []
        with torch.inference_mode():
            for images, targets, bad in loader:
                skipped.extend({"path": p, "reason": r} for p, r in bad)
                if len(targets) == 0:
                    continue
                logits = self.step.log_probabilities(self.model, images).cpu()
                loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
                top5 = logits.topk(min(5, n), dim=1).indices
                seen += torch.bincount(targets, minlength=n)
                hits1 += torch.bincount(targets[top5[:, 0] == targets], minlength=n)
                hits5 += torch.bincount(targets[(top5 == targets[:, None]).any(1)], minlength=n)
        total = int(seen.sum())
        return {
            "images": total,
            "loss": loss_sum / max(total, 1),
            "accuracy": float(hits1.sum()) / max(total, 1),
            "top5_accuracy": float(hits5.sum()) / max(total, 1),
            "per_class_accuracy": {name: float(hits1[i] / seen[i]) for name, i in labels.items() if seen[i] > 0},
            "folder_naming": naming,
            "weights": self.info.extra.get("weights"),
            "published": self.info.extra.get("published"),
            "skipped": skipped,
        }


class _Cropped(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], info: ModelInfo) -> None:
        self.samples, self.info = samples, info

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str, str]:
        path, label = self.samples[index]
        try:
            return fit_to_model(decode(path), self.info), label, str(path), ""
        except (OSError, ValueError) as error:
            return None, label, str(path), str(error)


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


def load_imagenet(spec: str, device: str = "auto", precision: str = "auto", tta: bool = False) -> ImageNetClassifier:
    """``imagenet:ARCH``: torchvision's ImageNet weights for ARCH with their categories and preprocessing."""
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
        },
    )
    return ImageNetClassifier(model.eval(), info, device, precision, tta)


def format_imagenet_evaluation(result: dict) -> str:
    lines = [
        f"images: {result['images']}   loss: {result['loss']:.4f}   top-1: {result['accuracy']:.4f}   "
        f"top-5: {result['top5_accuracy']:.4f}   (class folders named by {result['folder_naming']})"
    ]
    published = result.get("published")
    if published:
        lines.append(
            f"torchvision publishes for {result['weights']} on the 50,000 ImageNet validation images: "
            f"top-1 {published['acc@1'] / 100:.5f}, top-5 {published['acc@5'] / 100:.5f}"
        )
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} unreadable files")
    return "\n".join(lines)
