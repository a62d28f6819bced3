"""Collector throughput and CPU, fed from the recording made on the 6.18 host.

- events/s through the collector with 100-event ticks (the per-tick cost
  dominates small ticks): the collector as it is (a snapshot keeps its tick's
  newest events packed, decoded when a view reads them), interleaved with the
  same collector followed by decoding every event of the snapshot's tail (what
  the collector did on each tick before, and what a view reading all of them
  pays);
- the CPU share of one core used by the collector at a sustained 300k
  events/s: ticks paced at 10 per second (a 0.1 s interval: ten times the
  per-tick work of `top`'s default 1 s) with 30,000 events each, the newest
  200 decoded per tick as the TUI's event log does; process CPU time / wall.

The events are the recording's real events, repeated to the tick size; the
counters and per-process figures are the recording's ticks in turn.
"""

from __future__ import annotations

import dataclasses
import time

try:
    from bench.common import RECORDING, interleaved, median, row, spread
except ImportError:  # run as a file
    from common import RECORDING, interleaved, median, row, spread  # type: ignore[no-redef]

TARGET_RATE = 1_000_000  # events/s, 100-event ticks
TARGET_CPU = 10.0  # % of one core at 300k events/s
SUSTAINED = 300_000


def _ticks():
    from ksmtrace.sources.replay import ReplaySource

    with ReplaySource(RECORDING, warn=None) as src:
        ticks = list(src.ticks())
        meta = (src.kind, src.probes, src.notes, src.cow_estimated)
    return meta, ticks, b"".join(t.events for t in ticks)


def _tiled(blob: bytes, n: int) -> bytes:
    from ksmtrace.model import EVENT_SIZE

    return (blob * (n * EVENT_SIZE // len(blob) + 1))[: n * EVENT_SIZE]


def _rate(meta, ticks, per_tick: int, n_ticks: int, read_all: bool) -> float:
    from ksmtrace.collector import Collector

    blob = _tiled(b"".join(t.events for t in ticks), per_tick)
    feed = [dataclasses.replace(ticks[i % len(ticks)], seq=i + 1, events=blob)
            for i in range(n_ticks)]
    col = Collector(*meta)
    t0 = time.process_time()
    for t in feed:
        s = col.add_tick(t)
        if read_all:
            tuple(s.events)
    return per_tick * n_ticks / (time.process_time() - t0)


def _sustained(meta, ticks, seconds: float, per_s: int = SUSTAINED, hz: int = 10) -> float:
    """% of one core the collector uses at `per_s` events/s in `hz` paced ticks."""
    from ksmtrace.collector import Collector

    per_tick = per_s // hz
    blob = _tiled(b"".join(t.events for t in ticks), per_tick)
    feed = [dataclasses.replace(ticks[i % len(ticks)], seq=i + 1, events=blob)
            for i in range(len(ticks))]
    col = Collector(*meta)
    n = int(seconds * hz)
    start = time.monotonic()
    cpu0 = time.process_time()
    for i in range(n):
        due = start + i / hz
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        s = col.add_tick(feed[i % len(feed)])
        s.events[-200:]  # the event log's read
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu0
    assert wall >= (n - 1) / hz
    return 100.0 * cpu / wall


def run(quick: bool) -> list[dict]:
    meta, ticks, _ = _ticks()
    reps = 3 if quick else 9
    n_ticks = 200 if quick else 3000
    r = interleaved({
        "lazy": lambda: _rate(meta, ticks, 100, n_ticks, read_all=False),
        "eager": lambda: _rate(meta, ticks, 100, n_ticks, read_all=True),
    }, reps)
    lazy, eager = median(r["lazy"]), median(r["eager"])
    cpu = [_sustained(meta, ticks, 1.0 if quick else 5.0) for _ in range(1 if quick else 3)]
    c = median(cpu)
    return [
        row("collector, 100-event ticks", lazy, "events/s", f">= {TARGET_RATE:,} events/s",
            lazy >= TARGET_RATE,
            f"median, {spread(r['lazy'], '{:,.0f}')}; events kept packed until a view reads them"),
        row("collector + decoding every tail event, 100-event ticks", eager, "events/s", None,
            None, f"median, {spread(r['eager'], '{:,.0f}')}; interleaved with the row above; "
            f"{lazy / eager:.1f}x slower: what each tick cost before the lazy tail"),
        row(f"collector CPU at {SUSTAINED // 1000}k events/s", c, "% of a core",
            f"<= {TARGET_CPU:g} %", c <= TARGET_CPU,
            f"median of {len(cpu)} runs ({', '.join(f'{x:.2f}' for x in cpu)}); 10 ticks/s x "
            f"{SUSTAINED // 10:,} events, newest 200 decoded per tick"),
    ]


if __name__ == "__main__":
    for x in run(quick=False):
        print(x)
