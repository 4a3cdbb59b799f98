"""Resumable training state: everything a run needs to continue exactly where it stopped, in RUN_DIR/state.pt.

The file holds only tensors and plain Python values (RNG states included), so it is read with
``torch.load(weights_only=True)``, which refuses to execute code. It is written atomically: a kill -9 at any
moment leaves the previous state intact.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..files import atomic_write
from .config import TrainConfig, merge, to_dict
from .settings import resumable

STATE_FILE = "state.pt"
FORMAT = "vgg.state/1"


def rng_states(device: torch.device) -> dict[str, Any]:
    """The random streams training draws from: torch's (dropout, augmentation), CUDA's, Python's."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])


def save_state(run_dir: str | Path, state: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / STATE_FILE, lambda temp: torch.save({"format": FORMAT, **state}, temp))


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """Read RUN_DIR/state.pt (never executing code from it)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise UsageError(
            f"Cannot resume from {run_dir}: no {STATE_FILE} there. Expected the folder of a `vgg train` run "
            "(its --out) that finished at least one epoch or --save-every-steps interval."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise UsageError(f"Cannot resume from {path}: not a readable training state ({error}).") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"Cannot resume from {path}: not a vgg training state (expected format {FORMAT}).")
    return state


def resume_config(run_dir: str | Path, given: dict[str, Any]) -> TrainConfig:
    """The saved run's settings, with the few that may change (declared ``resumable``) taken from ``given``.

    Raises:
        UsageError: ``run_dir`` is not a run folder, or ``given`` asks for a different model or recipe.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not run_dir.exists() else f"has no config.json and {STATE_FILE}"
        raise UsageError(
            f"Cannot resume from {run_dir}: the folder {what}. Expected the --out folder of an earlier `vgg train`."
        )
    try:
        saved = json.loads(config_file.read_text())["config"]
        config = merge(TrainConfig(), saved, str(config_file))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UsageError(f"Cannot resume from {run_dir}: {config_file} is not a vgg run config ({error}).") from error
    current = to_dict(config)
    changes: dict[str, Any] = {"out": str(run_dir)}
    for key, value in given.items():
        if value is None:
            continue
        if key == "out":
            if Path(value).resolve() != run_dir.resolve():
                raise _clash(run_dir, "out", str(run_dir), value)
        elif key in resumable(TrainConfig):
            changes[key] = value
        elif key == "augment":
            for name, setting in value.items():
                if setting is not None and setting != current["augment"][name]:
                    raise _clash(run_dir, f"augment.{name}", current["augment"][name], setting)
        elif value != current[key]:
            raise _clash(run_dir, key, current[key], value)
    return merge(config, changes, "arguments").validate()


def _clash(run_dir: Path, key: str, saved: Any, given: Any) -> UsageError:
    return UsageError(
        f"Cannot resume {run_dir} with {key}={given!r}: the run was started with {key}={saved!r}. "
        f"Drop that setting to resume, or start a new run with another --out."
    )
