"""TUI frame time with 1,000 KSM processes (issue #5/#7 target: <= 50 ms).

A frame is what the app does for each new snapshot: every widget of the main
screen updated from the snapshot (four stage panels, sparklines, diagnosis,
status line, the process table rebuilt, sorted and filtered) and the screen
laid out and rendered by Textual's headless driver at 120x40.

The snapshot is a real one, replayed from the recording made on the 6.18 host
(tests/fixtures/recordings/host-6.18-workload.ksmrec), with its three
processes' rows repeated to 1,000 distinct pids: the cost measured is the
drawing, which depends on the number of rows, not on where they came from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from pathlib import Path

RECORDING = (Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "recordings"
             / "host-6.18-workload.ksmrec")
TARGET_MS = 50.0


def _snapshots(processes: int):
    from ksmtrace.feed import ReplayFeed
    from ksmtrace.sources.replay import ReplaySource

    feed = ReplayFeed(ReplaySource(RECORDING, warn=None)).start()
    feed.wait_loaded()
    base = feed.snapshots[5]
    rows = [dataclasses.replace(base.processes[i % len(base.processes)], pid=100000 + i,
                                merging_pages=(i * 37) % 5000, merges_rate=float(i % 13))
            for i in range(processes)]
    return feed, [dataclasses.replace(s, processes=tuple(rows)) for s in feed.snapshots]


async def _measure(frames: int, processes: int) -> list[float]:
    from ksmtrace.tui.app import KsmtraceApp

    feed, snaps = _snapshots(processes)
    feed.paused = True
    app = KsmtraceApp(feed, clock=False, refresh=3600)  # we drive the frames
    times: list[float] = []
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        screen = app.screen
        for i in range(frames + 2):
            snap = snaps[5 + i % 6]
            t0 = time.perf_counter()
            screen.show(snap, snaps[: 6 + i % 6])
            await pilot.pause()  # layout + render of the whole screen
            if i >= 2:  # the first frames build the widgets
                times.append((time.perf_counter() - t0) * 1000)
    return times


def run(quick: bool) -> list[dict]:
    processes = 1000
    times = asyncio.run(_measure(3 if quick else 30, processes))
    med = statistics.median(times)
    return [{
        "name": f"TUI frame, {processes} processes (median of {len(times)})",
        "value": round(med, 1),
        "unit": "ms",
        "target": f"<= {TARGET_MS:g} ms",
        "met": med <= TARGET_MS,
        "note": f"min {min(times):.1f} ms, max {max(times):.1f} ms; headless 120x40",
    }]


if __name__ == "__main__":
    for row in run(quick=False):
        print(row)
