"""Memory under process churn (issue #15): thousands of short-lived KSM
processes, each merging and breaking a page, leave the collector's tables
bounded by the live processes plus MAX_EXITED (the COW estimate's included)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ksmtrace.collector import MAX_EXITED, Collector
from ksmtrace.kernel.procfs import KsmStat
from ksmtrace.model import BpfTotals, MmStats, ProcessSample, Snapshot, Tick
from ksmtrace.record import Recording

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "recordings" / \
    "host-6.18-workload.ksmrec"
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

