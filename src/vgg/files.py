"""Writing files so that a crash never leaves a half-written one: atomic writes, JSON and CSV on top of them."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temp file in the target folder, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON, atomically."""
    atomic_write(path, lambda temp: Path(temp).write_text(json.dumps(data, indent=2) + "\n"))


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file with a header row, atomically; written even when ``rows`` is empty."""

    def write(temp: str) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)
