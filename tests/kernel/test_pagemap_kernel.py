"""Kernel tier: the page map reader against real merged pages.

Child processes map anonymous memory with duplicate content and madvise it
MERGEABLE; ksmd merges it; the reader must show exactly what the kernel's own
files say (checked here with an independent raw read), and agree with the
per-process counters in ksm_stat.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ksmtrace.kernel import procfs
from ksmtrace.kernel.pagemap import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    PAGE_SIZE,
    PageState,
    kpf_ksm_reliable,
    mergeable_areas,
    read_page_map,
)
from ksmtrace.kernel.sysfs import KsmKnobs, read_sysfs
from ksmtrace.workload import Workload, WorkloadSpec

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

# A child: map `pages` private anonymous pages, no THP, fill page i with
# content i % contents (made unique to this test run by `token`), or zeros
# when contents == 0, then MADV_MERGEABLE. Prints the area start, then waits
# for stdin to close.
CHILD = r"""
import mmap, sys
pages, contents, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
ps = mmap.PAGESIZE
m = mmap.mmap(-1, pages * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
for i in range(pages):
    if contents:
        m[i * ps:(i + 1) * ps] = (token + b"%d:" % (i % contents)).ljust(ps, b".")
    else:
        m[i * ps:(i + 1) * ps] = bytes(ps)
m.madvise(mmap.MADV_MERGEABLE)
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
sys.stdin.read()
"""


@contextmanager
def children(n: int, pages: int, contents: int) -> Iterator[list[tuple[int, int]]]:
    """n children as above; yields (pid, area start); always kills them."""
    token = os.urandom(8).hex()
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, str(pages), str(contents), token],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        yield [(p.pid, int(p.stdout.readline())) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)


def wait_until(cond, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def full_scan_after(n: int = 1) -> None:
    """Wait for n more complete ksmd passes, so counters are settled."""
    start = read_sysfs().full_scans or 0
    wait_until(lambda: (read_sysfs().full_scans or 0) >= start + n, what="ksmd full scans")


def raw_pages(pid: int, start: int, pages: int) -> list[tuple[int, int]]:
    """(pfn, kpageflags) per page, read straight from the kernel's files."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE_SIZE * 8)
        entries = struct.unpack(f"{pages}Q", f.read(pages * 8))
    out = []
    with open("/proc/kpageflags", "rb") as kf:
        for e in entries:
            assert e >> 63, "page not present"
            pfn = e & ((1 << 55) - 1)
            kf.seek(pfn * 8)
            out.append((pfn, struct.unpack("Q", kf.read(8))[0]))
    return out


@pytest.mark.vm
def test_ksm_pages_and_mappers_match_the_kernel():
    nproc, pages, contents = 3, 64, 4
    with KsmKnobs() as k, children(nproc, pages, contents) as kids:
        k.set(pages_to_scan=5000, sleep_millisecs=0)
        k.set(run=1)
        wait_until(
            lambda: all(procfs.read_ksm_merging_pages(pid) == pages for pid, _ in kids),
            what="every page merged",
        )
        full_scan_after(1)

        all_ksm: dict[int, int] = {}
        for pid, start in kids:
            areas = mergeable_areas(pid)
            assert [(a.start, a.end) for a in areas] == [(start, start + pages * PAGE_SIZE)]
            pm = read_page_map(pid)
            assert len(pm) == pages
            assert pm.counts[PageState.KSM] == pages

            # Exactly the pages whose kpageflags carry KPF_KSM, same pfns.
            raw = raw_pages(pid, start, pages)
            got = [(p.pfn, p.state) for p in pm]
            want = [(pfn, PageState.KSM if f & KPF_KSM else PageState.PRESENT) for pfn, f in raw]
            assert got == want

            stat = procfs.read_ksm_stat(pid)
            # None: kernels before 6.14 print no ksm_mergeable line
            assert stat is not None and stat.ksm_mergeable in (True, None)
            assert stat.ksm_merging_pages == pm.ksm_pages
            # smaps_rollup has a KSM line since 6.6 (not on Debian 12's 6.1)
            with open(f"/proc/{pid}/smaps_rollup") as f:
                has_ksm_line = "KSM:" in f.read()
            if has_ksm_line:
                assert procfs.read_smaps_rollup_ksm_bytes(pid) == pm.ksm_pages * PAGE_SIZE
            all_ksm.update(pm.pfns(PageState.KSM))

        # 3 x 64 pages of 4 contents: 4 KSM pages, each mapped by 48 PTEs.
        assert len(all_ksm) == contents
        assert sorted(all_ksm.values()) == [nproc * pages // contents] * contents
        assert {p.pid for p in procfs.ksm_processes()} >= {pid for pid, _ in kids}


@pytest.mark.vm
@pytest.mark.ksm_zero_pages
def test_zero_pages_match_ksm_stat():
    nproc, pages = 2, 64
    with KsmKnobs() as k, children(nproc, pages, contents=0) as kids:
        k.set(pages_to_scan=5000, sleep_millisecs=0, use_zero_pages=1)
        k.set(run=1)
        wait_until(
            lambda: all(
                (s := procfs.read_ksm_stat(pid)) is not None and s.ksm_zero_pages == pages
                for pid, _ in kids
            ),
            what="every page merged with the zero page",
        )
        zero_pfns: set[int] = set()
        for pid, start in kids:
            pm = read_page_map(pid)
            raw = raw_pages(pid, start, pages)
            assert all(f & KPF_ZERO_PAGE for _, f in raw)
            assert pm.counts[PageState.ZERO] == pages
            assert [p.pfn for p in pm] == [pfn for pfn, _ in raw]
            stat = procfs.read_ksm_stat(pid)
            assert stat is not None
            assert stat.ksm_zero_pages == pm.zero_pages
            assert stat.ksm_merging_pages == pm.ksm_pages == 0
            zero_pfns.update(pm.pfns(PageState.ZERO))
        assert len(zero_pfns) == 1  # one shared zero page
        assert (read_sysfs().ksm_zero_pages or 0) >= nproc * pages


def test_vanished_process_is_no_process():
    from ksmtrace.errors import NoProcess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(NoProcess):
        read_page_map(p.pid)
    assert procfs.read_ksm_stat(p.pid) is None


@pytest.mark.vm
def test_written_pages_leave_the_ksm_pages(quiet_ksm):
    """Pages written after merging are private again: the page map's KSM
    pages equal ksm_stat's ksm_merging_pages and smaps' KSM on every kernel,
    6.12 included, whose kpageflags marks every anonymous page KSM (there the
    map infers them, and says so)."""
    spec = WorkloadSpec(processes=2, pages=400, distinct=4)
    with Workload(spec, drive_ksmd=True) as w:
        w.wait_merged()
        written = w.cow(0.25)
        w.wait_expected()  # ksmd has noticed: ksm_merging_pages dropped
        for pid in w.pids:
            pm = read_page_map(pid)
            stat = procfs.read_ksm_stat(pid)
            got = (pm.ksm_pages, pm.counts[PageState.PRESENT])
            assert got == (stat.ksm_merging_pages, written[pid]) == (300, 100)
            smaps = procfs.read_smaps_rollup_ksm_bytes(pid)
            assert smaps in (None, pm.ksm_pages * PAGE_SIZE)
            assert pm.ksm_inferred == (not kpf_ksm_reliable())


# A child with `shared` pages of content common to every child of the run and
# `unique` pages of its own after them; prints the area start like CHILD.
LONE = r"""
import ctypes, mmap, os, sys
shared, unique, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
ps = mmap.PAGESIZE
m = mmap.mmap(-1, (shared + unique) * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
for i in range(shared):
    m[i * ps:(i + 1) * ps] = (token + b"s%d:" % i).ljust(ps, b".")
for i in range(unique):
    at = (shared + i) * ps
    m[at:at + ps] = (token + b"u%d:%d:" % (os.getpid(), i)).ljust(ps, b".")
m.madvise(mmap.MADV_MERGEABLE)
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


@pytest.mark.vm
def test_ksm_pages_left_with_one_mapper_are_found(quiet_ksm, monkeypatch):
    """A's and B's first 64 pages merge, each frame mapped by both; B exits.
    A's 64 KSM pages are then mapped once, and pagemap marks them exclusive
    like A's 20,000 ordinary pages after them (enough for A's area to be
    read from pagemap while smaps is read). The map still finds all 64
    (smaps counts them), reading flags only until it has: the last pages'
    flags are never read. Without smaps' count (6.1, or an area given by
    hand) every exclusive page is read, with the same map."""
    from ksmtrace.kernel import pagemap as pm_mod

    token = os.urandom(8).hex()
    shared, unique = 64, 20000
    procs = [subprocess.Popen([sys.executable, "-c", LONE, str(shared), str(n), token],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for n in (unique, 0)]
    try:
        (a, start), (b, _) = [(p.pid, int(p.stdout.readline())) for p in procs]
        with KsmKnobs() as k:
            k.set(pages_to_scan=5000, sleep_millisecs=0, run=1)
            wait_until(lambda: procfs.read_ksm_merging_pages(a) == shared
                       and procfs.read_ksm_merging_pages(b) == shared, what="64 pages merged")
            k.set(run=0)
            procs[1].kill()
            procs[1].wait(timeout=10)
            with open(f"/proc/{a}/pagemap", "rb") as f:
                f.seek(start // PAGE_SIZE * 8)
                entries = struct.unpack(f"{shared + unique}Q", f.read((shared + unique) * 8))
            assert all(e >> 63 and e >> 56 & 1 for e in entries)  # present, exclusive
            (area,) = mergeable_areas(a)
            guesses = pm_mod._maps_guesses(pm_mod.RootFiles("/"), a)
            assert any(g.start <= area.start and area.end <= g.end for g in guesses)
            reads: list[tuple[int, int]] = []
            real = pm_mod.RootFiles.pread

            def pread(self, rel, offset, size):
                if rel == "proc/kpageflags":
                    reads.append((offset // 8, size // 8))
                return real(self, rel, offset, size)

            monkeypatch.setattr(pm_mod.RootFiles, "pread", pread)
            pm = read_page_map(a)
            reads.clear()  # what follows: the reads of the map by hand
            by_hand = read_page_map(a, [pm_mod.Area(area.start, area.end)])
            stat = procfs.read_ksm_stat(a)
        pages = list(pm)
        assert [p.state for p in by_hand] == [p.state for p in pages]
        if pm.ksm_inferred:  # 6.12: a KSM page is inferred from two mappers or more
            assert pm.ksm_pages == 0
            return
        assert area.ksm in (shared, None) and stat.ksm_merging_pages == shared
        assert [p.state for p in pages] == [PageState.KSM] * shared + [PageState.PRESENT] * unique
        assert all(p.mappers == 1 for p in pages)
        def covered(rs):
            return {pfn for first, n in rs for pfn in range(first, first + n)}

        last = pages[-1].pfn
        if area.ksm is not None:  # stopped after the first batch, which held all 64
            # (a read of that batch may span the last page's pfn by chance: the
            # map answers only for pfns of the pages it read them for)
            assert pm.kpageflags(last) is None
            looked_up = sum(int(batch.held.sum()) for batch in pm._flags)  # distinct pfns
            assert shared <= looked_up <= pm_mod._FIRST_BATCH < shared + unique
        assert last in covered(reads) and by_hand.kpageflags(last) is not None
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
