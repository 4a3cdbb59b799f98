"""Using a trained model: ``vgg.load(path).predict(images)`` and whole-folder evaluation.

Nothing here (nor anything it imports) belongs to training: a process that only predicts carries no optimiser,
schedule or resume code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .checkpoint import ModelInfo, load_model
from .decoding import decode
from .errors import UsageError
from .evaluation import collect, result_of, write_outputs
from .explain import Explanation, explain
from .imagenet import imagenet_samples, is_imagenet, load_imagenet
from .inference import Step, fit_to_model
from .keras_files import is_keras_file
from .keras_import import load_keras
from .metrics import apply_temperature
from .runtime import pick_device, pick_precision
from .scan import image_files, scan_folder


@dataclass
class Prediction:
    label: str
    probability: float
    top_k: list[tuple[str, float]]
    source: str = ""
    error: str = ""  # why the image could not be used (``predict_files``); then there is no label

    def as_dict(self) -> dict[str, Any]:
        if self.error:
            return {"image": self.source, "error": self.error}
        return {
            "image": self.source,
            "label": self.label,
            "probability": self.probability,
            "top_k": [{"label": label, "probability": p} for label, p in self.top_k],
        }


class UnreadableImage(UsageError):
    """An image file that cannot be used; ``reason`` says why, as ``skipped.csv`` would."""

    def __init__(self, path: str | Path, reason: str, message: str | None = None):
        super().__init__(message or f"Cannot read image {path}: {reason}. Expected a jpg, png, ... image file.")
        self.path, self.reason = str(path), reason


ImageInput = str | Path | Image.Image | torch.Tensor
UNKNOWN = "unknown"  # the label of an image whose top probability is below ``predict``'s threshold


class Classifier:
    """A trained model with the exact preprocessing it was trained with (read from its file).

    Args:
        model: the network.
        info: the model file's metadata.
        device: where to run; ``auto`` picks CUDA when present.
        precision: ``auto`` uses bf16 where the hardware runs it natively.
        tta: also classify each image mirrored left-right and average the two (test-time augmentation; twice
            the compute). Only for classes that mirroring does not change.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        info: ModelInfo,
        device: str = "auto",
        precision: str = "auto",
        tta: bool = False,
    ):
        self.device = pick_device(device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.info = info
        self.step = Step(
            self.device, pick_precision(precision, self.device), tuple(info.mean), tuple(info.std), tta=tta
        )
        # Probabilities are calibrated by the temperature fitted at the end of training (1.0: as the model gives them).
        self.temperature = float(info.temperature)

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def _to_tensor(self, item: ImageInput) -> torch.Tensor:
        if isinstance(item, str | Path):
            try:
                return fit_to_model(decode(item), self.info)
            except ValueError as error:
                raise UnreadableImage(item, str(error)) from error
            except FileNotFoundError as error:
                raise UnreadableImage(item, "not found", str(error)) from error
            except OSError as error:
                raise UnreadableImage(item, f"unreadable ({error.strerror or error})") from error
        if isinstance(item, Image.Image):
            return fit_to_model(TF.pil_to_tensor(item.convert("RGB")), self.info)
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] not in (1, 3):
                raise UsageError(
                    f"Image tensors must be C x H x W with 1 or 3 channels. Received: {tuple(item.shape)}."
                )
            if item.dtype != torch.uint8:
                item = (item.float().clamp(0, 1) * 255).round().to(torch.uint8)
            return fit_to_model(item.expand(3, -1, -1), self.info)
        raise UsageError(f"Cannot predict on {type(item).__name__}: expected a path, a PIL image or a tensor.")

    def probabilities(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        batch_size: int = 64,
        calibrated: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Class probabilities, one row per image (N x num_classes).

        ``calibrated``: divide the logits by the model's fitted temperature (``ModelInfo.temperature``).
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        bar = tqdm(total=len(images), desc="predict", unit="img", leave=False, disable=not progress)
        tensors = []
        for item in images:
            tensors.append(self._to_tensor(item))
            bar.update(0.5)  # half of an image's work is decoding it, the other half the forward pass
        out = []
        with torch.inference_mode():
            for start in range(0, len(tensors), batch_size):
                batch = torch.stack(tensors[start : start + batch_size])
                log_p = self.step.log_probabilities(self.model, batch)
                if calibrated:
                    log_p = apply_temperature(log_p, self.temperature)
                out.append(log_p.exp().cpu())
                bar.update(len(batch) / 2)
        bar.close()
        return torch.cat(out) if out else torch.empty(0, len(self.class_names))

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        top_k: int = 1,
        batch_size: int = 64,
        threshold: float | None = None,
        progress: bool = False,
    ) -> Prediction | list[Prediction]:
        """Predict the class of one image (returns one ``Prediction``) or of several (returns a list).

        ``threshold``: an image whose top (calibrated) probability is below it gets the label ``unknown``; its
        ``top_k`` still lists the classes.
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UsageError(f"threshold must be a probability between 0 and 1. Received: threshold={threshold}.")
        single = isinstance(images, str | Path | Image.Image) or (isinstance(images, torch.Tensor) and images.ndim == 3)
        items = [images] if single else list(images)
        if top_k < 1:
            raise UsageError(f"top_k must be at least 1. Received: {top_k}.")
        k = min(top_k, len(self.class_names))
        probs = self.probabilities(items, batch_size, progress=progress)
        values, indices = probs.topk(k, dim=1)
        predictions = []
        for item, vals, idxs in zip(items, values.tolist(), indices.tolist(), strict=True):
            top = [(self.class_names[i], v) for i, v in zip(idxs, vals, strict=True)]
            source = str(item) if isinstance(item, str | Path) else ""
            label = UNKNOWN if threshold is not None and top[0][1] < threshold else top[0][0]
            predictions.append(Prediction(label, top[0][1], top, source))
        return predictions[0] if single else predictions

    def predict_files(
        self, paths: Sequence[str | Path], top_k: int = 1, batch_size: int = 64, **options: Any
    ) -> list[Prediction]:
        """``predict`` for many image files, where a bad file does not stop the others.

        Returns one ``Prediction`` per path, in order; a file that cannot be used (corrupt, not an image, a named
        pipe, too large, gone) gets one with ``error`` set to the reason and no label. ``options`` go to
        ``predict`` (``threshold``, ``progress``).
        """
        out: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            try:
                out.extend(self.predict(chunk, top_k, batch_size, **options))
                continue
            except UnreadableImage:
                pass
            for path in chunk:  # rare: the chunk had a bad file; each file alone names it (good ones decode twice)
                try:
                    out.append(self.predict(path, top_k, batch_size, **options))
                except UnreadableImage as error:
                    out.append(Prediction("", float("nan"), [], str(path), error.reason))
        return out

    def evaluate(
        self, folder: str | Path, batch_size: int = 64, workers: int | None = None, progress: bool = False
    ) -> dict:
        """Every metric on a labelled folder (``metrics.summarize``), misclassified images worst first, skipped files.

        Loss, top-1, top-5 (5+ classes), balanced accuracy, per-class precision/recall/F1/support, macro and
        weighted averages, the confusion matrix, and calibration error before and after the model's temperature.
        A model's own classes are read as ``folder/<class>/<image>``; an ImageNet classifier also accepts
        WordNet-id, class-index or category-name folders (``imagenet.py``), and reports per-class accuracy by
        folder name, with the accuracy torchvision publishes for its weights.
        """
        imagenet = self.info.extra.get("labels") == "imagenet"
        skipped: list[tuple[str, str]] = []
        if imagenet:
            samples, labels, naming = imagenet_samples(folder, self.class_names)
        else:
            scanned = scan_folder(folder, classes=self.class_names, progress=progress)
            samples = [(sample.path, sample.label) for sample in scanned.samples]
            skipped.extend(scanned.skipped)
        outputs = collect(self, samples, batch_size, workers, progress)
        outputs.skipped[:0] = skipped
        result = result_of(outputs, self.class_names, self.temperature)
        if not imagenet:
            return result
        # ImageNet: 1,000 classes of which a folder holds a few; per-class numbers by folder, no 1000 x 1000 matrix.
        confusion = result.pop("confusion")
        for key in ("per_class", "macro", "weighted", "class_names", "balanced_accuracy"):
            result.pop(key)
        result["per_class_accuracy"] = {
            name: confusion[i][i] / sum(confusion[i]) for name, i in labels.items() if sum(confusion[i]) > 0
        }
        result.update(
            folder_naming=naming, weights=self.info.extra.get("weights"), published=self.info.extra.get("published")
        )
        return result

    def explain(
        self, images: ImageInput | Sequence[ImageInput], class_name: str | None = None, layer: str | int | None = None
    ) -> list[Explanation]:
        """Grad-CAM heat maps: where in each image the evidence for the predicted (or named) class lies.

        ``layer``: a convolution by name (``features.28``) or count (-1 the last); by default the last one whose
        map is at least 8x8 (see ``explain.resolve_layer``). ``Explanation.save(path)`` writes the overlay PNG.
        """
        single = isinstance(images, str | Path | Image.Image) or (isinstance(images, torch.Tensor) and images.ndim == 3)
        items = [images] if single else list(images)
        tensors = [self._to_tensor(item) for item in items]
        sources = [str(item) if isinstance(item, str | Path) else "" for item in items]
        return explain(self, tensors, class_name=class_name, layer=layer, sources=sources)


def load(path: str | Path, device: str = "auto", precision: str = "auto", tta: bool = False) -> Classifier:
    """Load a model file written by ``vgg train``, ``imagenet:ARCH`` for torchvision's ImageNet classifier, or a Keras
    VGG file (converted in memory as ``vgg import-keras`` converts it; class names from a class-indices file).

    No code from a file is executed. ``tta``: see ``Classifier``.
    """
    if is_imagenet(path):
        model, info = load_imagenet(str(path))
    elif is_keras_file(path):
        model, info = load_keras(path)
    else:
        model, info = load_model(path)
    return Classifier(model, info, device, precision, tta)


def evaluate(
    model: str | Path | Classifier,
    data: str | Path,
    out: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    tta: bool = False,
    progress: bool = False,
) -> dict:
    """``vgg evaluate`` from Python: every metric of ``model`` (a file, ``imagenet:ARCH`` or a loaded Classifier)
    on the labelled folder ``data``; with ``out``, also confusion.png/.csv, misclassified.csv and metrics.json.
    """
    classifier = model if isinstance(model, Classifier) else load(model, device=device, tta=tta)
    result = classifier.evaluate(data, batch_size=batch_size, progress=progress)
    if out is not None:
        write_outputs(result, out)
    return result


def expand_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files stay as given; folders are replaced by the images inside them (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = list(image_files(p, bad=True))  # bad ones too: ``predict_files`` names them with the reason
            if not found:
                raise UsageError(f"No images in folder {p}/: expected image files (jpg, png, ...).")
            out.extend(found)
        elif p.exists():  # a named pipe or a device too: decoding refuses it, without blocking, as a bad file
            out.append(p)
        else:
            raise UsageError(f"Image not found: {p}. Expected an image file or a folder of images.")
    return out
