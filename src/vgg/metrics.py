"""Classification metrics over per-image outputs and confusion matrices: pure functions, no model, no files.

Hand-written rather than imported: each is a few lines over a confusion matrix, and the libraries that have them
cost more than they give here: ``import torchmetrics`` adds ~3 s (it imports torchvision.models), scikit-learn
with scipy installs ~200 MB (benchmarks/RESULTS.md, "Design measurements"). The tests check every function here
against scikit-learn where it is installed (it is in the ``dev`` extra).

Conventions: confusion matrices have true classes as rows and predicted classes as columns; a class that is never
predicted has precision 0 (scikit-learn's ``zero_division=0``), one with no images has recall 0 and weight 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ECE_BINS = 15  # Guo et al., "On Calibration of Modern Neural Networks" (2017), report ECE with 15 bins


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of (true class, predicted class) pairs: a ``num_classes x num_classes`` int64 matrix.

    It stays on ``targets``' device, so a validation loop can sum it without waiting for the GPU every batch.
    """
    targets = targets.long().flatten()
    predictions = predictions.long().flatten().to(targets.device)
    pairs = targets * num_classes + predictions
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def top_k_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Share of images whose true class is among the ``k`` highest scores (logits or probabilities)."""
    if len(targets) == 0:
        return 0.0
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == targets.view(-1, 1).to(top.device)).any(1).float().mean().item()


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


@dataclass
class ClassScores:
    """Per-class precision, recall, F1 and support (number of images of the class), in class order."""

    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]


def per_class_scores(confusion: torch.Tensor) -> ClassScores:
    """Precision (of the images predicted as the class, how many are), recall and F1 for every class."""
    confusion = confusion.double()
    hits = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    precision = _safe_div(hits, predicted)
    recall = _safe_div(hits, actual)
    f1 = _safe_div(2 * hits, predicted + actual)  # 2PR/(P+R) written without dividing by a zero P+R
    return ClassScores(precision.tolist(), recall.tolist(), f1.tolist(), actual.long().tolist())


def averages(scores: ClassScores) -> dict[str, dict[str, float]]:
    """Macro (every class counts the same) and weighted (by support) means of precision, recall and F1."""
    support = torch.tensor(scores.support, dtype=torch.float64)
    weights = support / support.sum() if support.sum() > 0 else support
    out: dict[str, dict[str, float]] = {"macro": {}, "weighted": {}}
    for name in ("precision", "recall", "f1"):
        values = torch.tensor(getattr(scores, name), dtype=torch.float64)
        out["macro"][name] = values.mean().item() if len(values) else 0.0
        out["weighted"][name] = (values * weights).sum().item()
    return out


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean recall over the classes that have images: accuracy as if every class were equally common."""
    actual = confusion.sum(1)
    present = actual > 0
    if not present.any():
        return 0.0
    return (confusion.diag()[present].double() / actual[present]).mean().item()


@dataclass
class CalibrationBin:
    """Images whose confidence (top probability) lies in ``(low, high]``: their count, mean confidence, accuracy."""

    low: float
    high: float
    count: int
    confidence: float
    accuracy: float


def reliability(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> list[CalibrationBin]:
    """Equal-width confidence bins over [0, 1], the data of a reliability diagram."""
    confidence, predicted = probabilities.float().max(1)
    correct = (predicted == targets.to(predicted.device)).float()
    out = []
    for i in range(bins):
        low, high = i / bins, (i + 1) / bins
        inside = (confidence > low) & (confidence <= high) if i else (confidence >= low) & (confidence <= high)
        count = int(inside.sum())
        out.append(
            CalibrationBin(
                low,
                high,
                count,
                confidence[inside].mean().item() if count else 0.0,
                correct[inside].mean().item() if count else 0.0,
            )
        )
    return out


def expected_calibration_error(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Mean gap between confidence and accuracy over confidence bins, weighted by how many images each holds."""
    total = len(targets)
    if total == 0:
        return 0.0
    return sum(b.count / total * abs(b.accuracy - b.confidence) for b in reliability(probabilities, targets, bins))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The one scalar T > 0 for which ``softmax(logits / T)`` has the lowest NLL on these (validation) images.

    Temperature scaling (Guo et al., 2017) changes confidences but never the predicted class. Log-probabilities
    work as well as logits: they differ by a per-row constant, which softmax ignores. T is optimised as log T
    (keeps it positive) with L-BFGS; the loss is convex in 1/T, so there is one minimum.
    """
    logits = logits.detach().double().cpu()
    targets = targets.long().cpu()
    if len(targets) == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = log_t.exp().item()
    # A separable validation set drives T towards 0 without bound; keep answers that still mean something.
    return float(min(max(temperature, 0.01), 100.0)) if math.isfinite(temperature) else 1.0


def apply_temperature(log_probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities after dividing the logits by ``temperature`` (1.0 leaves them as they are)."""
    if temperature == 1.0:
        return log_probabilities
    return (log_probabilities / temperature).log_softmax(1)


@dataclass
class Misclassified:
    path: str
    true: str
    predicted: str
    probability: float  # of the predicted class
    loss: float  # cross-entropy of the true class, -log p(true)


def misclassified(
    paths: Sequence[str], targets: torch.Tensor, log_probabilities: torch.Tensor, class_names: Sequence[str]
) -> list[Misclassified]:
    """The wrongly classified images, worst (highest loss) first."""
    predicted = log_probabilities.argmax(1)
    losses = -log_probabilities.gather(1, targets.long().view(-1, 1)).squeeze(1)
    rows = [
        Misclassified(
            str(paths[i]),
            class_names[int(targets[i])],
            class_names[int(predicted[i])],
            log_probabilities[i, predicted[i]].exp().item(),
            losses[i].item(),
        )
        for i in torch.nonzero(predicted != targets).flatten().tolist()
    ]
    return sorted(rows, key=lambda row: -row.loss)


def summarize(
    log_probabilities: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str], temperature: float = 1.0
) -> dict:
    """Every metric of an evaluation, as plain numbers and lists (JSON-ready).

    Args:
        log_probabilities: N x C, before temperature scaling.
        targets: N true class indices.
        class_names: the C names.
        temperature: the model's fitted temperature; ``ece_calibrated`` is measured after dividing by it.
    """
    num_classes = len(class_names)
    log_probabilities = log_probabilities.float().cpu()
    targets = targets.long().cpu()
    confusion = confusion_matrix(targets, log_probabilities.argmax(1), num_classes)
    scores = per_class_scores(confusion)
    total = len(targets)
    out = {
        "images": total,
        "loss": F.nll_loss(log_probabilities, targets).item() if total else 0.0,
        "accuracy": float(confusion.diag().sum()) / max(total, 1),
        "balanced_accuracy": balanced_accuracy(confusion),
        "per_class": {
            "precision": scores.precision,
            "recall": scores.recall,
            "f1": scores.f1,
            "support": scores.support,
        },
        "per_class_accuracy": scores.recall,
        **averages(scores),
        "temperature": temperature,
        "ece": expected_calibration_error(log_probabilities.exp(), targets),
        "ece_calibrated": expected_calibration_error(apply_temperature(log_probabilities, temperature).exp(), targets),
        "confusion": confusion.tolist(),
        "class_names": list(class_names),
    }
    if num_classes >= 5:  # with fewer classes top-5 is always 1.0: left out rather than shown
        out["top5_accuracy"] = top_k_accuracy(log_probabilities, targets, 5)
    return out
