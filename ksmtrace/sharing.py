"""Who shares with whom: which workloads (or processes) map the same KSM page
frames, from their page maps (kernel/pagemap.py: pagemap pfns and
kpageflags, root).

Pages of A and B are shared when a page of A and a page of B map the same
KSM page frame. For groups G (workloads or processes):

- `pages[g]`: G's pages mapped to KSM frames (page table entries, so a
  forked child that inherited its parent's KSM pages counts them, though
  its ksm_stat does not: KSM counts its own rmap items, not the PTEs);
- `alone[g]` / `with_others[g]`: those of G's pages whose frame only G maps,
  and those whose frame another group maps too;
- `matrix[a, b]` (a != b): the frames A and B have in common (symmetric);
  `matrix[g, g]`: G's own duplicates, the pages G maps to a frame it maps
  more than once (duplicate pages inside one VM);
- `exposure(groups)`: the memory the host would need if those groups wrote
  every KSM page they map: a copy per page, less the frames that only they
  map, which KSM then frees.

The zero page (use_zero_pages) is not a KSM frame and is left out. Pure
numpy on page maps already read: tests feed it maps of real processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ksmtrace.kernel.pagemap import PAGE_SIZE, PageMap, PageState

TOP_PAGES = 20  # frames listed by number of mappers


@dataclass(frozen=True)
class TopPage:
    pfn: int
    mappers: int  # page table entries mapping it, among the groups read
    owners: tuple[tuple[int, int], ...]  # (group index, its pages on the frame), most first


@dataclass(frozen=True)
class SharingMap:
    groups: tuple[str, ...]  # labels, one per group, in matrix order
    pages: np.ndarray
    alone: np.ndarray
    with_others: np.ndarray
    matrix: np.ndarray
    frames: int  # distinct KSM frames mapped by the groups
    top: tuple[TopPage, ...]
    _pfns: np.ndarray = field(repr=False)  # distinct (frame, group) pairs: frame
    _owner: np.ndarray = field(repr=False)  # ... and group
    _count: np.ndarray = field(repr=False)  # ... and the group's pages on it

    def exposure(self, groups: Sequence[int]) -> int:
        """Bytes the host would need if `groups` wrote every KSM page they map."""
        chosen = np.isin(self._owner, np.asarray(groups, dtype=np.int64))
        copies = int(self._count[chosen].sum())
        # a frame only the chosen map is freed once they have all written it
        freed = len(np.setdiff1d(np.unique(self._pfns[chosen]), np.unique(self._pfns[~chosen]),
                                 assume_unique=True))
        return (copies - freed) * PAGE_SIZE

    def shared_bytes(self, a: int, b: int) -> int:
        return int(self.matrix[a, b]) * PAGE_SIZE

    def pairs(self) -> list[tuple[int, int, int]]:
        """(a, b, frames in common) for a < b with any, most first."""
        a, b = np.nonzero(np.triu(self.matrix, 1))
        out = [(int(i), int(j), int(self.matrix[i, j])) for i, j in zip(a, b, strict=True)]
        return sorted(out, key=lambda x: (-x[2], x[0], x[1]))


def ksm_pfns(m: PageMap) -> np.ndarray:
    """The KSM frame of each of a process's KSM pages: all the map keeps."""
    return m.page_pfns(PageState.KSM)[0]


def build(groups: Sequence[str], parts: Sequence[tuple[int, np.ndarray]],
          top: int = TOP_PAGES) -> SharingMap:
    """The sharing map of `parts`, each (group index, a process's ksm_pfns)."""
    n = len(groups)
    pfns = np.concatenate([p for _, p in parts] or [np.empty(0, np.int64)])
    owner = np.concatenate([np.full(len(p), g, np.int64) for g, p in parts]
                           or [np.empty(0, np.int64)])
    # distinct (frame, group) pairs, with the group's pages on the frame
    key = pfns * n + owner if n else pfns
    pairs, count = np.unique(key, return_counts=True)
    pf, ow = (pairs // n, pairs % n) if n else (pairs, pairs)
    frames, first, groups_on = np.unique(pf, return_index=True, return_counts=True)
    shared = np.repeat(groups_on > 1, groups_on)  # per pair: another group maps the frame
    pages = np.bincount(ow, weights=count, minlength=n).astype(np.int64)
    with_others = np.bincount(ow[shared], weights=count[shared], minlength=n).astype(np.int64)
    matrix = np.zeros((n, n), np.int64)
    np.add.at(matrix, (ow, ow), count - 1)  # duplicates inside each group
    # frames in common: every pair of groups on each frame, by number of groups
    for k in np.unique(groups_on[groups_on > 1]):
        starts = first[groups_on == k]
        members = ow[starts[:, None] + np.arange(k)]  # (frames with k groups, k)
        for i in range(k):
            for j in range(k):
                if i != j:
                    np.add.at(matrix, (members[:, i], members[:, j]), 1)
    # the frames with the most mappers, with their owners
    mappers = np.add.reduceat(count, first) if len(first) else np.empty(0, np.int64)
    best = np.lexsort((frames, -mappers))[:top]
    tops = []
    for f in best:
        s, e = first[f], first[f] + groups_on[f]
        owners = sorted(zip(ow[s:e].tolist(), count[s:e].tolist(), strict=True),
                        key=lambda x: (-x[1], x[0]))
        tops.append(TopPage(int(frames[f]), int(mappers[f]), tuple(owners)))
    return SharingMap(tuple(groups), pages, pages - with_others, with_others, matrix,
                      len(frames), tuple(tops), pf, ow, count)
