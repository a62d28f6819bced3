"""The Prometheus side of the exporter: a custom collector over the newest
snapshot, in its own registry.

`publish(snapshot)` (the tick loop's thread) turns the snapshot into metric
families once and swaps them in with one reference assignment; `collect()`
(any number of scrape threads at once) yields the families of the newest
snapshot. A scrape never waits for the kernel, the collector or a lock, and
does no work beyond serialising (and the server keeps each snapshot's
serialised text, so even that happens once per snapshot and format).
"""

from __future__ import annotations

import time

from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.exposition import generate_latest

from ksmtrace.export.encode import Families, openmetrics, plain, text
from ksmtrace.export.metrics import DEFAULT_TOP, families
from ksmtrace.model import Snapshot


class SnapshotCollector:
    def __init__(self, top: int = DEFAULT_TOP):
        self.top = top
        self._current: tuple[int, tuple[Metric, ...]] = (0, ())  # (generation, families)
        self._snapshot: Snapshot | None = None
        self._cycles = 0
        self._last_cycle: float | None = None
        self._sharing: tuple[Metric, ...] = ()  # the newest sharing map's, from its thread

    def set_sharing(self, fams: list[Metric]) -> None:
        """The sharing map's families, served from the next snapshot on (one
        assignment: the sharing thread never waits for the tick loop)."""
        self._sharing = tuple(fams)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def publish(self, snap: Snapshot, started: float | None = None, check: bool = False) -> None:
        """Make `snap` what scrapes see. `started`: perf_counter() when this
        cycle began (before the collector aggregated the tick), so the cycle
        time reported next includes that work. `check`: serialise it once in
        each format first, so that a snapshot built from a bad recording
        raises here (and the previous one stays) rather than in every scrape."""
        t0 = time.perf_counter() if started is None else started
        fams = tuple(families(snap, self.top, self._last_cycle, self._cycles + 1)) \
            + self._sharing
        if check:
            if plain(fams):
                text(fams), openmetrics(fams)
            else:
                generate_latest(Families(fams))
        self._cycles += 1
        # one assignment: a scrape sees the old or the new families, whole
        self._current = (self._cycles, fams)
        self._snapshot = snap
        self._last_cycle = time.perf_counter() - t0

    @property
    def current(self) -> tuple[int, tuple[Metric, ...]]:
        """(generation, families) of the newest snapshot, read atomically."""
        return self._current

    def collect(self):
        return iter(self._current[1])

    def describe(self):
        return ()  # families vary with the kernel and the source: no fixed description


def make_registry(top: int = DEFAULT_TOP) -> tuple[CollectorRegistry, SnapshotCollector]:
    registry = CollectorRegistry(auto_describe=False)
    col = SnapshotCollector(top)
    registry.register(col)
    return registry, col


def scrape(registry: CollectorRegistry) -> bytes:
    """The text exposition of the registry (what GET /metrics returns)."""
    return generate_latest(registry)
