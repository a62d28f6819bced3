"""The page map of a process's mergeable memory: for every page of every
VM_MERGEABLE area, whether it is a KSM page, the shared zero page, an ordinary
resident page or absent, with its pfn and how many PTEs map it.

Sources (Documentation/admin-guide/mm/pagemap.rst), all root-only:
- /proc/<pid>/smaps       areas whose VmFlags contain `mg` (VM_MERGEABLE)
- /proc/<pid>/pagemap     one u64 per virtual page: bit 63 present, bit 62
                          swapped, bits 0-54 pfn (zeroed without CAP_SYS_ADMIN)
- /proc/kpageflags        one u64 per pfn: KPF_KSM bit 21, KPF_ZERO_PAGE bit 24
- /proc/kpagecount        one u64 per pfn: number of PTEs mapping the page

All of it is numpy, not a loop per page. pagemap is read in pieces of at most
`_CHUNK` entries; the pages are then looked up in batches of `_CHUNK`:
kpageflags and kpagecount are read only around the pfns found, in a few
contiguous reads found from the runs of consecutive pfns (no sort per page),
on two threads for large batches. The kernel's own work dominates: ~140 ns
per pfn for each of kpageflags and kpagecount on the development host, so a
map costs about that per distinct pfn, however fast the rest (bench/pagemap.py).

KPF_KSM is wrong on some kernels (6.12): stable_page_flags() tests
`mapping & PAGE_MAPPING_KSM`, which PAGE_MAPPING_ANON alone satisfies, so every
anonymous page reads as KSM. `kpf_ksm_reliable()` tests it once on a private
page of our own; where it fails, a page is taken for a KSM page when it is
anonymous and mapped by two PTEs or more (KSM pages are shared; a KSM page
left with one mapper, or an anonymous page shared after fork, is then
misread), and the map says its KSM state is inferred.

A fixture root cannot hold these files whole (their offsets reach terabytes),
so `RootFiles` also reads a recorded form: a directory `<file>.chunks/` next to
where the file would be, holding the bytes the kernel returned as files named
by their byte offset in hex. Bytes outside every chunk read as zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import mmap
import os
import sys
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ksmtrace.errors import NoProcess, NotRoot

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_PFN_MASK = (1 << 55) - 1
KPF_KSM = 1 << 21
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24

# kpageflags/kpagecount reads: pfns closer than this share one read, which
# costs at most this many unused u64s per gap but saves a read. On the
# development host the kernel takes ~140 ns per u64 and a read costs ~2 us
# more (syscall, Python): 16 unused u64s cost about one read.
_PFN_GAP = 16
# pagemap entries per read, and pages per batch of the pfn lookup: the memory
# held beyond the map's own arrays is a small multiple of this many u64s.
_CHUNK = 1 << 20
# u64s per file from which a batch reads kpageflags and kpagecount on two
# threads (below it, starting a thread costs more than it saves)
_PARALLEL = 1 << 15


class PageState(enum.Enum):
    KSM = "ksm"  # mapped to a KSM (stable tree) page
    ZERO = "zero"  # the shared zero page (KSM's use_zero_pages, or never written)
    PRESENT = "present"  # an ordinary resident page (THP included)
    ABSENT = "absent"  # not resident: never touched, or swapped out


_STATES = tuple(PageState)
_CODE = {s: i for i, s in enumerate(_STATES)}


@dataclass(frozen=True)
class Area:
    """A mergeable VMA: [start, end) and its backing path ("" if anonymous)."""

    start: int
    end: int
    path: str = ""

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE


@dataclass(frozen=True)
class PageInfo:
    addr: int
    state: PageState
    pfn: int | None  # None when absent
    mappers: int | None  # PTEs mapping the pfn (kpagecount); None when absent


class RootFiles:
    """Positioned reads of files under a root: the live files, or recorded
    `<name>.chunks/` directories in a fixture tree."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.root = Path(root)
        self._chunks: dict[Path, tuple[list[int], list[bytes]]] = {}
        # rel -> the live file's path, or the Path of its .chunks directory:
        # found once, as a page map makes thousands of reads of a few files
        self._where: dict[str, str | Path] = {}
        # live path -> fd, inside held_open() only; each file is read by one
        # thread at a time, so no two threads open the same one
        self._fds: dict[str, int] | None = None

    @contextlib.contextmanager
    def held_open(self) -> Iterator[None]:
        """Within it, a live file stays open from its first pread until the
        end (an open costs as much as reading ~50 pfns' flags). Re-entrant."""
        if self._fds is not None:
            yield
            return
        self._fds = {}
        try:
            yield
        finally:
            fds, self._fds = self._fds, None
            for fd in fds.values():
                os.close(fd)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        p = self.path(rel)
        return p.exists() or p.with_name(p.name + ".chunks").is_dir()

    def read_text(self, rel: str) -> str:
        return self.path(rel).read_text()

    def pread(self, rel: str, offset: int, size: int) -> bytes:
        where = self._where.get(rel)
        if where is None:
            p = self.path(rel)
            chunks = p.with_name(p.name + ".chunks")
            where = self._where[rel] = chunks if not p.exists() and chunks.is_dir() else str(p)
        if isinstance(where, Path):
            return self._pread_chunks(where, offset, size)
        fds = self._fds
        fd = fds.get(where) if fds is not None else None
        if fd is None:
            fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
            if fds is not None:
                fds[where] = fd
        try:
            parts = []
            while size > 0:
                data = os.pread(fd, size, offset)
                if not data:
                    break  # past the last pfn, or the process is exiting
                parts.append(data)
                offset += len(data)
                size -= len(data)
            return b"".join(parts)
        finally:
            if fds is None:
                os.close(fd)

    def _pread_chunks(self, d: Path, offset: int, size: int) -> bytes:
        if d not in self._chunks:
            items = sorted((int(f.name, 16), f.read_bytes()) for f in d.iterdir())
            self._chunks[d] = ([o for o, _ in items], [b for _, b in items])
        offsets, blobs = self._chunks[d]
        out = bytearray(size)
        i = max(bisect_right(offsets, offset) - 1, 0)
        while i < len(offsets) and offsets[i] < offset + size:
            lo = max(offsets[i], offset)
            hi = min(offsets[i] + len(blobs[i]), offset + size)
            if lo < hi:
                out[lo - offset : hi - offset] = blobs[i][lo - offsets[i] : hi - offsets[i]]
            i += 1
        return bytes(out)


def parse_smaps_areas(text: str) -> list[Area]:
    """Areas of smaps text whose VmFlags contain `mg`."""
    areas: list[Area] = []
    header: tuple[int, int, str] | None = None
    for line in text.splitlines():
        if line.startswith("VmFlags:"):
            if header and "mg" in line.split()[1:]:
                areas.append(Area(*header))
            header = None
            continue
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:
            # "start-end perms offset dev inode [path]": path may contain spaces.
            fields = line.split(None, 5)
            lo, _, hi = fields[0].partition("-")
            try:
                header = (int(lo, 16), int(hi, 16), fields[5] if len(fields) > 5 else "")
            except ValueError:
                header = None
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


@dataclass(frozen=True)
class _FlagReads:
    """The kpageflags reads of one lookup batch: each read's first pfn
    (sorted, reads disjoint), where its u64s start in `flags`, the u64s, and
    which of them are at a pfn of the batch's pages (the rest fill gaps)."""

    first: np.ndarray
    offset: np.ndarray
    flags: np.ndarray
    held: np.ndarray

    def get(self, pfn: int) -> int | None:
        if not 0 < pfn <= PM_PFN_MASK:
            return None
        i = int(np.searchsorted(self.first, pfn, side="right")) - 1
        if i < 0:
            return None
        j = int(self.offset[i]) + pfn - int(self.first[i])
        end = int(self.offset[i + 1]) if i + 1 < len(self.offset) else len(self.flags)
        return int(self.flags[j]) if j < end and self.held[j] else None


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
        flags: Sequence[_FlagReads],
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
        for reads in self._flags:
            if (flags := reads.get(pfn)) is not None:
                return flags
        return None

    @property
    def ksm_pages(self) -> int:
        return self.counts[PageState.KSM]

    @property
    def zero_pages(self) -> int:
        return self.counts[PageState.ZERO]


def _reads(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads covering the pfns of some pages (int64, in page order, repeats
    allowed): (first pfn, length) of each read, sorted and disjoint, and each
    page's index into the concatenation of the reads. Found from the runs of
    pages whose pfn goes up by one from page to page (a THP is one run), so
    only the runs are sorted, not the pages. Reads start and end at a page's
    pfn, and join pfns no more than _PFN_GAP apart, as if between the sorted
    distinct pfns."""
    n = len(pfns)
    start = np.flatnonzero(np.diff(pfns, prepend=pfns[:1] - 2) != 1)  # each run's first page
    length = np.diff(start, append=n)
    lo = pfns[start]
    order = np.argsort(lo, kind="stable")
    lo_sorted = lo[order]
    reach = np.maximum.accumulate(lo_sorted + length[order] - 1)  # highest pfn so far
    new = np.ones(len(order), bool)  # the run starts a read
    new[1:] = lo_sorted[1:] - reach[:-1] > _PFN_GAP
    heads = np.flatnonzero(new)
    first = lo_sorted[heads]
    read_length = reach[np.append(heads[1:], len(order)) - 1] - first + 1
    read = np.empty(len(order), np.int64)
    read[order] = np.cumsum(new) - 1  # the read each run falls in
    shift = (np.cumsum(read_length) - read_length - first)[read]  # pfn -> index, per run
    return first, read_length, pfns + np.repeat(shift, length)


def _read_u64s(files: RootFiles, rel: str, first: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The concatenated u64s at [first, first + length) of each read; past the
    file's end they read as zero."""
    parts = []
    for f, n in zip(first.tolist(), length.tolist(), strict=True):
        data = files.pread(rel, f * 8, n * 8)
        parts.append(data + bytes(n * 8 - len(data)))
    return np.frombuffer(b"".join(parts), np.uint64)


def _read_flags_and_counts(
    files: RootFiles, first: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """kpageflags and kpagecount over the same reads. The kernel computes
    every u64 it returns (~140 ns each on the development host), so a large
    batch reads the two files on two threads: os.pread releases the GIL."""
    if length.sum() < _PARALLEL:
        return (
            _read_u64s(files, "proc/kpageflags", first, length),
            _read_u64s(files, "proc/kpagecount", first, length),
        )
    with ThreadPoolExecutor(1, thread_name_prefix="ksmtrace-kpagecount") as pool:
        counts = pool.submit(_read_u64s, files, "proc/kpagecount", first, length)
        return _read_u64s(files, "proc/kpageflags", first, length), counts.result()


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
                data = files.pread(rel, (first + lo) * 8, want * 8)
            except PermissionError as e:
                raise _hidden(f"/proc/{pid}/pagemap") from e
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ESRCH):
                    raise _no_process(pid) from e
                raise
            got = np.frombuffer(data, np.uint64, len(data) // 8)
            entries[at + lo : at + lo + len(got)] = got
            if len(got) < want:  # area unmapped or the process exited mid-read
                if not files.exists(_pid_dir(pid)):
                    raise _no_process(pid)
                break  # the rest of the area stays zero: absent
        at += area.pages
    return entries


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
    if areas is None:
        areas = mergeable_areas(pid, files=files)
    # a fixture tree was recorded on a kernel whose flags were checked
    infer = files.root == Path("/") and not kpf_ksm_reliable()
    with files.held_open():
        return _read_map(files, pid, areas, infer)


def _read_map(files: RootFiles, pid: int, areas: Sequence[Area], infer: bool) -> PageMap:
    pfns = _read_pagemap(files, pid, areas)
    states = np.full(len(pfns), _CODE[PageState.ABSENT], np.uint8)
    mappers = np.full(len(pfns), -1, np.int64)
    flag_reads: list[_FlagReads] = []
    for lo in range(0, len(pfns), _CHUNK):
        entries = pfns[lo : lo + _CHUNK]  # a view: becomes the batch's pfns in place
        present = entries >= np.uint64(PM_PRESENT)
        entries &= np.uint64(PM_PFN_MASK)
        entries[~present] = 0
        page = np.flatnonzero(present)
        if not len(page):
            continue
        pfn = entries[page].view(np.int64)
        if not pfn.all():
            # Since 4.2 pagemap shows pfn 0 to anyone without CAP_SYS_ADMIN.
            raise _hidden(f"/proc/{pid}/pagemap")
        first, length, at = _reads(pfn)
        try:
            flags, counts = _read_flags_and_counts(files, first, length)
        except PermissionError as e:
            raise _hidden("/proc/kpageflags and /proc/kpagecount") from e
        held = np.zeros(len(flags), bool)
        held[at] = True
        flag_reads.append(_FlagReads(first, np.cumsum(length) - length, flags, held))
        f, n = flags[at], counts[at].view(np.int64)
        code = np.full(len(page), _CODE[PageState.PRESENT], np.uint8)
        ksm = (f & np.uint64(KPF_KSM)) != 0
        if infer:
            ksm &= n >= 2
        code[ksm] = _CODE[PageState.KSM]
        # The zero page check comes last, overriding: it is never a KSM page,
        # and KSM's use_zero_pages maps it instead of a KSM page.
        code[(f & np.uint64(KPF_ZERO_PAGE)) != 0] = _CODE[PageState.ZERO]
        states[lo : lo + _CHUNK][page] = code
        mappers[lo : lo + _CHUNK][page] = n
    return PageMap(pid, areas, states, pfns.view(np.int64), mappers, flag_reads, infer)
