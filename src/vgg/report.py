"""What a person reads: the model summary, the training history and its curves, evaluation tables."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write
from .models import build


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int


def layer_table(arch: str, num_classes: int, image_size: int, freeze: str = "none") -> tuple[list[LayerRow], int, int]:
    """Each leaf layer's output shape and parameter count, plus total and trainable parameter counts.

    ``freeze="features"`` counts the convolutional trunk as non-trainable, as ``vgg train --freeze features`` runs it.

    The model is built on the meta device: shapes and counts without allocating or initialising 138M weights.
    """
    with torch.device("meta"):
        model = build(arch, num_classes=num_classes, image_size=image_size, init_weights=False)
    model.freeze_features(freeze == "features")
    rows: list[LayerRow] = []

    def record(name: str):
        def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            # The torch layer a module is (models.Conv3x3 is an nn.Conv2d), as users know it from torchvision.
            kind = next(c.__name__ for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
            rows.append(LayerRow(name, kind, tuple(output.shape[1:]), params))

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    with torch.no_grad():
        model.forward_features(torch.empty(1, 3, image_size, image_size, device="meta"))
        # The flatten between pooling and classifier is a function call, not a module: show it as Keras does.
        side = model.avgpool.output_size[0]
        rows.append(LayerRow("flatten", "Flatten", (512 * side * side,), 0))
        model.forward_head(torch.empty(1, 512 * side * side, device="meta"))
    for handle in handles:
        handle.remove()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return rows, total, trainable


def format_summary(arch: str, num_classes: int, image_size: int, freeze: str = "none") -> str:
    """A table like Keras's ``model.summary()``: layer, output shape, parameters, then the totals.

    ``freeze="features"``: the trunk's parameters count as non-trainable (``vgg train --freeze features``).
    """
    rows, total, trainable = layer_table(arch, num_classes, image_size, freeze)
    header = ("Layer (type)", "Output Shape", "Param #")
    cells = [
        (f"{r.name} ({r.kind})", "(N, " + ", ".join(map(str, r.output_shape)) + ")", f"{r.params:,}") for r in rows
    ]
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(3)]
    rule = "-" * (sum(widths) + 6)
    out = io.StringIO()
    out.write(f'Model: "{arch}" ({num_classes} classes, {image_size}x{image_size} RGB input)\n')
    out.write(rule.replace("-", "=") + "\n")
    out.write(f"{header[0]:<{widths[0]}}   {header[1]:<{widths[1]}}   {header[2]:>{widths[2]}}\n")
    out.write(rule.replace("-", "=") + "\n")
    for name, shape, params in cells:
        out.write(f"{name:<{widths[0]}}   {shape:<{widths[1]}}   {params:>{widths[2]}}\n")
    out.write(rule.replace("-", "=") + "\n")
    out.write(
        f"Total params: {total:,}\nTrainable params: {trainable:,}\nNon-trainable params: {total - trainable:,}\n"
    )
    return out.getvalue()


HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "images_per_s", "seconds")


def write_history(path: str | Path, history: Sequence[dict[str, float]]) -> None:
    """One row per epoch: ``HISTORY_FIELDS``, then every other column a row has (with ``--ema``, the average's
    validation), empty where a row lacks it."""
    fields = list(dict.fromkeys([*HISTORY_FIELDS, *(name for row in history for name in row)]))

    def write(temp: str) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def read_history(path: str | Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def plot_curves(path: str | Path, history: Sequence[dict[str, float]]) -> None:
    """Accuracy / val accuracy and loss / val loss against epochs, as the tutorial plots them (with --ema, the
    average's validation too)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for axes, metric in ((left, "accuracy"), (right, "loss")):
        axes.plot(epochs, [row[metric] for row in history], marker="o", label=metric)
        axes.plot(epochs, [row[f"val_{metric}"] for row in history], marker="o", label=f"val_{metric}")
        averaged = [(row["epoch"], row[f"ema_val_{metric}"]) for row in history if f"ema_val_{metric}" in row]
        if averaged:
            axes.plot(*zip(*averaged, strict=True), marker="o", linestyle="--", label=f"ema_val_{metric}")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(metric)
        axes.set_title(f"model {metric}")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)


def format_evaluation(result: dict, class_names: Sequence[str]) -> str:
    """``Classifier.evaluate``'s result as text: totals, then per class (or, for ImageNet, the published numbers)."""
    head = f"images: {result['images']}   loss: {result['loss']:.4f}   "
    if "top5_accuracy" in result:
        head += f"top-1: {result['accuracy']:.4f}   top-5: {result['top5_accuracy']:.4f}"
    else:
        head += f"accuracy: {result['accuracy']:.4f}"
    if "folder_naming" in result:
        return _format_imagenet(head, result)
    if "per_class" not in result:  # the training loop's validation result: accuracy per class only
        width = max(len("class"), *(len(n) for n in class_names))
        lines = [head, f"{'class':<{width}}   images   accuracy"]
        for name, row, acc in zip(class_names, result["confusion"], result["per_class_accuracy"], strict=True):
            lines.append(f"{name:<{width}}   {sum(row):>6}   {acc:.4f}")
    else:
        lines = [head + f"   balanced accuracy: {result['balanced_accuracy']:.4f}", _calibration_line(result)]
        lines += _class_table(result, class_names)
    if result.get("skipped"):
        lines.append(f"skipped {len(result['skipped'])} unreadable files")
    return "\n".join(lines)


def _calibration_line(result: dict) -> str:
    line = f"calibration: expected calibration error {result['ece']:.4f}"
    if result["temperature"] != 1.0:
        line += f", {result['ece_calibrated']:.4f} after temperature scaling (T = {result['temperature']:.3f})"
    return line


def _class_table(result: dict, class_names: Sequence[str]) -> list[str]:
    """Per-class precision, recall, F1 and support, then the macro and weighted averages (as scikit-learn prints)."""
    width = max(len("weighted avg"), *(len(n) for n in class_names))
    per = result["per_class"]
    lines = [f"{'class':<{width}}   precision   recall       f1   images"]
    for i, name in enumerate(class_names):
        lines.append(
            f"{name:<{width}}   {per['precision'][i]:>9.4f}   {per['recall'][i]:.4f}   {per['f1'][i]:.4f}   "
            f"{per['support'][i]:>6}"
        )
    for kind in ("macro", "weighted"):
        avg = result[kind]
        lines.append(
            f"{kind + ' avg':<{width}}   {avg['precision']:>9.4f}   {avg['recall']:.4f}   {avg['f1']:.4f}   "
            f"{result['images']:>6}"
        )
    return lines


def _format_imagenet(head: str, result: dict) -> str:
    lines = [f"{head}   (class folders named by {result['folder_naming']})"]
    published = result.get("published")
    if published:
        lines.append(
            f"torchvision publishes for {result['weights']} on the 50,000 ImageNet validation images: "
            f"top-1 {published['acc@1'] / 100:.5f}, top-5 {published['acc@5'] / 100:.5f}"
        )
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} unreadable files")
    return "\n".join(lines)
