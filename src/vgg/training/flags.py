"""``vgg train`` and ``vgg lr-find`` flags, built from the settings' declarations (``settings.py``), and the
resolved configuration they give. Only those two commands import this (the rest of the CLI never loads training)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from ..errors import UsageError
from .augment import AugmentConfig
from .config import TrainConfig, resolve
from .settings import declared, kinds
from .state import resume_config


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', received {text!r}") from None


def _number_or(kind: type, words: tuple[str, ...]) -> Callable[[str], float | str]:
    """An argparse type for a number that may also be one of a few words (``--lr find``)."""

    def parse(text: str) -> float | str:
        if text in words:
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {' or '.join(words)}, received {text!r}") from None

    return parse


def add_settings(p: argparse.ArgumentParser) -> None:
    """The settings of a training run, as flags (from ``TrainConfig``'s declarations)."""
    p.add_argument("--config", help="a .toml or .json file of settings; flags override it")
    p.add_argument("--recipe", help="default (learns) or tutorial (Adam 1e-3, no augmentation)")
    for f in declared(TrainConfig):
        _add_setting(p, TrainConfig, f)
    group = p.add_argument_group("augmentation (training images only)")
    for f in declared(AugmentConfig):
        _add_setting(group, AugmentConfig, f)


def _add_setting(parser: argparse._ActionsContainer, config_type: type, f: dataclasses.Field) -> None:
    plain, options = kinds(config_type, f.name)
    text = f.metadata["help"]
    if options and not any(k in (int, float) for k in plain):
        text += f" ({', '.join(options)})"
    if f.default is not None and f.default != "":
        text += f"; default {'on' if f.default is True else 'off' if f.default is False else f.default}"
    if f.name == "data":
        parser.add_argument("data", nargs="?", help=text)
        return
    flag = "--" + (f.metadata["flag"] or f.name).replace("_", "-")
    if bool in plain:
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        return
    kind = int if int in plain else float if float in plain else str
    if f.name == "batch_size":
        kind = _batch_size
    elif options and kind is not str:
        kind = _number_or(kind, options)
    parser.add_argument(flag, dest=f.name, type=kind, help=text, metavar=flag[2:].replace("-", "_").upper())


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The resolved training configuration for parsed ``vgg train`` arguments."""
    augment = {f.name: getattr(args, f.name) for f in declared(AugmentConfig)}
    flags = {f.name: getattr(args, f.name) for f in declared(TrainConfig)}
    if args.resume:
        if args.overwrite:
            raise UsageError(
                f"--resume continues the run in {args.resume} and --overwrite replaces it with a new one: pass one."
            )
        if args.config or args.recipe:
            raise UsageError(
                f"--resume takes its settings from {args.resume}/config.json; drop --config/--recipe "
                "(flags like --epochs or --device may still be given)."
            )
        return resume_config(args.resume, {**flags, "augment": augment})
    if not args.data:
        raise UsageError("vgg train: the following arguments are required: data (or --resume RUN_DIR)")
    return resolve(args.recipe or "default", args.config, augment=augment, **flags)
