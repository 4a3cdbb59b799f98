"""Errors a user can act on: the command line prints them as one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(Exception):
    """Bad input from the user (a path, a value, a file): the message says what was expected and what was received."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """A " Did you mean 'x'?" suffix for the closest choice, or an empty string."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
