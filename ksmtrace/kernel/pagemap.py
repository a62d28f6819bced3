"""The page map of a process's mergeable memory: for every page of every
VM_MERGEABLE area, whether it is a KSM page, the shared zero page, an ordinary
resident page or absent, with its pfn and how many PTEs map it.

Sources (Documentation/admin-guide/mm/pagemap.rst), all root-only:
- /proc/<pid>/smaps       areas whose VmFlags contain `mg` (VM_MERGEABLE)
- /proc/<pid>/pagemap     one u64 per virtual page: bit 63 present, bit 62
                          swapped, bits 0-54 pfn (zeroed without CAP_SYS_ADMIN)
- /proc/kpageflags        one u64 per pfn: KPF_KSM bit 21, KPF_ZERO_PAGE bit 24
- /proc/kpagecount        one u64 per pfn: number of PTEs mapping the page

pagemap is read once per area; kpageflags and kpagecount only at the distinct
pfns found, sorted and grouped into a few contiguous reads.

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

import ctypes
import enum
import errno
import mmap
import os
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ksmtrace.errors import NoProcess, NotRoot

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_PFN_MASK = (1 << 55) - 1
KPF_KSM = 1 << 21
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24

# kpageflags/kpagecount reads: pfns closer than this share one read, which
# costs at most this many unused u64s per gap but saves a syscall.
_PFN_GAP = 64


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

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        p = self.path(rel)
        return p.exists() or p.with_name(p.name + ".chunks").is_dir()

    def read_text(self, rel: str) -> str:
        return self.path(rel).read_text()

    def pread(self, rel: str, offset: int, size: int) -> bytes:
        p = self.path(rel)
        chunks = p.with_name(p.name + ".chunks")
        if not p.exists() and chunks.is_dir():
            return self._pread_chunks(chunks, offset, size)
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
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


def _u64s(data: bytes) -> array:
    a = array("Q")
    a.frombytes(data[: len(data) - len(data) % 8])
    return a


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
                (entry,) = _u64s(os.pread(f.fileno(), 8, addr // PAGE_SIZE * 8))
            pfn = entry & PM_PFN_MASK
            if not entry & PM_PRESENT or not pfn:
                return True
            with open("/proc/kpageflags", "rb", buffering=0) as f:
                (flags,) = _u64s(os.pread(f.fileno(), 8, pfn * 8))
        except (OSError, ValueError):
            return True
        return not flags & KPF_KSM
    finally:
        page.close()


class PageMap:
    """Pages of some areas of one process, stored compactly (one array entry
    per page, not one object). Iterate for `PageInfo`s in address order.
    `ksm_inferred`: this kernel's KPF_KSM is wrong, KSM pages were inferred
    (see the module's docstring)."""

    def __init__(
        self,
        pid: int,
        areas: Sequence[Area],
        states: bytes,
        pfns: array,
        mappers: array,
        flags: dict[int, int],
        ksm_inferred: bool = False,
    ):
        self.pid = pid
        self.ksm_inferred = ksm_inferred
        self.areas = tuple(areas)
        self._states = states  # index into _STATES per page
        self._pfns = pfns  # 0 when absent
        self._mappers = mappers  # -1 when absent
        self._flags = flags  # kpageflags per distinct pfn
        self.counts: dict[PageState, int] = {s: states.count(_CODE[s]) for s in PageState}

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[PageInfo]:
        i = 0
        for area in self.areas:
            for addr in range(area.start, area.end, PAGE_SIZE):
                state = _STATES[self._states[i]]
                if state is PageState.ABSENT:
                    yield PageInfo(addr, state, None, None)
                else:
                    yield PageInfo(addr, state, self._pfns[i], self._mappers[i])
                i += 1

    def pages(self, state: PageState | None = None) -> Iterator[PageInfo]:
        return (p for p in self if state is None or p.state is state)

    def pfns(self, state: PageState) -> dict[int, int]:
        """Distinct pfns in `state` -> mappers (kpagecount) of each."""
        if state is PageState.ABSENT:
            return {}
        code = _CODE[state]
        return {
            self._pfns[i]: self._mappers[i]
            for i in range(len(self._states))
            if self._states[i] == code
        }

    def kpageflags(self, pfn: int) -> int | None:
        """Raw /proc/kpageflags bits of a pfn this map contains."""
        return self._flags.get(pfn)

    @property
    def ksm_pages(self) -> int:
        return self.counts[PageState.KSM]

    @property
    def zero_pages(self) -> int:
        return self.counts[PageState.ZERO]


def _pfn_runs(pfns: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first, count) reads covering sorted distinct pfns."""
    if not pfns:
        return
    start = prev = pfns[0]
    for pfn in pfns[1:]:
        if pfn - prev > _PFN_GAP:
            yield start, prev - start + 1
            start = pfn
        prev = pfn
    yield start, prev - start + 1


def _read_per_pfn(files: RootFiles, rel: str, pfns: Sequence[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for first, count in _pfn_runs(pfns):
        values = _u64s(files.pread(rel, first * 8, count * 8))
        for pfn in pfns[bisect_right(pfns, first - 1) : bisect_right(pfns, first + count - 1)]:
            idx = pfn - first
            out[pfn] = values[idx] if idx < len(values) else 0
    return out


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
    entries = array("Q")
    for area in areas:
        try:
            data = files.pread(
                f"{_pid_dir(pid)}/pagemap", area.start // PAGE_SIZE * 8, area.pages * 8
            )
        except PermissionError as e:
            raise _hidden(f"/proc/{pid}/pagemap") from e
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                raise _no_process(pid) from e
            raise
        got = _u64s(data)
        if len(got) < area.pages:  # area unmapped or the process exited mid-read
            if not files.exists(_pid_dir(pid)):
                raise _no_process(pid)
            got.extend([0] * (area.pages - len(got)))
        entries.extend(got)

    pfns = array("Q", bytes(8 * len(entries)))
    present = []
    for i, e in enumerate(entries):
        if e & PM_PRESENT:
            pfn = e & PM_PFN_MASK
            if pfn == 0:
                # Since 4.2 pagemap shows pfn 0 to anyone without CAP_SYS_ADMIN.
                raise _hidden(f"/proc/{pid}/pagemap")
            pfns[i] = pfn
            present.append(i)

    distinct = sorted({pfns[i] for i in present})
    try:
        flags = _read_per_pfn(files, "proc/kpageflags", distinct)
        counts = _read_per_pfn(files, "proc/kpagecount", distinct)
    except PermissionError as e:
        raise _hidden("/proc/kpageflags and /proc/kpagecount") from e

    states = bytearray([_CODE[PageState.ABSENT]]) * len(entries)
    mappers = array("q", [-1]) * len(entries)
    ksm, zero, plain = _CODE[PageState.KSM], _CODE[PageState.ZERO], _CODE[PageState.PRESENT]
    # a fixture tree was recorded on a kernel whose flags were checked
    infer = files.root == Path("/") and not kpf_ksm_reliable()
    for i in present:
        pfn = pfns[i]
        f = flags[pfn]
        # The zero page check comes first: it is never a KSM page, and KSM's
        # use_zero_pages maps it instead of a KSM page.
        is_ksm = f & KPF_KSM and (not infer or counts[pfn] >= 2)
        states[i] = zero if f & KPF_ZERO_PAGE else ksm if is_ksm else plain
        mappers[i] = counts[pfn]
    return PageMap(pid, areas, bytes(states), pfns, mappers, flags, infer)
