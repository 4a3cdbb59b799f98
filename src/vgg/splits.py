"""The train/validation split of a dataset: drawn per class (seeded), written next to a run as split.csv, and read
back (by a resumed run, or given with ``--split``) with every row checked."""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError
from .files import write_csv
from .scan import ImageFolder, Sample


def stratified_split(
    folder: ImageFolder, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split each class separately so train and validation keep the class proportions; seeded, reproducible."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"val_fraction must be between 0 and 1. Received: {val_fraction}.")
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label, name in enumerate(folder.classes):
        members = [s for s in folder.samples if s.label == label]
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:
            raise UsageError(
                f"Class {name!r} has only 1 image: a validation split needs at least 2 per class "
                "(add images or pass --val VAL_DIR)."
            )
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return train, val


def write_split(path: str | Path, classes: Sequence[str], train: Sequence[Sample], val: Sequence[Sample]) -> None:
    """Write the split manifest: one row per image (path, class, split), readable by ``read_split``."""
    rows = [
        [str(s.path), classes[s.label], split] for split, samples in (("train", train), ("val", val)) for s in samples
    ]
    write_csv(path, ["path", "class", "split"], rows)


def read_split(
    path: str | Path, classes: Sequence[str], moved: dict[str, str] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Read a split manifest written by a previous run; its classes must be ``classes``.

    ``moved`` maps a folder the manifest names to where it is now (paths under the key are read under the value).

    Raises:
        UsageError: the file is missing or malformed, names other classes, or lists files that are gone.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"Split file not found: {path}. Expected a split.csv written by `vgg train` (path,class,split)."
        )
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"path", "class", "split"} <= set(reader.fieldnames):
                raise UsageError(
                    f"Split file {path} must have the columns path,class,split. Received: {reader.fieldnames}."
                )
            rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as error:
        raise UsageError(f"Split file {path} is not a readable CSV file ({error}).") from error
    for number, row in enumerate(rows, start=2):
        if not all(isinstance(row[key], str) for key in ("path", "class", "split")) or "\0" in row["path"]:
            raise UsageError(
                f"Split file {path}, line {number}: expected path,class,split. Received: {list(row.values())[:3]}."
            )
        for old, new in (moved or {}).items():
            if row["path"] == old or row["path"].startswith(old.rstrip(os.sep) + os.sep):
                row["path"] = new + row["path"][len(old.rstrip(os.sep)) :]
                break
    label_of = {name: i for i, name in enumerate(classes)}
    named = {row["class"] for row in rows}
    if named != set(classes):
        raise UsageError(
            f"Classes in split file {path} differ from the data's classes: missing {sorted(set(classes) - named)}, "
            f"unexpected {sorted(named - set(classes))}."
        )
    splits = {row["split"] for row in rows} - {"train", "val"}
    if splits:
        raise UsageError(f"Split file {path}: split must be train or val. Received: {sorted(splits)}.")
    gone = [row["path"] for row in rows if not _is_file(row["path"])]
    if gone:
        raise UsageError(
            f"Split file {path} lists {len(gone)} files that do not exist (first: {gone[0]}); "
            "run from the folder the split was made in, or make a new split."
        )
    train = [Sample(Path(r["path"]), label_of[r["class"]]) for r in rows if r["split"] == "train"]
    val = [Sample(Path(r["path"]), label_of[r["class"]]) for r in rows if r["split"] == "val"]
    if not train or not val:
        raise UsageError(
            f"Split file {path} must list both train and val images. Received: {len(train)} train, {len(val)} val."
        )
    return train, val


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long for the file system
        return False
