"""Every subcommand and option, misused: a non-zero exit and one error line
starting `ksmtrace: ` (plus at most a `how to fix:` line), never a traceback.

The bad values are generated from the parser itself, so a new option is
covered by the matrix the day it is added.
"""

from __future__ import annotations

import argparse

import pytest

from ksmtrace import argtypes, cli

RECORDING = "tests/fixtures/recordings/host-6.18-workload.ksmrec"
BAD_NUMBERS = ("nan", "inf", "-inf", "-1", "abc", "")
NUMBERS = (int, float)  # a number option must use an argtypes type, which refuses NaN


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _matrix() -> list[tuple[str, ...]]:
    cases: list[tuple[str, ...]] = [("no-such-command",), ("--no-such-option",)]
    for name, sp in _subparsers().items():
        cases.append((name, "--no-such-option"))
        for a in sp._actions:
            if not a.option_strings or a.nargs == 0:
                continue
            opt = a.option_strings[-1]
            if a.choices:
                cases.append((name, opt, "bogus-choice"))
            elif a.type is not None:
                cases += [(name, opt, v) for v in BAD_NUMBERS
                          if not _accepts(a.type, v)]
        for a in sp._actions:  # positional numbers (intervals, counts)
            if not a.option_strings and a.type not in (None, str) and a.dest != "help":
                cases += [(name, v) for v in BAD_NUMBERS if not _accepts(a.type, v)]
    return cases


def _accepts(typ, value: str) -> bool:
    try:
        typ(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False
    return True


COMBOS = [
    ("stat", "--sysfs-only", "--strict"),
    ("stat", "--sysfs-only", "--bpf-stats"),
    ("stat", "--sysfs-only", "--attach", "kprobe"),
    ("stat", "--sysfs-only", "--ebpf"),
    ("top", "--sysfs-only", "--strict"),
    ("export", "--sysfs-only", "--attach", "fentry"),
    ("export", "--replay", RECORDING, "-p", "1"),
    ("export", "--replay", RECORDING, "--sysfs-only"),
    ("export", "--replay", RECORDING, "--strict"),
    ("top", "--replay", RECORDING, "--attach", "tracepoint"),
    ("top", "--replay", RECORDING, "--demo"),
    ("record", "0.5"),  # -o is required
    ("timeline", RECORDING),  # -o is required
    ("timeline", RECORDING, "-o", RECORDING),  # the input
    ("report",),
    ("report", "/nonexistent/x.ksmrec"),
    ("report", "tests"),  # a directory
    ("workload", "--state", "protnone", "--loop"),
]


@pytest.mark.parametrize("argv", _matrix() + COMBOS, ids=" ".join)
def test_misuse_exits_non_zero_with_one_error_line(argv, capsys):
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    assert rc not in (0, None), (argv, out)
    lines = out.err.splitlines()
    assert lines and lines[0].startswith("ksmtrace: "), out.err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  how to fix: ")), out.err
    assert "Traceback" not in out.err


def test_no_option_takes_a_bare_int_or_float():
    bare = [(name, a.option_strings or a.dest) for name, sp in _subparsers().items()
            for a in sp._actions if a.type in NUMBERS and not a.choices]
    assert bare == []


def test_the_matrix_covers_every_subcommand():
    names = {c[0] for c in _matrix()}
    assert set(_subparsers()) <= names
    assert len(_matrix()) + len(COMBOS) > 150


@pytest.mark.parametrize("typ", [argtypes.seconds, argtypes.duration, argtypes.factor])
def test_non_finite_numbers_are_refused(typ):
    for v in ("nan", "NaN", "inf", "-inf", "1e400"):
        with pytest.raises(argparse.ArgumentTypeError):
            typ(v)


def test_every_command_is_in_the_lazy_table():
    """A command missing from cli.COMMANDS would still parse, through the
    full parser, but pay for importing every command's module."""
    assert set(cli.COMMANDS) == set(_subparsers())
    for name in cli.COMMANDS:
        sub = next(a for a in cli.build_parser(name)._actions
                   if isinstance(a, argparse._SubParsersAction))
        assert name in sub.choices


def test_a_command_imports_only_its_own_module(loaded_by):
    assert loaded_by("from ksmtrace import cli; cli.build_parser('top')",
                     ("ksmtrace.workload", "ksmtrace.report", "ksmtrace.export",
                      "ksmtrace.doctor", "ksmtrace.top")) == ["ksmtrace.top"]
