"""Memory under process churn (issue #15): thousands of short-lived KSM
processes, each merging and breaking a page, leave the collector's tables
bounded by the live processes plus MAX_EXITED (the COW estimate's included),
and the live source's by the live processes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ksmtrace.collector import MAX_EXITED, Collector
from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel.procfs import KsmStat
from ksmtrace.model import BpfTotals, MmStats, ProcessSample, Snapshot, Tick
from ksmtrace.record import Recording
from ksmtrace.sources.live import KEY_U64, OWNER, LiveSource

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "recordings" / \
    "host-6.18-workload.ksmrec"
FACTS = Path(__file__).resolve().parent.parent / "fixtures" / "facts" / "host-6.18.json"
ALIVE = 20


def churn(col: Collector, processes: int) -> Snapshot:
    """Ticks in which processes start, merge, write (one COW break each,
    counted by cow_ksm and seen as one write fault) and exit, ALIVE at a
    time, as a live source on a tracepoint-only kernel delivers them.
    Returns the last snapshot."""
    with Recording(FIX) as r:
        base = next(iter(r.ticks())).counters
    cow = base.vmstat.cow_ksm or 0
    seq = 0
    stat = KsmStat(ksm_rmap_items=32, ksm_merging_pages=32, ksm_mergeable=True)
    for first in range(0, processes, ALIVE):
        pids = range(1000 + first, 1000 + first + ALIVE)
        mms = {0xFFFF0000_0000 + pid * 64: pid for pid in pids}
        for phase in range(2):  # merged; then each wrote one page and exited
            seq += 1
            if phase:
                cow += ALIVE
            counters = dataclasses.replace(
                base, mono=base.mono + seq, wall=base.wall + seq,
                vmstat=dataclasses.replace(base.vmstat, cow_ksm=cow),
                processes=tuple(ProcessSample(pid, "ksmchurn", "/", stat) for pid in pids)
                if not phase else ())
            st = {mm: MmStats((32, 0, 0), wp_faults=phase) for mm in mms}
            bpf = BpfTotals({}, {}, {}, {} if phase else st, st if phase else {}, mms)
            snap = col.add_tick(Tick(seq, counters, bpf))
    return snap


def test_cow_estimate_tables_stay_bounded_and_the_rows_still_sum():
    col = Collector("live", cow_estimated=True)
    snap = churn(col, 5000)
    bound = MAX_EXITED + ALIVE + 2  # pid 0 and the pool of the forgotten
    assert len(col._procs) <= bound
    assert len(col._wp_total) <= bound, len(col._wp_total)
    assert len(col._cow_given) <= bound, len(col._cow_given)
    assert len(col._mm_seen) == 0 and len(col._owner) == 0
    # the shares of the processes still shown are untouched by the forgetting:
    # each of the one-break processes got exactly its one break
    rows = [r for r in snap.processes if r.pid]
    assert len(rows) == MAX_EXITED and all(r.cow_breaks == 1 for r in rows)
    assert snap.totals["cow_ksm"] == 5000


class _Map:
    def __init__(self):
        self.entries: dict[bytes, bytes] = {}

    def items(self):
        return list(self.entries.items())

    def set(self, key: bytes, value: bytes) -> None:
        pass


class _Loaded:
    """What resolve_owners uses of the loaded programs: the resolver's
    attach and detach, the resolve request map and the owners map, in which
    every pid asked for is found (ksm_enter named it)."""

    def __init__(self):
        self.maps = {"owners": _Map(), "resolve": _Map()}

    def attach(self, name: str) -> None:
        pass

    def detach(self, name: str) -> None:
        pass

    def own(self, pids) -> None:
        self.maps["owners"].entries = {KEY_U64.pack(pid * 64): OWNER.pack(pid, b"ksmchurn")
                                       for pid in pids}


def test_live_source_forgets_the_pids_it_resolved_once_they_are_gone():
    facts = caps.Facts.from_dict(json.loads(FACTS.read_text()))
    src = LiveSource(facts, caps.plan(facts))
    assert "RESOLVER" in src.spec.parts
    src._bpf = loaded = _Loaded()
    for first in range(0, 5000, ALIVE):
        pids = list(range(10**6 + first, 10**6 + first + ALIVE))
        loaded.own(pids)
        src.resolve_owners(pids)  # started since the last tick: resolved, found
        src._owner_pids = set(pids)
        src.resolve_owners(pids)  # the next tick: known
    assert src._resolved == set(pids)
    assert len(src._resolve_tries) == 0
