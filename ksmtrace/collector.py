"""Aggregation: turns the stream of ticks (counter polls, in-kernel
aggregates, raw events) into one immutable Snapshot per interval.

Pure Python, no kernel access, so it runs the same on live data and on a
recording. Memory stays bounded under process churn: per-process state is
kept for live pids plus a bounded set of recently exited ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from ksmtrace.figures import AGGREGATES, COUNTER_SLOTS, RATES, aggregate
from ksmtrace.kernel.identity import Workload, identify
from ksmtrace.kernel.procfs import KsmStat
from ksmtrace.model import (
    EVENT_SIZE,
    CounterSample,
    EventTail,
    MmStats,
    ProbeStatus,
    ProcessRow,
    Snapshot,
    Tick,
)
from ksmtrace.sources import Source

MAX_EXITED = 256  # exited processes kept in the table (most recent)
RETIRED = -1  # the forgotten processes' COW-estimate weights and shares, pooled
EVENT_TAIL = 512  # events kept per snapshot for views (all are recorded)
ALL_EVENTS = None  # event_tail for views that show every event (trace, timeline)


def observe(src: Source, event_tail: int | None = EVENT_TAIL) -> Observed:
    """A source together with its collector: how every command, feed, bench
    and test reads figures. Entering it enters the source (probes attached,
    files opened); leaving it leaves the source on every path."""
    return Observed(src, event_tail)


class Observed:
    def __init__(self, src: Source, event_tail: int | None = EVENT_TAIL):
        self.src = src
        self._event_tail = event_tail
        self._collector: Collector | None = None

    @property
    def collector(self) -> Collector:
        """Made on first use: a live source knows its probes once attached."""
        if self._collector is None:
            self._collector = Collector.for_source(self.src, self._event_tail)
        return self._collector

    def __enter__(self) -> Observed:
        self.src.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.src.__exit__(*exc)

    def sample(self) -> Snapshot:
        """A tick read now, aggregated."""
        return self.collector.add_tick(self.src.tick())

    def snapshots(self, interval: float = 0.0, count: int = 0) -> Iterator[Snapshot]:
        """The source's ticks (see Source.ticks), aggregated one by one."""
        for tick in self.src.ticks(interval, count):
            yield self.collector.add_tick(tick)


def kernel_counter(s: CounterSample, name: str) -> int | None:
    if name == "merged_pages":
        return s.ksm.merged_pages
    if name == "cow_ksm":
        return s.vmstat.cow_ksm
    if name == "ksmd_cpu_ticks":
        return s.ksmd_cpu_ticks
    return getattr(s.ksm, name)


def split_exact(total: int, weights: dict[int, int]) -> dict[int, int]:
    """Split `total` in proportion to `weights` so the parts sum to `total`
    exactly (largest remainder; ties go to the larger weight, then smaller key)."""
    wsum = sum(weights.values())
    if total <= 0 or wsum <= 0:
        return {}
    parts = {k: total * w // wsum for k, w in weights.items()}
    left = total - sum(parts.values())
    order = sorted(weights, key=lambda k: (-(total * weights[k] % wsum), -weights[k], k))
    for k in order[:left]:
        parts[k] += 1
    return {k: v for k, v in parts.items() if v}


@dataclass
class _Proc:
    comm: str = "?"
    cgroup: str = "/"
    merges: int = 0  # successful merges, since start
    cow: int = 0
    merges_prev: int = 0
    cow_prev: int = 0
    alive: bool = True
    stat: KsmStat | None = None  # last ksm_stat seen (kept once the process exits)
    workload: Workload | None = None


UNATTRIBUTED = Workload("process", "(unattributed)")


@dataclass
class _MmState:
    last: MmStats = field(default_factory=MmStats)


class Collector:
    def __init__(self, source: str, probes: tuple[ProbeStatus, ...] = (),
                 notes: tuple[str, ...] = (), cow_estimated: bool = False,
                 event_tail: int | None = EVENT_TAIL):
        self.source = source
        self.event_tail = event_tail
        self.probes = probes
        self.notes = notes
        self.cow_estimated = cow_estimated
        self._first: CounterSample | None = None
        self._prev: Tick | None = None
        self._procs: OrderedDict[int, _Proc] = OrderedDict()
        self._mm_seen: dict[int, MmStats] = {}  # last stats per live mm
        self._owner: dict[int, int] = {}  # mm -> pid, as last known
        self._cow_unattributed = 0
        self._cow_total = 0  # cow_ksm since start (COW estimate)
        self._wp_total: dict[int, int] = {}  # pid -> write-protect faults since start
        self._cow_given: dict[int, int] = {}  # pid -> its share of _cow_total so far

    # ------------------------------------------------------------------
    @classmethod
    def for_source(cls, src: Source, event_tail: int | None = EVENT_TAIL) -> Collector:
        """The collector of a source: its kind, probes, notes and COW estimate."""
        return cls(src.kind, src.probes, src.notes, src.cow_estimated, event_tail)

    def add_tick(self, tick: Tick) -> Snapshot:
        prev, self._prev = self._prev, tick
        c = tick.counters
        if self._first is None:
            self._first = c
        interval = 0.0 if prev is None else c.mono - prev.counters.mono

        totals: dict[str, int] = {}
        deltas: dict[str, int] = {}
        for name in RATES:
            now, first = kernel_counter(c, name), kernel_counter(self._first, name)
            if now is None or first is None:
                continue
            totals[name] = now - first
            before = kernel_counter(prev.counters, name) if prev else None
            if before is not None:
                deltas[name] = now - before

        b = tick.bpf
        if b is not None:
            for name in COUNTER_SLOTS:
                totals[name] = b.counters.get(name, 0)
                if prev is not None and prev.bpf is not None:
                    deltas[name] = totals[name] - prev.bpf.counters.get(name, 0)
            for agg in AGGREGATES:
                totals[agg.name] = aggregate(agg.name, b.counters)
                if prev is not None and prev.bpf is not None:
                    deltas[agg.name] = totals[agg.name] - aggregate(agg.name, prev.bpf.counters)
            self._update_processes(tick, deltas.get("cow_ksm", 0))
        else:
            self._update_processes(tick, 0)

        rates = {k: v / interval for k, v in deltas.items()} if interval > 0 else {}
        lost = 0
        if b is not None:
            lost = b.counters.get("events_lost", 0) + b.perf_lost
        # the newest events for views, decoded (owners resolved) only if a view reads them
        events: EventTail | tuple = ()
        comms: dict[int, str] = {}
        if tick.events:
            raw = tick.events if self.event_tail is None else \
                tick.events[-self.event_tail * EVENT_SIZE:]
            events = EventTail(raw, dict(self._owner))
            comms = self._comms(tick)
        if b is not None:
            for mm in b.exited:  # bounded: an exited mm's owner is resolved no more
                self._owner.pop(mm, None)
        return Snapshot(
            seq=tick.seq,
            wall=c.wall,
            interval=interval,
            source=self.source,
            ksm=c.ksm,
            vmstat=c.vmstat,
            totals=totals,
            rates=rates,
            hist={k: dict(v) for k, v in b.hist.items()} if b else {},
            errors=dict(b.errors) if b else {},
            processes=self._rows(tick, interval),
            probes=self.probes,
            traced=b is not None,
            cow_estimated=self.cow_estimated,
            lost_events=lost,
            events=events,
            notes=self.notes,
            programs=b.programs if b is not None else (),
            page_maps=tick.page_maps,
            mono=c.mono,
            comms=comms,
        )

    # ------------------------------------------------------------------
    def _comms(self, tick: Tick) -> dict[int, str]:
        """pid -> comm of the processes events may belong to: what BPF saw
        for the owners, then what the counter poll read."""
        out = dict(tick.bpf.comms) if tick.bpf is not None else {}
        out.update((pid, p.comm) for pid, p in self._procs.items() if p.comm != "?")
        return out

    def _proc(self, pid: int) -> _Proc:
        p = self._procs.get(pid)
        if p is None:
            p = self._procs[pid] = _Proc()
        return p

    def _update_processes(self, tick: Tick, cow_ksm_delta: int) -> None:
        c = tick.counters
        alive = {ps.pid for ps in c.processes}
        for ps in c.processes:
            p = self._proc(ps.pid)
            if ps.workload is not None:
                p.workload = ps.workload
            elif p.workload is None or (p.comm, p.cgroup) != (ps.comm, ps.cgroup):
                # a recording from before workloads were sampled: the cgroup tells
                p.workload = identify((), ps.cgroup, ps.comm, ps.pid)
            p.comm, p.cgroup, p.alive, p.stat = ps.comm, ps.cgroup, True, ps.stat
        b = tick.bpf
        if b is not None:
            self._owner.update(b.owners)
            for pid, comm in b.comms.items():
                if pid in self._procs and self._procs[pid].comm == "?":
                    self._procs[pid].comm = comm
            wp_delta: dict[int, int] = {}
            for mm, st in list(b.mms.items()) + list(b.exited.items()):
                before = self._mm_seen.get(mm, MmStats())
                pid = self._owner.get(mm, 0)
                dm = sum(st.merges) - sum(before.merges)
                dc = sum(st.cow) - sum(before.cow)
                dw = st.wp_faults - before.wp_faults
                if dm or dc:
                    p = self._proc(pid)
                    if p.comm == "?" and pid in b.comms:
                        p.comm = b.comms[pid]
                    p.merges += dm
                    if not self.cow_estimated:
                        p.cow += dc
                if dw:
                    wp_delta[pid] = wp_delta.get(pid, 0) + dw
                self._mm_seen[mm] = st
            for mm in b.exited:
                self._mm_seen.pop(mm, None)
            if self.cow_estimated:
                # the exact global count, split by write-protect faults. The
                # split is of the totals since start, not of each tick's
                # deltas: the counter poll and the BPF read are not atomic
                # together, so the faults of a write can land a tick before
                # its cow_ksm.
                for pid, n in wp_delta.items():
                    self._wp_total[pid] = self._wp_total.get(pid, 0) + n
                self._cow_total += max(cow_ksm_delta, 0)
                # Breaks while no KSM process has made a write fault yet
                # (unshares by break_ksm, writes through GUP) are pid 0's,
                # "(unattributed)", for good: the rows sum to cow_ksm exactly.
                if not self._wp_total:
                    self._cow_unattributed = self._cow_total
                target = split_exact(self._cow_total - self._cow_unattributed, self._wp_total)
                if self._cow_unattributed:
                    target[0] = target.get(0, 0) + self._cow_unattributed
                for pid in set(target) | set(self._cow_given):
                    d = target.get(pid, 0) - self._cow_given.get(pid, 0)
                    # not a forgotten one
                    if d and (pid in self._procs or pid in wp_delta or pid == 0):
                        self._proc(pid).cow += d
                self._cow_given = target
        # bounded: forget the oldest exited processes beyond MAX_EXITED
        for pid, p in self._procs.items():
            if pid not in alive and pid != 0:
                p.alive = False
        exited = [pid for pid, p in self._procs.items() if not p.alive]
        for pid in exited[: max(0, len(exited) - MAX_EXITED)]:
            del self._procs[pid]
        # the COW estimate's tables too: a forgotten pid's faults and share
        # join one pool, which keeps its weight in the split (the others'
        # shares stay what they were) and is given to no row
        for pid in [pid for pid in self._wp_total.keys() | self._cow_given.keys()
                    if pid > 0 and pid not in self._procs]:
            for table in (self._wp_total, self._cow_given):
                if n := table.pop(pid, 0):
                    table[RETIRED] = table.get(RETIRED, 0) + n

    def _rows(self, tick: Tick, interval: float) -> tuple[ProcessRow, ...]:
        stats = {ps.pid: ps for ps in tick.counters.processes}
        rows = []
        for pid, p in self._procs.items():
            ps = stats.get(pid)
            st = ps.stat if ps else p.stat
            dm, dc = p.merges - p.merges_prev, p.cow - p.cow_prev
            p.merges_prev, p.cow_prev = p.merges, p.cow
            if st is None and not p.merges and not p.cow:
                continue
            rows.append(ProcessRow(
                pid=pid,
                comm=p.comm if pid else "(unattributed)",
                cgroup=p.cgroup,
                mergeable=bool(st and (st.ksm_mergeable or st.ksm_merge_any)),
                merging_pages=st.ksm_merging_pages if st else None,
                zero_pages=st.ksm_zero_pages if st else None,
                rmap_items=st.ksm_rmap_items if st else None,
                profit_bytes=st.ksm_process_profit if st else None,
                merges=p.merges,
                merges_rate=dm / interval if interval > 0 else 0.0,
                cow_breaks=p.cow,
                cow_rate=dc / interval if interval > 0 else 0.0,
                cow_estimated=self.cow_estimated,
                alive=p.alive,
                workload=(p.workload or identify((), p.cgroup, p.comm, pid)) if pid
                else UNATTRIBUTED,
            ))
        rows.sort(key=lambda r: (-(r.merging_pages or 0), -r.merges, r.pid))
        return tuple(rows)

