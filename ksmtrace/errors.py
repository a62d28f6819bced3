"""Errors a user can act on, each with its own exit code and a how-to-fix hint.

The CLI catches `KsmtraceError`, prints `ksmtrace: <message>` and the hint to
stderr, and exits with `exit_code`: never a traceback for a known condition.
"""

from __future__ import annotations

import sys
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILURE = 1  # a check failed (tests, --strict with missed probes, ...)
    USAGE = 2  # argparse's own code for bad command lines
    NOT_ROOT = 3
    NO_KSM = 4
    NO_BPF = 5
    NO_TRACEFS = 6
    NO_HEADERS = 7
    NO_BTF = 8
    BAD_RECORDING = 9
    NO_PROCESS = 10
    BUSY = 11  # KSM knobs held by another ksmtrace, or resource busy
    INTERRUPTED = 130


class KsmtraceError(Exception):
    exit_code: Exit = Exit.FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def report(self) -> int:
        """Say what is wrong and how to fix it on stderr, one line each (no
        traceback); the exit code."""
        print(f"ksmtrace: {self.message}", file=sys.stderr)
        if self.hint:
            print(f"  how to fix: {self.hint}", file=sys.stderr)
        return int(self.exit_code)


class UsageError(KsmtraceError):
    """A bad command line that argparse cannot catch (a value out of range,
    options that do not go together, no terminal)."""

    exit_code = Exit.USAGE


class NotRoot(KsmtraceError):
    exit_code = Exit.NOT_ROOT


class NoKsm(KsmtraceError):
    exit_code = Exit.NO_KSM


class NoBpf(KsmtraceError):
    exit_code = Exit.NO_BPF


class NoTracefs(KsmtraceError):
    exit_code = Exit.NO_TRACEFS


class NoHeaders(KsmtraceError):
    exit_code = Exit.NO_HEADERS


class NoBtf(KsmtraceError):
    exit_code = Exit.NO_BTF


class BadRecording(KsmtraceError):
    exit_code = Exit.BAD_RECORDING


class NoProcess(KsmtraceError):
    exit_code = Exit.NO_PROCESS


class Busy(KsmtraceError):
    exit_code = Exit.BUSY


def no_ksm(root: str = "/") -> NoKsm:
    return NoKsm(
        f"this kernel has no KSM: {root.rstrip('/')}/sys/kernel/mm/ksm does not exist",
        "KSM needs a kernel built with CONFIG_KSM=y (every Debian/Ubuntu/Fedora kernel has it); "
        "boot such a kernel, or use `vagrant up` in vagrant/ for a test kernel",
    )


def not_root(what: str) -> NotRoot:
    return NotRoot(
        f"{what} needs root",
        "run it with sudo, or use `ksmtrace stat --sysfs-only` which works unprivileged",
    )
