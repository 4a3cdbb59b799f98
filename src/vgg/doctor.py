"""``vgg doctor``: everything that is wrong with a dataset folder, found before training rather than during it.

Every file is read once: its content hash finds exact duplicates (within a split, and across train and
validation, where they inflate validation accuracy), its header gives the colour mode and size, and a full decode
finds truncated and corrupt files. The report is a plain dict (``--json`` prints it as is).
"""

from __future__ import annotations

import hashlib
import io
import os
import statistics
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from .decoding import decode_bytes
from .isolation import map_isolated
from .loading import default_workers
from .scan import class_folders, index_folder, read_regular

# Classes this many times larger than the smallest one are reported: plain training then mostly learns the big ones.
IMBALANCE_WARNING = 3.0
SMALL_SIDE = 32


def inspect_image(path: str) -> dict[str, Any]:
    """Hash, format, mode, size and decodability of one image file."""
    try:
        data = read_regular(path)
    except (OSError, ValueError) as error:  # gone, unreadable, replaced by a named pipe, grown past the limit
        return {"path": path, "error": str(error) if isinstance(error, ValueError) else f"unreadable ({error})"}
    info: dict[str, Any] = {"path": path, "sha256": hashlib.sha256(data).hexdigest()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                orientation = im.getexif().get(0x0112, 1)
                # Sizes as displayed (and as trained on): orientations 5-8 swap width and height.
                size = list(im.size)[::-1] if orientation in (5, 6, 7, 8) else list(im.size)
                info.update(mode=im.mode, size=size, frames=getattr(im, "n_frames", 1), rotated=orientation != 1)
    except Exception:  # noqa: BLE001 - any header failure is reported by the decode below
        pass
    try:
        decode_bytes(data)
    except ValueError as error:
        info["error"] = str(error)
    return info


def _crashed(path: str) -> dict[str, Any]:
    return {"path": path, "error": "decoder crashed (the process decoding this file died)"}


def _inspect_all(paths: list[str], workers: int, progress: bool = False) -> list[dict[str, Any]]:
    """Every file inspected in worker processes, so that a decoder crashing on one file names it and no more."""
    if not paths:
        return []
    workers = max(1, min(workers, -(-len(paths) // 64)))
    with tqdm(total=len(paths), desc="doctor", unit="img", leave=False, disable=not progress) as bar:
        return map_isolated(inspect_image, paths, workers, _crashed, progress=bar.update)


def _split_report(root: Path, classes: list[str], workers: int, progress: bool = False) -> dict[str, Any]:
    """Counts, bad and other files and image facts for one folder of class folders."""
    bad: list[dict[str, str]] = []
    other: list[str] = []
    loose: list[str] = []
    images: dict[str, list[str]] = {name: [] for name in classes}
    for relative, kind, detail in index_folder(root, progress=progress).files:
        top = relative.split(os.sep, 1)[0]
        path = str(root / relative)
        if top == relative or top not in images:
            loose.append(path)
        elif kind == "image":
            images[top].append(path)
        elif kind == "bad":
            bad.append({"path": path, "reason": detail})
        else:
            other.append(path)
    class_of = {p: name for name, paths in images.items() for p in paths}
    facts = _inspect_all(list(class_of), workers, progress)
    counts = Counter()
    for fact in facts:
        if "error" in fact:
            bad.append({"path": fact["path"], "reason": fact["error"]})
        else:
            counts[class_of[fact["path"]]] += 1
    good = [f for f in facts if "error" not in f]
    return {
        "root": str(root),
        "counts": {name: counts.get(name, 0) for name in classes},
        "bad_files": sorted(bad, key=lambda b: b["path"]),
        "non_image_files": other,
        "files_outside_classes": loose,
        "facts": good,
    }


def _summary(facts: list[dict[str, Any]]) -> dict[str, Any]:
    if not facts:
        return {}
    widths = [f["size"][0] for f in facts if "size" in f]
    heights = [f["size"][1] for f in facts if "size" in f]
    return {
        "colour_modes": dict(Counter(f.get("mode", "?") for f in facts).most_common()),
        "sizes": {
            "width": {"min": min(widths), "median": statistics.median(widths), "max": max(widths)},
            "height": {"min": min(heights), "median": statistics.median(heights), "max": max(heights)},
            f"smaller_than_{SMALL_SIDE}px": sum(min(w, h) < SMALL_SIDE for w, h in zip(widths, heights, strict=True)),
        },
        "animated": sum(1 for f in facts if f.get("frames", 1) > 1),
        "exif_rotated": sum(1 for f in facts if f.get("rotated")),
    }


def _duplicates(facts: list[dict[str, Any]]) -> list[list[str]]:
    by_hash: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        by_hash[f["sha256"]].append(f["path"])
    return sorted(sorted(paths) for paths in by_hash.values() if len(paths) > 1)


def _describe_split(
    split: str, found: dict[str, Any], val_given: bool, problems: list[str], warns: list[str]
) -> tuple[dict[str, Any], bool]:
    """One split's section of the report, adding its problems and warnings; also whether training could use it."""
    counts = found["counts"]
    usable = True
    for name, n in counts.items():
        if n == 0:
            usable = usable and split == "val"
            problems.append(f"{split}: class {name!r} has no usable images")
        elif n == 1 and split == "train" and not val_given:
            usable = False
            problems.append(f"train: class {name!r} has 1 image: a validation split needs at least 2")
    for bad in found["bad_files"]:
        problems.append(f"{split}: bad file {bad['path']}: {bad['reason']} (training skips it)")
    if found["non_image_files"]:
        warns.append(f"{split}: {len(found['non_image_files'])} files are not images and are ignored")
    if found["files_outside_classes"]:
        warns.append(f"{split}: {len(found['files_outside_classes'])} files outside class folders are ignored")
    duplicates = _duplicates(found["facts"])
    for group in duplicates:
        problems.append(f"{split}: {len(group)} identical files: {', '.join(group)}")
    summary = _summary(found["facts"])
    small = summary.get("sizes", {}).get(f"smaller_than_{SMALL_SIDE}px", 0)
    if small:
        warns.append(f"{split}: {small} images are smaller than {SMALL_SIDE} px on a side")
    section = {
        "root": found["root"],
        "counts": counts,
        "images": sum(counts.values()),
        "bad_files": found["bad_files"],
        "non_image_files": found["non_image_files"],
        "files_outside_classes": found["files_outside_classes"],
        "duplicates": duplicates,
        **summary,
    }
    return section, usable


def _leakage(train_facts: list[dict[str, Any]], val_facts: list[dict[str, Any]]) -> list[list[str]]:
    """[training path, validation path] for every validation file identical to a training file."""
    train_hashes: dict[str, list[str]] = defaultdict(list)
    for f in train_facts:
        train_hashes[f["sha256"]].append(f["path"])
    return [[path, f["path"]] for f in val_facts for path in train_hashes.get(f["sha256"], [])]


def examine(
    data: str | Path, val: str | Path | None = None, workers: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """Check a dataset folder (and optionally its validation folder) and report what would go wrong in training.

    ``progress``: a bar (images/s) while the files are read.

    Returns:
        A dict with per-split ``counts``, ``bad_files``, ``non_image_files``, ``colour_modes``, ``sizes``,
        ``duplicates`` (lists of identical files), ``leakage`` (files in both train and validation), the
        ``imbalance`` ratio, and ``problems`` / ``warnings`` as sentences. ``trainable`` is False when training
        would stop with an error.

    Raises:
        UsageError: ``data`` (or ``val``) is not a folder of class folders.
    """
    workers = default_workers() if workers is None else workers
    root = Path(data)
    classes = class_folders(root)
    problems: list[str] = []
    warns: list[str] = []
    trainable = True
    splits = {"train": _split_report(root, classes, workers, progress)}
    if val is not None:
        val_root = Path(val)
        val_classes = class_folders(val_root)
        if val_classes != classes:
            trainable = False
            problems.append(
                f"validation classes differ from training classes: missing {sorted(set(classes) - set(val_classes))}, "
                f"unexpected {sorted(set(val_classes) - set(classes))}"
            )
        splits["val"] = _split_report(val_root, sorted(set(val_classes) | set(classes)), workers, progress)
    if len(classes) < 2:
        trainable = False
        problems.append(f"only one class ({classes[0]!r}): at least 2 class folders are needed")
    report: dict[str, Any] = {"data": str(root), "val": None if val is None else str(val), "splits": {}}
    for split, found in splits.items():
        report["splits"][split], usable = _describe_split(split, found, val is not None, problems, warns)
        trainable = trainable and usable
    counts = splits["train"]["counts"]
    smallest = min(counts.values())
    ratio = max(counts.values()) / smallest if smallest else float("inf")
    report["imbalance"] = ratio if smallest else None
    if smallest and ratio >= IMBALANCE_WARNING:
        big, little = max(counts, key=counts.__getitem__), min(counts, key=counts.__getitem__)
        warns.append(
            f"train: classes are imbalanced {ratio:.1f}x ({big}: {counts[big]}, {little}: {counts[little]}); "
            "consider --class-weight auto or --sampler balanced"
        )
    leakage = _leakage(splits["train"]["facts"], splits["val"]["facts"]) if "val" in splits else []
    if leakage:
        problems.append(
            f"leakage: {len(leakage)} validation images are identical to training images "
            f"(first: {leakage[0][1]} = {leakage[0][0]})"
        )
    report["leakage"] = leakage
    report["trainable"] = trainable
    report["problems"] = problems
    report["warnings"] = warns
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one block per split, then problems and warnings."""
    lines = []
    for split, r in report["splits"].items():
        lines.append(f"{split}: {r['root']} ({r['images']} usable images, {len(r['counts'])} classes)")
        width = max(len(name) for name in r["counts"])
        for name, n in r["counts"].items():
            lines.append(f"  {name:<{width}}  {n}")
        if "colour_modes" in r:
            lines.append("  colour modes: " + ", ".join(f"{m} {n}" for m, n in r["colour_modes"].items()))
            w, h = r["sizes"]["width"], r["sizes"]["height"]
            lines.append(
                f"  sizes: width {w['min']}-{w['max']} (median {w['median']:g}), "
                f"height {h['min']}-{h['max']} (median {h['median']:g})"
            )
            if r["animated"] or r["exif_rotated"]:
                lines.append(f"  animated: {r['animated']}, EXIF-rotated: {r['exif_rotated']} (both handled)")
    if report["imbalance"] is not None:
        lines.append(f"imbalance (largest / smallest class): {report['imbalance']:.1f}x")
    for title, items in (("problems", report["problems"]), ("warnings", report["warnings"])):
        lines.append(f"{title}: {len(items)}")
        lines.extend(f"  - {item}" for item in items)
    verdict = "trainable" if report["trainable"] else "NOT trainable"
    if report["problems"] and report["trainable"]:
        verdict += ", with problems to fix"
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines) + "\n"
