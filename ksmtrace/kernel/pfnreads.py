"""kpageflags and kpagecount around the pfns of a set of pages: a few
contiguous reads, found from the runs of consecutive pfns, on two threads
for large batches (os.pread releases the GIL). The kernel computes every
u64 it returns, ~140 ns each on the development host, so the reads cover
the pages' pfns and small gaps between them, nothing more.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ksmtrace.kernel.rootfiles import RootFiles

# kpageflags/kpagecount reads: pfns closer than this share one read, which
# costs at most this many unused u64s per gap but saves a read. On the
# development host the kernel takes ~140 ns per u64 and a read costs ~2 us
# more (syscall, Python): 16 unused u64s cost about one read.
PFN_GAP = 16
# u64s per file from which a batch reads kpageflags and kpagecount on two
# threads (below it, starting a thread costs more than it saves)
PARALLEL = 1 << 15


@dataclass(frozen=True)
class FlagReads:
    """The kpageflags reads of one lookup batch: each read's first pfn
    (sorted, reads disjoint), where its u64s start in `flags`, the u64s, and
    which of them are at a pfn of the batch's pages (the rest fill gaps)."""

    first: np.ndarray
    offset: np.ndarray
    flags: np.ndarray
    held: np.ndarray

    def get(self, pfn: int) -> int | None:
        if not 0 < pfn < 1 << 63:
            return None
        i = int(np.searchsorted(self.first, pfn, side="right")) - 1
        if i < 0:
            return None
        j = int(self.offset[i]) + pfn - int(self.first[i])
        end = int(self.offset[i + 1]) if i + 1 < len(self.offset) else len(self.flags)
        return int(self.flags[j]) if j < end and self.held[j] else None


def reads(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads covering the pfns of some pages (int64, in page order, repeats
    allowed): (first pfn, length) of each read, sorted and disjoint, and each
    page's index into the concatenation of the reads. Found from the runs of
    pages whose pfn goes up by one from page to page (a THP is one run), so
    only the runs are sorted, not the pages (np.unique on the pages costs 3-4
    times more, even where every run is one page long). Reads start and end
    at a page's pfn, and join pfns no more than PFN_GAP apart, as if between
    the sorted distinct pfns."""
    n = len(pfns)
    start = np.flatnonzero(np.diff(pfns, prepend=pfns[:1] - 2) != 1)  # each run's first page
    length = np.diff(start, append=n)
    lo = pfns[start]
    order = np.argsort(lo, kind="stable")
    lo_sorted = lo[order]
    reach = np.maximum.accumulate(lo_sorted + length[order] - 1)  # highest pfn so far
    new = np.ones(len(order), bool)  # the run starts a read
    new[1:] = lo_sorted[1:] - reach[:-1] > PFN_GAP
    heads = np.flatnonzero(new)
    first = lo_sorted[heads]
    read_length = reach[np.append(heads[1:], len(order)) - 1] - first + 1
    read = np.empty(len(order), np.int64)
    read[order] = np.cumsum(new) - 1  # the read each run falls in
    shift = (np.cumsum(read_length) - read_length - first)[read]  # pfn -> index, per run
    return first, read_length, pfns + np.repeat(shift, length)


def read_u64s(files: RootFiles, rel: str, first: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The concatenated u64s at [first, first + length) of each read; past the
    file's end they read as zero."""
    parts = []
    for f, n in zip(first.tolist(), length.tolist(), strict=True):
        data = files.pread(rel, f * 8, n * 8)
        parts.append(data + bytes(n * 8 - len(data)))
    return np.frombuffer(b"".join(parts), np.uint64)


def read_u64s_parallel(files: RootFiles, rel: str, first: np.ndarray,
                        length: np.ndarray) -> np.ndarray:
    """read_u64s, a large batch split in two halves read on two threads
    (os.pread releases the GIL; each half reads its own file descriptor)."""
    if length.sum() < PARALLEL or len(first) < 2:
        return read_u64s(files, rel, first, length)
    half = int(np.searchsorted(np.cumsum(length), length.sum() // 2)) + 1
    half = min(half, len(first) - 1)
    def upper_half() -> np.ndarray:
        other = RootFiles(files.root)
        with other.held_open():
            return read_u64s(other, rel, first[half:], length[half:])

    with ThreadPoolExecutor(1, thread_name_prefix="ksmtrace-kpageflags") as pool:
        upper = pool.submit(upper_half)
        lower = read_u64s(files, rel, first[:half], length[:half])
        return np.concatenate([lower, upper.result()])


def read_flags_and_counts(
    files: RootFiles, first: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """kpageflags and kpagecount over the same reads. The kernel computes
    every u64 it returns (~140 ns each on the development host), so a large
    batch reads the two files on two threads: os.pread releases the GIL."""
    if length.sum() < PARALLEL:
        return (
            read_u64s(files, "proc/kpageflags", first, length),
            read_u64s(files, "proc/kpagecount", first, length),
        )
    with ThreadPoolExecutor(1, thread_name_prefix="ksmtrace-kpagecount") as pool:
        counts = pool.submit(read_u64s, files, "proc/kpagecount", first, length)
        return read_u64s(files, "proc/kpageflags", first, length), counts.result()
