"""``RUN_DIR/report.html``: one self-contained page on a run, for a person who would rather look than read logs.

The run's settings, its data (counts per class and split, imbalance, skipped files), the training curves, the
evaluation table, the confusion matrix, calibration, and the worst-classified validation images with their
Grad-CAM. Every image is embedded as a base64 PNG and the page has no script and no external link, so the file
can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import UsageError
from .evaluation import Outputs, collect, confusion_png, reliability_png, result_of
from .files import atomic_write
from .predict import Classifier, load
from .report import plot_curves, read_history
from .scan import scan_folder

GALLERY = 12  # worst-classified images shown with their Grad-CAM


@dataclass
class RunData:
    """What split.csv and skipped.csv say about a run's images."""

    counts: dict[str, Counter] = field(default_factory=dict)  # split -> class -> images
    val: list[tuple[str, str]] = field(default_factory=list)  # (path, class) of the validation images
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_run_data(run_dir: Path) -> RunData:
    data = RunData()
    split = run_dir / "split.csv"
    if split.is_file():
        with open(split, newline="") as handle:
            for row in csv.DictReader(handle):
                data.counts.setdefault(row["split"], Counter())[row["class"]] += 1
                if row["split"] == "val":
                    data.val.append((row["path"], row["class"]))
    skipped = run_dir / "skipped.csv"
    if skipped.is_file():
        with open(skipped, newline="") as handle:
            data.skipped = [(row["path"], row["reason"]) for row in csv.DictReader(handle)]
    return data


def _model_file(run_dir: Path) -> Path:
    for name in ("best.safetensors", "last.safetensors"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise UsageError(
        f"No model in {run_dir}: expected best.safetensors or last.safetensors written by `vgg train`. "
        f"Found: {', '.join(sorted(p.name for p in run_dir.iterdir())) or 'nothing'}."
    )


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _pil_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _img(data: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{_png(data)}" alt="{html.escape(alt)}"{size}>'


def _table(header: list[str], rows: list[list[object]], numeric_from: int = 1) -> str:
    def cell(i: int, value: object) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return f'<td class="{"num" if i >= numeric_from else ""}">{html.escape(text)}</td>'

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _curves(run_dir: Path) -> bytes | None:
    if (run_dir / "curves.png").is_file():
        return (run_dir / "curves.png").read_bytes()
    if (run_dir / "history.csv").is_file():
        history = read_history(run_dir / "history.csv")
        if history:
            with tempfile.TemporaryDirectory() as folder:
                plot_curves(Path(folder) / "curves.png", history)
                return (Path(folder) / "curves.png").read_bytes()
    return None


def _config_section(run_dir: Path) -> str:
    path = run_dir / "config.json"
    if not path.is_file():
        return "<p>No config.json in this run folder.</p>"
    config = json.loads(path.read_text())
    rows = [[key, json.dumps(value) if isinstance(value, dict | list) else value] for key, value in config.items()]
    return _table(["setting", "value"], [[k, str(v)] for k, v in rows], numeric_from=99)


def _data_section(data: RunData, class_names: list[str]) -> str:
    if not data.counts:
        return "<p>No split.csv in this run folder.</p>"
    splits = sorted(data.counts, key=lambda s: (s != "train", s))
    rows = [[name, *(data.counts[s].get(name, 0) for s in splits)] for name in class_names]
    rows.append(["total", *(sum(data.counts[s].values()) for s in splits)])
    train = data.counts.get(splits[0], Counter())
    sizes = [train.get(name, 0) for name in class_names]
    ratio = max(sizes) / max(1, min(sizes)) if sizes else 1.0
    parts = [_table(["class", *splits], rows), f"<p>Imbalance (largest / smallest {splits[0]} class): {ratio:.2f}x</p>"]
    if data.skipped:
        shown = [[p, r] for p, r in data.skipped[:50]]
        parts.append(f"<p>{len(data.skipped)} files skipped as unreadable (first 50):</p>")
        parts.append(_table(["path", "reason"], shown, numeric_from=99))
    else:
        parts.append("<p>No files were skipped.</p>")
    return "\n".join(parts)


def _evaluation_section(result: dict) -> str:
    names = result["class_names"]
    totals = [
        ["images", result["images"]],
        ["loss", result["loss"]],
        ["accuracy (top-1)", result["accuracy"]],
        *([["top-5 accuracy", result["top5_accuracy"]]] if "top5_accuracy" in result else []),
        ["balanced accuracy", result["balanced_accuracy"]],
        ["macro F1", result["macro"]["f1"]],
        ["weighted F1", result["weighted"]["f1"]],
    ]
    per = result["per_class"]
    rows: list[list[object]] = [
        [name, per["precision"][i], per["recall"][i], per["f1"][i], per["support"][i]] for i, name in enumerate(names)
    ]
    for kind in ("macro", "weighted"):
        avg = result[kind]
        rows.append([f"{kind} avg", avg["precision"], avg["recall"], avg["f1"], result["images"]])
    return _table(["metric", "value"], totals) + _table(["class", "precision", "recall", "F1", "images"], rows)


def _gallery(classifier: Classifier, result: dict, count: int) -> str:
    worst = result["misclassified"][:count]
    if not worst:
        return "<p>No image was misclassified.</p>"
    explanations = classifier.explain([row["path"] for row in worst])
    cards = []
    for row, explanation in zip(worst, explanations, strict=True):
        original = Image.fromarray(explanation.image.permute(1, 2, 0).numpy()).resize(
            explanation.overlay().size, Image.Resampling.NEAREST
        )
        caption = (
            f"{Path(row['path']).name}<br>true: <b>{html.escape(row['true'])}</b>, predicted: "
            f"<b>{html.escape(row['predicted'])}</b> ({row['probability']:.3f})<br>loss {row['loss']:.3f}"
        )
        cards.append(
            '<figure class="card">'
            + _img(_pil_png(original), f"{row['path']} as the model saw it", 160)
            + _img(_pil_png(explanation.overlay()), f"Grad-CAM of {row['predicted']} on {row['path']}", 160)
            + f"<figcaption>{caption}</figcaption></figure>"
        )
    return (
        "<p>Left: the image as the model saw it; right: Grad-CAM of the predicted class (red: the evidence for it)."
        "</p>" + '<div class="gallery">' + "".join(cards) + "</div>"
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; } td.num { text-align: right; }
th { background: #f3f3f3; } img { max-width: 100%; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.card { margin: 0; border: 1px solid #ddd; padding: 0.5em; font-size: 0.85em; width: 330px; }
.card img { margin-right: 4px; image-rendering: pixelated; }
"""


def build_report(run_dir: Path, classifier: Classifier, outputs: Outputs, source: str, gallery: int = GALLERY) -> str:
    """The page's HTML for a run and one evaluation pass (``outputs``) of its model over ``source``'s images."""
    names = classifier.class_names
    result = result_of(outputs, names, classifier.temperature)
    data = read_run_data(run_dir)
    curves = _curves(run_dir)
    ece = f"expected calibration error {result['ece']:.4f}"
    if classifier.temperature != 1.0:
        ece += f"; after temperature scaling (T = {classifier.temperature:.3f}) {result['ece_calibrated']:.4f}"
    sections = [
        f"<h1>Run {html.escape(run_dir.name)}</h1>",
        f"<p>{html.escape(str(run_dir))} &middot; model {html.escape(classifier.info.arch)}, "
        f"{len(names)} classes, {classifier.info.image_size} px &middot; evaluated on {html.escape(source)}</p>",
        "<h2>Settings</h2>",
        _config_section(run_dir),
        "<h2>Data</h2>",
        _data_section(data, names),
        "<h2>Training curves</h2>",
        _img(curves, "accuracy and loss per epoch") if curves else "<p>No history.csv in this run folder.</p>",
        "<h2>Evaluation</h2>",
        _evaluation_section(result) if result["images"] else "<p>No images to evaluate.</p>",
    ]
    if result["images"]:
        sections += [
            "<h2>Confusion matrix</h2>",
            _img(confusion_png(result["confusion"], names), "confusion matrix"),
            "<h2>Calibration</h2>",
            f"<p>{ece}. A calibrated model's 0.8-confidence answers are right 80% of the time.</p>",
            _img(reliability_png(outputs.log_probabilities, outputs.targets, classifier.temperature), "reliability"),
            f"<h2>Worst-classified images ({min(gallery, len(result['misclassified']))} of "
            f"{len(result['misclassified'])} mistakes)</h2>",
            _gallery(classifier, result, gallery),
        ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>vgg report: {html.escape(run_dir.name)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def write_report(
    run_dir: str | Path,
    data: str | Path | None = None,
    device: str = "auto",
    progress: bool = False,
    batch_size: int = 64,
    classifier: Classifier | None = None,
    outputs: Outputs | None = None,
) -> Path:
    """Evaluate the run's model (on ``data``, else its validation images) and write ``RUN_DIR/report.html``.

    Args:
        run_dir: a folder written by ``vgg train``.
        data: a labelled folder ``DATA/<class>/<image>``; by default the images split.csv marks ``val``.
        classifier: the model to report on (default: the run's best.safetensors).
        outputs: its pass over the run's validation images when already made (training's calibration made one).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"Run folder not found: {run_dir}. Expected a folder written by `vgg train`.")
    if classifier is None:
        classifier = load(_model_file(run_dir), device=device)
    names = classifier.class_names
    if data is not None:
        scanned = scan_folder(data, classes=names)
        samples = [(s.path, s.label) for s in scanned.samples]
        source = str(data)
    else:
        index = {name: i for i, name in enumerate(names)}
        samples = [(path, index[name]) for path, name in read_run_data(run_dir).val if name in index]
        source = f"the run's {len(samples)} validation images"
    if outputs is None or data is not None:
        outputs = collect(classifier, samples, batch_size, progress=progress)
    page = build_report(run_dir, classifier, outputs, source)
    path = run_dir / "report.html"
    atomic_write(path, lambda temp: Path(temp).write_text(page, encoding="utf-8"))
    return path


report = write_report  # the public name: vgg.report(run_dir, data=None)
