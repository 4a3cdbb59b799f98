"""The run folder (``--out``): every file a training run writes, by the main process only.

``RUN_DIR`` holds ``best.safetensors`` and ``last.safetensors`` (model files), ``state.pt`` (resumable state),
``history.csv`` and ``curves.png`` (one row / point per epoch), ``config.json`` (the resolved settings, class
names, versions), ``split.csv`` (which image trained and which validated), ``skipped.csv`` (unreadable files)
and, with ``--tensorboard``, ``tensorboard/``. This object is the only place those names appear.

A run owns its folder: ``claim`` locks it (``RUN_DIR/.lock``, an ``flock`` the system drops when the process ends,
however it ends), so a second writer is refused; a new run never replaces another run's files (without ``--out``
it takes the first free folder of runs/train, runs/train2, ..., as Ultralytics does; an explicit ``--out`` that
holds a run is refused unless ``--overwrite``); and temp files a killed save left behind are removed.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folders are still never overwritten
    fcntl = None  # type: ignore[assignment]

import torch
import torchvision
from torch import nn

from .. import __version__
from ..checkpoint import ModelInfo, save_model
from ..distributed import World, from_main
from ..errors import UsageError
from ..files import DiskFull, check_out_folder, file_mode, remove_stale_temps, write_csv, write_json
from ..report import plot_curves, write_history
from ..scan import Sample
from ..splits import write_split
from .config import TrainConfig, to_dict
from .state import STATE_FILE, fingerprint, save_state, split_digest

DEFAULT_OUT = "runs/train"
LOCK_FILE = ".lock"
# Every file a run writes: a folder holding any of them holds a run.
RUN_FILES = (
    "config.json", STATE_FILE, "best.safetensors", "last.safetensors", "history.csv", "curves.png", "split.csv",
    "skipped.csv", "report.html",
)  # fmt: skip


class FolderInUse(UsageError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive ``flock`` on RUN_DIR/.lock, held while the run writes; the system releases it when the process
    ends, even by ``kill -9``. The file keeps the holder's process id for the refusal message."""

    def __init__(self, folder: Path) -> None:
        self.fd: int | None = None
        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as error:
            raise UsageError(
                f"Cannot write in the run folder {folder}: {error.strerror or error}. Pass --out with a folder you "
                "can write to."
            ) from error
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUse(
                    f"{folder} is in use by another `vgg train` (process {holder}): two runs writing one folder would "
                    "mix their files. Wait for it to end, or pass another --out."
                ) from error
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def run_files(folder: Path) -> list[str]:
    """The names of a run's files (and ``tensorboard/``) present in ``folder``."""
    found = []
    for name in (*RUN_FILES, "tensorboard"):
        try:
            if os.path.lexists(folder / name):
                found.append(name)
        except OSError:
            continue
    return found


def claim(folder: Path, resume: bool, overwrite: bool, log: Callable[[str], None]) -> RunLock:
    """Make ``folder`` this run's: create and lock it, refuse (or with ``overwrite`` delete) another run's files,
    and remove temp files a killed save left.

    Raises:
        UsageError: ``folder`` is a file or not writable, or holds another run (``FolderInUse``: is being written).
    """
    check_out_folder(folder, "the run's files")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"Cannot create the run folder {folder}: {error.strerror or error}. Pass --out with a folder you can "
            "write to."
        ) from error
    lock = RunLock(folder)
    try:
        found = run_files(folder)
        if found and not resume:
            if not overwrite:
                raise UsageError(
                    f"{folder} already holds a run ({', '.join(found)}) and a new run would replace its files: "
                    f"continue it with `vgg train --resume {folder}`, replace it with --overwrite, or pass another "
                    "--out."
                )
            for name in found:
                path = folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            log(f"--overwrite: removed the earlier run's {', '.join(found)} from {folder}")
        stale = remove_stale_temps(folder, RUN_FILES)
        if stale:
            log(f"removed {len(stale)} temp files that an interrupted save left in {folder}")
    except BaseException:
        lock.release()
        raise
    return lock


def own_folder(
    config: TrainConfig, world: World, resume: bool, log: Callable[[str], None]
) -> tuple[TrainConfig, RunLock | None]:
    """The run's folder, claimed by the main process (the others learn its name and any refusal from it).

    Without ``config.out`` this is the first of runs/train, runs/train2, ... that holds no run and is not in use.
    """
    lock: RunLock | None = None
    outcome: tuple[str, str | None] | None = None
    if world.main:
        out = config.out or DEFAULT_OUT
        try:
            if config.out is None:
                out, lock = _first_free(log)
            else:
                lock = claim(Path(out), resume, config.overwrite, log)
            outcome = (out, None)
        except UsageError as error:
            outcome = (out, str(error))
    out, refused = from_main(outcome)  # type: ignore[misc]
    if refused is not None:
        raise UsageError(refused)
    return dataclasses.replace(config, out=out), lock


def _first_free(log: Callable[[str], None]) -> tuple[str, RunLock]:
    number = 1
    while True:
        out = DEFAULT_OUT if number == 1 else f"{DEFAULT_OUT}{number}"
        number += 1
        if run_files(Path(out)):
            continue
        try:
            return out, claim(Path(out), resume=False, overwrite=False, log=log)
        except FolderInUse:
            continue


class RunDir:
    """Writes a run's files (only when ``main``: under torchrun the other processes write nothing)."""

    def __init__(self, config: TrainConfig, main: bool, log: Callable[[str], None], state: dict | None) -> None:
        self.path = Path(config.out)
        self.config, self.main, self.log = config, main, log
        self.best, self.last = self.path / "best.safetensors", self.path / "last.safetensors"
        self.writer = _tensorboard(config, state) if main else None
        self.split_sha256: str | None = None
        self.saved_at = _point(state) if state is not None else None

    def start(
        self,
        config: TrainConfig,
        classes: Sequence[str],
        train: Sequence[Sample],
        val: Sequence[Sample],
        skipped: list[tuple[str, str]],
        run_facts: dict[str, Any],
    ) -> None:
        """Write the split, the files skipped so far and the resolved ``config`` before the first epoch."""
        self.config = config
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_split(self.path / "split.csv", classes, train, val)
        self.split_sha256 = split_digest(train, val, [config.data, config.val])
        self.write_skipped(skipped)
        versions = {
            "vgg": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        }
        config = {"config": to_dict(self.config), "class_names": list(classes), "seed": self.config.seed}
        write_json(self.path / "config.json", {**config, **run_facts, "versions": versions})

    def write_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """``skipped.csv`` (path, reason), written even when empty so that "no bad files" is visible too."""
        if self.main:
            write_csv(self.path / "skipped.csv", ["path", "reason"], skipped)

    def epoch_end(self, history: list[dict[str, float]], improved: bool, model: nn.Module, info: ModelInfo) -> None:
        """Save the last (and, when it improved, the best) model, the history and its curves; log the epoch."""
        if not self.main:
            return
        row = history[-1]
        if self.writer is not None:
            for name in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "images_per_s"):
                self.writer.add_scalar(name, row[name], int(row["epoch"]))
            self.writer.flush()
        save_model(self.last, model, info)
        if improved:
            save_model(self.best, model, info)
        write_history(self.path / "history.csv", history)
        plot_curves(self.path / "curves.png", history)
        self.log(
            f"epoch {int(row['epoch'])}/{self.config.epochs}: loss {row['loss']:.4f} accuracy {row['accuracy']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_accuracy {row['val_accuracy']:.4f} "
            + (f"ema_val_accuracy {row['ema_val_accuracy']:.4f} " if "ema_val_accuracy" in row else "")
            + f"({row['images_per_s']:.1f} img/s, {row['seconds']:.0f} s)"
            + (f"  * best {self.config.monitor}, saved {self.best}" if improved else "")
        )

    def save_state(self, state: dict[str, Any]) -> None:
        """Write state.pt with the settings it belongs to; a full disk ends the run with the last good state kept."""
        if not self.main:
            return
        try:
            save_state(self.path, {**state, "settings": fingerprint(self.config), "split_sha256": self.split_sha256})
        except DiskFull as error:
            raise DiskFull(f"{error} The run can continue from there: vgg train --resume {self.path}") from error
        self.saved_at = _point(state)

    def interrupted(self) -> None:
        """Say what an interrupted run keeps, and how to go on from it."""
        if not self.main:
            return
        if self.saved_at is None:
            self.log(f"interrupted before the first epoch ended: nothing in {self.path} to resume")
        else:
            self.log(f"interrupted: {self.path} keeps the state {self.saved_at}; `vgg train --resume {self.path}` "
                     "continues from there")  # fmt: skip

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _point(state: dict[str, Any]) -> str:
    """Where in the run a training state was taken, in words."""
    if state["in_epoch"]:
        return f"after step {state['global_step']} (in epoch {state['epoch'] + 1})"
    return f"after epoch {state['epoch']}"


def _tensorboard(config: TrainConfig, state: dict | None):  # -> SummaryWriter | None
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UsageError(
            "--tensorboard needs the tensorboard package, which is not installed. "
            "Install it with: pip install 'vgg[tensorboard]' (or pip install tensorboard)."
        ) from error
    # purge_step drops events a killed run wrote after its last saved state, so resumed curves do not double back.
    purge = state["epoch"] + 1 if state is not None else None
    return SummaryWriter(str(Path(config.out) / "tensorboard"), purge_step=purge)
