"""The vocabulary every layer shares.

Going in: `Tick`s, one per interval, each holding a poll of the kernel's own
counters (`CounterSample`), the in-kernel aggregates read from BPF maps
(`BpfTotals`, monotonic since load) and the raw per-event records drained in
that interval (packed `struct ksm_event`, see bpf/ksmtrace.h). A recording is
the sequence of ticks, so replay feeds the collector exactly what live did.

Coming out: an immutable `Snapshot` per interval. Views read snapshots only.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum, IntEnum
from typing import TYPE_CHECKING

from ksmtrace.figures import FIGURES, cow_kind, errno_name, merge_kind_text
from ksmtrace.kernel.identity import Workload
from ksmtrace.kernel.procfs import PAGE_SIZE, KsmStat, KsmVmstat
from ksmtrace.kernel.sysfs import KsmSysfs

if TYPE_CHECKING:  # numpy, only where page maps are read
    from ksmtrace.kernel.pagemap import PageMap


class PageState(Enum):
    """What a page of a process's page map is (kernel/pagemap.py reads them;
    here so that views name the states without importing the reader)."""

    KSM = "ksm"  # mapped to a KSM (stable tree) page
    ZERO = "zero"  # the shared zero page (KSM's use_zero_pages, or never written)
    PRESENT = "present"  # an ordinary resident page (THP included)
    ABSENT = "absent"  # not resident: never touched, or swapped out

# --------------------------------------------------------------------------
# Events: mirrors of bpf/ksmtrace.h


class EventKind(IntEnum):
    SCAN_START = 1
    SCAN_STOP = 2
    MERGE = 3
    REMOVE_KSM_PAGE = 4
    REMOVE_RMAP_ITEM = 5
    KSM_ENTER = 6
    KSM_EXIT = 7
    COW = 8
    WP_FAULT = 9
    ADVISOR = 10
    UNSHARE = 11


EVENT_STAGE = {
    EventKind.SCAN_START: "searching",
    EventKind.SCAN_STOP: "searching",
    EventKind.ADVISOR: "searching",
    EventKind.MERGE: "merging",
    EventKind.KSM_ENTER: "counting",
    EventKind.KSM_EXIT: "counting",
    EventKind.REMOVE_KSM_PAGE: "updating",
    EventKind.REMOVE_RMAP_ITEM: "updating",
    EventKind.COW: "updating",
    EventKind.WP_FAULT: "updating",
    EventKind.UNSHARE: "updating",
}


# struct ksm_event, little-endian (x86_64 and arm64 hosts): (field, format),
# in bpf/ksmtrace.h order. The one Python description of the layout.
EVENT_FIELDS = (("ts_ns", "Q"), ("mm", "Q"), ("pfn", "Q"), ("value", "Q"), ("aux", "Q"),
                ("pid", "I"), ("tid", "I"), ("err", "i"), ("kind", "H"), ("sub", "H"),
                ("comm", "16s"))
EVENT_STRUCT = struct.Struct("<" + "".join(f for _, f in EVENT_FIELDS))
EVENT_SIZE = EVENT_STRUCT.size
EVENT_OFFSETS = {name: struct.calcsize("<" + "".join(f for _, f in EVENT_FIELDS[:i]))
                 for i, (name, _) in enumerate(EVENT_FIELDS)}
assert EVENT_SIZE == 72 and EVENT_OFFSETS["kind"] == 52


@dataclass(frozen=True, slots=True)
class Event:
    ts_ns: int
    mm: int
    pfn: int
    value: int
    aux: int
    pid: int
    tid: int
    err: int
    kind: int
    sub: int
    comm: str

    @classmethod
    def unpack(cls, raw: bytes | memoryview, offset: int = 0) -> Event:
        t = EVENT_STRUCT.unpack_from(raw, offset)
        return cls(*t[:10], t[10].split(b"\0", 1)[0].decode("utf-8", "replace"))

    @property
    def stage(self) -> str:
        return EVENT_STAGE.get(EventKind(self.kind), "?")

    @property
    def scan_seq(self) -> int:
        return self.aux & 0xFFFFFFFF

    @property
    def rmap_entries(self) -> int:
        return self.aux >> 32

    @property
    def name(self) -> str:
        """The event's name in every view (trace, event log, timeline)."""
        return EVENT_NAMES.get(self.kind, str(self.kind))

    def describe(self) -> str:
        """What the event says, in words: the one rendering every view uses."""
        k = self.kind
        if k == EventKind.MERGE:
            lat = f" {self.value / 1000:.1f}us" if self.value else ""
            return (f"{merge_kind_text(self.sub)} pfn={self.pfn:#x} {errno_name(self.err)}"
                    f"{lat}")
        if k in (EventKind.SCAN_START, EventKind.SCAN_STOP):
            took = f" took {self.value / 1e6:.3f}ms" if k == EventKind.SCAN_STOP and \
                self.value else ""
            return f"round {self.scan_seq} rmap_entries={self.rmap_entries}{took}"
        if k == EventKind.COW:
            return f"{cow_kind(self.sub)} pfn={self.pfn:#x} {self.value / 1000:.1f}us"
        if k in (EventKind.REMOVE_KSM_PAGE, EventKind.REMOVE_RMAP_ITEM):
            return f"pfn={self.pfn:#x}"
        if k == EventKind.UNSHARE:
            return f"break_ksm {errno_name(self.err)} {self.value / 1000:.1f}us"
        if k == EventKind.WP_FAULT:
            return f"write-protect fault at {self.aux:#x} (COW estimate basis)"
        if k == EventKind.ADVISOR:
            return f"scan_time={self.value} pages_to_scan={self.aux} cpu={self.sub}%"
        return f"mm={self.mm:#x}"


EVENT_NAMES = {
    EventKind.SCAN_START: "scan_start",
    EventKind.SCAN_STOP: "scan_stop",
    EventKind.MERGE: "merge",
    EventKind.REMOVE_KSM_PAGE: "remove_ksm_page",
    EventKind.REMOVE_RMAP_ITEM: "remove_rmap_item",
    EventKind.KSM_ENTER: "ksm_enter",
    EventKind.KSM_EXIT: "ksm_exit",
    EventKind.COW: "cow_break",
    EventKind.WP_FAULT: "wp_fault",
    EventKind.ADVISOR: "advisor",
    EventKind.UNSHARE: "unshare",
}


def iter_events(blob: bytes | memoryview, owners: Mapping[int, int] | None = None):
    """Decode a packed run of events (fast path: struct.iter_unpack). With
    `owners` (mm -> pid), an event whose owner BPF did not know gets the pid
    of its mm's owner."""
    for t in EVENT_STRUCT.iter_unpack(blob):
        pid = t[5] or (owners.get(t[1], 0) if owners else 0)
        yield Event(*t[:5], pid, *t[6:10], t[10].split(b"\0", 1)[0].decode("utf-8", "replace"))


class EventTail(Sequence[Event]):
    """A snapshot's newest events, kept packed (struct ksm_event) and decoded
    on first use: most snapshots are never looked at event by event, and
    decoding is what a tick of the collector would otherwise spend most of
    its time on (bench/collector.py). Immutable, compares like a tuple."""

    __slots__ = ("_raw", "_owners", "_decoded")

    def __init__(self, raw: bytes = b"", owners: Mapping[int, int] | None = None):
        if len(raw) % EVENT_SIZE:
            raise ValueError(f"{len(raw)} bytes is not a whole number of events")
        self._raw = bytes(raw)
        self._owners = owners  # mm -> pid when the events were collected
        self._decoded: tuple[Event, ...] | None = None

    @property
    def raw(self) -> bytes:
        return self._raw

    def _all(self) -> tuple[Event, ...]:
        if self._decoded is None:
            self._decoded = tuple(iter_events(self._raw, self._owners))
        return self._decoded

    def __len__(self) -> int:
        return len(self._raw) // EVENT_SIZE

    def __bool__(self) -> bool:
        return bool(self._raw)

    def __getitem__(self, i):  # type: ignore[override]
        return self._all()[i]

    def __iter__(self) -> Iterator[Event]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EventTail):
            return self._raw == other._raw
        if isinstance(other, tuple):
            return self._all() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"EventTail({len(self)} events)"

    def __deepcopy__(self, memo: dict) -> EventTail:
        return self  # immutable


# --------------------------------------------------------------------------
# Ticks: what a source delivers each interval


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    comm: str
    cgroup: str
    stat: KsmStat
    # the VM, container or service it belongs to; None in recordings made
    # before it was sampled (the collector then names it from the cgroup)
    workload: Workload | None = None


@dataclass(frozen=True)
class CounterSample:
    """One poll of the kernel's own counters (sysfs, vmstat, ksm_stat)."""

    mono: float  # time.monotonic() of the poll
    wall: float  # time.time() of the poll
    ksm: KsmSysfs
    vmstat: KsmVmstat
    processes: tuple[ProcessSample, ...] = ()
    ksmd_cpu_ticks: int | None = None  # ksmd's utime+stime (USER_HZ ticks); None: unknown


@dataclass(frozen=True)
class MmStats:
    """struct mm_stats: one mm's figures since it was first seen (monotonic)."""

    merges: tuple[int, int, int] = (0, 0, 0)  # by MergeKind
    merge_failures: int = 0
    cow: tuple[int, int] = (0, 0)  # by CowKind
    wp_faults: int = 0
    unshares: int = 0
    rmap_removed: int = 0


@dataclass(frozen=True)
class ProgramCost:
    """ksmtrace's own cost: one of its BPF programs, as the kernel's BPF
    run-time statistics count it (kernel.bpf_stats_enabled, on only while
    ksmtrace runs). Cumulative since the program was loaded."""

    name: str
    run_time_ns: int
    run_count: int


@dataclass(frozen=True)
class BpfTotals:
    """In-kernel aggregates, monotonic since the programs were loaded."""

    counters: dict[str, int]
    hist: dict[str, dict[int, int]]  # histogram -> log2(ns) slot -> count
    errors: dict[str, int]  # "<merge kind>:<errno>" -> failures
    mms: dict[int, MmStats]  # mm -> stats, for mms still alive at the read
    exited: dict[int, MmStats]  # mm -> final stats of mms drained this tick
    owners: dict[int, int]  # mm -> pid
    perf_lost: int = 0  # perf buffer's own lost-sample count
    comms: dict[int, str] = field(default_factory=dict)  # pid -> comm, when BPF saw it
    programs: tuple[ProgramCost, ...] = ()  # our own programs' run time (BPF stats)


@dataclass(frozen=True)
class ProbeStatus:
    probe: str
    stage: str
    method: str | None
    targets: tuple[str, ...]
    attached: bool
    estimated: bool
    error: str | None = None


@dataclass(frozen=True)
class Tick:
    seq: int
    counters: CounterSample
    bpf: BpfTotals | None = None
    events: bytes = b""  # packed struct ksm_event, EVENT_SIZE each
    # Page maps of the processes a view asked the source to watch (pid ->
    # map, or why it could not be read). Live only; not recorded.
    page_maps: dict[int, PageMap | str] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Snapshots: what views read


@dataclass(frozen=True)
class ProcessRow:
    pid: int
    comm: str
    cgroup: str
    mergeable: bool
    merging_pages: int | None  # ksm_stat ksm_merging_pages
    zero_pages: int | None
    rmap_items: int | None
    profit_bytes: int | None
    merges: int  # traced successful merges, since start
    merges_rate: float
    cow_breaks: int  # since start (estimated on tracepoint-only kernels)
    cow_rate: float
    cow_estimated: bool
    alive: bool = True  # False: exited (kept with its last figures, bounded)
    workload: Workload | None = None  # None only for rows built by hand (tests)


@dataclass(frozen=True)
class Snapshot:
    """What the kernel showed over one interval, as immutable data.

    `totals` are since the source started (sysfs/vmstat figures as the change
    since the first tick, BPF figures since the programs were loaded);
    `rates` are per second over this interval. Both are keyed by the
    figure names of ksmtrace.figures; `observed(name)` says whether a figure
    was observed at all (a missing figure is not a zero).
    """

    seq: int
    wall: float
    interval: float  # seconds since the previous snapshot (0 for the first)
    source: str  # "live", "sysfs-only", "replay"
    ksm: KsmSysfs
    vmstat: KsmVmstat
    totals: dict[str, int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    hist: dict[str, dict[int, int]] = field(default_factory=dict)  # since start
    errors: dict[str, int] = field(default_factory=dict)  # "kind:errno" -> count
    processes: tuple[ProcessRow, ...] = ()
    probes: tuple[ProbeStatus, ...] = ()
    traced: bool = False  # BPF figures present (live or replay of live)
    cow_estimated: bool = False  # per-process COW split from cow_ksm by wp faults
    lost_events: int = 0
    events: Sequence[Event] = ()  # this interval's events (bounded tail; EventTail: lazy)
    notes: tuple[str, ...] = ()  # what this source cannot see, and why
    programs: tuple[ProgramCost, ...] = ()  # ksmtrace's own BPF cost, since load
    page_maps: dict[int, PageMap | str] = field(default_factory=dict)  # see Tick
    mono: float = 0.0  # time.monotonic() of the poll: the events' clock (CLOCK_MONOTONIC)
    comms: Mapping[int, str] = field(default_factory=dict)  # pid -> comm of event owners

    def observed(self, name: str) -> bool:
        """Whether figure `name` was observed here: a kernel figure this
        kernel has, or a traced one whose probe is attached with a method
        that produces it. The only answer to "is this figure traced here?"."""
        f = FIGURES[name]
        if f.source != "bpf":
            if name.startswith("process_"):  # a ProcessRow field, read from procfs
                return any(getattr(r, name[8:]) is not None for r in self.processes)
            return name in self.totals or getattr(self.ksm, name, None) is not None
        if not self.traced:
            return False
        if f.probe is None:  # ksmtrace's own figures: there whenever BPF is
            return True
        p = next((p for p in self.probes if p.probe == f.probe), None)
        return p is not None and p.attached and p.method in f.methods

    def comm_of(self, pid: int) -> str:
        return self.comms.get(pid, "?")

    @property
    def saved_bytes(self) -> int:
        return self.ksm.saved_pages * PAGE_SIZE

    @property
    def missed_probes(self) -> tuple[ProbeStatus, ...]:
        return tuple(p for p in self.probes if not p.attached)

    def as_dict(self) -> dict:
        d = asdict(replace(self, page_maps={}, comms={}))
        del d["comms"]
        d["saved_bytes"] = self.saved_bytes
        d["ksm"] = self.ksm.as_dict()
        d["events"] = [asdict(e) for e in self.events]
        return d
