"""A whole training run, top to bottom: scan the data -> build the model -> batch the images -> fit -> RUN_DIR."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..batches import Batches, class_weights, limit_per_class
from ..calibration import calibrate_model_file
from ..checkpoint import ModelInfo
from ..distributed import World, finish
from ..distributed import setup as setup_distributed
from ..errors import UsageError
from ..html_report import write_report
from ..inference import Step
from ..models import build
from ..report import format_summary
from ..runtime import pick_device, pick_precision, training_memory_format
from ..scan import Sample, read_split, scan_folder, stratified_split
from .augment import image_transform
from .autobatch import find_batch_size
from .config import TrainConfig
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


@dataclass
class Data:
    """The images of a run: class names, training and validation samples, files skipped while scanning."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]]


def imbalance_line(counts: dict[str, int], config: TrainConfig) -> str:
    """One line on class balance: the largest/smallest ratio and what this run does about it."""
    largest = max(counts, key=counts.__getitem__)
    smallest = min(counts, key=counts.__getitem__)
    ratio = counts[largest] / max(1, counts[smallest])
    remedy = []
    if config.class_weight == "auto":
        remedy.append("class-weighted loss")
    if config.sampler == "balanced":
        remedy.append("balanced sampling")
    if counts[largest] == counts[smallest]:
        return f"classes are balanced ({counts[largest]} images each)"
    line = f"imbalance: {ratio:.1f}x ({largest}: {counts[largest]}, {smallest}: {counts[smallest]})"
    if remedy:
        return line + "; using " + " and ".join(remedy)
    if ratio >= 3:
        return line + "; consider --class-weight auto or --sampler balanced"
    return line


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
    log(_data_line(config, data, counts, train_batches, device, precision, world))
    log(
        f"optimizer: {config.optimizer}, peak lr {config.peak_lr:g}, {config.warmup:g}-epoch warm-up, "
        f"{config.schedule} schedule, {config.epochs} epochs"
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
    weights = _class_weights(config, data, counts, log)
    trained, fit_train, fit_val, fit_step = _fit_inputs(
        model, train_batches, val_batches, step, config, world, log, progress
    )
    result = fit(
        trained, fit_train, fit_val, config, fit_step, len(data.classes),
        on_epoch_end=lambda history, improved, chosen: run_dir.epoch_end(
            history, improved, model if chosen is trained else chosen, info
        ),
        progress=progress, state=state, on_checkpoint=run_dir.save_state, class_weights=weights, log=log,
    )  # fmt: skip
    run_dir.close()
    skipped = _summarise(config, result, data, (train_batches, val_batches), run_dir, log)
    if world.main:
        _calibrate_and_report(run_dir.path, Path(run_dir.best), data, device, log, progress)
    return TrainResult(run_dir.path, run_dir.best, run_dir.last, data.classes, result, skipped, model)


def _class_weights(
    config: TrainConfig, data: Data, counts: dict[str, int], log: Callable[[str], None]
) -> torch.Tensor | None:
    """``--class-weight auto``: loss weights inversely proportional to the usable images per class."""
    if config.class_weight != "auto":
        return None
    labels = torch.arange(len(data.classes)).repeat_interleave(torch.tensor(list(counts.values())))
    weights = class_weights(labels, len(data.classes))
    log("class weights: " + ", ".join(f"{n}: {w:.2f}" for n, w in zip(data.classes, weights.tolist(), strict=True)))
    return weights


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
        log(f"best {config.monitor} {result.best_value:.4f} at epoch {result.best_epoch}; model: {run_dir.best}")
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
    if not 0 < start < end:
        raise UsageError(f"The sweep must rise: expected 0 < start < end. Received: start={start}, end={end}.")
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


def _data_line(
    config: TrainConfig, data: Data, counts: dict[str, int], batches: Batches, device: torch.device, precision: str,
    world: World,
) -> str:  # fmt: skip
    return (
        f"classes: {len(data.classes)} ({', '.join(f'{n}: {c}' for n, c in counts.items())})\n"
        f"{imbalance_line(counts, config)}\n"
        f"train: {len(data.train)} images ({'in memory' if batches.in_memory else 'streamed'}), "
        f"validation: {len(data.val)} images, device: {device}, precision: {precision}"
        + (f", {world.world_size} processes" if world.distributed else "")
    )


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


class MatrixPool(nn.Module):
    """Adaptive average pooling as two matrix products, for ``--deterministic`` on CUDA.

    CUDA's adaptive average pooling has no deterministic backward pass (under ``torch.use_deterministic_algorithms``
    the first backward would stop the run), while matrix products are deterministic once cuBLAS has a fixed
    workspace. The windows are adaptive pooling's own; a map already of the output size passes through untouched
    (VGG below 256 px).
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    @staticmethod
    def _windows(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
        """``out`` x ``size``: row i averages input positions floor(i*size/out) to ceil((i+1)*size/out)."""
        matrix = torch.zeros(out, size, dtype=like.dtype, device=like.device)
        for i in range(out):
            start, end = i * size // out, -(-(i + 1) * size // out)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (height, width), (out_h, out_w) = x.shape[-2:], self.output_size
        if (height, width) == (out_h, out_w):
            return x
        rows, columns = self._windows(height, out_h, x), self._windows(width, out_w, x)
        return torch.einsum("ih,nchw,jw->ncij", rows, x, columns)


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


def read_data(config: TrainConfig, saved: SavedRun | None = None, log: Callable[[str], None] = print) -> Data:
    """Scan the dataset and split it: ``--val`` folder, ``--split`` file, or a seeded stratified split.

    A resumed run (``saved``) reads its own RUN_DIR/split.csv: images added since it started are left out (a new
    split would move validation images into training), and a dataset that moved is followed (``--data``).
    """
    folder = scan_folder(config.data)
    skipped = list(folder.skipped)
    if saved is not None:
        if folder.classes != saved.class_names:
            raise UsageError(
                f"Cannot resume {config.out}: {config.data} has classes {folder.classes} but the run was trained on "
                f"{saved.class_names}. Resume with the run's data, or start a new run with another --out."
            )
        train_samples, val_samples = read_split(Path(config.out) / "split.csv", folder.classes, _moved(config, saved))
        if config.val:
            skipped += scan_folder(config.val, classes=folder.classes).skipped
        listed = {str(s.path) for s in (*train_samples, *val_samples)}
        new = sum(1 for s in folder.samples if str(s.path) not in listed)
        if new:
            log(f"{new} images in {config.data} are not in the run's split.csv: the resumed run leaves them out")
    elif config.val:
        train_samples = folder.samples
        val_folder = scan_folder(config.val, classes=folder.classes)
        val_samples = val_folder.samples
        skipped += val_folder.skipped
    elif config.split:
        train_samples, val_samples = read_split(config.split, folder.classes)
    else:
        train_samples, val_samples = stratified_split(folder, config.val_fraction, config.seed)
    if config.max_per_class:
        train_samples = limit_per_class(train_samples, config.max_per_class, config.seed)
        val_samples = limit_per_class(val_samples, max(1, round(config.max_per_class * config.val_fraction)))
    return Data(folder.classes, train_samples, val_samples, skipped)


def _moved(config: TrainConfig, saved: SavedRun) -> dict[str, str]:
    """Old data folder -> new one, when a resume names another folder than the run was started with."""
    moved = {}
    for key in ("data", "val"):
        old, new = saved.settings.get(key), getattr(config, key)
        if isinstance(old, str) and old and new and Path(old) != Path(new):
            moved[str(Path(old))] = str(Path(new))
    return moved


def make_batches(
    config: TrainConfig, data: Data, device: torch.device, world: World, progress: bool = False
) -> tuple[Batches, Batches]:
    """Training batches (shuffled, augmented per image if asked) and validation batches, sharded under DDP.

    ``progress``: a bar over the one-time decoding pass of datasets small enough to keep in memory.
    """
    pin = device.type == "cuda"
    decode_device = device if config.decode == "device" or (config.decode == "auto" and device.type == "cuda") else None
    common = dict(
        workers=config.workers, cache=config.cache, pin_memory=pin, rank=world.rank, world_size=world.world_size,
        decode_device=decode_device, progress=progress,
    )  # fmt: skip
    train_batches = Batches(
        data.train, config.image_size, config.batch_size, shuffle=True, seed=config.seed, drop_last=True,
        transform=image_transform(config.augment), sampler=config.sampler, **common,
    )  # fmt: skip
    val_batches = Batches(data.val, config.image_size, max(config.batch_size, 128), shuffle=False, **common)
    return train_batches, val_batches


def usable_counts(data: Data, train_batches: Batches, config: TrainConfig) -> dict[str, int]:
    """Training images per class; what decoded, not what was listed, when they are in memory.

    Raises:
        UsageError: a class has no readable training image (it could not be learned).
    """
    counts = {name: sum(1 for s in data.train if s.label == i) for i, name in enumerate(data.classes)}
    if train_batches.in_memory:
        decoded = torch.bincount(train_batches.labels, minlength=len(data.classes)).tolist()
        counts = dict(zip(data.classes, decoded, strict=True))
    unusable = [name for name, n in counts.items() if n == 0]
    if unusable:
        raise UsageError(
            f"Class {unusable[0]!r} has no usable training images: every file failed to decode (see the warnings "
            f"above). Expected at least one readable image per class in {config.data}/{unusable[0]}/."
        )
    return counts


def _log_resume(state: dict, config: TrainConfig, run_dir: RunDir, batches: int, log: Callable[[str], None]) -> None:
    done = state["epoch"] + (state["batches"]["position"] / max(1, batches) if state["in_epoch"] else 0)
    log(f"resuming {run_dir.path} at epoch {done:.2f} of {config.epochs}")
    if state["epoch"] >= config.epochs:
        log(f"the run already finished {state['epoch']} epochs: pass --epochs N to train longer")
    if config.restore_best and run_dir.best.is_file():
        state["best_model"] = load_file(run_dir.best)
