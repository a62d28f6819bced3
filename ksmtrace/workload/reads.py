"""What the workload reads from the kernel: global deltas, each child's
ksm_stat, ksmd's scan progress, and other KSM users that would spoil them."""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ksmtrace.kernel import procfs
from ksmtrace.kernel.sysfs import KsmSysfs
from ksmtrace.workload.model import Expectation

# ---------------------------------------------------------------------------
# Reading the kernel
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """What the kernel shows: global deltas from the baseline, per-child
    absolute ksm_stat values (None for a child that is gone)."""

    pages_shared: int
    pages_sharing: int
    ksm_zero_pages: int | None  # None: the kernel has no such counter (< 6.10)
    full_scans: int
    cow_ksm: int
    merging_pages: tuple[int | None, ...]
    zero_pages: tuple[int | None, ...]
    run: int | None

    def matches_global(self, e: Expectation) -> bool:
        return (self.pages_shared, self.pages_sharing) == (
            e.pages_shared,
            e.pages_sharing,
        ) and self.ksm_zero_pages in (None, e.ksm_zero_pages)

    def matches_own(self, e: Expectation) -> bool:
        """The children's own ksm_stat figures, which nobody else can move.
        A kernel without a per-process zero-page count (< 6.10: None while the
        child lives) is not held to one."""
        zero = all(m is None or m == x for m, x in zip(self.zero_pages, e.zero_pages,
                                                       strict=True))
        return self.merging_pages == e.merging_pages and zero

    def matches(self, e: Expectation) -> bool:
        return self.matches_global(e) and self.matches_own(e)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Baseline:
    sysfs: KsmSysfs
    cow_ksm: int


class ScanClock:
    """Whether ksmd is still working. With no mm on its list ksmd sleeps and
    full_scans stops (measured: after every child's PR_SET_MEMORY_MERGE 0,
    or at start with nothing registered), so "two more full scans" never
    comes; nothing can change the figures then either. Idle = neither
    full_scans nor pages_scanned moved for many of ksmd's sleep periods."""

    def __init__(self, s: KsmSysfs):
        self._key = (s.full_scans, s.pages_scanned)
        self._changed = time.monotonic()
        self._idle_after = max(1.0, 50 * (s.sleep_millisecs or 0) / 1000)

    def update(self, s: KsmSysfs) -> None:
        key = (s.full_scans, s.pages_scanned)
        if key != self._key:
            self._key, self._changed = key, time.monotonic()

    def idle(self) -> bool:
        return time.monotonic() - self._changed >= self._idle_after


def read_cow_ksm(root: str | os.PathLike) -> int:
    return procfs.read_vmstat(root).get("cow_ksm", 0)


@dataclass(frozen=True)
class KsmUser:
    """Another process known to KSM: its merging moves the same global
    counters (pages_shared, pages_sharing, ksm_zero_pages, cow_ksm)."""

    pid: int
    comm: str
    rmap_items: int
    merging_pages: int
    zero_pages: int

    def __str__(self) -> str:
        return (
            f"{self.comm} (pid {self.pid}: {self.rmap_items} rmap items, "
            f"{self.merging_pages} merged, {self.zero_pages} zero pages)"
        )


def other_ksm_users(exclude: Collection[int] = (), root: str | os.PathLike = "/") -> list[KsmUser]:
    """Processes other than `exclude` that registered memory with KSM or
    have pages merged (QEMU does by default: mem-merge=on). Exact global
    deltas need none of them to be merging or breaking pages meanwhile."""
    users = []
    proc = Path(root) / "proc"
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) in exclude or int(entry) == os.getpid():
            continue
        st = procfs.read_ksm_stat(int(entry), root)
        if st is None or not st.known_to_ksm:
            continue
        try:
            comm = (proc / entry / "comm").read_text().strip()
        except OSError:
            continue  # exited meanwhile
        users.append(
            KsmUser(
                int(entry),
                comm,
                st.ksm_rmap_items or 0,
                st.ksm_merging_pages or 0,
                max(st.ksm_zero_pages or 0, 0),
            )
        )
    return users

def signed(v: int | None) -> str:
    return "n/a" if v is None else f"{v:+d}"
