"""The ``vgg`` command line: each subcommand maps onto one API call; errors are one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import UsageError

if TYPE_CHECKING:
    from .config import TrainConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors: one line, exit 2, like ours
        raise UsageError(f"{self.prog}: {message}")


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', received {text!r}") from None


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, help=help)


def _add_summary(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("summary", help="print a model's layers, output shapes and parameter counts")
    p.add_argument("--arch", default="vgg16", help="family member (vgg11 ... vgg19_bn); default vgg16")
    p.add_argument("--classes", type=int, default=1000, help="number of output classes; default 1000")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels; default 224")
    p.set_defaults(run=_summary)


def _summary(args: argparse.Namespace) -> int:
    from .models import check_arch
    from .report import format_summary

    print(format_summary(check_arch(args.arch), args.classes, args.image_size), end="")
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train a model on a class-per-folder image dataset")
    p.add_argument("data", nargs="?", help="dataset folder: DATA/<class>/<image> (optional with --resume)")
    p.add_argument("--val", help="validation folder with the same classes (default: a stratified 80/20 split)")
    p.add_argument("--out", help="run folder for models, history, curves and config (default runs/train)")
    p.add_argument("--config", help="a .toml or .json file of settings; flags override it")
    p.add_argument("--recipe", help="default (learns) or tutorial (Adam 1e-3, no augmentation)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its state.pt, exactly")
    p.add_argument("--arch", help="vgg11, vgg13, vgg16, vgg19 or their _bn variants; default vgg16")
    p.add_argument("--image-size", type=int, help="images are resized to this square side; default 224")
    p.add_argument("--epochs", type=int, help="maximum number of epochs; default 30")
    p.add_argument(
        "--batch-size", type=_batch_size, help="images per step, or auto (the largest that fits); default 64"
    )
    p.add_argument("--optimizer", help="adamw (default), adam or sgd")
    p.add_argument("--lr", type=float, help="peak learning rate; default 1e-3 for _bn archs from scratch, else 2e-4")
    p.add_argument("--momentum", type=float, help="SGD momentum (Nesterov); default 0.9")
    p.add_argument("--weight-decay", type=float, help="default 0.05 (decoupled, AdamW)")
    _bool_flag(p, "nesterov", "Nesterov momentum for SGD (default on)")
    p.add_argument("--schedule", help="cosine (default), constant, step, onecycle or plateau; all after warm-up")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up length; default 1")
    p.add_argument("--step-size", type=int, help="step schedule: decay the rate by --gamma every N epochs; default 10")
    p.add_argument("--gamma", type=float, help="step and plateau schedules: rate decay factor; default 0.1")
    p.add_argument("--plateau-patience", type=int, help="plateau schedule: epochs without improvement; default 3")
    p.add_argument("--clip-grad-norm", type=float, help="clip the gradient norm to this value; default 0 (off)")
    p.add_argument("--accumulate", type=int, help="accumulate gradients over N batches per step; default 1")
    p.add_argument("--label-smoothing", type=float, help="default 0.1")
    p.add_argument("--dropout", type=float, help="dropout in the classifier; default 0.5")
    p.add_argument("--patience", type=int, help="stop after this many epochs without improvement; default 20")
    p.add_argument("--monitor", help="val_accuracy (default), val_loss, accuracy or loss")
    p.add_argument("--min-delta", type=float, help="smallest change of --monitor that counts as improvement; default 0")
    _bool_flag(p, "restore-best", "end with the best epoch's weights instead of the last (default off)")
    p.add_argument("--val-fraction", type=float, help="validation share when --val is not given; default 0.2")
    p.add_argument("--max-per-class", type=int, help="use at most this many training images per class")
    p.add_argument("--seed", type=int, help="seed for the split, initialisation and shuffling; default 0")
    _bool_flag(p, "deterministic", "deterministic kernels only (torch.use_deterministic_algorithms); default off")
    p.add_argument("--save-every-steps", type=int, help="also save state.pt every N steps, for mid-epoch resume")
    _bool_flag(p, "compile", "compile the model with torch.compile (slow first step; faster steps on GPUs)")
    _bool_flag(p, "tensorboard", "write TensorBoard event files to RUN_DIR/tensorboard (needs vgg[tensorboard])")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--precision", help="auto (default: bf16 where native), fp32, bf16, fp16 (CUDA)")
    p.add_argument("--workers", type=int, help="image decoding processes; default: one per core, up to 8")
    p.add_argument("--cache", help="auto (default: decoded images kept in memory when they fit), ram, none")
    p.add_argument(
        "--decode", help="where JPEGs are decoded: auto (default: on the GPU when training on CUDA), workers, device"
    )
    p.add_argument("--split", help="reuse a split.csv (path,class,split) from an earlier run instead of splitting")
    p.add_argument("--class-weight", help="none (default) or auto: loss weights inversely proportional to class size")
    p.add_argument("--sampler", help="shuffle (default) or balanced: draw every class equally often")
    g = p.add_argument_group("augmentation (training images only)")
    g.add_argument("--rotation", type=float, help="max rotation in degrees; default 0")
    g.add_argument("--shift", type=float, help="max shift as a fraction of the side; default 0.125")
    g.add_argument("--zoom", type=float, help="zoom range: scale in [1-zoom, 1+zoom]; default 0")
    g.add_argument("--shear", type=float, help="max shear in degrees; default 0")
    g.add_argument("--brightness", type=float, help="brightness factor range [1-b, 1+b]; default 0")
    _bool_flag(g, "hflip", "random left-right flips (default on)")
    _bool_flag(g, "vflip", "random upside-down flips (default off)")
    g.add_argument(
        "--augment", dest="policy", help="none, basic (default: the options above), randaugment or trivialaugment"
    )
    g.add_argument("--mixup", type=float, help="MixUp alpha (e.g. 0.2); default 0 (off)")
    g.add_argument("--cutmix", type=float, help="CutMix alpha (e.g. 1.0); default 0 (off)")
    g.add_argument("--erasing", type=float, help="random erasing probability per image; default 0")
    _add_transfer_flags(p)
    p.set_defaults(run=_train)


def _add_transfer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transfer learning")
    g.add_argument("--weights", help="start from 'imagenet' (torchvision's weights for --arch) or a .pth/.safetensors")
    g.add_argument("--freeze", help="none (default) or features: train only the classifier")
    g.add_argument("--unfreeze-at", type=int, help="with --freeze features: train the features too from this epoch")
    g.add_argument("--backbone-lr-scale", type=float, help="the features' learning rate is lr times this; default 1")
    _bool_flag(g, "cache-features", "frozen features, no augmentation: compute features once (default on)")


AUGMENT_FLAGS = (
    "rotation",
    "shift",
    "zoom",
    "shear",
    "brightness",
    "hflip",
    "vflip",
    "policy",
    "mixup",
    "cutmix",
    "erasing",
)
TRAIN_FLAGS = (
    "data", "val", "out", "arch", "image_size", "epochs", "batch_size", "optimizer", "lr", "momentum",
    "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "dropout", "patience", "monitor",
    "val_fraction", "max_per_class", "seed", "device", "precision", "workers", "cache", "decode", "nesterov",
    "step_size", "gamma", "plateau_patience", "clip_grad_norm", "accumulate", "min_delta", "restore_best",
    "deterministic", "save_every_steps", "tensorboard", "compile", "split", "class_weight", "sampler",
)  # fmt: skip
TRANSFER_FLAGS = ("weights", "freeze", "unfreeze_at", "backbone_lr_scale", "cache_features")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The resolved training configuration for parsed ``vgg train`` arguments."""
    from .config import resolve
    from .state import resume_config

    augment = {name: getattr(args, name) for name in AUGMENT_FLAGS}
    flags = {name: getattr(args, name) for name in TRAIN_FLAGS + TRANSFER_FLAGS}
    if args.resume:
        if args.config or args.recipe:
            raise UsageError(
                f"--resume takes its settings from {args.resume}/config.json; drop --config/--recipe "
                "(flags like --epochs or --device may still be given)."
            )
        return resume_config(args.resume, {**flags, "augment": augment})
    if not args.data:
        raise UsageError("vgg train: the following arguments are required: data (or --resume RUN_DIR)")
    return resolve(args.recipe or "default", args.config, augment=augment, **flags)


def _train(args: argparse.Namespace) -> int:
    from .distributed import from_env
    from .trainer import train

    config = train_config(args)
    result = train(config, log=print, progress=sys.stderr.isatty(), resume=bool(args.resume))
    if from_env().main:
        print(
            f"run folder: {result.run_dir} (best.safetensors, last.safetensors, history.csv, curves.png, config.json)"
        )
    return 0


def _add_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        action="store_true",
        help="also classify each image mirrored left-right and average the two (twice the compute; only where "
        "mirroring keeps the class)",
    )


def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("predict", help="predict the class of images with a trained model")
    p.add_argument("model", help="a .safetensors model file written by `vgg train`, or imagenet:ARCH (e.g. vgg16)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--top-k", type=int, default=1, help="show the k most likely classes; default 1")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", default="auto")
    _add_tta(p)
    p.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> int:
    from .predict import expand_images, load

    paths = expand_images(args.images)
    classifier = load(args.model, device=args.device, tta=args.tta)
    predictions = classifier.predict(paths, top_k=args.top_k)
    if args.json:
        print(json.dumps([p.as_dict() for p in predictions], indent=2))
        return 0
    for p in predictions:
        ranked = "  ".join(f"{label} {prob:.3f}" for label, prob in p.top_k)
        print(f"{p.source}: {ranked}")
    return 0


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="loss, accuracy and per-class accuracy on a labelled folder")
    p.add_argument("model", help="a .safetensors model file written by `vgg train`, or imagenet:ARCH (e.g. vgg16)")
    p.add_argument("data", help="labelled folder DATA/<class>/<image> with the model's classes")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    _add_tta(p)
    p.set_defaults(run=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .predict import load
    from .report import format_evaluation

    classifier = load(args.model, device=args.device, tta=args.tta)
    result = classifier.evaluate(args.data, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
    elif "top5_accuracy" in result:
        from .imagenet import format_imagenet_evaluation

        print(format_imagenet_evaluation(result))
    else:
        print(format_evaluation(result, classifier.class_names))
    return 0


def _add_datasets(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("datasets", help="write a real dataset as class folders")
    p.add_argument("name", choices=["fashion-mnist"], help="dataset to write")
    p.add_argument("dest", help="output folder: DEST/train/<class>/*.png and DEST/test/<class>/*.png")
    p.add_argument("--source", help="folder holding the IDX files (default: Debian's package, then download)")
    p.add_argument("--limit-per-class", type=int, help="write at most this many images per class and split")
    p.set_defaults(run=_datasets)


def _datasets(args: argparse.Namespace) -> int:
    from .datasets import fashion_mnist

    dest = fashion_mnist(args.dest, args.source, args.limit_per_class)
    print(f"wrote Fashion-MNIST to {dest}/train and {dest}/test")
    return 0


def _add_doctor(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("doctor", help="check a dataset folder before training: counts, bad files, duplicates")
    p.add_argument("data", help="dataset folder: DATA/<class>/<image>")
    p.add_argument("--val", help="validation folder: also checked for images duplicated across train and val")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import examine, format_report

    report = examine(args.data, args.val)
    print(json.dumps(report, indent=2) if args.json else format_report(report), end="" if not args.json else "\n")
    return 1 if report["problems"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vgg", description="Train, evaluate and use VGG image classifiers on folders of images.")
    parser.add_argument("--version", action="version", version=f"vgg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_summary, _add_train, _add_predict, _add_evaluate, _add_datasets, _add_doctor):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage or input error)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
        return args.run(args)
    except UsageError as error:
        if args is not None and args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
