"""The pure part of the workload generator: a workload's shape, and what
the kernel must show for it (`expect`, `model`), which pages a COW storm or
a restore writes. No kernel, no processes: unit-tested as plain functions."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ksmtrace.errors import Exit, KsmtraceError

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


@dataclass
class State:
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
