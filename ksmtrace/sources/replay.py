"""Replay of a recording as a source: the recorded ticks, in order, so the
collector builds the same snapshots as it did live."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from ksmtrace.model import Tick
from ksmtrace.record import Recording


class ReplaySource:
    kind = "replay"

    def __init__(self, path: str | os.PathLike, speed: float | None = None):
        self.recording = Recording(path)
        h = self.recording.header
        self.probes = self.recording.probes
        self.cow_estimated = bool(h.get("cow_estimated"))
        self.notes = tuple(h.get("notes", ())) + (
            f"replay of {os.path.basename(str(path))} recorded {h.get('started', '?')} "
            f"on {h.get('host', '?')} ({h.get('kernel', '?')})",)
        self.speed = speed
        self.pids = None

    def __enter__(self) -> ReplaySource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def ticks(self, interval: float = 0, count: int = 0) -> Iterator[Tick]:
        """Recorded ticks; `interval` is ignored, `speed` paces them (None: at once)."""
        prev: float | None = None
        for n, tick in enumerate(self.recording.ticks()):
            if count and n > count:
                return
            if self.speed and prev is not None:
                time.sleep(max(0.0, (tick.counters.mono - prev) / self.speed))
            prev = tick.counters.mono
            yield tick
