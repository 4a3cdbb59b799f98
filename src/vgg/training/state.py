"""Resumable training state: everything a run needs to continue exactly where it stopped, in RUN_DIR/state.pt.

The file holds only tensors and plain Python values (RNG states included), so it is read with
``torch.load(weights_only=True)``, which refuses to execute code. It is written atomically: a kill -9 at any
moment leaves the previous state intact. Its first line carries the SHA-256 of the rest (``torch.save``'s zip
archive), checked before anything is unpickled: a damaged file is refused, never resumed with garbage in the
optimizer. Its contents are then checked for the keys and types ``fit`` reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from ..errors import UsageError
from ..files import atomic_write
from ..scan import Sample
from .config import TrainConfig, merge, to_dict
from .settings import resumable

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
FORMAT = "vgg.state/2"
LEGACY_FORMAT = "vgg.state/1"  # before checksums: a plain torch.save zip, still resumable (unverified)
_MAGIC = b"vgg.state/2 sha256:"
_HEADER_BYTES = len(_MAGIC) + 64 + 1  # magic, 64 hex digits, newline
# What ``fit`` reads from a state, with the types it must have (``None`` allowed where listed).
_SCHEMA: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "in_epoch": (dict, type(None)),
    "global_step": (int,),
    "model": (dict,),
    "optimizer": (dict,),
    "schedule": (dict,),
    "scaler": (dict, type(None)),
    "stopper": (dict,),
    "history": (list,),
    "batches": (dict, type(None)),
    "rng": (list,),
}


def rng_states(device: torch.device) -> dict[str, Any]:
    """The random streams training draws from: torch's (dropout, augmentation), the training GPU's, Python's.

    Only the process's own GPU: each process trains on one, and reading every visible GPU's state would start a
    CUDA context on each of them, from every process.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore ``rng_states``; a GPU stream only on a GPU, so a run moves between CPU and GPUs, and to fewer GPUs.

    A saved GPU state is restored to ``device`` (the process's GPU): the only entry, or, from states that listed
    every visible GPU, that GPU's entry where there is one. States of a CPU run leave the GPU's stream seeded.
    """
    torch.set_rng_state(states["torch"])
    saved = states["cuda"]
    if saved and device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_rng_state(saved[index] if len(saved) > 1 and index < len(saved) else saved[0], device)
    random.setstate(states["python"])


class _Hashing:
    """A write-only file that hashes what passes through it (``torch.save`` writes its archive sequentially)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.sha = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class _From:
    """A read-only view of ``handle`` from byte ``offset`` on, so ``torch.load`` reads the archive after the header."""

    def __init__(self, handle: IO[bytes], offset: int) -> None:
        self.handle, self.offset = handle, offset
        handle.seek(offset)

    def read(self, size: int = -1) -> bytes:
        return self.handle.read(size)

    def readinto(self, buffer: Any) -> int:
        return self.handle.readinto(buffer)

    def seek(self, position: int, whence: int = 0) -> int:
        return self.handle.seek(position + self.offset if whence == 0 else position, whence) - self.offset

    def tell(self) -> int:
        return self.handle.tell() - self.offset

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def save_state(run_dir: str | Path, state: dict[str, Any]) -> None:
    """Write RUN_DIR/state.pt atomically: a checksum line, then ``torch.save``'s archive of ``state``."""

    def write(temp: str) -> None:
        with open(temp, "wb") as handle:
            handle.write(b"\0" * _HEADER_BYTES)
            hashing = _Hashing(handle)
            torch.save({"format": FORMAT, **state}, hashing)
            handle.seek(0)
            handle.write(_MAGIC + hashing.sha.hexdigest().encode() + b"\n")

    atomic_write(Path(run_dir) / STATE_FILE, write)


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """Read RUN_DIR/state.pt (never executing code from it), after checking its checksum.

    Raises:
        UsageError: no state there, or it is damaged (checksum), not a vgg state, or lacks what a resume needs.
    """
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise UsageError(
            f"Cannot resume from {run_dir}: no {STATE_FILE} there. Expected the folder of a `vgg train` run "
            "(its --out) that finished at least one epoch or --save-every-steps interval."
        )
    try:
        with open(path, "rb") as handle:
            state = _read(path, handle)
    except UsageError:
        raise
    # A zip archive whose index survived but whose members did not fails in many ways deep inside torch.load.
    except (RuntimeError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError) as error:  # fmt: skip
        raise UsageError(f"Cannot resume from {path}: not a readable training state ({_first_line(error)}).") from error
    check_state(state, path)
    return state


def _read(path: Path, handle: IO[bytes]) -> Any:
    head = handle.read(_HEADER_BYTES)
    if head.startswith(b"PK\x03\x04"):  # written before checksums
        log.warning("%s has no checksum (written by an older vgg): resuming without verifying it", path)
        handle.seek(0)
        state = torch.load(handle, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and state.get("format") == LEGACY_FORMAT:
            state["format"] = FORMAT
        return state
    if not (head.startswith(_MAGIC) and head.endswith(b"\n") and len(head) == _HEADER_BYTES):
        raise UsageError(
            f"Cannot resume from {path}: not a readable training state (it does not start with {_MAGIC.decode()!r})."
        )
    expected = head[len(_MAGIC) : -1].decode("ascii", "replace")
    sha = hashlib.sha256()
    while chunk := handle.read(1 << 20):
        sha.update(chunk)
    if sha.hexdigest() != expected:
        raise UsageError(
            f"Cannot resume from {path}: the file is damaged (its SHA-256 checksum does not match its content). "
            "Resume from a copy, or start a new run."
        )
    return torch.load(_From(handle, _HEADER_BYTES), map_location="cpu", weights_only=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def check_state(state: Any, path: str | Path) -> None:
    """Check that ``state`` has every key ``fit`` reads, with the right types (the checksum cannot vouch for a file
    some other program wrote).

    Raises:
        UsageError: one line naming the first key that is missing or of the wrong type.
    """
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"Cannot resume from {path}: not a vgg training state (expected format {FORMAT}).")
    for key, types in _SCHEMA.items():
        if key not in state:
            raise UsageError(f"Cannot resume from {path}: the training state has no {key!r}.")
        value = state[key]
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            wanted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise UsageError(
                f"Cannot resume from {path}: {key!r} in the training state must be {wanted}. "
                f"Received: {type(value).__name__}."
            )
    problem = _content_problem(state)
    if problem:
        raise UsageError(f"Cannot resume from {path}: the training state is inconsistent ({problem}).")


def _content_problem(state: dict[str, Any]) -> str | None:
    if state["epoch"] < 0 or state["global_step"] < 0:
        return f"epoch {state['epoch']}, step {state['global_step']}"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        return "model weights that are not named tensors"
    if not {"state", "param_groups"} <= set(state["optimizer"]):
        return "no optimizer state or parameter groups"
    if not {"best", "epoch", "bad"} <= set(state["stopper"]):
        return "no early-stopping record"
    if not state["rng"] or not all(isinstance(r, dict) and {"torch", "cuda", "python"} <= set(r) for r in state["rng"]):
        return "no random-number states"
    if not all(isinstance(row, dict) for row in state["history"]):
        return "history rows that are not tables"
    batches = state["batches"]
    if batches is not None and not (
        isinstance(batches.get("position"), int) and isinstance(batches.get("generator"), torch.Tensor)
    ):
        return "no shuffling position"
    if state["in_epoch"] is not None and not isinstance(state["in_epoch"].get("totals"), dict):
        return "a mid-epoch record without totals"
    return None


def resume_config(run_dir: str | Path, given: dict[str, Any]) -> TrainConfig:
    """The saved run's settings, with the few that may change (declared ``resumable``) taken from ``given``.

    Raises:
        UsageError: ``run_dir`` is not a run folder, or ``given`` asks for a different model or recipe.
    """
    run_dir = Path(run_dir)
    config = merge(TrainConfig(), read_run(run_dir).settings, str(run_dir / "config.json"))
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


@dataclass
class SavedRun:
    """What RUN_DIR/config.json says about a run: its settings, classes and number of processes."""

    settings: dict[str, Any]
    class_names: list[str]
    world_size: int


def read_run(run_dir: str | Path) -> SavedRun:
    """Read and check RUN_DIR/config.json.

    Raises:
        UsageError: the folder or file is missing, or the file is not a vgg run config (one line naming what).
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not run_dir.exists() else f"has no config.json and {STATE_FILE}"
        raise UsageError(
            f"Cannot resume from {run_dir}: the folder {what}. Expected the --out folder of an earlier `vgg train`."
        )
    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:  # ValueError: invalid JSON or UTF-8, too deep
        raise UsageError(f"Cannot resume from {run_dir}: {config_file} is not a vgg run config ({error}).") from error
    except RecursionError as error:
        raise UsageError(f"Cannot resume from {run_dir}: {config_file} is nested too deeply.") from error
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise UsageError(
            f"Cannot resume from {run_dir}: {config_file} is not a vgg run config (expected an object with a "
            f"'config' table). Received: {_short(data)}."
        )
    names = data.get("class_names")
    if not (
        isinstance(names, list)
        and len(names) >= 2
        and all(isinstance(n, str) and n for n in names)
        and len(set(names)) == len(names)
    ):
        raise UsageError(
            f"Cannot resume from {run_dir}: class_names in {config_file} must be a list of 2 or more distinct names. "
            f"Received: {_short(names)}."
        )
    world_size = data.get("world_size", 1)  # runs written before it was recorded ran in one process
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise UsageError(
            f"Cannot resume from {run_dir}: world_size in {config_file} must be a positive integer. "
            f"Received: {_short(world_size)}."
        )
    return SavedRun(data["config"], names, world_size)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The settings a resume may not change (where the folder is aside): stored in state.pt, checked on resume."""
    fixed = resumable(TrainConfig) | {"out"}
    return {key: value for key, value in to_dict(config).items() if key not in fixed}


def split_digest(train: Sequence[Sample], val: Sequence[Sample], roots: Sequence[str | None]) -> str:
    """SHA-256 of a split (each image's path under its dataset folder, label and role, in order): state.pt records
    the split it was trained on. Paths are taken relative to ``roots`` so that a dataset that moves keeps its digest.
    """
    folders = [Path(root) for root in roots if root]
    sha = hashlib.sha256()
    for role, samples in (("train", train), ("val", val)):
        for sample in samples:
            path = Path(sample.path)
            under = next((path.relative_to(f) for f in folders if path.is_relative_to(f)), path)
            sha.update(f"{under}\t{sample.label}\t{role}\n".encode())
    return sha.hexdigest()


def check_split(state: dict[str, Any], digest: str, out: str | Path) -> None:
    """Check that the split a resume read from RUN_DIR/split.csv is the one ``state`` was trained on.

    Raises:
        UsageError: split.csv was changed (or belongs to another run).
    """
    recorded = state.get("split_sha256")  # absent in states written before it was recorded
    if isinstance(recorded, str) and recorded != digest:
        raise UsageError(
            f"Cannot resume {out}: split.csv is not the split {STATE_FILE} was trained on (it was changed, or comes "
            "from another run). Restore the run's split.csv, or start a new run (--split FILE reuses any split)."
        )


def check_resume(state: dict[str, Any], config: TrainConfig, saved: SavedRun, world_size: int) -> None:
    """Check that ``state`` belongs to the run config.json describes, and that it runs in as many processes
    (``check_split`` checks split.csv, once it is read).

    Raises:
        UsageError: another number of processes, or state.pt and config.json from two different runs.
    """
    for trained, source in ((saved.world_size, "config.json"), (len(state["rng"]), STATE_FILE)):
        if trained != world_size:
            raise UsageError(
                f"Cannot resume {config.out} with {world_size} process(es): {source} says it was trained with "
                f"{trained}, and each process's shuffling and random streams continue where they stopped. Resume "
                f"it with {trained} (torchrun --nproc_per_node={trained}, or plain `vgg train --resume` for 1)."
            )
    recorded = state.get("settings")  # absent in states written before it was recorded
    if isinstance(recorded, dict):
        current = fingerprint(config)
        differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if differ:
            key = differ[0]
            raise UsageError(
                f"Cannot resume {config.out}: config.json and {STATE_FILE} come from different runs ({key} is "
                f"{_short(current.get(key))} in one and {_short(recorded.get(key))} in the other). Start a new run, "
                "or restore the run's own files."
            )


def _clash(run_dir: Path, key: str, saved: Any, given: Any) -> UsageError:
    return UsageError(
        f"Cannot resume {run_dir} with {key}={given!r}: the run was started with {key}={saved!r}. "
        f"Drop that setting to resume, or start a new run with another --out."
    )
