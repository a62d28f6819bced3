"""Counter polling: KSM sysfs, /proc/vmstat and per-process ksm_stat.

Needs no BPF and no root (ksm_stat of other users' processes needs root;
those processes are then missing, and the snapshot says so). It is also the
part of the live source that samples counters each interval.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ksmtrace.kernel import identity, procfs, sysfs
from ksmtrace.model import CounterSample, ProcessSample, Tick

Identities = dict[tuple[int, str, str], identity.Workload]
# (pid, comm, cgroup) -> workload, for the processes of the tick loop's last
# sample: a process's cmdline is read once, not every interval. A pid reused
# by another program changes comm or cgroup, or both, and is read again.
_identities: Identities = {}


def _workloads(procs: list[ProcessSample], root: str | os.PathLike,
               known: Identities) -> tuple[list[ProcessSample], Identities]:
    """The samples with their workloads, and the cache for the next sample."""
    out, now = [], {}
    for p in procs:
        key = (p.pid, p.comm, p.cgroup)
        w = known.get(key)
        if w is None:
            # gone since its ksm_stat was read: named from its cgroup, like the rest
            cmdline = procfs.read_cmdline(p.pid, root) or b""
            w = identity.identify(cmdline, p.cgroup, p.comm, p.pid)
        now[key] = w
        out.append(ProcessSample(p.pid, p.comm, p.cgroup, p.stat, w))
    return out, now


def sample(
    root: str | os.PathLike = "/", pids: list[int] | None = None, all_processes: bool = True,
    own_identities: bool = False,
) -> CounterSample:
    """Read the counters once. `pids` limits the per-process part to those
    pids. `own_identities`: read every workload afresh, leaving the tick
    loop's cache alone (for a reader on another thread)."""
    global _identities
    mono, wall = time.monotonic(), time.time()
    ksm = sysfs.read_sysfs(root)
    vm = procfs.read_ksm_vmstat(root)
    procs: list[ProcessSample] = []
    if pids is not None:
        for pid in pids:
            st = procfs.read_ksm_stat(pid, root)
            if st is None:
                continue  # exited mid-sample: expected
            procs.append(
                ProcessSample(
                    pid,
                    procfs.read_comm(pid, root) or "?",
                    procfs.read_cgroup(pid, root) or "/",
                    st,
                )
            )
    elif all_processes:
        procs = [ProcessSample(p.pid, p.comm, p.cgroup, p.stat) for p in procfs.ksm_processes(root)]
    if own_identities:
        procs, _ = _workloads(procs, root, {})
    else:
        procs, _identities = _workloads(procs, root, _identities)
    return CounterSample(mono, wall, ksm, vm, tuple(procs), _ksmd_cpu(root))


_ksmd: dict[str, int | None] = {}


def _ksmd_cpu(root: str | os.PathLike) -> int | None:
    key = os.fspath(root)
    if key not in _ksmd:
        _ksmd[key] = procfs.find_ksmd(root)
    pid = _ksmd[key]
    return None if pid is None else procfs.read_cpu_ticks(pid, root)


def read_page_maps(pids, root: str | os.PathLike = "/") -> dict:
    """Page maps of the watched processes (pid -> PageMap), or a one-line
    reason per pid when its map cannot be read (not root, exited)."""
    from ksmtrace.errors import KsmtraceError
    from ksmtrace.kernel import pagemap

    out: dict = {}
    for pid in sorted(pids):
        try:
            out[pid] = pagemap.read_page_map(pid, root=root)
        except KsmtraceError as e:
            out[pid] = e.message
        except OSError as e:  # vanished between reads of its files
            out[pid] = f"process {pid}: {e.strerror or e}"
    return out


@dataclass(frozen=True)
class SharingSample:
    """What the sharing map is built from: every KSM process, the KSM frame
    of each of its KSM pages (sharing.ksm_pfns; the rest of its page map is
    not kept), why a process could not be read, and the host's figures to
    compare with."""

    processes: tuple[ProcessSample, ...]
    pfns: dict[int, Any]  # pid -> numpy array of frames
    unread: dict[int, str]  # pid -> why its map was not read
    ksm: sysfs.KsmSysfs
    mem_available: int | None  # bytes, /proc/meminfo
    inferred: bool  # KSM pages inferred: this kernel's KPF_KSM is wrong
    seconds: float  # how long the reading took


class SharingCancelled(Exception):
    """`cancel` was set while the sharing map was being read."""


def sample_sharing(root: str | os.PathLike = "/",
                   progress: Callable[[int, int], None] | None = None,
                   cancel: Any = None) -> SharingSample:
    """Read every KSM process's page map, one after the other, keeping only
    its KSM frames. `progress(done, total)` after each; `cancel` (an
    Event) is checked between maps (SharingCancelled). Root needed: NotRoot
    otherwise, from the first map."""
    from ksmtrace.errors import NoProcess
    from ksmtrace.kernel import pagemap
    from ksmtrace.sharing import ksm_pfns

    t0 = time.monotonic()
    procs = sample(root, own_identities=True).processes
    pfns: dict[int, Any] = {}
    unread: dict[int, str] = {}
    inferred = False
    for i, p in enumerate(procs):
        if cancel is not None and cancel.is_set():
            raise SharingCancelled
        try:
            m = pagemap.read_page_map(p.pid, root=root)
        except NoProcess as e:
            unread[p.pid] = e.message  # exited meanwhile: expected
        except OSError as e:
            unread[p.pid] = f"process {p.pid}: {e.strerror or e}"
        else:
            pfns[p.pid] = ksm_pfns(m)
            inferred |= m.ksm_inferred
        if progress is not None:
            progress(i + 1, len(procs))
    return SharingSample(procs, pfns, unread, sysfs.read_sysfs(root),
                         procfs.read_mem_available(root), inferred, time.monotonic() - t0)


SYSFS_ONLY_NOTES = (
    "sysfs-only: no BPF; figures are the kernel's counters polled each interval",
    "not seen: individual merges (kinds, errno, pfn), merge latency, scan-round "
    "durations, per-process merges and COW breaks, unmerges",
)


class SysfsSource:
    """Counter polling as a source: works without root and without BPF."""

    kind = "sysfs-only"
    probes: tuple = ()
    cow_estimated = False
    notes = SYSFS_ONLY_NOTES

    def __init__(self, root: str | os.PathLike = "/", pids: list[int] | None = None):
        self.root = root
        self.pids = pids
        self.watch: set[int] = set()  # pids whose page map each tick carries
        self._seq = 0
        if os.geteuid() != 0:
            self.notes = self.notes + (
                "not root: ksm_stat of other users' processes is not readable",)

    def __enter__(self) -> SysfsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def tick(self) -> Tick:
        self._seq += 1
        return Tick(self._seq, sample(self.root, pids=self.pids),
                    page_maps=read_page_maps(self.watch, self.root) if self.watch else {})

    def ticks(self, interval: float, count: int = 0) -> Iterator[Tick]:
        return paced(self.tick, time.sleep, interval, count)


def paced(tick: Callable[[], Tick], wait: Callable[[float], None], interval: float,
          count: int = 0, full: Callable[[], bool] | None = None) -> Iterator[Tick]:
    """A tick at once, then one every `interval` seconds on a fixed grid (no
    drift), `count` of them (0: forever). `wait(s)` may return early.

    `full()`, asked after every wait: true when what the next tick would
    carry has reached its bound; a tick is then taken at once, in between,
    counted in neither `count` nor the grid (so a tick's size stays bounded
    whatever the interval)."""
    yield tick()
    n = 0
    deadline = time.monotonic()
    while not count or n < count:
        deadline += interval
        while (left := deadline - time.monotonic()) > 0:
            wait(min(left, 0.1))
            if full is not None and full():
                yield tick()
        yield tick()
        n += 1
