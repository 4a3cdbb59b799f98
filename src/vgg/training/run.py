"""A whole training run, top to bottom: scan the data -> build the model -> batch the images -> fit -> RUN_DIR."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..batches import Batches
from ..calibration import calibrate_model_file
from ..checkpoint import ModelInfo
from ..distributed import World, finish
from ..distributed import setup as setup_distributed
from ..errors import UsageError
from ..html_report import write_report
from ..inference import Step
from ..models import MatrixPool, build
from ..report import format_summary
from ..runtime import pick_device, pick_precision, training_memory_format
from .autobatch import find_batch_size
from .config import TrainConfig
from .data import Data, data_line, loss_weights, make_batches, read_data, usable_counts
from .epoch import Objective
from .features import cached_fit_inputs
from .loop import FitResult, fit
from .lr_find import RangeTest, describe, sweep_model
from .rundir import RunDir, own_folder
from .state import SavedRun, check_resume, check_split, load_state, read_run, split_digest
from .transfer import prepare


@dataclass
class TrainResult:
    run_dir: Path
    best_model: Path
    last_model: Path
    class_names: list[str]
    fit: FitResult
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model: nn.Module | None = None

    @property
    def history(self) -> list[dict[str, float]]:
        return self.fit.history


def train(
    config: TrainConfig, log: Callable[[str], None] = print, progress: bool = True, resume: bool = False
) -> TrainResult:
    """Train a model as ``config`` says; everything the run produces goes to ``config.out``.

    With ``resume``, continue the run in ``config.out`` from its ``state.pt`` (see ``state.resume_config`` for
    the settings that must match), on the run's own split. Under torchrun, every process calls this; only rank 0
    writes and logs. The run folder is claimed first (``rundir.claim``: locked, never another run's files
    replaced), so a refusal comes before any image is read.
    """
    config.validate()
    if not config.data:
        raise UsageError("No dataset folder: expected DATA/<class>/<image> (vgg train DATA, or TrainConfig(data=...)).")
    world, device = setup_distributed(pick_device(config.device))
    if not world.main:
        log, progress = (lambda _: None), False
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_benchmark = torch.backends.cudnn.benchmark
    lock = None
    try:
        config, lock = own_folder(config, world, resume, log)
        state, saved = None, None
        if resume:
            saved = read_run(config.out)
            state = load_state(config.out)
            check_resume(state, config, saved, world.world_size)
        result = _train(config, log, progress, state, saved, device, world)
    except BaseException:
        finish(world, wait=False)
        raise
    finally:
        if lock is not None:
            lock.release()
        torch.use_deterministic_algorithms(was_deterministic)
        torch.backends.cudnn.benchmark = was_benchmark
    finish(world)
    return result


def _train(
    config: TrainConfig, log: Callable[[str], None], progress: bool, state: dict | None, saved: SavedRun | None,
    device: torch.device, world: World,
) -> TrainResult:  # fmt: skip
    precision = pick_precision(config.precision, device)
    _set_kernels(config, device, world)
    run_dir = RunDir(config, world.main, log, state)
    torch.manual_seed(config.seed)

    data = read_data(config, saved, log)
    if state is not None:
        check_split(state, split_digest(data.train, data.val, [config.data, config.val]), config.out)
    # Weights are read before the images are decoded: a missing weights file should not cost a decoding pass.
    model = build(config.arch, num_classes=len(data.classes), image_size=config.image_size, dropout=config.dropout)
    preprocessing = prepare(model, config, data.classes, log)
    if config.deterministic and device.type == "cuda":
        model.avgpool = MatrixPool(model.avgpool.output_size)  # no parameters: the model files are unchanged
    layout = training_memory_format(device, precision, config.image_size)
    if config.batch_size == "auto":
        size = find_batch_size(
            model, config.image_size, device, precision, len(data.train), layout, config.unfreeze_at is not None
        )
        config = dataclasses.replace(config, batch_size=size)
        log(f"batch size: {config.batch_size} (auto: the largest power of two that fits)")
    train_batches, val_batches = make_batches(config, data, device, world, progress)

    model = model.to(device, memory_format=layout)
    if config.lr == "find":
        step = Step(device, precision, preprocessing.mean, preprocessing.std, memory_format=layout)
        config = _find_lr(model, train_batches, step, config, len(data.classes), world, log, progress)
    if config.compile:
        # In place: the parameter names (and so the model files and training state) stay those of the module.
        model.compile()
    if world.distributed:
        # DDP copies rank 0's initial weights to every process; the other streams (dropout, augmentation) differ.
        torch.manual_seed(config.seed + world.rank)
    log(format_summary(config.arch, len(data.classes), config.image_size, config.freeze))
    counts = usable_counts(data, train_batches, config)
    log(data_line(config, data, counts, train_batches, device, precision, world))
    log(
        f"optimizer: {config.optimizer}, peak lr {config.peak_lr:g}, {config.warmup:g}-epoch warm-up, "
        f"{config.schedule} schedule, {config.epochs} epoch{'s' if config.epochs != 1 else ''}"
    )
    facts = {"device": str(device), "precision": precision, "world_size": world.world_size}
    run_dir.start(
        config, data.classes, data.train, data.val, data.skipped + train_batches.skipped + val_batches.skipped, facts
    )
    info = ModelInfo(
        arch=config.arch, class_names=data.classes, image_size=config.image_size, mean=list(preprocessing.mean),
        std=list(preprocessing.std), dropout=config.dropout,
        extra={"weights": preprocessing.source} if preprocessing.source else {},
    )  # fmt: skip
    if state is not None:
        _log_resume(state, config, run_dir, len(train_batches), log)

    step = Step(device, precision, preprocessing.mean, preprocessing.std, memory_format=layout)
    weights = loss_weights(config, data, counts, log)
    trained, fit_train, fit_val, fit_step = _fit_inputs(
        model, train_batches, val_batches, step, config, world, log, progress
    )
    try:
        result = fit(
            trained, fit_train, fit_val, config, fit_step, len(data.classes),
            on_epoch_end=lambda history, improved, chosen: run_dir.epoch_end(
                history, improved, model if chosen is trained else chosen, info
            ),
            progress=progress, state=state, on_checkpoint=run_dir.save_state, class_weights=weights, log=log,
        )  # fmt: skip
    except KeyboardInterrupt:
        run_dir.interrupted()
        raise
    run_dir.close()
    skipped = _summarise(config, result, data, (train_batches, val_batches), run_dir, log)
    if world.main:
        _calibrate_and_report(run_dir.path, Path(run_dir.best), data, device, log, progress)
    return TrainResult(run_dir.path, run_dir.best, run_dir.last, data.classes, result, skipped, model)


def _summarise(
    config: TrainConfig, result: FitResult, data: Data, batches: tuple[Batches, Batches], run_dir: RunDir,
    log: Callable[[str], None],
) -> list[tuple[str, str]]:  # fmt: skip
    """The end of a run in the log (early stop, skipped files, decoder fallbacks, best epoch); returns the skipped."""
    if result.stopped_early:
        log(f"stopped early: no {config.monitor} improvement in {config.patience} epochs")
    skipped = data.skipped + batches[0].skipped + batches[1].skipped
    run_dir.write_skipped(skipped)
    if skipped:
        log(f"skipped {len(skipped)} unreadable files, listed in {run_dir.path / 'skipped.csv'}")
    for name, part in zip(("training", "validation"), batches, strict=True):
        if part.fallbacks.counts:
            log(f"{name} {part.fallbacks.summary()}")
    if result.best_value is not None:
        flipped = config.tta and config.monitor.startswith("val_")
        scored = " (flip-averaged: evaluate and predict with --tta to match)" if flipped else ""
        best = f"{result.best_value:.4f}{scored} at epoch {result.best_epoch}"
        log(f"best {config.monitor} {best}; model: {run_dir.best}")
    return skipped


def _find_lr(
    model: nn.Module, batches: Batches, step: Step, config: TrainConfig, num_classes: int, world: World,
    log: Callable[[str], None], progress: bool,
) -> TrainConfig:  # fmt: skip
    """``config`` with ``lr="find"`` replaced by the range test's suggestion (written to config.json as a number)."""
    if world.distributed:
        raise UsageError("--lr find runs on one process: run `vgg lr-find` first, then torchrun ... --lr RATE.")
    # Class weights (--class-weight auto) are left out: they come from the usable counts, known later in the run.
    result = sweep_model(model, batches, step, config, Objective.from_config(config, num_classes), progress=progress)
    log(describe(result))
    if result.suggestion is None:
        raise UsageError(
            "--lr find found no rate at which the loss falls (the range test's curve is in `vgg lr-find` ... --plot): "
            "pass --lr RATE."
        )
    return dataclasses.replace(config, lr=result.suggestion)


def lr_find(
    config: TrainConfig,
    start: float = 1e-7,
    end: float = 1.0,
    steps: int = 200,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> RangeTest:
    """The learning-rate range test for the run ``config`` describes: same data, model, optimizer and augmentation.

    Nothing is written to the run folder; the caller prints and plots the result (``lr_find.describe``, ``plot``).
    """
    config.validate()
    if not config.data:
        raise UsageError("No dataset folder: expected DATA/<class>/<image> (vgg lr-find DATA).")
    if not 0 < start < end < math.inf:
        raise UsageError(
            f"The sweep must rise between finite rates: expected 0 < start < end < inf. Received: start={start}, "
            f"end={end}."
        )
    if steps < 10:
        raise UsageError(f"steps must be 10 or more for a readable curve. Received: steps={steps}.")
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    torch.manual_seed(config.seed)
    data = read_data(config, None, log)
    model = build(config.arch, num_classes=len(data.classes), image_size=config.image_size, dropout=config.dropout)
    preprocessing = prepare(model, config, data.classes, log)
    layout = training_memory_format(device, precision, config.image_size)
    if config.batch_size == "auto":
        size = find_batch_size(model, config.image_size, device, precision, len(data.train), layout)
        config = dataclasses.replace(config, batch_size=size)
    world = World()
    train_batches, _ = make_batches(config, data, device, world, progress)
    model = model.to(device, memory_format=layout)
    step = Step(device, precision, preprocessing.mean, preprocessing.std, memory_format=layout)
    log(f"range test: {config.arch}, {len(data.train)} training images, batch {config.batch_size}, {config.optimizer}")
    objective = Objective.from_config(config, len(data.classes))
    return sweep_model(model, train_batches, step, config, objective, start, end, steps, progress)


def _calibrate_and_report(
    run_dir: Path, best: Path, data: Data, device: torch.device, log: Callable[[str], None], progress: bool
) -> None:
    """Fit the best model's temperature on the validation images (stored in its file), then write report.html."""
    if not data.val or not best.is_file():
        return
    calibration = calibrate_model_file(best, [(s.path, s.label) for s in data.val], str(device), progress=progress)
    if calibration is not None:
        log(calibration.line())
    # The report evaluates the same validation images: it reuses the calibration pass's outputs.
    outputs = calibration.outputs if calibration is not None else None
    log(f"report: {write_report(run_dir, device=str(device), progress=progress, outputs=outputs)}")


def _fit_inputs(
    model: nn.Module, train_batches: Batches, val_batches: Batches, step: Step, config: TrainConfig, world: World,
    log: Callable[[str], None], progress: bool,
) -> tuple:  # fmt: skip
    """(model to train, training batches, validation batches, step) for ``fit``.

    With a frozen backbone and no augmentation, the classifier alone is fit on features computed once (single
    process only: each process would otherwise fit its own classifier on its own shard); under DDP the model is
    wrapped.
    """
    cached = (
        None if world.distributed else cached_fit_inputs(model, train_batches, val_batches, step, config, log, progress)
    )
    if cached is not None:
        return cached
    if world.distributed:
        device = step.device
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, train_batches, val_batches, step


def _set_kernels(config: TrainConfig, device: torch.device, world: World) -> None:
    if world.distributed and config.unfreeze_at:
        # DDP registers the parameters that need gradients when it wraps the model; later unfreezing is unseen.
        raise UsageError("--unfreeze-at is not supported under torchrun yet: train frozen, then --weights RUN/best...")
    if config.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, read when its first handle is made (no matmul has run
        # on the device yet); a value the user set is theirs.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # An op with no deterministic kernel stops the run (what --deterministic promises), unless the user asked
        # for a warning instead.
        torch.use_deterministic_algorithms(True, warn_only=config.deterministic_warn_only)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # Input shapes are fixed for the whole run, so cuDNN's one-off search for the fastest kernels pays back.
        torch.backends.cudnn.benchmark = True


def _log_resume(state: dict, config: TrainConfig, run_dir: RunDir, batches: int, log: Callable[[str], None]) -> None:
    done = state["epoch"] + (state["batches"]["position"] / max(1, batches) if state["in_epoch"] else 0)
    log(f"resuming {run_dir.path} at epoch {done:.2f} of {config.epochs}")
    if state["epoch"] >= config.epochs:
        log(f"the run already finished {state['epoch']} epochs: pass --epochs N to train longer")
    if config.restore_best and run_dir.best.is_file():
        state["best_model"] = load_file(run_dir.best)
