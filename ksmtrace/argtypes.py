"""Command-line value types: each refuses at parse time (exit 2) what the
commands cannot use, NaN and infinities included (`nan > 0` is False, so a
later `<= 0` check lets NaN through, and `inf` seconds never ends a sleep)."""

from __future__ import annotations

import argparse
import math


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def seconds(text: str) -> float:
    """An interval: finite and > 0."""
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return v


def duration(text: str) -> float:
    """A duration where 0 means "no limit": finite and >= 0."""
    v = _finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more seconds, not {text}")
    return v


def factor(text: str) -> float:
    """A speed factor: finite and > 0."""
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return v


def count(text: str) -> int:
    """A count where 0 means "no limit": an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return v


def pid(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if not 0 < v < 2**22:
        raise argparse.ArgumentTypeError(f"{text} is not a process id (1 to 4194303)")
    return v


class Parser(argparse.ArgumentParser):
    """argparse with errors as one line (exit 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ksmtrace: {message} (see `{self.prog} --help`)\n")
