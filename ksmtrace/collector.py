"""Aggregation: turns the stream of counter samples (and, with BPF, events)
into one immutable Snapshot per interval. Pure Python, no kernel access."""

from __future__ import annotations

from ksmtrace.model import RATE_COUNTERS, CounterSample, Snapshot


def _counter(s: CounterSample, name: str) -> int | None:
    if name == "merged_pages":
        return s.ksm.merged_pages
    if name == "cow_ksm":
        return s.vmstat.cow_ksm
    return getattr(s.ksm, name)


class Collector:
    def __init__(self, source: str, notes: tuple[str, ...] = ()):
        self.source = source
        self.notes = notes
        self._prev: CounterSample | None = None

    def add_sample(self, s: CounterSample) -> Snapshot:
        prev, self._prev = self._prev, s
        deltas: dict[str, int] = {}
        rates: dict[str, float] = {}
        interval = 0.0 if prev is None else s.mono - prev.mono
        if prev is not None:
            for name in RATE_COUNTERS:
                now, before = _counter(s, name), _counter(prev, name)
                if now is None or before is None:
                    continue
                deltas[name] = now - before
                if interval > 0:
                    rates[name] = deltas[name] / interval
        return Snapshot(
            s.wall, interval, self.source, s.ksm, s.vmstat, deltas, rates, s.processes, self.notes
        )
