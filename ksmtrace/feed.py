"""Feeds: snapshots for views that poll (the TUI), produced off the UI thread.

`LiveFeed` runs a source (live BPF or sysfs-only) and a collector on a worker
thread and keeps the newest snapshot plus a bounded history. `ReplayFeed`
turns a recording into snapshots and plays them back at a chosen speed, with
pause and seek. Both are one-way: the view only reads snapshots, and tells the
feed which process's page map it wants (`watch`); the source reads it.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ksmtrace.collector import Observed
from ksmtrace.errors import KsmtraceError
from ksmtrace.model import Snapshot

HISTORY = 120  # snapshots kept for sparklines


class LiveFeed:
    """Snapshots from an entered source (live or sysfs-only) and its
    collector, one per `interval`, computed on a daemon thread."""

    seekable = False

    def __init__(self, observed: Observed, interval: float = 1.0, history: int = HISTORY):
        self.observed = observed
        self.source = observed.src
        self.kind = observed.src.kind
        self.interval = interval
        self._history: deque[Snapshot] = deque(maxlen=history)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.watched: int | None = None

    # -------------------------------------------------------------- control
    def start(self) -> LiveFeed:
        self._thread = threading.Thread(target=self._run, name="ksmtrace-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 10)

    def __enter__(self) -> LiveFeed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def watch(self, pid: int | None) -> None:
        """Ask the source for `pid`'s page map from the next tick on (None: stop)."""
        self.watched = pid
        if hasattr(self.source, "watch"):
            self.source.watch = set() if pid is None else {pid}  # rebound, never mutated

    def _run(self) -> None:
        try:
            for snap in self.observed.snapshots(self.interval):
                if self._stop.is_set():
                    return
                self._history.append(snap)
        except BaseException as e:  # shown by the view, which then exits
            self.error = e

    # -------------------------------------------------------------- reading
    def current(self) -> Snapshot | None:
        return self._history[-1] if self._history else None

    def recent(self, n: int = HISTORY) -> list[Snapshot]:
        h = list(self._history)
        return h[-n:]

    def describe(self) -> str:
        return self.kind

    def sharing(self, progress=None, cancel=None):
        """The sharing map's input, read now (slow: every KSM process's page
        map; call it off the UI thread). See sources.counters.sample_sharing."""
        from ksmtrace.sources.counters import sample_sharing

        return sample_sharing(progress=progress, cancel=cancel)


class ReplayFeed:
    """A recording played back: all ticks go through one collector (on a
    thread, so a long recording starts playing at once) and a play clock moves
    through the snapshots at `speed` times the recorded pace."""

    kind = "replay"
    seekable = True
    SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)

    def __init__(self, observed: Observed, speed: float = 1.0, history: int = HISTORY):
        self.observed = observed
        self.source = observed.src
        self.path = str(getattr(self.source.recording, "path", ""))
        self.snapshots: list[Snapshot] = []
        self.loaded = False
        self.error: BaseException | None = None
        self.speed = speed
        self.paused = False
        self.position = 0
        self.watched: int | None = None
        self._history = history
        self._clock = 0.0  # recorded seconds since the first snapshot
        self._last: float | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> ReplayFeed:
        self._thread = threading.Thread(target=self._load, name="ksmtrace-replay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> ReplayFeed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _load(self) -> None:
        try:
            for snap in self.observed.snapshots():
                with self._lock:
                    self.snapshots.append(snap)
        except BaseException as e:
            self.error = e
        finally:
            self.loaded = True

    def wait_loaded(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def watch(self, pid: int | None) -> None:
        self.watched = pid  # recordings hold no page maps; the view says so

    # ------------------------------------------------------------ playback
    def _offset(self, i: int) -> float:
        return self.snapshots[i].wall - self.snapshots[0].wall

    def advance(self, now: float | None = None) -> None:
        """Move the play clock by the real time since the last call, times
        the speed (nothing while paused)."""
        now = time.monotonic() if now is None else now
        last, self._last = self._last, now
        if self.paused or last is None or not self.snapshots:
            return
        self._clock += (now - last) * self.speed
        with self._lock:
            n = len(self.snapshots)
            while self.position + 1 < n and self._offset(self.position + 1) <= self._clock:
                self.position += 1
            if self.position + 1 >= n and self.loaded:
                self._clock = self._offset(self.position)  # hold at the end

    def seek(self, delta: int) -> None:
        """Move by `delta` snapshots (clamped)."""
        self.seek_to(self.position + delta)

    def seek_to(self, index: int) -> None:
        with self._lock:
            if not self.snapshots:
                return
            self.position = max(0, min(index, len(self.snapshots) - 1))
            self._clock = self._offset(self.position)

    def toggle_pause(self) -> bool:
        self.paused = not self.paused
        return self.paused

    def faster(self, up: bool = True) -> float:
        speeds = self.SPEEDS
        i = min(range(len(speeds)), key=lambda j: abs(speeds[j] - self.speed))
        self.speed = speeds[min(i + 1, len(speeds) - 1)] if up else speeds[max(i - 1, 0)]
        return self.speed

    @property
    def at_end(self) -> bool:
        return self.loaded and self.position >= len(self.snapshots) - 1

    # -------------------------------------------------------------- reading
    def current(self) -> Snapshot | None:
        with self._lock:
            return self.snapshots[self.position] if self.snapshots else None

    def recent(self, n: int = HISTORY) -> list[Snapshot]:
        with self._lock:
            return self.snapshots[max(0, self.position + 1 - min(n, self._history)):
                                  self.position + 1]

    def sharing(self, progress=None, cancel=None):
        raise KsmtraceError("recordings hold no page maps, so no sharing map",
                            "run `ksmtrace top` live, as root, to see who shares with whom")

    def describe(self) -> str:
        n = len(self.snapshots)
        state = "paused" if self.paused else f"{self.speed:g}x"
        more = "" if self.loaded else "+"
        return f"replay {self.position + 1}/{n}{more} {state}"
