"""The page map of a process's mergeable memory: for every page of every
VM_MERGEABLE area, whether it is a KSM page, the shared zero page, an ordinary
resident page or absent, with its pfn and how many PTEs map it.

Sources (Documentation/admin-guide/mm/pagemap.rst), all root-only:
- /proc/<pid>/smaps       areas whose VmFlags contain `mg` (VM_MERGEABLE)
- /proc/<pid>/pagemap     one u64 per virtual page: bit 63 present, bit 62
                          swapped, bit 56 exclusively mapped, bits 0-54 pfn
                          (zeroed without CAP_SYS_ADMIN)
- /proc/kpageflags        one u64 per pfn: KPF_KSM bit 21, KPF_ZERO_PAGE bit 24
- /proc/kpagecount        one u64 per pfn: number of PTEs mapping the page

All of it is numpy, not a loop per page. pagemap is read in pieces of at most
`_CHUNK` entries; the pages are then looked up in batches of `_CHUNK`:
kpageflags and kpagecount are read only around the pfns found, in a few
contiguous reads found from the runs of consecutive pfns (no sort per page),
on two threads for large batches. The kernel's own work dominates: ~140 ns
per pfn for each of kpageflags and kpagecount on the development host.

So the pages pagemap marks exclusively mapped (bit 56: one PTE maps the
page) are not looked up: they are present pages with one mapper. One of them
is a KSM page only when the other mappers of its KSM page wrote or unmapped
theirs. smaps counts an area's KSM pages (its `KSM:` line, Linux 6.7 and
later); when the area's other pages hold fewer, its exclusive pages' flags
are read in address order, in growing batches, until the count is met. An
area without that count (older kernels, or made by hand) has all of them
read. A map of unmerged memory then costs pagemap alone (bench/pagemap.py).

KPF_KSM is wrong on some kernels (6.12): stable_page_flags() tests
`mapping & PAGE_MAPPING_KSM`, which PAGE_MAPPING_ANON alone satisfies, so every
anonymous page reads as KSM. `kpf_ksm_reliable()` tests it once on a private
page of our own; where it fails, a page is taken for a KSM page when it is
anonymous and mapped by two PTEs or more (KSM pages are shared; a KSM page
left with one mapper, or an anonymous page shared after fork, is then
misread), and the map says its KSM state is inferred.

Files are read through `RootFiles` (kernel/rootfiles.py), live or recorded;
kpageflags and kpagecount around a page set's pfns by kernel/pfnreads.py.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ksmtrace.errors import NoProcess, NotRoot
from ksmtrace.kernel.pfnreads import (
    FlagReads,
    read_flags_and_counts,
    read_u64s_parallel,
    reads,
)
from ksmtrace.kernel.procfs import PAGE_SIZE
from ksmtrace.kernel.rootfiles import RootFiles
from ksmtrace.model import PageState

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_MMAP_EXCLUSIVE = 1 << 56
PM_PFN_MASK = (1 << 55) - 1
KPF_KSM = 1 << 21
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24

# pagemap entries per read, and pages per batch of the pfn lookup: the memory
# held beyond the map's own arrays is a small multiple of this many u64s.
_CHUNK = 1 << 20
# exclusively mapped pages whose flags are read first when smaps counts more
# KSM pages in an area than its shared pages hold; each batch doubles
_FIRST_BATCH = 1 << 12
# pages from which a private writable area in maps is read from pagemap
# while smaps is read (it may turn out not mergeable: read for nothing)
_AHEAD = 1 << 14


_STATES = tuple(PageState)
_CODE = {s: i for i, s in enumerate(_STATES)}


@dataclass(frozen=True)
class Area:
    """A mergeable VMA: [start, end), its backing path ("" if anonymous) and
    the pages smaps counted as KSM pages in it when read (None: unknown, as
    before Linux 6.7 or for an area made by hand)."""

    start: int
    end: int
    path: str = ""
    ksm: int | None = None

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE


@dataclass(frozen=True)
class PageInfo:
    addr: int
    state: PageState
    pfn: int | None  # None when absent
    mappers: int | None  # PTEs mapping the pfn (kpagecount); None when absent


def _vma_header(line: str) -> tuple[int, int, str, str] | None:
    """(start, end, perms, path) of a maps line or smaps header, "start-end
    perms offset dev inode [path]" (the path may contain spaces); None for
    any other line."""
    first = line.split(" ", 1)[0]
    if "-" not in first or ":" in first:
        return None
    fields = line.split(None, 5)
    lo, _, hi = fields[0].partition("-")
    try:
        return (int(lo, 16), int(hi, 16), fields[1] if len(fields) > 1 else "",
                fields[5] if len(fields) > 5 else "")
    except ValueError:
        return None


def parse_smaps_areas(text: str) -> list[Area]:
    """Areas of smaps text whose VmFlags contain `mg`."""
    areas: list[Area] = []
    header: tuple[int, int, str] | None = None
    ksm: int | None = None
    for line in text.splitlines():
        if line.startswith("VmFlags:"):
            if header and "mg" in line.split()[1:]:
                areas.append(Area(*header, ksm))
            header, ksm = None, None
            continue
        if line.startswith("KSM:"):
            fields = line.split()
            if len(fields) == 3 and fields[1].isdigit() and fields[2] == "kB":
                ksm = int(fields[1]) * 1024 // PAGE_SIZE
            continue
        if (vma := _vma_header(line)) is not None:
            header, ksm = (vma[0], vma[1], vma[3]), None
    return areas


def _pid_dir(pid: int) -> str:
    return f"proc/{pid}"


def _no_process(pid: int) -> NoProcess:
    return NoProcess(f"no process with pid {pid}", "check the pid with `ps -p PID`")


def _hidden(what: str) -> NotRoot:
    return NotRoot(
        f"reading {what} needs root (pfns and page flags are hidden from unprivileged users)",
        "run it with sudo; `ksmtrace stat --sysfs-only` works without root",
    )


def mergeable_areas(
    pid: int, root: str | os.PathLike = "/", *, files: RootFiles | None = None
) -> list[Area]:
    """VMAs of `pid` that KSM may scan: madvise(MADV_MERGEABLE), or every
    eligible VMA after prctl(PR_SET_MEMORY_MERGE)."""
    files = files or RootFiles(root)
    try:
        text = files.read_text(f"{_pid_dir(pid)}/smaps")
    except FileNotFoundError as e:
        raise _no_process(pid) from e
    except PermissionError as e:
        raise _hidden(f"/proc/{pid}/smaps") from e
    except ProcessLookupError as e:
        raise _no_process(pid) from e
    return parse_smaps_areas(text)


_kpf_ksm_reliable: bool | None = None


def _u64(data: bytes) -> int:
    """One native u64; 0 for a short read (no page there)."""
    return int.from_bytes(data, sys.byteorder) if len(data) == 8 else 0


def kpf_ksm_reliable() -> bool:
    """Whether /proc/kpageflags' KPF_KSM marks KSM pages only, tested once
    on an anonymous page of this process, which is certainly not one (root;
    True when it cannot be told)."""
    global _kpf_ksm_reliable
    if _kpf_ksm_reliable is None:
        _kpf_ksm_reliable = _test_kpf_ksm()
    return _kpf_ksm_reliable


def _test_kpf_ksm() -> bool:
    page = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        page[:8] = b"ksmtrace"  # faulted in: an anonymous page of our own
        view = ctypes.c_char.from_buffer(page)
        addr = ctypes.addressof(view)
        del view  # an exported buffer would pin the mmap
        try:
            with open("/proc/self/pagemap", "rb", buffering=0) as f:
                entry = _u64(os.pread(f.fileno(), 8, addr // PAGE_SIZE * 8))
            pfn = entry & PM_PFN_MASK
            if not entry & PM_PRESENT or not pfn:
                return True
            with open("/proc/kpageflags", "rb", buffering=0) as f:
                flags = _u64(os.pread(f.fileno(), 8, pfn * 8))
        except OSError:
            return True
        return not flags & KPF_KSM
    finally:
        page.close()


class PageMap:
    """Pages of some areas of one process, stored as numpy arrays (one entry
    per page, in address order, areas one after another). Iterate for
    `PageInfo`s in address order; `page_pfns` gives one state's pfns as an
    array. `ksm_inferred`: this kernel's KPF_KSM is wrong, KSM pages were
    inferred (see the module's docstring)."""

    def __init__(
        self,
        pid: int,
        areas: Sequence[Area],
        states: np.ndarray,
        pfns: np.ndarray,
        mappers: np.ndarray,
        flags: Sequence[FlagReads],
        ksm_inferred: bool = False,
    ):
        self.pid = pid
        self.ksm_inferred = ksm_inferred
        self.areas = tuple(areas)
        self._states = states  # uint8 per page, index into _STATES
        self._pfns = pfns  # int64 per page, 0 when absent
        self._mappers = mappers  # int64 per page, -1 when absent
        # one per lookup batch; a pfn in several batches was read in each,
        # and the first batch's read answers
        self._flags = tuple(flags)
        # the page index at which each area starts, then the number of pages
        self._first = np.cumsum([0] + [a.pages for a in self.areas])
        n = np.bincount(states, minlength=len(_STATES))
        self.counts: dict[PageState, int] = {s: int(n[_CODE[s]]) for s in PageState}

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[PageInfo]:
        return self._infos(np.arange(len(self._states)))

    def _infos(self, idx: np.ndarray) -> Iterator[PageInfo]:
        """PageInfos of the pages at sorted indexes `idx`, made in slices so
        that only one slice's Python objects exist at a time."""
        starts = np.array([a.start for a in self.areas], dtype=np.int64)
        for lo in range(0, len(idx), 1 << 16):
            i = idx[lo : lo + (1 << 16)]
            area = np.searchsorted(self._first, i, side="right") - 1
            addrs = starts[area] + (i - self._first[area]) * PAGE_SIZE
            for addr, code, pfn, mappers in zip(
                addrs.tolist(),
                self._states[i].tolist(),
                self._pfns[i].tolist(),
                self._mappers[i].tolist(),
                strict=True,
            ):
                state = _STATES[code]
                if state is PageState.ABSENT:
                    yield PageInfo(addr, state, None, None)
                else:
                    yield PageInfo(addr, state, pfn, mappers)

    def pages(self, state: PageState | None = None) -> Iterator[PageInfo]:
        if state is None:
            return iter(self)
        return self._infos(np.flatnonzero(self._states == _CODE[state]))

    def page_pfns(self, state: PageState) -> tuple[np.ndarray, np.ndarray]:
        """(pfns, mappers) of every page in `state`, one entry per page in
        address order (a pfn mapped at several addresses repeats): int64
        arrays, the caller's own copies. For set operations across processes
        without a Python loop, e.g. the KSM pages two processes share:
        `np.intersect1d(a.page_pfns(KSM)[0], b.page_pfns(KSM)[0])`. Empty for
        ABSENT, which has no pfns."""
        if state is PageState.ABSENT:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        mask = self._states == _CODE[state]
        return self._pfns[mask], self._mappers[mask]

    def pfns(self, state: PageState) -> dict[int, int]:
        """Distinct pfns in `state` -> mappers (kpagecount) of each."""
        pfns, mappers = self.page_pfns(state)
        distinct, first = np.unique(pfns, return_index=True)
        return dict(zip(distinct.tolist(), mappers[first].tolist(), strict=True))

    def kpageflags(self, pfn: int) -> int | None:
        """Raw /proc/kpageflags bits of a pfn this map contains."""
        for batch in self._flags:
            if (flags := batch.get(pfn)) is not None:
                return flags
        return None

    @property
    def ksm_pages(self) -> int:
        return self.counts[PageState.KSM]

    @property
    def zero_pages(self) -> int:
        return self.counts[PageState.ZERO]


def _read_pagemap(files: RootFiles, pid: int, areas: Sequence[Area]) -> np.ndarray:
    """The raw pagemap entries of `areas`, one after another (uint64), read
    in pieces of at most _CHUNK entries."""
    rel = f"{_pid_dir(pid)}/pagemap"
    entries = np.zeros(sum(a.pages for a in areas), np.uint64)
    at = 0
    for area in areas:
        first = area.start // PAGE_SIZE
        for lo in range(0, area.pages, _CHUNK):
            want = min(_CHUNK, area.pages - lo)
            try:
                got = files.pread_into(rel, (first + lo) * 8, entries[at + lo : at + lo + want])
            except PermissionError as e:
                raise _hidden(f"/proc/{pid}/pagemap") from e
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ESRCH):
                    raise _no_process(pid) from e
                raise
            if got < want * 8:  # area unmapped or the process exited mid-read
                if not files.exists(_pid_dir(pid)):
                    raise _no_process(pid)
                entries[at + lo + got // 8 : at + area.pages] = 0  # the rest: absent
                break
        at += area.pages
    return entries


def _maps_guesses(files: RootFiles, pid: int) -> list[Area]:
    """The areas of /proc/<pid>/maps (no page table walk) that may be
    mergeable and are large enough to read ahead: private and writable."""
    try:
        text = files.read_text(f"{_pid_dir(pid)}/maps")
    except OSError:
        return []  # read nothing ahead: smaps then says what is wrong
    out = []
    for line in text.splitlines():
        vma = _vma_header(line)
        if vma is None:
            continue
        area, perms = Area(vma[0], vma[1]), vma[2]
        if perms[1:2] == "w" and perms[3:4] == "p" and area.pages >= _AHEAD:
            out.append(area)
    return out


@dataclass
class _Block:
    """Pages decoded from pagemap (and kpageflags/kpagecount for those not
    exclusively mapped): one entry per page, as PageMap holds them."""

    states: np.ndarray
    pfns: np.ndarray
    mappers: np.ndarray
    exclusive: np.ndarray
    flags: list[FlagReads]

    def __getitem__(self, part: slice) -> _Block:
        return _Block(self.states[part], self.pfns[part], self.mappers[part],
                      self.exclusive[part], self.flags)

    @staticmethod
    def join(blocks: Sequence[_Block]) -> _Block:
        if len(blocks) == 1:
            return blocks[0]
        flags: list[FlagReads] = []
        for b in blocks:  # a block sliced twice from one read-ahead: its reads once
            flags += [f for f in b.flags if not any(f is g for g in flags)]
        return _Block(*(np.concatenate([getattr(b, k) for b in blocks])
                        for k in ("states", "pfns", "mappers", "exclusive")), flags)


def _decode(files: RootFiles, pid: int, entries: np.ndarray, infer: bool) -> _Block:
    present = entries >= np.uint64(PM_PRESENT)
    exclusive = present & ((entries & np.uint64(PM_MMAP_EXCLUSIVE)) != 0)
    entries &= np.uint64(PM_PFN_MASK)  # in place: the entries become the pfns
    entries[~present] = 0
    pfns = entries.view(np.int64)
    if not pfns[present].all():
        # Since 4.2 pagemap shows pfn 0 to anyone without CAP_SYS_ADMIN.
        raise _hidden(f"/proc/{pid}/pagemap")
    states = np.full(len(pfns), _CODE[PageState.ABSENT], np.uint8)
    mappers = np.full(len(pfns), -1, np.int64)
    # Exclusively mapped: one PTE maps the page, so it is a KSM page only if
    # a KSM page with a single mapper; see _exclusive_ksm.
    states[exclusive] = _CODE[PageState.PRESENT]
    mappers[exclusive] = 1
    block = _Block(states, pfns, mappers, exclusive, [])
    shared = np.flatnonzero(present & ~exclusive)
    for lo in range(0, len(shared), _CHUNK):
        _classify(files, shared[lo : lo + _CHUNK], block, infer, counts=True)
    return block


def _decode_halves(pool: ThreadPoolExecutor, files: RootFiles, pid: int, area: Area,
                   infer: bool) -> _Block:
    """_decode of a large area in two halves, the upper one on `pool` (each
    thread its own file descriptors): the reads release the GIL."""
    if area.pages < 2 * _AHEAD:
        return _decode(files, pid, _read_pagemap(files, pid, [area]), infer)
    mid = area.start + area.pages // 2 * PAGE_SIZE

    def upper() -> _Block:
        own = RootFiles(files.root)
        with own.held_open():
            return _decode(own, pid, _read_pagemap(own, pid, [Area(mid, area.end)]), infer)

    high = pool.submit(upper)
    low = _decode(files, pid, _read_pagemap(files, pid, [Area(area.start, mid)]), infer)
    return _Block.join([low, high.result()])


def _read_ahead(files: RootFiles, pid: int, infer: bool) -> tuple[list[Area], _Block]:
    """The mergeable areas, decoded. smaps walks the page tables as pagemap
    does, at about the same cost, so the large areas that may be mergeable
    are read from pagemap and decoded on this thread while smaps is read on
    another; an area smaps then shows mergeable is taken from what was read
    ahead, if it lies inside one, else read now."""
    guesses = _maps_guesses(files, pid)
    if not guesses:
        areas = mergeable_areas(pid, files=files)
        return areas, _decode(files, pid, _read_pagemap(files, pid, areas), infer)
    ahead: dict[Area, _Block] = {}
    with ThreadPoolExecutor(2, thread_name_prefix="ksmtrace-pagemap") as pool:
        smaps = pool.submit(mergeable_areas, pid, files=RootFiles(files.root))
        try:
            for g in guesses:
                ahead[g] = _decode_halves(pool, files, pid, g, infer)
        finally:
            areas = smaps.result()  # raises what smaps raised, first
    blocks = []
    for a in areas:
        g = next((g for g in ahead if g.start <= a.start and a.end <= g.end), None)
        if g is None:
            blocks.append(_decode(files, pid, _read_pagemap(files, pid, [a]), infer))
        else:
            lo = (a.start - g.start) // PAGE_SIZE
            blocks.append(ahead[g][lo : lo + a.pages])
    if not blocks:
        return areas, _decode(files, pid, np.empty(0, np.uint64), infer)
    return areas, _Block.join(blocks)


def read_page_map(
    pid: int,
    areas: Sequence[Area] | None = None,
    root: str | os.PathLike = "/",
    *,
    files: RootFiles | None = None,
) -> PageMap:
    """The page map of `pid` over `areas` (default: its mergeable areas).

    Raises NoProcess if the pid does not exist (or exits while being read),
    NotRoot if the kernel hides pfns or page flags from us.
    """
    files = files or RootFiles(root)
    if not files.exists(_pid_dir(pid)):
        raise _no_process(pid)
    # a fixture tree was recorded on a kernel whose flags were checked
    infer = files.root == Path("/") and not kpf_ksm_reliable()
    with files.held_open():
        if areas is None:
            areas, block = _read_ahead(files, pid, infer)
        else:
            block = _decode(files, pid, _read_pagemap(files, pid, areas), infer)
        if not infer:  # an inferred KSM page has two mappers or more
            _exclusive_ksm(files, areas, block)
    return PageMap(pid, areas, block.states, block.pfns, block.mappers, block.flags, infer)


def _exclusive_ksm(files: RootFiles, areas: Sequence[Area], block: _Block) -> None:
    """Finds the KSM pages among the exclusively mapped pages of each area:
    KSM pages whose other mappers wrote or unmapped theirs. smaps counted
    the area's KSM pages (Area.ksm); their flags are read, in address order
    and in growing batches, only until the pages found match that count.
    Without a count, every exclusive page's flags are read."""
    ksm = _CODE[PageState.KSM]
    at = 0
    for area in areas:
        lo, at = at, at + area.pages
        if area.ksm is not None:
            missing = area.ksm - int(np.count_nonzero(block.states[lo:at] == ksm))
            if missing <= 0:
                continue
        idx = np.flatnonzero(block.exclusive[lo:at]) + lo
        batch = _FIRST_BATCH
        while len(idx):
            part, idx = idx[:batch], idx[batch:]
            _classify(files, part, block, False, counts=False)
            batch = min(batch * 2, _CHUNK)
            if area.ksm is not None:
                missing = area.ksm - int(np.count_nonzero(block.states[lo:at] == ksm))
                if missing <= 0:
                    break


def _classify(files: RootFiles, page: np.ndarray, block: _Block, infer: bool, *,
              counts: bool) -> None:
    """States of the present pages at indexes `page` of `block` from their
    kpageflags, and their mappers from kpagecount (`counts`; else they keep
    theirs)."""
    if not len(page):
        return
    pfn = block.pfns[page]
    first, length, at = reads(pfn)
    try:
        if counts:
            flags, n64 = read_flags_and_counts(files, first, length)
        else:
            flags = read_u64s_parallel(files, "proc/kpageflags", first, length)
    except PermissionError as e:
        raise _hidden("/proc/kpageflags and /proc/kpagecount") from e
    held = np.zeros(len(flags), bool)
    held[at] = True
    block.flags.append(FlagReads(first, np.cumsum(length) - length, flags, held))
    # each u64 read classified once, then given to the pages on it: a read
    # holds each distinct pfn once, where merged memory has many pages
    code = np.full(len(flags), _CODE[PageState.PRESENT], np.uint8)
    ksm = (flags & np.uint64(KPF_KSM)) != 0
    if counts:
        n = n64.view(np.int64)
        block.mappers[page] = n[at]
        if infer:
            ksm &= n >= 2
    code[ksm] = _CODE[PageState.KSM]
    # The zero page check comes last, overriding: it is never a KSM page,
    # and KSM's use_zero_pages maps it instead of a KSM page.
    code[(flags & np.uint64(KPF_ZERO_PAGE)) != 0] = _CODE[PageState.ZERO]
    block.states[page] = code[at]
