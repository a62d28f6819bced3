"""counters.paced: ticks on a fixed grid, and early ticks when what the next
tick would carry reaches its bound (a live source's pending events), which
count neither towards `count` nor move the grid. Pure logic: the clock is
fake, `wait` advances it, and nothing sleeps."""

from __future__ import annotations

import itertools

import pytest

from ksmtrace.sources import counters


@pytest.fixture
def src(monkeypatch):
    """A fake source: one event arrives per wait; a tick takes them all."""
    clock = [0.0]
    pending: list[float] = []
    taken: list[list[float]] = []

    def tick():
        taken.append(list(pending))
        pending.clear()
        return clock[0]

    def wait(s: float) -> None:
        clock[0] = round(clock[0] + s, 9)
        pending.append(clock[0])

    monkeypatch.setattr(counters.time, "monotonic", lambda: clock[0])
    return pending, taken, tick, wait


def test_ticks_follow_the_grid(src):
    pending, taken, tick, wait = src
    assert list(counters.paced(tick, wait, 0.5, count=3)) == [0.0, 0.5, 1.0, 1.5]
    assert [len(t) for t in taken] == [0, 5, 5, 5]  # waits of at most 0.1 s


def test_a_full_tick_comes_early_off_the_grid_and_uncounted(src):
    pending, taken, tick, wait = src
    times = list(counters.paced(tick, wait, 0.5, count=2, full=lambda: len(pending) >= 2))
    # per interval: two early ticks of 2 events, then the grid's with the 1 left
    assert times == [0.0, 0.2, 0.4, 0.5, 0.7, 0.9, 1.0]
    assert [len(t) for t in taken] == [0, 2, 2, 1, 2, 2, 1]


def test_an_hour_long_interval_still_gives_bounded_ticks(src):
    pending, taken, tick, wait = src
    ticks = counters.paced(tick, wait, 3600.0, full=lambda: len(pending) >= 3)
    assert len(list(itertools.islice(ticks, 5))) == 5
    assert [len(t) for t in taken] == [0, 3, 3, 3, 3]
