"""The collector's lazy event tail (the fix measured by bench/collector.py):
a snapshot carries the newest EVENT_TAIL events of its tick, packed, and
decodes them only when a view reads them; what a view reads is exactly what
decoding the whole tick and keeping its end would give."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from ksmtrace.collector import EVENT_TAIL, observe
from ksmtrace.model import EVENT_SIZE, EventTail, ProgramCost, iter_events
from ksmtrace.sources.replay import ReplaySource

RECORDING = Path(__file__).parent.parent / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"


def _ticks():
    with ReplaySource(RECORDING, warn=None) as src:
        return src, list(src.ticks())


def test_snapshot_events_are_the_ticks_newest_events_decoded_on_demand():
    src, ticks = _ticks()
    blob = b"".join(t.events for t in ticks)  # 2,691 real events
    assert len(blob) // EVENT_SIZE > EVENT_TAIL
    col = observe(src).collector
    snap = col.add_tick(dataclasses.replace(ticks[0], events=blob))
    assert isinstance(snap.events, EventTail)
    assert snap.events._decoded is None  # nothing decoded until asked
    expected = tuple(iter_events(blob))[-EVENT_TAIL:]
    assert len(snap.events) == EVENT_TAIL
    assert snap.events[-1] == expected[-1]
    assert tuple(snap.events[-200:]) == expected[-200:]
    assert list(snap.events) == list(expected)
    assert snap.events == expected
    assert snap.as_dict()["events"][0]["ts_ns"] == expected[0].ts_ns
    assert copy.deepcopy(snap).events == snap.events


def test_empty_and_partial_tails():
    assert not EventTail(b"") and len(EventTail(b"")) == 0
    with pytest.raises(ValueError):
        EventTail(b"x" * (EVENT_SIZE - 1))
    src, ticks = _ticks()
    col = observe(src).collector
    snap = col.add_tick(dataclasses.replace(ticks[0], events=b""))
    assert snap.events == () and not snap.events


def test_program_costs_ride_the_tick_into_the_snapshot():
    src, ticks = _ticks()
    col = observe(src).collector
    cost = (ProgramCost("merge", 1234, 5),)
    t = ticks[1]
    snap = col.add_tick(dataclasses.replace(t, bpf=dataclasses.replace(t.bpf, programs=cost)))
    assert snap.programs == cost
