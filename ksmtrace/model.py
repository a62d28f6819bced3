"""The vocabulary every layer shares: counter samples going in, immutable
snapshots coming out. Views read snapshots only; they never touch the kernel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ksmtrace.kernel.procfs import KsmStat, KsmVmstat
from ksmtrace.kernel.sysfs import KsmSysfs

PAGE_SIZE = 4096


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    comm: str
    cgroup: str
    stat: KsmStat


@dataclass(frozen=True)
class CounterSample:
    """One poll of the kernel's own counters (sysfs, vmstat, ksm_stat)."""

    mono: float  # time.monotonic() of the poll
    wall: float  # time.time() of the poll
    ksm: KsmSysfs
    vmstat: KsmVmstat
    processes: tuple[ProcessSample, ...] = ()


# Counters whose per-interval change is shown as a rate, with the KSM name
# each is shown under. Values are read from KsmSysfs / KsmVmstat.
RATE_COUNTERS = {
    "pages_scanned": "scanned",
    "pages_skipped": "skipped",
    "full_scans": "scan_rounds",
    "merged_pages": "merged",  # pages_shared + pages_sharing
    "ksm_zero_pages": "zero_merged",
    "cow_ksm": "cow_breaks",
}


@dataclass(frozen=True)
class Snapshot:
    """What the kernel showed over one interval, as immutable data."""

    wall: float
    interval: float  # seconds since the previous snapshot (0 for the first)
    source: str  # "live", "sysfs-only", "replay"
    ksm: KsmSysfs
    vmstat: KsmVmstat
    deltas: dict[str, int] = field(default_factory=dict)  # RATE_COUNTERS changes
    rates: dict[str, float] = field(default_factory=dict)  # deltas / interval
    processes: tuple[ProcessSample, ...] = ()
    notes: tuple[str, ...] = ()  # what this source cannot see, and why

    @property
    def saved_bytes(self) -> int:
        return self.ksm.saved_pages * PAGE_SIZE

    def as_dict(self) -> dict:
        d = asdict(self)
        d["saved_bytes"] = self.saved_bytes
        d["ksm"] = self.ksm.as_dict()
        return d
