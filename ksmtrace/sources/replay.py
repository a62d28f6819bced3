"""Replay of a recording as a source: the recorded ticks, in order, so a
collector fed by it builds the same snapshots as it did live.

Same interface as the live and sysfs-only sources (`kind`, `probes`,
`notes`, `cow_estimated`, `ticks(interval, count)`, context manager); the
probe statuses, notes and COW mode are the recording's, not this host's.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from ksmtrace.model import ProbeStatus, Tick
from ksmtrace.record import Recording


class ReplaySource:
    """`speed=None` replays as fast as the file parses; `speed=1.0` at the
    recorded pace, `2.0` twice as fast, and so on."""

    kind = "replay"

    def __init__(self, path: str | os.PathLike, speed: float | None = None,
                 warn: IO[str] | None = sys.stderr):
        if speed is not None and speed <= 0:
            raise ValueError(f"replay speed must be > 0, not {speed}")
        self.recording = Recording(path, warn=warn)  # warn=None: silently drop a cut-off end
        self.header: dict[str, Any] = self.recording.header
        self.probes: tuple[ProbeStatus, ...] = self.recording.probes
        self.notes: tuple[str, ...] = tuple(self.header.get("notes", ()))
        self.cow_estimated = bool(self.header.get("cow_estimated", False))
        self.speed = speed
        self.pids: list[int] | None = None  # accepted like other sources; the recording decides

    def __enter__(self) -> ReplaySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.recording.close()

    def ticks(self, interval: float = 0.0, count: int = 0) -> Iterator[Tick]:
        """The recorded ticks. `interval` is ignored (the recording has its
        own); `count` as for the other sources: the first tick, then `count`
        more (0: all). With `speed`, each tick comes when its recorded time,
        divided by the speed, has passed since the first."""
        first_mono: float | None = None
        started = time.monotonic()
        for n, tick in enumerate(self.recording.ticks()):
            if count and n > count:
                return
            if self.speed is not None:
                if first_mono is None:
                    first_mono = tick.counters.mono
                due = started + (tick.counters.mono - first_mono) / self.speed
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
            yield tick
