"""Replay: how fast recordings parse (events/s), and replay through the
collector.

Two recordings, parsed in turn within each repetition:
- the real one made on the 6.18 host (tests/fixtures/recordings/
  host-6.18-workload.ksmrec: 25 ticks, 2,691 events, about 100 per tick,
  where the per-tick JSON dominates);
- a burst recording written here from the same ticks with 30,000 of its real
  events per tick (300k events/s at a 0.1 s interval), where the events do.

Parsing is the whole read path: record heads and payload CRCs checked, the
tick JSON decoded into a Tick; events stay the packed bytes the kernel wrote
(decoded only when asked), so they cost their CRC and a slice.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

try:
    from bench.common import RECORDING, interleaved, median, row, spread
except ImportError:  # run as a file
    from common import RECORDING, interleaved, median, row, spread  # type: ignore[no-redef]

TARGET = 1_000_000  # events/s
BURST_PER_TICK = 30_000


def _write_burst(path: Path, ticks: int) -> int:
    from ksmtrace.model import EVENT_SIZE
    from ksmtrace.record import Recorder, Recording

    with Recording(RECORDING, warn=None) as r:
        src = list(r.ticks())
        header = dict(r.header)
    blob = b"".join(t.events for t in src)
    blob = (blob * (BURST_PER_TICK * EVENT_SIZE // len(blob) + 1))[: BURST_PER_TICK * EVENT_SIZE]
    for k in ("format", "ksmtrace"):
        header.pop(k, None)
    with Recorder(path, header) as w:
        for i in range(ticks):
            w.write(dataclasses.replace(src[i % len(src)], seq=i + 1, events=blob))
    return ticks * BURST_PER_TICK


def _parse(path: Path, through_collector: bool = False) -> float:
    from ksmtrace.collector import observe
    from ksmtrace.model import EVENT_SIZE
    from ksmtrace.sources.replay import ReplaySource

    t0 = time.perf_counter()
    n = 0
    with observe(ReplaySource(path, warn=None)) as obs:
        for t in obs.src.ticks():
            n += len(t.events) // EVENT_SIZE
            if through_collector:
                obs.collector.add_tick(t)
    return n / (time.perf_counter() - t0)


def run(quick: bool) -> list[dict]:
    reps = 3 if quick else 9
    with tempfile.TemporaryDirectory(prefix="ksmtrace-bench-") as d:
        burst = Path(d) / "burst.ksmrec"
        events = _write_burst(burst, 5 if quick else 50)
        size = burst.stat().st_size
        loops = 1 if quick else 20  # the fixture is small: parse it several times per sample

        def fixture(col: bool = False) -> float:
            return median([_parse(RECORDING, col) for _ in range(loops)])

        r = interleaved({
            "fixture": fixture,
            "burst": lambda: _parse(burst),
            "fixture+collector": lambda: fixture(True),
            "burst+collector": lambda: _parse(burst, True),
        }, reps)
    rows = []
    for key, what in (("fixture", "real 6.18 recording, ~100 events/tick"),
                      ("burst", f"burst recording, {BURST_PER_TICK:,} events/tick")):
        v = median(r[key])
        rows.append(row(f"replay parse, {what}", v, "events/s", f">= {TARGET:,} events/s",
                        v >= TARGET, f"median, {spread(r[key], '{:,.0f}')}"
                        + (f"; {events:,} events, {size / 1e6:.0f} MB" if key == "burst" else "")))
        c = median(r[key + "+collector"])
        rows.append(row(f"replay through the collector, {what}", c, "events/s", None, None,
                        f"median, {spread(r[key + '+collector'], '{:,.0f}')}"))
    return rows


if __name__ == "__main__":
    for x in run(quick=False):
        print(x)
