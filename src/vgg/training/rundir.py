"""The run folder (``--out``): every file a training run writes, by the main process only.

``RUN_DIR`` holds ``best.safetensors`` and ``last.safetensors`` (model files), ``state.pt`` (resumable state),
``history.csv`` and ``curves.png`` (one row / point per epoch), ``config.json`` (the resolved settings, class
names, versions), ``split.csv`` (which image trained and which validated), ``skipped.csv`` (unreadable files)
and, with ``--tensorboard``, ``tensorboard/``. This object is the only place those names appear.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .. import __version__
from ..checkpoint import ModelInfo, save_model
from ..errors import UsageError
from ..files import write_csv, write_json
from ..report import plot_curves, write_history
from ..scan import Sample, write_split
from .config import TrainConfig, to_dict
from .state import save_state


class RunDir:
    """Writes a run's files (only when ``main``: under torchrun the other processes write nothing)."""

    def __init__(self, config: TrainConfig, main: bool, log: Callable[[str], None], state: dict | None) -> None:
        self.path = Path(config.out)
        self.config, self.main, self.log = config, main, log
        self.best, self.last = self.path / "best.safetensors", self.path / "last.safetensors"
        self.writer = _tensorboard(config, state) if main else None

    def class_names(self) -> list[str]:
        """The classes of the run this folder holds (for resuming)."""
        return json.loads((self.path / "config.json").read_text())["class_names"]

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
            f"({row['images_per_s']:.1f} img/s, {row['seconds']:.0f} s)"
            + (f"  * best {self.config.monitor}, saved {self.best}" if improved else "")
        )

    def save_state(self, state: dict[str, Any]) -> None:
        if self.main:
            save_state(self.path, state)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
