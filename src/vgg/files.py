"""Writing files so that a crash never leaves a half-written one: atomic writes, JSON and CSV on top of them.

Every file is written to a temp file in its own folder (``.NAME.XXXX.tmp``), flushed to disk, given the mode a plain
``open`` would give it (``0o666`` less the umask: ``mkstemp`` alone makes it private), renamed over ``NAME``, and the
folder is flushed so that the rename itself survives a power cut. A full disk is one clear error, and the old file
stays as it was.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError

# Some writers (torch's zip writer, safetensors) report a full disk as their own error, not as OSError(ENOSPC).
_FULL_DISK_FREE_BYTES = 16 * 2**20


class DiskFull(UsageError):
    """No space left on the device while writing a file; the previous version of the file is intact."""


def file_mode() -> int:
    """The mode a new file gets from ``open``: ``0o666`` less the process's umask."""
    try:
        with open("/proc/self/status") as status:  # reading it does not change it (os.umask would, briefly)
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _disk_full(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, Exception) or isinstance(error, UsageError):
        return False
    try:
        return shutil.disk_usage(folder).free < _FULL_DISK_FREE_BYTES
    except OSError:
        return False


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temp file in the target folder, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written one; a ``kill -9``
    can leave a ``.NAME.*.tmp`` file, which ``remove_stale_temps`` clears.

    Raises:
        DiskFull: the device ran out of space; ``path`` still holds its previous content.
    """
    # Before the work of ``write``: over a folder, the rename would fail naming the temp file.
    path = check_out_file(path, "the file to write", flag="")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temp)
        os.chmod(temp, file_mode())
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if _disk_full(error, path.parent):
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise DiskFull(
                f"No space left on the device to write {path}: {kept}. Free some space and try again."
            ) from error
        raise
    fsync_folder(path.parent)


def remove_stale_temps(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temp files (``.NAME.*.tmp``) that a killed ``atomic_write`` of any of ``names`` left in ``folder``.

    Only call this while no other process writes those files (a run folder under its lock). Returns what was removed.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for temp in folder.glob(f".{name}.*.tmp"):
            try:
                temp.unlink()
            except FileNotFoundError:
                continue
            removed.append(temp)
    return removed


def check_out_folder(folder: str | Path, holds: str) -> Path:
    """``--out FOLDER`` as a Path, refused when a file stands there (``holds``: what the folder is for)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file: expected a folder for {holds}. Pass another --out.")
    return folder


def check_out_file(path: str | Path, holds: str, flag: str = "--out") -> Path:
    """A file to write as a Path, refused up front when a folder stands there (``holds``: what the file is;
    ``flag``: the option that named it, if any)."""
    path = Path(path)
    if path.is_dir():
        named = f"{flag} {path}" if flag else str(path)
        raise UsageError(f"{named} is a folder: expected a file name for {holds}. Pass a path such as {path / 'NAME'}.")
    return path


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
