"""Evaluating a model on labelled images: each image's output, every metric over them, and the files people read.

``collect`` runs the model once over the images and keeps each one's log-probabilities (before temperature
scaling), so that the metrics, the calibration before and after, and the list of mistakes all come from one pass.
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from .checkpoint import ModelInfo
from .files import atomic_write, write_csv, write_json
from .inference import Step, fit_to_model
from .loading import fitted_batches
from .metrics import apply_temperature, expected_calibration_error, misclassified, reliability, summarize


class _Classifier(Protocol):
    model: torch.nn.Module
    info: ModelInfo
    step: Step


def show_progress(quiet: bool = False) -> bool:
    """Progress bars only for a person watching a terminal: never in logs, pipes or under ``--json``."""
    return not quiet and sys.stderr.isatty()


@dataclass
class Outputs:
    """One pass of a model over labelled images."""

    log_probabilities: torch.Tensor  # N x C, before temperature scaling
    targets: torch.Tensor
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def collect(
    classifier: _Classifier,
    samples: Sequence[tuple[str | Path, int]],
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = False,
) -> Outputs:
    """Run ``classifier`` over ``(path, class index)`` samples; unreadable files are skipped and listed."""
    batches = fitted_batches(samples, functools.partial(fit_to_model, info=classifier.info), batch_size, workers)
    log_ps, targets, paths, skipped = [], [], [], []
    classifier.model.eval()
    with (
        torch.inference_mode(),
        tqdm(total=len(samples), desc="evaluate", unit="img", leave=False, disable=not progress) as bar,
    ):
        for images, labels, bad, batch_paths in batches:
            skipped.extend(bad)
            bar.update(len(labels) + len(bad))
            if len(labels) == 0:
                continue
            log_ps.append(classifier.step.log_probabilities(classifier.model, images).float().cpu())
            targets.append(labels.cpu())
            paths.extend(str(p) for p in batch_paths)
    num_classes = len(classifier.info.class_names)
    return Outputs(
        torch.cat(log_ps) if log_ps else torch.empty(0, num_classes),
        torch.cat(targets) if targets else torch.empty(0, dtype=torch.long),
        paths,
        skipped,
    )


def result_of(outputs: Outputs, class_names: Sequence[str], temperature: float = 1.0) -> dict:
    """Every metric (``metrics.summarize``), the misclassified images worst first, and the skipped files."""
    result = summarize(outputs.log_probabilities, outputs.targets, class_names, temperature)
    calibrated = apply_temperature(outputs.log_probabilities, temperature)
    result["misclassified"] = [
        asdict(row) for row in misclassified(outputs.paths, outputs.targets, calibrated, class_names)
    ]
    result["skipped"] = [{"path": path, "reason": reason} for path, reason in outputs.skipped]
    return result


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """confusion.png, confusion.csv, misclassified.csv and metrics.json in ``out``; returns their paths.

    ImageNet results carry no confusion matrix (1,000 x 1,000 for a folder of a few classes): only the last two.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "confusion" in result:
        names, confusion = result["class_names"], result["confusion"]
        png = confusion_png(confusion, names)
        atomic_write(out / "confusion.png", lambda temp: Path(temp).write_bytes(png))
        rows = ([n, *row] for n, row in zip(names, confusion, strict=True))
        write_csv(out / "confusion.csv", ["true \\ predicted", *names], rows)
        written += [out / "confusion.png", out / "confusion.csv"]
    write_csv(
        out / "misclassified.csv",
        ["path", "true", "predicted", "probability", "loss"],
        (
            [r["path"], r["true"], r["predicted"], f"{r['probability']:.6f}", f"{r['loss']:.6f}"]
            for r in result["misclassified"]
        ),
    )
    write_json(out / "metrics.json", {k: v for k, v in result.items() if k != "misclassified"})
    return [*written, out / "misclassified.csv", out / "metrics.json"]


def _figure_png(figure) -> bytes:  # noqa: ANN001 (matplotlib is imported lazily)
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def confusion_png(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    """The confusion matrix as a PNG, each row normalised to the share of that class's images.

    Sized by the number of classes so that 10 to 100 stay readable: cells carry their percentage up to 30
    classes; beyond, the colour alone does (the CSV has the counts).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    counts = torch.tensor(confusion, dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(class_names)
    side = min(30.0, max(5.0, 2.5 + 0.28 * n))
    font = max(7.0, min(10.0, 160 / max(n, 1)))  # 7 pt: the largest that fits a 0.28 in cell at 100 classes
    figure, axes = plt.subplots(figsize=(side + 1.2, side))
    image = axes.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(n), class_names, rotation=90, fontsize=font)
    axes.set_yticks(range(n), class_names, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"confusion matrix ({int(counts.sum())} images; rows sum to 100%)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    value = shares[i, j].item()
                    text = f"{100 * value:.0f}" if value >= 0.005 else "<1"  # a few images, not none
                    axes.text(j, i, text, ha="center", va="center", fontsize=font * 0.9,
                              color="white" if value > 0.5 else "black")  # fmt: skip
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    figure.tight_layout()
    return _figure_png(figure)


def reliability_png(log_probabilities: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, before and (if T != 1) after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    runs = [("as trained", log_probabilities, "tab:red")]
    if temperature != 1.0:
        runs.append((f"T = {temperature:.2f}", apply_temperature(log_probabilities, temperature), "tab:blue"))
    for label, log_p, colour in runs:
        bins = [b for b in reliability(log_p.exp(), targets) if b.count]
        ece = expected_calibration_error(log_p.exp(), targets)
        axes.plot([b.confidence for b in bins], [b.accuracy for b in bins], marker="o", color=colour,
                  label=f"{label}: ECE {ece:.3f}")  # fmt: skip
    axes.set_xlabel("confidence (top probability)")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title("reliability")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    figure.tight_layout()
    return _figure_png(figure)
