"""KSM workload generator: child processes full of duplicate pages, and the
exact figures the kernel should show for them.

N child processes each map M pages cycling through D distinct contents (plus
optional unique pages and zero pages), register them with KSM
(`madvise(MADV_MERGEABLE)` or `prctl(PR_SET_MEMORY_MERGE)`), and on command
write to merged pages (copy-on-write breaks), put the original contents back
(re-merge) or unmerge. `expect()` predicts, as a pure function, what
/sys/kernel/mm/ksm, /proc/<pid>/ksm_stat and /proc/vmstat `cow_ksm` must then
show; `Workload` runs it, optionally drives ksmd fast (restoring every knob on
every exit path) and waits until the kernel agrees. Used by the demo, the
kernel-tier tests and benchmarks, and as `ksmtrace workload`.

What the model encodes was measured on 6.18 (see `expect()`); children are
started as `python -m ksmtrace.workload --child` and driven over pipes.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import math
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ksmtrace.errors import Exit, KsmtraceError, NoKsm, no_ksm, not_root
from ksmtrace.kernel import procfs
from ksmtrace.kernel.sysfs import KsmKnobs, KsmSysfs, Terminated, ksm_present, read_sysfs
from ksmtrace.spawn import python_argv

PAGE = mmap.PAGESIZE
PR_SET_PDEATHSIG = 1
PR_SET_MEMORY_MERGE = 67  # 6.4+: every present and future VMA of the mm is mergeable
MAX_PAGES_TO_SCAN = 100_000
DEFAULT_TIMEOUT = 120.0

Register = Literal["madvise", "prctl"]
# What merged pages can be put through before they are unmerged, each a path
# of its own through break_ksm and do_wp_page (docs/cow-breaks.md):
#   protnone  mprotect(PROT_NONE); writes to them go through /proc/self/mem
#   uffd_wp   write-protected by userfaultfd (never written: a write waits)
#   discard   MADV_DONTNEED: no page left to unmerge
PageStateName = Literal["protnone", "uffd_wp", "discard"]
PAGE_STATES: tuple[PageStateName, ...] = ("protnone", "uffd_wp", "discard")
Progress = Callable[[str, int, int], None]  # (phase, done, total)


class WorkloadError(KsmtraceError):
    """A workload child failed, or the kernel never reached the prediction."""

    exit_code = Exit.FAILURE


class MergeTimeout(WorkloadError):
    """ksmd did not reach the predicted figures in time."""


# ---------------------------------------------------------------------------
# The shape of a workload and what the kernel must show for it (pure logic)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    """N processes, each with the same page layout:

    pages [0, pages)                        content `i % distinct` (shared by all)
    pages [pages, pages+unique_pages)       content unique to (process, page)
    pages [.., +zero_pages)                 all zero bytes
    """

    processes: int = 2
    pages: int = 1000
    distinct: int = 10
    zero_pages: int = 0
    unique_pages: int = 0
    register: Register = "madvise"
    # ksmd's use_zero_pages while the workload runs; None leaves it as it is.
    use_zero_pages: bool | None = None

    def validate(self) -> None:
        if self.processes < 1:
            raise WorkloadError("a workload needs at least 1 process")
        if self.pages < 0 or self.zero_pages < 0 or self.unique_pages < 0:
            raise WorkloadError("page counts cannot be negative")
        if self.pages and self.distinct < 1:
            raise WorkloadError("--distinct must be at least 1")
        if self.region_pages < 1:
            raise WorkloadError("a workload needs at least one page per process")
        if self.register not in ("madvise", "prctl"):
            raise WorkloadError(f"unknown registration {self.register!r}: madvise or prctl")

    @property
    def region_pages(self) -> int:
        """Pages mapped (and registered) by each process."""
        return self.pages + self.unique_pages + self.zero_pages

    @property
    def zero_start(self) -> int:
        return self.pages + self.unique_pages

    def describe(self) -> str:
        parts = [
            f"{self.processes} processes x {self.pages} pages of {self.distinct} distinct contents"
        ]
        if self.unique_pages:
            parts.append(f"{self.unique_pages} unique pages")
        if self.zero_pages:
            parts.append(f"{self.zero_pages} zero pages")
        return ", ".join(parts) + f", registered by {self.register}"


@dataclass(frozen=True)
class Expectation:
    """What the kernel should show, as deltas from before the workload
    started (global) and as absolute values for each child (per process)."""

    pages_shared: int
    pages_sharing: int
    ksm_zero_pages: int
    merging_pages: tuple[int, ...]  # /proc/<pid>/ksm_stat ksm_merging_pages
    zero_pages: tuple[int, ...]  # /proc/<pid>/ksm_stat ksm_zero_pages
    unmerged: tuple[int, ...]  # registered pages left on their own page

    @property
    def merged_pages(self) -> int:
        return self.pages_shared + self.pages_sharing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Model:
    """`expect()`'s answer plus which pages it considers merged into a KSM
    page (not the zero page), per process: the pages COW writes go to."""

    expectation: Expectation
    ksm_mapped: tuple[tuple[int, ...], ...]


def expect(
    spec: WorkloadSpec,
    *,
    max_page_sharing: int = 256,
    use_zero_pages: bool = False,
    written: Sequence[Collection[int]] = (),
) -> Expectation:
    """Predict the kernel's figures once ksmd has merged `spec`'s pages
    (and, with `written`, once it has noticed those pages were COW-written).

    The rules, each measured on 6.18 (2 cores, Debian 12):
    - A content with C >= 2 copies needs ceil(C / max_page_sharing) KSM pages
      ("dups" of a stable-node chain), filled in ksmd's scan order:
      pages_shared = #KSM pages, pages_sharing = C - pages_shared. When
      C % max_page_sharing == 1 the last copy has no partner for a new KSM
      page and stays unmerged: 2x600 copies of one content gave shared 5,
      sharing 1195 (5 dups of 256,256,256,256,176); 3x171 = 513 copies gave
      shared 2, sharing 510, and the one left out was the last process's.
    - ksm_stat ksm_merging_pages counts every page of the process mapped to
      a KSM page, the one a KSM page was made from included (2 processes x
      1 page of one content: 1 and 1, pages_shared 1, pages_sharing 1).
    - use_zero_pages=1: zero pages are mapped to the zero page, counted in
      ksm_zero_pages (global and per process), never in pages_shared,
      pages_sharing or ksm_merging_pages. use_zero_pages=0: the zero page
      is one more content (and one that other processes can share too).
    - A KSM page keeps its stable node while one page still maps it: after
      writes a dup left with one mapper still counts as pages_shared 1.
      The unmerged leftover joins a dup that writes made room in.
    Scan order is process by process (the order the children registered),
    pages in address order; it only matters for which process keeps the
    leftover copy of a C % max_page_sharing == 1 content.
    """
    return model(
        spec, max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages, written=written
    ).expectation


def model(
    spec: WorkloadSpec,
    *,
    max_page_sharing: int = 256,
    use_zero_pages: bool = False,
    written: Sequence[Collection[int]] = (),
) -> Model:
    """`expect()` with the per-page detail; see `expect()` for the rules."""
    spec.validate()
    if max_page_sharing < 2:
        raise WorkloadError("max_page_sharing is at least 2 in the kernel")
    n = spec.processes
    w = [frozenset(x) for x in written] + [frozenset()] * (n - len(written))
    shared = sharing = 0
    merging = [0] * n
    mapped: list[list[int]] = [[] for _ in range(n)]

    def merge_content(copies: list[tuple[int, int]]) -> None:
        """One content's copies in scan order -> KSM pages (dups) and mappers."""
        nonlocal shared, sharing
        if len(copies) < 2:
            return
        groups = [copies[i : i + max_page_sharing] for i in range(0, len(copies), max_page_sharing)]
        leftover = None
        if len(groups[-1]) == 1:
            leftover = groups.pop()[0]
        kept = [[c for c in g if c[1] not in w[c[0]]] for g in groups]
        if leftover is not None and leftover[1] not in w[leftover[0]]:
            # A write made room in a dup: ksmd merges the leftover into it.
            for g in kept:
                if 0 < len(g) < max_page_sharing:
                    g.append(leftover)
                    break
        for g in kept:
            if g:
                shared += 1
                sharing += len(g) - 1
                for proc, page in g:
                    merging[proc] += 1
                    mapped[proc].append(page)

    for k in range(spec.distinct if spec.pages else 0):
        pages = range(k, spec.pages, spec.distinct)
        merge_content([(p, i) for p in range(n) for i in pages])

    zeros = range(spec.zero_start, spec.region_pages)
    zero_pages = [0] * n
    if use_zero_pages:
        for p in range(n):
            zero_pages[p] = sum(1 for i in zeros if i not in w[p])
    else:
        merge_content([(p, i) for p in range(n) for i in zeros])

    merged = [merging[p] + zero_pages[p] for p in range(n)]
    return Model(
        expectation=Expectation(
            pages_shared=shared,
            pages_sharing=sharing,
            ksm_zero_pages=sum(zero_pages),
            merging_pages=tuple(merging),
            zero_pages=tuple(zero_pages),
            unmerged=tuple(spec.region_pages - len(w[p]) - merged[p] for p in range(n)),
        ),
        ksm_mapped=tuple(tuple(sorted(m)) for m in mapped),
    )


def cow_plan(
    ksm_mapped: Sequence[Sequence[int]],
    fraction: float,
    already: Sequence[Collection[int]] = (),
    spec: WorkloadSpec | None = None,
) -> list[list[int]]:
    """Pages each process writes: `fraction` of its KSM-mapped pages (not yet
    written). With `spec`, candidates are grouped by content before being
    picked evenly, so every content loses about `fraction` of its copies
    (spacing by address alone lines up with `i % distinct` and breaks some
    contents whole, others not at all)."""
    if not 0.0 <= fraction <= 1.0:
        raise WorkloadError(f"the COW fraction must be within 0..1, not {fraction}")

    def by_content(i: int) -> tuple[int, int]:
        assert spec is not None
        return (i % spec.distinct if i < spec.pages else spec.distinct, i)

    plan = []
    for p, pages in enumerate(ksm_mapped):
        done = already[p] if p < len(already) else ()
        cand = [i for i in pages if i not in done]
        if spec is not None:
            cand.sort(key=by_content)
        k = math.floor(fraction * len(cand) + 0.5)  # half up: 1 page at 0.5 is written
        plan.append(sorted(cand[(j * len(cand)) // k] for j in range(k)) if k else [])
    return plan


def restore_plan(
    spec: WorkloadSpec,
    written: Sequence[Collection[int]],
    *,
    max_page_sharing: int = 256,
    use_zero_pages: bool = False,
) -> list[list[int]]:
    """Written pages to give their original content back, per process.

    Restored pages re-merge in ksmd's scan order from wherever its cursor
    is, so for a content with C % max_page_sharing == 1 copies, which
    restored copy ends up the partnerless leftover is arbitrary (measured:
    3x171 restored, the leftover moved from process 2 to process 1). One
    written page of such a content, the last in scan order, stays written:
    the other C - 1 copies fill whole KSM pages and the outcome is exact."""
    n = spec.processes
    w = [set(x) for x in written] + [set() for _ in range(n - len(written))]

    def content(page: int) -> int | None:
        if page < spec.pages:
            return page % spec.distinct
        if page >= spec.zero_start and not use_zero_pages:
            return -1  # the zero page is one more content then
        return None

    copies = {k: n * len(range(k, spec.pages, spec.distinct)) for k in range(spec.distinct)}
    copies[-1] = n * spec.zero_pages
    keep: dict[int, tuple[int, int]] = {}
    for p in range(n):
        for page in sorted(w[p]):
            k = content(page)
            if k is not None and copies[k] > 1 and copies[k] % max_page_sharing == 1:
                keep[k] = (p, page)  # later in scan order wins
    for p, page in keep.values():
        w[p].discard(page)
    return [sorted(x) for x in w]


def nothing_merged(processes: int) -> Expectation:
    zeros = (0,) * processes
    return Expectation(0, 0, 0, zeros, zeros, zeros)


def default_pages_to_scan(spec: WorkloadSpec) -> int:
    """Large: ksmd also walks every other registered mm (a VM's guest RAM
    can be a million pages), and with sleep_millisecs=0 a big batch costs
    nothing once the workload is merged."""
    return MAX_PAGES_TO_SCAN


# ---------------------------------------------------------------------------
# Page contents (shared by parent and child; pure)
# ---------------------------------------------------------------------------


def dup_content(nonce: bytes, k: int) -> bytes:
    """Content k: a 16-byte unit repeated. The per-run nonce (top bit set, so
    never zero and never a COW marker) keeps two workloads from merging."""
    return (nonce + k.to_bytes(8, "little")) * (PAGE // 16)


def unique_content(nonce: bytes, proc: int, page: int) -> bytes:
    return (nonce + ((1 << 62) | (proc << 32) | page).to_bytes(8, "little")) * (PAGE // 16)


def cow_marker(pid: int, page: int, generation: int) -> bytes:
    """Written over the first 32 bytes of a page: unique per pid, page and
    storm, so a written page never becomes identical to another again."""
    return b"ksmtrcow" + b"".join(x.to_bytes(8, "little") for x in (pid, page, generation))


def page_content(spec: WorkloadSpec, nonce: bytes, proc: int, page: int) -> bytes:
    if page < spec.pages:
        return dup_content(nonce, page % spec.distinct)
    if page < spec.zero_start:
        return unique_content(nonce, proc, page)
    return bytes(PAGE)


def new_nonce() -> bytes:
    n = bytearray(os.urandom(8))
    n[0] |= 0x80
    return bytes(n)


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


class _ScanClock:
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


def _read_cow_ksm(root: str | os.PathLike) -> int:
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


# ---------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------


# userfaultfd (x86_64 syscall number; ioctls from linux/userfaultfd.h)
PROT_NONE = 0
NR_USERFAULTFD = 323
UFFD_API = 0xAA
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_WRITEPROTECT = 0xC018AA06  # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
UFFDIO_REGISTER_MODE_WP = 1 << 1


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.syscall.restype = ctypes.c_long
    return libc


def _runs(pages: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of consecutive pages."""
    it = iter(sorted(pages))
    start = prev = next(it, None)
    if start is None:
        return
    for p in it:
        if p != prev + 1:
            yield start, prev - start + 1
            start = p
        prev = p
    yield start, prev - start + 1


def _prctl(libc: ctypes.CDLL, option: int, arg: int) -> None:
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}, {arg}): {os.strerror(e)}")


class _Child:
    """The child side: owns the region, obeys one JSON command per line."""

    def __init__(self, cfg: dict[str, Any]):
        self.spec = WorkloadSpec(**cfg["spec"])
        self.index: int = cfg["index"]
        self.nonce = bytes.fromhex(cfg["nonce"])
        self.libc = _libc()
        self.region: mmap.mmap | None = None
        self.addr = 0
        self.protnone: set[int] = set()
        self._mem: int | None = None  # /proc/self/mem, for writes to PROT_NONE pages
        self._uffd: int | None = None

    def setup(self) -> None:
        spec = self.spec
        size = spec.region_pages * PAGE
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # THP pages are not merged page by page (and Debian defaults THP to
        # always): force 4 KiB pages before the first touch.
        m.madvise(mmap.MADV_NOHUGEPAGE)
        buf = ctypes.c_char.from_buffer(m)
        self.addr = ctypes.addressof(buf)
        del buf  # an exported buffer would pin the mmap
        self.region = m
        if spec.register == "prctl":
            # After the mmap, so the region is mergeable from the prctl on and
            # `_unregister_others` leaves it so. Before it, the mm would have
            # no mergeable VMA between the two calls, and ksmd drops such an
            # mm from KSM, clearing MMF_VM_MERGE_ANY: nothing mapped later is
            # mergeable (found in the 6.12 guest, where slow Python under TCG
            # made that window wide: no VMA with the `mg` flag, ksmd asleep).
            try:
                _prctl(self.libc, PR_SET_MEMORY_MERGE, 1)
            except OSError as e:
                raise RuntimeError(f"PR_SET_MEMORY_MERGE (Linux 6.4+) failed: {e}") from e
            self._unregister_others()
        # Page by page, so each content is a short-lived 4 KiB object: no big
        # buffers (malloc'd by mmap) holding copies of our contents.
        for i in range(spec.region_pages):
            m[i * PAGE : (i + 1) * PAGE] = page_content(spec, self.nonce, self.index, i)
        if spec.register == "madvise":
            m.madvise(mmap.MADV_MERGEABLE)
        self._unregister_others()

    def _unregister_others(self) -> None:
        """prctl makes every VMA mergeable, the interpreter's heap and stacks
        too: pages there (zeroed, or stale copies of our contents) would merge
        and spoil the exact figures. Only the region stays mergeable. Done
        after every command, since new mappings inherit the flag."""
        if self.spec.register != "prctl":
            return
        with open("/proc/self/maps") as f:
            ranges = [line.split(None, 1)[0].split("-") for line in f]
        for lo, hi in ranges:
            start, end = int(lo, 16), int(hi, 16)
            if self.region is not None and start == self.addr:
                continue
            # EINVAL for [vsyscall] and friends: nothing to unregister there.
            self.libc.madvise(start, end - start, mmap.MADV_UNMERGEABLE)

    def _put(self, page: int, data: bytes) -> None:
        """Write at the start of `page`: a store, or for a PROT_NONE page a
        FOLL_FORCE write through /proc/self/mem (as a debugger's would be),
        which takes the same copy-on-write fault."""
        assert self.region is not None
        if page in self.protnone:
            if self._mem is None:
                self._mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
            if os.pwrite(self._mem, data, self.addr + page * PAGE) != len(data):
                raise OSError(f"short write to PROT_NONE page {page} via /proc/self/mem")
        else:
            self.region[page * PAGE : page * PAGE + len(data)] = data

    def write(self, pages: list[int], generation: int) -> int:
        pid = os.getpid()
        for i in pages:
            self._put(i, cow_marker(pid, i, generation))
        return len(pages)

    def restore(self, pages: list[int]) -> int:
        for i in pages:
            self._put(i, page_content(self.spec, self.nonce, self.index, i))
        return len(pages)

    def set_state(self, state: str, pages: list[int]) -> int:
        assert self.region is not None
        for start, n in _runs(pages):
            if state == "protnone":
                if self.libc.mprotect(self.addr + start * PAGE, n * PAGE, PROT_NONE) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"mprotect(PROT_NONE): {os.strerror(e)}")
            elif state == "uffd_wp":
                uffd = self._uffd_wp_registered()
                # struct uffdio_writeprotect { range { start, len }, mode = MODE_WP }
                arg = bytearray(struct.pack("QQQ", self.addr + start * PAGE, n * PAGE, 1))
                fcntl.ioctl(uffd, UFFDIO_WRITEPROTECT, arg)
            elif state == "discard":
                self.region.madvise(mmap.MADV_DONTNEED, start * PAGE, n * PAGE)
            else:
                raise ValueError(f"unknown page state {state!r}: one of {', '.join(PAGE_STATES)}")
        if state == "protnone":
            self.protnone.update(pages)
        return len(pages)

    def _uffd_wp_registered(self) -> int:
        """A userfaultfd with the whole region registered for write-protect
        faults (no handler: nothing may write a protected page)."""
        if self._uffd is not None:
            return self._uffd
        assert self.region is not None
        fd = self.libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"userfaultfd: {os.strerror(e)} (CONFIG_USERFAULTFD?)")
        try:
            api = bytearray(struct.pack("QQQ", UFFD_API, UFFD_FEATURE_PAGEFAULT_FLAG_WP, 0))
            fcntl.ioctl(fd, UFFDIO_API, api)
            if not struct.unpack("QQQ", api)[1] & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
                raise OSError("this kernel's userfaultfd cannot write-protect anonymous pages")
            mode = UFFDIO_REGISTER_MODE_WP
            reg = bytearray(struct.pack("QQQQ", self.addr, len(self.region), mode, 0))
            fcntl.ioctl(fd, UFFDIO_REGISTER, reg)
        except BaseException:
            os.close(fd)
            raise
        self._uffd = fd
        return fd

    def unmerge(self) -> None:
        assert self.region is not None
        if self.spec.register == "prctl":
            _prctl(self.libc, PR_SET_MEMORY_MERGE, 0)  # unmerges and clears every VMA
        else:
            self.region.madvise(mmap.MADV_UNMERGEABLE)

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg["cmd"]
        if cmd == "setup":
            self.setup()
            return {"ok": cmd, "addr": self.addr}
        if cmd == "write":
            n = self.write(msg["pages"], msg["generation"])
        elif cmd == "restore":
            n = self.restore(msg["pages"])
        elif cmd == "unmerge":
            self.unmerge()
            n = 0
        elif cmd == "state":
            n = self.set_state(msg["state"], msg["pages"])
        else:
            raise ValueError(f"unknown command {cmd!r}")
        self._unregister_others()
        return {"ok": cmd, "n": n}


def _child_main(arg: str) -> int:
    cfg = json.loads(arg)
    libc = _libc()
    # Die with the parent (a SIGKILLed parent runs no cleanup). The signal is
    # tied to the parent *thread* that started us; if it is already gone we
    # were reparented before the prctl took effect.
    _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent"]:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    child = _Child(cfg)
    reply({"ok": "hello", "pid": os.getpid()})
    for line in sys.stdin.buffer:
        msg = json.loads(line)
        if msg.get("cmd") == "exit":
            break
        try:
            reply(child.handle(msg))
        except Exception as e:  # reported to the parent, which raises it
            reply({"error": f"{type(e).__name__}: {e}"})
    return 0


# ---------------------------------------------------------------------------
# The parent: children, phases, waiting for ksmd
# ---------------------------------------------------------------------------


class _ChildHandle:
    """Parent side of one child: a Popen and a line protocol with timeouts."""

    def __init__(self, index: int, cfg: dict[str, Any]):
        self.index = index
        self.proc = subprocess.Popen(
            python_argv("ksmtrace.workload", "--child", json.dumps(cfg)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self.pid = self.proc.pid
        self.addr = 0  # the region's start in the child, once set up
        self._buf = b""

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None

    def recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkloadError(f"workload child {self.pid} did not answer in {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self._died()
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise WorkloadError(f"workload child {self.pid}: {msg['error']}")
        return msg

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(msg)
        return self.recv(timeout)

    def _died(self) -> WorkloadError:
        rc = self.proc.poll()
        return WorkloadError(
            f"workload child {self.pid} exited unexpectedly"
            + (f" (exit status {rc})" if rc is not None else "")
        )

    def end(self, grace: float) -> None:
        """Ask it to exit (closing stdin is enough), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


@dataclass
class _State:
    # Replaced, never mutated: readers in other threads see whole states.
    written: tuple[frozenset[int], ...] = ()
    generation: int = 0
    cow_expected: int = 0  # cow_ksm delta the writes so far must have caused
    unmerged: bool = False
    # pages put in each PAGE_STATES state, per child
    states: tuple[tuple[str, tuple[frozenset[int], ...]], ...] = ()

    def in_state(self, state: str, index: int) -> frozenset[int]:
        for name, pages in self.states:
            if name == state:
                return pages[index]
        return frozenset()


class Workload:
    """Run a `WorkloadSpec` in real child processes.

        with Workload(WorkloadSpec(processes=2, pages=2000, distinct=20)) as w:
            w.wait_merged()                  # raises MergeTimeout with what was reached
            written = w.cow(0.25)            # {pid: pages written}
            w.wait_expected()                # ksmd has noticed the broken pages
            w.unmerge(); w.wait_expected()

    `drive_ksmd=True` sets pages_to_scan (100000 unless given),
    sleep_millisecs=0, use_zero_pages (if the spec says) and run=1, and puts
    every knob back on exit (exception, Ctrl-C, SIGTERM included: from the
    main thread `KsmKnobs` turns those signals into exceptions). Children are
    ended on every exit path, and die by themselves if the thread that
    started them dies (PR_SET_PDEATHSIG): start a workload from the thread
    that will outlive it.

    Thread safety: phases (start, cow, restore, unmerge, stop) are serialised
    by a lock; `measure()`, `expected()`, `pids` and `phase` may be read from
    any thread, e.g. by a view while `demo_loop()` runs in a worker.
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        drive_ksmd: bool = True,
        pages_to_scan: int | None = None,
        root: str | os.PathLike = "/",
        progress: Progress | None = None,
        reply_timeout: float = 120.0,
    ):
        spec.validate()
        self.spec = spec
        self.drive_ksmd = drive_ksmd
        self.pages_to_scan = pages_to_scan or default_pages_to_scan(spec)
        self.root = root
        self.progress = progress
        self.reply_timeout = reply_timeout
        self.baseline: Baseline | None = None
        self.max_page_sharing = 256
        self.use_zero_pages = False
        self.phase = "new"
        self.started_at: float | None = None  # monotonic time ksmd could start merging
        self._children: list[_ChildHandle] = []
        self._knobs: KsmKnobs | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._state = _State()
        self._nonce = new_nonce()

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._children]

    def regions(self) -> dict[int, tuple[int, int]]:
        """pid -> [start, end) of its region: the page map to read, which
        stays the same after unmerging (unlike its mergeable areas)."""
        size = self.spec.region_pages * PAGE
        return {c.pid: (c.addr, c.addr + size) for c in self._children}

    def start(self) -> None:
        """Baseline, knobs, children filled and registered (in order), run=1."""
        with self._lock:
            if self.phase != "new":
                raise WorkloadError("a Workload can only be started once")
            self.phase = "starting"
            if not ksm_present(self.root):
                raise no_ksm(str(self.root))
            try:
                self._start()
            except BaseException:
                self.stop()
                raise

    def _start(self) -> None:
        spec = self.spec
        if self.drive_ksmd:
            self._knobs = KsmKnobs(self.root)
            self._knobs.__enter__()
            knobs: dict[str, int | str] = {
                "pages_to_scan": self.pages_to_scan,
                "sleep_millisecs": 0,
            }
            if spec.use_zero_pages is not None:
                knobs["use_zero_pages"] = int(spec.use_zero_pages)
            self._knobs.set(**knobs)
            # Pages of processes that exited while ksmd was stopped still
            # count until ksmd walks their mm again: a stale pages_shared would
            # vanish mid-workload and spoil the deltas. Let ksmd settle first,
            # then pause it so the children register (and get scanned) in order.
            self._knobs.set(run=1)
            self._wait_full_scans(2, timeout=30.0)
            self._knobs.set(run=0)
        self.baseline = Baseline(read_sysfs(self.root), _read_cow_ksm(self.root))
        self.max_page_sharing = self.baseline.sysfs.max_page_sharing or 256
        self.use_zero_pages = bool(self.baseline.sysfs.use_zero_pages)
        if spec.use_zero_pages is not None and self.use_zero_pages != spec.use_zero_pages:
            raise WorkloadError(
                f"ksmd's use_zero_pages is {int(self.use_zero_pages)}, "
                f"the workload asks for {int(spec.use_zero_pages)}",
                "let the workload drive ksmd (--drive-ksmd), or set "
                "/sys/kernel/mm/ksm/use_zero_pages yourself",
            )
        self._state = _State(written=(frozenset(),) * spec.processes)
        # Start every interpreter at once (the slow part), then fill and
        # register one after another: ksmd's scan order is registration order.
        for i in range(spec.processes):
            cfg = {
                "spec": asdict(spec),
                "index": i,
                "nonce": self._nonce.hex(),
                "parent": os.getpid(),
            }
            self._children.append(_ChildHandle(i, cfg))
        for c in self._children:
            c.recv(self.reply_timeout)
        for n, c in enumerate(self._children):
            c.addr = c.call({"cmd": "setup"}, self.reply_timeout)["addr"]
            self._progress("fill", (n + 1) * spec.region_pages, spec.processes * spec.region_pages)
        if self.drive_ksmd and self._knobs is not None:
            self._knobs.set(run=1)
        self.started_at = time.monotonic()
        self.phase = "merging"

    def stop(self) -> None:
        """End every child; when driving ksmd, let it drop their pages, then
        restore the knobs. Safe to call twice and from any thread."""
        self._stopping.set()
        main = threading.current_thread() is threading.main_thread()
        sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        # Cleanup must not be cut short by a second Ctrl-C / SIGTERM: they are
        # held back until it is done, then delivered.
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            with self._lock:
                self._end_children()
        finally:
            try:
                if self._knobs is not None:
                    knobs, self._knobs = self._knobs, None
                    knobs.__exit__(None, None, None)
            finally:
                self.phase = "stopped"
                if main:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)

    def _end_children(self) -> None:
        if not self._children:
            return
        children, self._children = self._children, []
        for c in children:  # in parallel: close all stdins first
            try:
                if c.proc.stdin is not None:
                    c.proc.stdin.close()
            except OSError:
                pass
        for c in children:
            c.end(grace=5.0)
        # Pages of exited processes leave the KSM counters only when ksmd
        # walks their mm (their rmap_items) again. Restoring run=0 before that
        # would leave stale pages_shared/sharing that vanish in the next run
        # and break everyone's deltas: wait for two full scans.
        if self._knobs is not None and self.baseline is not None:
            self._wait_full_scans(2, timeout=10.0)

    def _wait_full_scans(self, count: int, timeout: float) -> None:
        """Until ksmd has made `count` more full scans, or is idle."""
        try:
            s = read_sysfs(self.root)
        except NoKsm:
            return
        if s.run != 1 or s.full_scans is None:
            return
        clock = _ScanClock(s)
        target = s.full_scans + count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = read_sysfs(self.root)
            clock.update(s)
            if (s.full_scans or 0) >= target or clock.idle():
                return
            time.sleep(0.01)

    # -- predictions and measurements -------------------------------------------
    def model(self) -> Model:
        st = self._state
        if st.unmerged:
            zeros = ((),) * self.spec.processes
            return Model(nothing_merged(self.spec.processes), zeros)
        return model(
            self.spec,
            max_page_sharing=self.max_page_sharing,
            use_zero_pages=self.use_zero_pages,
            written=st.written,
        )

    def expected(self) -> Expectation:
        """What the kernel should show now that ksmd has caught up with the
        phases run so far. Lock-free: a view may call it during a COW storm."""
        return self.model().expectation

    @property
    def expected_cow_ksm(self) -> int | None:
        """cow_ksm delta since start caused by this workload's writes and
        unmerge (assuming each phase began with the kernel caught up); None
        once pages write-protected by userfaultfd were unmerged: whether
        break_ksm copies them depends on the kernel (6.1 leaves them merged)."""
        st = self._state
        if st.unmerged and any(any(p) for n, p in st.states if n == "uffd_wp"):
            return None
        return st.cow_expected

    def measure(self, sysfs: KsmSysfs | None = None) -> Measurement:
        """Global deltas from the baseline and the children's ksm_stat now
        (or with `sysfs`, a reading just taken)."""
        if self.baseline is None:
            raise WorkloadError("the workload has not been started")
        b = self.baseline.sysfs
        s = read_sysfs(self.root) if sysfs is None else sysfs
        stats = [procfs.read_ksm_stat(pid, self.root) for pid in self.pids]
        return Measurement(
            pages_shared=(s.pages_shared or 0) - (b.pages_shared or 0),
            pages_sharing=(s.pages_sharing or 0) - (b.pages_sharing or 0),
            ksm_zero_pages=None if s.ksm_zero_pages is None
            else s.ksm_zero_pages - (b.ksm_zero_pages or 0),
            full_scans=(s.full_scans or 0) - (b.full_scans or 0),
            cow_ksm=_read_cow_ksm(self.root) - self.baseline.cow_ksm,
            merging_pages=tuple(None if st is None else st.ksm_merging_pages for st in stats),
            zero_pages=tuple(None if st is None else st.ksm_zero_pages for st in stats),
            run=s.run,
        )

    def wait_merged(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        stop: threading.Event | None = None,
        *,
        exact_global: bool = True,
    ) -> Measurement:
        """Wait until the kernel shows `expected()` and keeps showing it
        across two full scans. Raises MergeTimeout saying what was reached."""
        return self.wait_expected(timeout, stop=stop, phase="merge", exact_global=exact_global)

    def wait_expected(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        stop: threading.Event | None = None,
        phase: str = "settle",
        exact_global: bool = True,
    ) -> Measurement:
        """Wait until every child's ksm_stat and (with `exact_global`) the
        global sysfs deltas equal `expected()`, stable across two full scans.
        Without `exact_global` only the children's own figures count: other
        KSM users (VMs) cannot disturb those, so a demo never stalls."""
        exp = self.expected()
        if self.baseline is None:
            raise WorkloadError("the workload has not been started")
        deadline = time.monotonic() + timeout
        stable_from: int | None = None  # full_scans when the figures first matched
        total = sum(exp.merging_pages) + sum(exp.zero_pages)
        last_progress = 0.0
        clock: _ScanClock | None = None
        while True:
            s = read_sysfs(self.root)
            clock = _ScanClock(s) if clock is None else clock
            clock.update(s)
            m = self.measure(s)
            if m.run != 1:
                raise WorkloadError(
                    f"ksmd is not running (run={m.run}): nothing will be merged",
                    "use --drive-ksmd, or `echo 1 > /sys/kernel/mm/ksm/run`",
                )
            if m.matches(exp) if exact_global else m.matches_own(exp):
                if stable_from is None:
                    stable_from = m.full_scans
                if m.full_scans >= stable_from + 2 or clock.idle():
                    return m
            else:
                stable_from = None
            now = time.monotonic()
            if now - last_progress > 0.1:
                own = sum(x or 0 for x in m.merging_pages) + sum(x or 0 for x in m.zero_pages)
                self._progress(phase, own, total)
                last_progress = now
            if (stop is not None and stop.is_set()) or self._stopping.is_set():
                return m
            if now > deadline:
                raise self._timeout(phase, timeout, exp, m)
            time.sleep(0.01)

    def _timeout(self, phase: str, timeout: float, e: Expectation, m: Measurement) -> MergeTimeout:
        others = other_ksm_users(self.pids, self.root)
        hint = (
            "other processes use KSM and move the same global counters: "
            + "; ".join(map(str, others[:5]))
            + " -- exact deltas need them gone (QEMU: -machine mem-merge=off)"
            if others
            else "ksmd may be scanning too slowly: use --drive-ksmd or a longer --timeout"
        )
        return MergeTimeout(
            f"ksmd did not reach the predicted figures in {timeout:g} s ({phase}): "
            f"pages_shared {m.pages_shared:+d} (expected {e.pages_shared:+d}), "
            f"pages_sharing {m.pages_sharing:+d} (expected {e.pages_sharing:+d}), "
            f"ksm_zero_pages {_signed(m.ksm_zero_pages)} (expected {e.ksm_zero_pages:+d}), "
            f"ksm_merging_pages per child {list(m.merging_pages)} "
            f"(expected {list(e.merging_pages)}), after {m.full_scans} full scans",
            hint,
        )

    # -- phases -----------------------------------------------------------------
    def cow(
        self,
        fraction: float,
        rate: float | None = None,
        stop: threading.Event | None = None,
        *,
        pause_ksmd: bool = True,
        pids: Collection[int] | None = None,
        among: PageStateName | None = None,
    ) -> dict[int, int]:
        """Write unique bytes into `fraction` of each child's merged pages
        (KSM pages, not zero-page merges), at `rate` pages/s in total (None
        or 0: as fast as possible); with `pids`, only those children write
        (uneven per-process figures). Returns {pid: pages written}; each write
        to a merged page is one cow_ksm. ksmd notices at its next pass:
        `wait_expected()` then sees the broken pages gone.

        cow_ksm is counted in do_wp_page before the copy; measured on 6.18,
        with ksmd scanning meanwhile it sometimes counts a break twice
        (+1..+3 over 750 writes in 4 of 18 runs, 0 in 10 runs with ksmd
        paused, no page migration either way). So when the workload drives
        ksmd it pauses it (run=0) during the writes unless `pause_ksmd` is
        False (a live demo), which costs that exactness.

        With `among`, only pages put in that state by `set_state` are
        written (PROT_NONE ones through /proc/self/mem); otherwise pages in
        the uffd_wp state are never picked (a write would wait forever)."""
        with self._lock:
            self._check_running()
            st = self._state
            mapped = self.model().ksm_mapped
            if among is not None:
                if among == "uffd_wp":
                    raise WorkloadError("pages write-protected by userfaultfd cannot be written")
                mapped = tuple(
                    tuple(i for i in m if i in st.in_state(among, p)) for p, m in enumerate(mapped)
                )
            skip = tuple(w | st.in_state("uffd_wp", p) for p, w in enumerate(st.written))
            plan = cow_plan(mapped, fraction, skip, self.spec)
            if pids is not None:
                plan = [p if c.pid in pids else [] for c, p in zip(self._children, plan,
                                                                    strict=True)]
            st.generation += 1
            cmd = {"cmd": "write", "generation": st.generation}
            with self._ksmd_paused(pause_ksmd):
                done = self._paced("cow", plan, rate, stop, cmd)
            st.written = tuple(w | frozenset(plan[p][: done[p]]) for p, w in enumerate(st.written))
            st.cow_expected += sum(done)
            self.phase = "cow"
            return {c.pid: done[c.index] for c in self._children}

    def restore_contents(self, rate: float | None = None) -> int:
        """Put the original contents back into the written pages, so ksmd
        merges them again (all but one page of a content that would leave a
        copy without partner, see `restore_plan`). Returns pages rewritten."""
        with self._lock:
            self._check_running()
            st = self._state
            plan = restore_plan(
                self.spec,
                st.written,
                max_page_sharing=self.max_page_sharing,
                use_zero_pages=self.use_zero_pages,
            )
            done = self._paced("restore", plan, rate, None, {"cmd": "restore"})
            st.written = tuple(w - frozenset(plan[p][: done[p]]) for p, w in enumerate(st.written))
            self.phase = "merging"
            return sum(done)

    def set_state(
        self, state: PageStateName, fraction: float, *, pids: Collection[int] | None = None
    ) -> dict[int, list[int]]:
        """Put `fraction` of each child's merged pages (or only `pids`'
        children's) into `state` (see PAGE_STATES); returns {pid: pages}.
        protnone and uffd_wp pages stay merged; discarded pages are gone, as
        if written (without a cow_ksm), from ksmd's next pass on."""
        if state not in PAGE_STATES:
            raise WorkloadError(f"unknown page state {state!r}: one of {', '.join(PAGE_STATES)}")
        with self._lock:
            self._check_running()
            st = self._state
            busy = tuple(
                w.union(*(pages[p] for _, pages in st.states)) for p, w in enumerate(st.written)
            )
            plan = cow_plan(self.model().ksm_mapped, fraction, busy, self.spec)
            if pids is not None:
                plan = [p if c.pid in pids else [] for c, p in zip(self._children, plan,
                                                                    strict=True)]
            for c in self._children:
                if plan[c.index]:
                    c.call({"cmd": "state", "state": state, "pages": plan[c.index]},
                           self.reply_timeout)
            chosen = tuple(st.in_state(state, c.index) | frozenset(plan[c.index])
                           for c in self._children)
            st.states = tuple((n, v) for n, v in st.states if n != state) + ((state, chosen),)
            if state == "discard":
                st.written = tuple(w | frozenset(plan[p]) for p, w in enumerate(st.written))
            return {c.pid: plan[c.index] for c in self._children}

    def unmerge(self) -> None:
        """MADV_UNMERGEABLE (or PR_SET_MEMORY_MERGE 0 for prctl) in every
        child: the kernel breaks every merged page right away (one cow_ksm
        per page mapped to a KSM page, once ksmd had merged them all); the
        counters drop at once with prctl, at ksmd's next pass with madvise."""
        with self._lock:
            self._check_running()
            # Measured: unmerging breaks each page mapped to a KSM page through
            # the COW fault path, one cow_ksm each (zero-page merges: none).
            broken = sum(self.model().expectation.merging_pages)
            with self._ksmd_paused(True):  # same fault path as cow(): exact counts
                for c in self._children:
                    c.send({"cmd": "unmerge"})
                for c in self._children:
                    c.recv(self.reply_timeout)
            self._state.unmerged = True
            self._state.cow_expected += broken
            self.phase = "unmerged"

    @contextmanager
    def _ksmd_paused(self, pause: bool) -> Iterator[None]:
        """run=0 for the block when we drive ksmd. Writing `run` takes
        ksm_thread_mutex, which ksmd holds for a whole batch: once the write
        returns, ksmd is idle."""
        if not (pause and self._knobs is not None):
            yield
            return
        self._knobs.set(run=0)
        try:
            yield
        finally:
            if self._knobs is not None and not self._stopping.is_set():
                self._knobs.set(run=1)

    def _check_running(self) -> None:
        if not self._children or self._stopping.is_set():
            raise WorkloadError("the workload is not running")

    def _paced(
        self,
        phase: str,
        plan: list[list[int]],
        rate: float | None,
        stop: threading.Event | None,
        cmd: dict[str, Any],
    ) -> list[int]:
        """Send `plan` (pages per child) as commands, at `rate` pages/s in
        total, round-robin over the children; returns pages done per child."""
        total = sum(len(p) for p in plan)
        done = [0] * len(plan)
        if total == 0:
            return done
        batch = 2000  # bounded messages keep the children's allocations small
        t0 = time.monotonic()
        sent = 0
        while sent < total:
            if (stop is not None and stop.is_set()) or self._stopping.is_set():
                break
            if rate:
                due = min(total, max(1, int((time.monotonic() - t0) * rate) + 1))
                if due <= sent:
                    time.sleep(min(0.05, (sent + 1) / rate - (time.monotonic() - t0)))
                    continue
            else:
                due = total
            quota = min(due - sent, batch * len(plan))
            share = self._round_robin(plan, done, quota)
            busy = []
            for c in self._children:
                pages = plan[c.index][done[c.index] : done[c.index] + share[c.index]]
                if pages:
                    c.send({**cmd, "pages": pages})
                    busy.append((c, len(pages)))
            for c, n in busy:
                c.recv(self.reply_timeout)
                done[c.index] += n
                sent += n
            self._progress(phase, sent, total)
        return done

    @staticmethod
    def _round_robin(plan: list[list[int]], done: list[int], quota: int) -> list[int]:
        share = [0] * len(plan)
        left = [len(p) - d for p, d in zip(plan, done, strict=True)]
        while quota > 0 and any(left[i] > share[i] for i in range(len(plan))):
            for i in range(len(plan)):
                if quota and left[i] > share[i]:
                    share[i] += 1
                    quota -= 1
        return share

    def demo_loop(
        self,
        stop: threading.Event,
        *,
        cow_fraction: float = 0.3,
        cow_rate: float | None = 5000.0,
        pause: float = 2.0,
        timeout: float = DEFAULT_TIMEOUT,
        on_phase: Callable[[str, Measurement], None] | None = None,
    ) -> None:
        """Merge -> pause -> COW storm -> ksmd notices -> restore contents ->
        re-merge -> ... until `stop` is set. Meant for a worker thread (the
        one that started the workload) while a view reads `measure()`."""
        while not stop.is_set():
            for step in ("merge", "cow", "broken", "restore"):
                if stop.is_set() or self._stopping.is_set():
                    return
                if step == "merge":
                    m = self.wait_merged(timeout, stop, exact_global=False)
                elif step == "cow":
                    self.cow(cow_fraction, cow_rate, stop, pause_ksmd=False)
                    m = self.measure()
                elif step == "broken":
                    m = self.wait_expected(
                        timeout, stop=stop, phase="cow-noticed", exact_global=False
                    )
                else:
                    self.restore_contents(cow_rate)
                    m = self.measure()
                if on_phase is not None:
                    on_phase(step, m)
                if stop.wait(pause):
                    return

    def _progress(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

DESCRIPTION = """\
Run a KSM workload and show, phase by phase, what the kernel should show
(the prediction) next to what it shows (measured deltas of
/sys/kernel/mm/ksm, /proc/<pid>/ksm_stat and /proc/vmstat cow_ksm).

N child processes map M pages each, cycling through D distinct contents
(every content is in every process), optionally plus unique pages and zero
pages, and register them with madvise(MADV_MERGEABLE) or
prctl(PR_SET_MEMORY_MERGE). Phases: fill+register -> merge -> COW writes
-> unmerge -> hold -> exit. By default ksmd is driven fast
(pages_to_scan=100000, sleep_millisecs=0, run=1; paused during COW writes
and unmerge, which keeps cow_ksm exact) and every knob is put back on exit,
Ctrl-C and SIGTERM included. Needs root.

The global figures are deltas of system-wide counters: another KSM user
merging meanwhile (a VM: QEMU's default is mem-merge=on) makes them
differ. The per-process ksm_stat figures belong to the workload alone."""

EPILOG = """\
examples:
  ksmtrace workload                          2 x 1000 pages, 10 contents
  ksmtrace workload -n 4 -p 50000 -d 1000    200,000 pages to merge (benchmark size)
  ksmtrace workload -n 2 -p 600 -d 1         1200 copies of one content: a
                                             stable-node chain of 5 KSM pages
  ksmtrace workload -z 500 --use-zero-pages 1
                                             zero pages merged into the zero page
  ksmtrace workload --register prctl --cow-fraction 0.5 --cow-rate 2000 --unmerge
  ksmtrace workload --state protnone --state uffd_wp:0.5 --cow-fraction 0.3 --unmerge
                                             COW and unmerge of PROT_NONE and
                                             userfaultfd write-protected pages
  ksmtrace workload --hold                   keep the pages merged until Ctrl-C
  ksmtrace workload --loop                   merge, COW storm, re-merge... until Ctrl-C
  ksmtrace workload --json                   one JSON object per phase

exit status: 0 when every figure matched the prediction, 1 when one did not
(or ksmd did not reach it within --timeout), 130 on Ctrl-C."""


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add `workload` to a subparsers object; `run_cli` runs it."""
    p = subparsers.add_parser(
        "workload",
        help="run a KSM workload and compare the kernel's figures with the prediction",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shape = p.add_argument_group("shape")
    shape.add_argument(
        "-n",
        "--processes",
        type=_positive,
        default=2,
        metavar="N",
        help="child processes (default 2)",
    )
    shape.add_argument(
        "-p",
        "--pages",
        type=_count,
        default=1000,
        metavar="M",
        help="duplicate pages per process (default 1000)",
    )
    shape.add_argument(
        "-d",
        "--distinct",
        type=_positive,
        default=10,
        metavar="D",
        help="distinct contents among them, page i has content i%%D (default 10)",
    )
    shape.add_argument(
        "-u",
        "--unique-pages",
        type=_count,
        default=0,
        metavar="U",
        help="extra pages per process that never merge (default 0)",
    )
    shape.add_argument(
        "-z",
        "--zero-pages",
        type=_count,
        default=0,
        metavar="Z",
        help="extra all-zero pages per process (default 0)",
    )
    shape.add_argument(
        "--register",
        choices=("madvise", "prctl"),
        default="madvise",
        help="madvise(MADV_MERGEABLE) on the area, or "
        "prctl(PR_SET_MEMORY_MERGE) before mapping it (default madvise)",
    )
    ksmd = p.add_argument_group("ksmd")
    ksmd.add_argument(
        "--drive-ksmd",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="set pages_to_scan, sleep_millisecs=0, run=1 while running and "
        "restore them after (default: on)",
    )
    ksmd.add_argument(
        "--pages-to-scan",
        type=_positive,
        default=None,
        metavar="N",
        help=f"pages_to_scan when driving ksmd (default {MAX_PAGES_TO_SCAN})",
    )
    ksmd.add_argument(
        "--use-zero-pages",
        type=int,
        choices=(0, 1),
        default=None,
        help="use_zero_pages while running (default: leave as it is)",
    )
    ksmd.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up waiting for ksmd after this long, per phase (default {DEFAULT_TIMEOUT:g})",
    )
    phases = p.add_argument_group("phases")
    phases.add_argument(
        "--cow-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="after merging, write to this fraction (0..1) of each "
        "process's merged pages (default 0)",
    )
    phases.add_argument(
        "--cow-rate",
        type=float,
        default=0.0,
        metavar="PAGES/S",
        help="COW writes per second, all processes together (default 0: as fast as possible)",
    )
    phases.add_argument(
        "--state",
        action="append",
        default=[],
        type=_page_state,
        metavar="STATE[:F]",
        help="after merging, put fraction F (default 0.5) of each process's merged pages "
        "not yet in a state into STATE, before any COW: protnone (mprotect PROT_NONE; "
        "COW writes to them go through /proc/self/mem), uffd_wp (userfaultfd "
        "write-protected; never written), discard (MADV_DONTNEED); repeatable. "
        "See docs/cow-breaks.md",
    )
    phases.add_argument(
        "--unmerge",
        action="store_true",
        help="finally unmerge (MADV_UNMERGEABLE, or PR_SET_MEMORY_MERGE 0)",
    )
    phases.add_argument(
        "--hold",
        type=float,
        nargs="?",
        const=math.inf,
        default=0.0,
        metavar="SECONDS",
        help="keep the processes alive this long at the end; without a value, until Ctrl-C",
    )
    phases.add_argument(
        "--loop",
        action="store_true",
        help="repeat merge, COW storm (--cow-fraction, default 0.3), re-merge until Ctrl-C",
    )
    p.add_argument(
        "-j", "--json", action="store_true", help="print one JSON object per phase instead of text"
    )
    p.set_defaults(func=run_cli)
    return p


def _page_state(text: str) -> tuple[PageStateName, float]:
    name, _, frac = text.partition(":")
    if name not in PAGE_STATES:
        raise argparse.ArgumentTypeError(f"unknown page state {name!r}: {', '.join(PAGE_STATES)}")
    try:
        f = float(frac) if frac else 0.5
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction: {frac!r}") from None
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"the fraction must be within 0..1, not {frac}")
    return name, f  # type: ignore[return-value]


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _count(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative: {v}")
    return v


class _Printer:
    """Text or JSON-lines output, and progress on a terminal."""

    def __init__(self, as_json: bool):
        self.json = as_json
        self.tty = sys.stdout.isatty()
        self._last = 0.0
        self._dirty = False
        self._began: dict[str, float] = {}

    def event(self, name: str, text: str | None = None, **data: Any) -> None:
        self._clear()
        if self.json:
            print(json.dumps({"event": name, **data}), flush=True)
        elif text is not None:
            print(text, flush=True)

    def progress(self, phase: str, done: int, total: int) -> None:
        if self.json:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last > 0.1 or done >= total:
                pct = f"{100 * done // total}%" if total else ""
                print(f"\r  {phase}: {done}/{total} {pct}   ", end="", flush=True)
                self._dirty = True
                self._last = now
        elif now - self._began.setdefault(phase, now) > 2.0 and now - self._last > 2.0:
            # In a log, only steps long enough to wonder about.
            print(f"  {phase}: {done}/{total}", flush=True)
            self._last = now

    def _clear(self) -> None:
        if self._dirty:
            print("\r" + " " * 60 + "\r", end="", flush=True)
            self._dirty = False


def _signed(v: int | None) -> str:
    return "n/a" if v is None else f"{v:+d}"


def _compare(e: Expectation, m: Measurement, pids: Sequence[int]) -> tuple[list[str], bool]:
    ok = m.matches(e)
    rows = [
        f"  {'':22}{'expected':>10}{'measured':>10}",
        *(
            f"  {name:22}{ev:>+10d}{_signed(mv):>10}{'' if mv in (None, ev) else '   <- differs'}"
            for name, ev, mv in (
                ("pages_shared", e.pages_shared, m.pages_shared),
                ("pages_sharing", e.pages_sharing, m.pages_sharing),
                ("ksm_zero_pages", e.ksm_zero_pages, m.ksm_zero_pages),
            )
        ),
        "  per process (ksm_stat):   ksm_merging_pages   ksm_zero_pages",
    ]
    for i, pid in enumerate(pids):
        em, mm = e.merging_pages[i], m.merging_pages[i]
        ez, mz = e.zero_pages[i], m.zero_pages[i]
        bad = "" if (em, ez) == (mm, mz) else "   <- differs"
        rows.append(f"    pid {pid:<10}  {em:>9} / {mm!s:<9} {ez:>7} / {mz!s:<7}{bad}")
    return rows, ok


def run_cli(args: argparse.Namespace) -> int:
    """`ksmtrace workload`: run the phases, print prediction vs kernel."""
    spec = WorkloadSpec(
        processes=args.processes,
        pages=args.pages,
        distinct=args.distinct,
        zero_pages=args.zero_pages,
        unique_pages=args.unique_pages,
        register=args.register,
        use_zero_pages=None if args.use_zero_pages is None else bool(args.use_zero_pages),
    )
    spec.validate()
    if not 0.0 <= args.cow_fraction <= 1.0:
        raise WorkloadError(f"--cow-fraction must be within 0..1, not {args.cow_fraction}")
    if args.state and args.loop:
        raise WorkloadError("--state cannot be combined with --loop (re-merging restores contents "
                            "into pages that may be PROT_NONE or write-protected)")
    if os.geteuid() != 0 and args.drive_ksmd:
        raise not_root("driving ksmd (--drive-ksmd)")
    out = _Printer(args.json)
    all_ok = True
    # SIGTERM/SIGHUP unwind through the with-block (children ended, knobs
    # restored) even when KsmKnobs has not installed its own handlers.
    old = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        w = Workload(
            spec,
            drive_ksmd=args.drive_ksmd,
            pages_to_scan=args.pages_to_scan,
            progress=out.progress,
        )
        t0 = time.monotonic()
        with w:
            b = w.baseline.sysfs if w.baseline else None
            knobs = (
                f"ksmd driven: pages_to_scan={w.pages_to_scan} sleep_millisecs=0 run=1"
                if args.drive_ksmd
                else f"ksmd as it is: run={b.run if b else '?'}"
            )
            out.event(
                "start",
                f"workload: {spec.describe()}\n  {knobs}, use_zero_pages="
                f"{int(w.use_zero_pages)}, max_page_sharing={w.max_page_sharing}\n"
                f"  pids {' '.join(map(str, w.pids))}; filled and registered in "
                f"{time.monotonic() - t0:.2f} s",
                spec=asdict(spec),
                pids=w.pids,
                drive_ksmd=args.drive_ksmd,
                pages_to_scan=w.pages_to_scan if args.drive_ksmd else None,
                use_zero_pages=w.use_zero_pages,
                max_page_sharing=w.max_page_sharing,
            )
            others = other_ksm_users(w.pids)
            if others:
                out.event(
                    "warning",
                    "  note: other processes use KSM, so the global deltas may differ: "
                    + "; ".join(map(str, others[:5])),
                    others=[asdict(o) for o in others],
                )
            all_ok &= _phase(out, w, "merge", "merged", args.timeout)
            if args.loop:
                _loop(out, w, args)
                return Exit.OK
            for state, fraction in args.state:
                put = w.set_state(state, fraction)
                out.event(
                    "state",
                    f"[state] {state}: {sum(map(len, put.values()))} merged pages "
                    f"({fraction:g} of each process's)",
                    state=state,
                    pages={str(k): len(v) for k, v in put.items()},
                )
            if args.cow_fraction:
                cow0 = w.measure().cow_ksm
                tc = time.monotonic()
                written = w.cow(args.cow_fraction, args.cow_rate or None)
                n = sum(written.values())
                cow = w.measure().cow_ksm - cow0
                rate = f"{args.cow_rate:g} pages/s" if args.cow_rate else "full speed"
                ok = cow == n
                all_ok &= ok
                out.event(
                    "cow",
                    f"[cow] wrote {n} merged pages ({rate}) in {time.monotonic() - tc:.2f} s: "
                    f"cow_ksm expected {n:+d}, measured {cow:+d}" + ("" if ok else "   <- differs"),
                    written={str(k): v for k, v in written.items()},
                    cow_ksm_expected=n,
                    cow_ksm_measured=cow,
                    ok=ok,
                )
                all_ok &= _phase(
                    out, w, "cow-noticed", "after ksmd noticed the writes", args.timeout
                )
            if args.unmerge and args.state:
                # whether PROT_NONE and uffd-wp pages unmerge is the kernel's
                # choice (6.1: they stay merged): report, do not predict
                cow0 = w.measure().cow_ksm
                w.unmerge()
                cow = w.measure().cow_ksm - cow0
                want = w.expected_cow_ksm
                out.event(
                    "unmerge",
                    f"[unmerge] cow_ksm {cow:+d}: one per page still mapped to a KSM page, "
                    "less those this kernel leaves merged (docs/cow-breaks.md)",
                    cow_ksm=cow,
                    cow_ksm_expected_total=want,
                )
            elif args.unmerge:
                cow0 = w.measure().cow_ksm
                w.unmerge()
                all_ok &= _phase(
                    out, w, "unmerge", "unmerged", args.timeout, cow_ksm=w.measure().cow_ksm - cow0
                )
            if args.hold:
                until = "Ctrl-C" if math.isinf(args.hold) else f"{args.hold:g} s"
                out.event("hold", f"[hold] holding the pages until {until}", seconds=args.hold)
                _hold(args.hold)
        out.event(
            "exit",
            "[exit] children ended" + (", knobs restored" if args.drive_ksmd else ""),
            ok=all_ok,
        )
        return Exit.OK if all_ok else Exit.FAILURE
    except KeyboardInterrupt:
        out.event("interrupted", "[exit] interrupted: children ended, knobs restored")
        return Exit.INTERRUPTED
    except Terminated as e:
        return int(e.code) if isinstance(e.code, int) else Exit.FAILURE
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


def _phase(
    out: _Printer, w: Workload, phase: str, title: str, timeout: float, **extra: Any
) -> bool:
    t = time.monotonic()
    m = w.wait_expected(timeout, phase=phase)
    e = w.expected()
    rows, ok = _compare(e, m, w.pids)
    if "cow_ksm" in extra:
        rows.append(f"  cow_ksm {extra['cow_ksm']:+d} (the kernel broke each merged page)")
    out.event(
        phase,
        f"[{phase}] {title} after {time.monotonic() - t:.2f} s, {m.full_scans} full scans "
        f"since start{'' if ok else ' -- DIFFERS from the prediction'}\n" + "\n".join(rows),
        expected=e.as_dict(),
        measured=m.as_dict(),
        seconds=round(time.monotonic() - t, 3),
        ok=ok,
        **extra,
    )
    return ok


def _loop(out: _Printer, w: Workload, args: argparse.Namespace) -> None:
    stop = threading.Event()
    out.event("loop", "[loop] merge -> COW storm -> re-merge until Ctrl-C")

    def on_phase(step: str, m: Measurement) -> None:
        out.event(
            step,
            f"[{step}] pages_shared {m.pages_shared:+d} pages_sharing {m.pages_sharing:+d} "
            f"ksm_zero_pages {_signed(m.ksm_zero_pages)} cow_ksm {m.cow_ksm:+d}",
            measured=m.as_dict(),
        )

    w.demo_loop(
        stop,
        cow_fraction=args.cow_fraction or 0.3,
        cow_rate=args.cow_rate or None,
        timeout=args.timeout,
        on_phase=on_phase,
    )


def _hold(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 3600.0))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ksmtrace.workload ...`: the CLI without the rest of ksmtrace."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv[1])
    parser = argparse.ArgumentParser(prog="ksmtrace")
    sub = parser.add_subparsers()
    add_cli(sub)
    args = parser.parse_args(["workload", *argv])
    try:
        return run_cli(args)
    except KsmtraceError as e:
        print(f"ksmtrace: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return int(e.exit_code)


__all__ = [
    "Expectation",
    "KsmUser",
    "Measurement",
    "MergeTimeout",
    "Model",
    "Workload",
    "WorkloadError",
    "WorkloadSpec",
    "add_cli",
    "cow_plan",
    "expect",
    "other_ksm_users",
    "restore_plan",
    "model",
    "run_cli",
]

if __name__ == "__main__":
    raise SystemExit(main())
