"""Signals, in one place.

The program that owns the process (the CLI; the test suite and the benchmark
for their own runs) calls `install()` once: Ctrl-C then raises
KeyboardInterrupt and SIGTERM/SIGHUP raise `Terminated`, so every with-block
unwinds (probes detached, knobs restored, children ended, recordings
closed). No library code installs handlers. `held()` defers the three over a
critical section (a record being written, the cleanup of a workload).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

UNWINDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP: a SystemExit (exit status 128 + signal), so that no
    `except Exception` swallows it on the way out."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _raise(signum: int, frame: object) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """From the main thread: Ctrl-C, SIGTERM and SIGHUP unwind (see above)."""
    for s in UNWINDING:
        signal.signal(s, _raise)


@contextmanager
def installed() -> Iterator[None]:
    """`install()` for the block, the previous handlers back after it (main
    thread only; elsewhere nothing changes)."""
    with calling(_raise):
        yield


@contextmanager
def calling(handler: Callable[[int, object], None],
            sigs: tuple[int, ...] = UNWINDING) -> Iterator[None]:
    """`handler` for `sigs` during the block (main thread only)."""
    if not _main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in sigs}
    try:
        for s in sigs:
            signal.signal(s, handler)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]


@contextmanager
def held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP held back for the block (main thread only),
    delivered right after it. The mask is read before it is changed and
    changed inside the try: a signal raised between blocking and `try`
    would otherwise leave them blocked for good."""
    if not _main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(UNWINDING))
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
