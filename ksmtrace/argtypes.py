"""Command-line value types, and the subcommands' parsers. Each type refuses
at parse time (exit 2) what the commands cannot use, NaN and infinities
included (`nan > 0` is False, so a later `<= 0` check lets NaN through, and
`inf` seconds never ends a sleep)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _parse(text: str, kind: type[int] | type[float]) -> float:
    try:
        v = kind(text)
    except ValueError:
        what = "a number" if kind is float else "a whole number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def _at_least(kind: type, low: float, *, strict: bool = False, high: float | None = None,
              unit: str = "") -> Callable[[str], float]:
    def check(text: str):
        v = _parse(text, kind)
        if v < low or (strict and v == low) or (high is not None and v > high):
            bound = f"{'more than' if strict else 'at least'} {low}{unit}"
            if high is not None:
                bound = f"within {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return v
    return check


seconds = _at_least(float, 0, strict=True, unit=" seconds")  # an interval
duration = _at_least(float, 0, unit=" seconds (0: no limit)")
factor = _at_least(float, 0, strict=True)  # a speed
fraction = _at_least(float, 0, high=1)
rate = _at_least(float, 0)  # per second, 0: as fast as possible
count = _at_least(int, 0)  # 0: no limit, or none
positive = _at_least(int, 1)


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


def subcommand(sub: argparse._SubParsersAction, name: str, help: str, description: str,
               epilog: str) -> argparse.ArgumentParser:
    """A subcommand's parser; its description and examples (`epilog`) print
    as written."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
