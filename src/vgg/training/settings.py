"""Declaring settings once: type, default, help text, allowed range and whether a resumed run may change it.

A config dataclass declares each field with ``setting(...)``; ``check_settings`` validates an instance from those
declarations (one-line errors naming the setting), and the command line builds its flags from them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import UsageError, did_you_mean


def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    resumable: bool = False,
    flag: str | None = None,
) -> Any:
    """A dataclass field with its help text, its allowed range [low, high] and whether resume may change it.

    ``flag`` names the command-line flag when it is not the field's name (``--augment`` for ``policy``).
    """
    metadata = {"help": help, "low": low, "high": high, "resumable": resumable, "flag": flag}
    return dataclasses.field(default=default, metadata=metadata)


def declared(config_type: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass declared with ``setting``, in order."""
    return [f for f in dataclasses.fields(config_type) if "help" in f.metadata]


def _parts(hint: Any) -> tuple[Any, ...]:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return typing.get_args(hint) if union else (hint,)


def kinds(config_type: type, name: str) -> tuple[tuple[type, ...], tuple[str, ...]]:
    """The plain types a setting accepts (int, float, bool, str, NoneType) and its ``Literal`` choices."""
    hint = typing.get_type_hints(config_type)[name]
    plain, options = [], []
    for part in _parts(hint):
        if typing.get_origin(part) is Literal:
            options.extend(typing.get_args(part))
        else:
            plain.append(part)
    return tuple(plain), tuple(options)


def choices(config_type: type, name: str) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` setting (empty for other settings)."""
    return kinds(config_type, name)[1]


def _type_ok(value: Any, plain: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in plain
    if isinstance(value, int):
        return int in plain or float in plain
    return any(isinstance(value, k) for k in plain if k is not type(None))


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def check_settings(config: Any) -> None:
    """Check the type, choice and range of every declared setting of ``config``.

    Raises:
        UsageError: one line naming the setting, what it must be and what it was.
    """
    for f in declared(type(config)):
        value, name = getattr(config, f.name), f.name
        plain, options = kinds(type(config), f.name)
        if value is None and type(None) in plain:
            continue
        numeric = any(k in (int, float) for k in plain)
        if options and isinstance(value, str) and str not in plain:
            if value not in options and not numeric:
                raise UsageError(
                    f"{name} must be one of {{{', '.join(options)}}}. Received: {name}={value!r}."
                    + did_you_mean(value, options)
                )
            if value in options:
                continue
        if not _type_ok(value, plain):
            wanted = [_NAMES[k] for k in plain if k in _NAMES] + [repr(o) for o in options]
            raise UsageError(f"{name} must be {' or '.join(wanted)}. Received: {name}={value!r}.")
        if isinstance(value, int | float) and not isinstance(value, bool):
            _check_range(name, value, f.metadata)


def _check_range(name: str, value: float, meta: Mapping[str, Any]) -> None:
    low, high = meta["low"], meta["high"]
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number. Received: {name}={value}.")
    if high is not None and low is not None and not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}. Received: {name}={value}.")
    if low is not None and value < low:
        bound = "a positive integer" if low == 1 and isinstance(value, int) else f"{low} or more"
        raise UsageError(f"{name} must be {bound}. Received: {name}={value}.")


def resumable(config_type: type) -> set[str]:
    """Names of the settings a resumed run may change: where and how fast it runs, and how far it goes."""
    return {f.name for f in declared(config_type) if f.metadata["resumable"]}
