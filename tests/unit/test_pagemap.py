"""Page-map reader on the recorded page-map chunks (see tests/fixtures/README.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ksmtrace.errors import NoProcess, NotRoot
from ksmtrace.kernel import pagemap, pfnreads, procfs
from ksmtrace.kernel.pagemap import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    PAGE_SIZE,
    Area,
    PageInfo,
    PageState,
    RootFiles,
    mergeable_areas,
    parse_smaps_areas,
    read_page_map,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HOST = FIXTURES / "host-6.18"
OLD = FIXTURES / "host-6.1"
MANIFEST = json.loads((HOST / "MANIFEST.json").read_text())
DUPS = [MANIFEST["roles"][f"dup-{i}"] for i in range(3)]
LAYOUT = MANIFEST["dup_area_layout_pages"]
N_DUP, N_ZERO, N_UNIQUE, N_UNTOUCHED = (
    LAYOUT["duplicate"],
    LAYOUT["zero"],
    LAYOUT["unique"],
    LAYOUT["untouched"],
)
AREA_PAGES = N_DUP + N_ZERO + N_UNIQUE + N_UNTOUCHED
COW = MANIFEST["cow_page_of_dup_0"]

pytestmark = pytest.mark.skipif(
    PAGE_SIZE != MANIFEST["page_size"], reason="fixtures recorded with another page size"
)


def test_mergeable_areas():
    for pid in DUPS:
        areas = mergeable_areas(pid, HOST)
        assert len(areas) == 1
        assert areas[0].pages == AREA_PAGES and areas[0].path == ""
    # Only the madvised area carries `mg` in those processes.
    smaps = (HOST / f"proc/{DUPS[0]}/smaps").read_text()
    assert sum(" mg" in ln for ln in smaps.splitlines() if ln.startswith("VmFlags:")) == 1


def test_parse_smaps_areas():
    text = (
        "00400000-00452000 r-xp 00000000 08:02 173521  /usr/bin/my prog\n"
        "Size:                328 kB\n"
        "VmFlags: rd ex mr mw me dw mg\n"
        "7f0000000000-7f0000004000 rw-p 00000000 00:00 0 \n"
        "Rss:                   4 kB\n"
        "VmFlags: rd wr mr mw me ac mg\n"
        "7f0000004000-7f0000008000 rw-p 00000000 00:00 0  [heap]\n"
        "VmFlags: rd wr mr mw me ac\n"
    )
    assert parse_smaps_areas(text) == [
        Area(0x400000, 0x452000, "/usr/bin/my prog"),
        Area(0x7F0000000000, 0x7F0000004000, ""),
    ]


def expected_states(i: int) -> list[PageState]:
    states = (
        [PageState.KSM] * N_DUP
        + [PageState.ZERO] * N_ZERO
        + [PageState.PRESENT] * N_UNIQUE
        + [PageState.ABSENT] * N_UNTOUCHED
    )
    if i == 0:
        states[COW] = PageState.PRESENT  # written after merging: a private copy
    return states


@pytest.mark.parametrize("root", [HOST, OLD], ids=["6.18", "6.1-format"])
def test_page_states_follow_the_recorded_layout(root):
    for i, pid in enumerate(DUPS):
        pm = read_page_map(pid, root=root)
        assert len(pm) == AREA_PAGES
        assert [p.state for p in pm] == expected_states(i)
        assert sum(pm.counts.values()) == AREA_PAGES


def test_counts_agree_with_the_kernels_own_counters():
    for pid in DUPS:
        pm = read_page_map(pid, root=HOST)
        stat = procfs.read_ksm_stat(pid, HOST)
        assert pm.ksm_pages == stat.ksm_merging_pages
        assert pm.zero_pages == stat.ksm_zero_pages
        assert procfs.read_smaps_rollup_ksm_bytes(pid, HOST) == pm.ksm_pages * PAGE_SIZE


def test_ksm_pfns_and_mappers():
    maps = [read_page_map(pid, root=HOST) for pid in DUPS]
    ksm: dict[int, int] = {}
    for pm in maps:
        ksm.update(pm.pfns(PageState.KSM))
    # 3 processes x 64 pages of 4 contents = 48 PTEs per KSM page, one fewer
    # for the content whose page dup-0 copied on write.
    assert len(ksm) == LAYOUT["duplicate_contents"]
    per_content = 3 * N_DUP // LAYOUT["duplicate_contents"]
    assert sorted(ksm.values()) == [per_content - 1] + [per_content] * (len(ksm) - 1)
    # Same content -> same pfn, in every process.
    first = {i: p.pfn for i, p in enumerate(maps[1]) if p.state is PageState.KSM}
    for pm in maps:
        for i, p in enumerate(pm):
            if p.state is PageState.KSM:
                assert p.pfn == first[i % LAYOUT["duplicate_contents"]]
                assert pm.kpageflags(p.pfn) & KPF_KSM


def test_zero_and_present_pages():
    pm = read_page_map(DUPS[1], root=HOST)
    zero = pm.pfns(PageState.ZERO)
    assert len(zero) == 1  # one shared zero page
    (zpfn,) = zero
    assert pm.kpageflags(zpfn) & KPF_ZERO_PAGE
    present = pm.pfns(PageState.PRESENT)
    assert len(present) == N_UNIQUE and set(present.values()) == {1}
    assert pm.pfns(PageState.ABSENT) == {}


def test_iteration_yields_addresses_in_order():
    pm = read_page_map(DUPS[2], root=HOST)
    (area,) = pm.areas
    pages = list(pm)
    assert [p.addr for p in pages] == list(range(area.start, area.end, PAGE_SIZE))
    last = pages[-1]
    assert last == PageInfo(area.end - PAGE_SIZE, PageState.ABSENT, None, None)
    assert [p.addr for p in pm.pages(PageState.ZERO)] == [
        area.start + (N_DUP + i) * PAGE_SIZE for i in range(N_ZERO)
    ]


def test_explicit_areas_may_split_the_vma():
    (area,) = mergeable_areas(DUPS[0], HOST)
    mid = area.start + 70 * PAGE_SIZE
    parts = [Area(area.start, mid, ""), Area(mid, area.end, "")]
    whole = list(read_page_map(DUPS[0], root=HOST))
    split = read_page_map(DUPS[0], parts, root=HOST)
    assert split.areas == tuple(parts)
    assert list(split) == whole


def test_missing_pid_is_no_process():
    with pytest.raises(NoProcess):
        read_page_map(999_999_999, root=HOST)
    with pytest.raises(NoProcess):
        mergeable_areas(999_999_999, HOST)


def test_hidden_pfns_mean_not_root(tmp_path):
    # What an unprivileged reader gets: present pages, pfn field zeroed.
    pid = 4242
    d = tmp_path / f"proc/{pid}"
    (d / "pagemap.chunks").mkdir(parents=True)
    (d / "smaps").write_text("7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \nVmFlags: mg\n")
    (d / "pagemap.chunks" / f"{0x7F0000000000 // PAGE_SIZE * 8:016x}").write_bytes(
        struct.pack("2Q", 1 << 63, 1 << 63)
    )
    with pytest.raises(NotRoot, match="needs root"):
        read_page_map(pid, root=tmp_path)


def test_unreadable_kpageflags_means_not_root(monkeypatch):
    real = RootFiles.pread

    def pread(self, rel, offset, size):
        if rel == "proc/kpageflags":
            raise PermissionError(13, "Permission denied")
        return real(self, rel, offset, size)

    monkeypatch.setattr(RootFiles, "pread", pread)
    with pytest.raises(NotRoot):
        read_page_map(DUPS[0], root=HOST)


def test_unreadable_smaps_means_not_root(monkeypatch):
    def read_text(self, rel):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(RootFiles, "read_text", read_text)
    with pytest.raises(NotRoot):
        mergeable_areas(DUPS[0], HOST)


def test_chunk_reads_join_and_zero_fill(tmp_path):
    d = tmp_path / "proc/kpagecount.chunks"
    d.mkdir(parents=True)
    (d / f"{16:016x}").write_bytes(b"AAAAAAAA")
    (d / f"{24:016x}").write_bytes(b"BBBBBBBB")
    files = RootFiles(tmp_path)
    assert files.exists("proc/kpagecount")
    assert files.pread("proc/kpagecount", 12, 24) == b"\0" * 4 + b"A" * 8 + b"B" * 8 + b"\0" * 4
    assert files.pread("proc/kpagecount", 20, 6) == b"AAAABB"
    assert files.pread("proc/kpagecount", 1000, 8) == b"\0" * 8


def pfn_runs(pfns: list[int]) -> list[tuple[int, int]]:
    """The reads the page-by-page reader made: (first, count) over the sorted
    distinct pfns, split where two are more than PFN_GAP apart."""
    runs: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        if runs and pfn - (runs[-1][0] + runs[-1][1] - 1) <= pfnreads.PFN_GAP:
            runs[-1] = (runs[-1][0], pfn - runs[-1][0] + 1)
        else:
            runs.append((pfn, 1))
    return runs


def check_reads(pfns: list[int]) -> None:
    first, length, at = pfnreads.reads(np.array(pfns, np.int64))
    assert list(zip(first.tolist(), length.tolist(), strict=True)) == pfn_runs(pfns)
    # each page's index into the concatenated reads lands on its own pfn
    read_pfns = np.concatenate([np.arange(f, f + n) for f, n in zip(first, length, strict=True)])
    assert read_pfns[at].tolist() == pfns


def test_pfn_reads_group_runs_like_the_sorted_distinct_pfns():
    gap = pfnreads.PFN_GAP
    pfns = [5, 6, 7, 7 + gap, 7 + 2 * gap + 1, 1000, 1001]
    assert pfn_runs(pfns) == [(5, gap + 3), (7 + 2 * gap + 1, 1), (1000, 2)]
    check_reads(pfns)
    # out of order, repeated, overlapping runs, a run inside another
    check_reads([1001, 1000, 7, 5, 6, 50, 6, 7, 8, 5, 6, 300, 301, 302, 299, 300, 1002, 1000])
    check_reads([42])
    # the pfns of the recorded pages, as the reader meets them (all three dups)
    maps = [read_page_map(pid, root=HOST) for pid in DUPS]
    check_reads([p.pfn for pm in maps for p in pm if p.pfn is not None])


@given(st.lists(st.integers(1, 1 << 20) | st.integers(1 << 50, (1 << 50) + 300), min_size=1))
def test_pfn_reads_any_order(pfns):
    check_reads(pfns)


def record_preads(monkeypatch) -> list[tuple[str, int, int]]:
    calls: list[tuple[str, int, int]] = []
    real = RootFiles.pread

    real_into = RootFiles.pread_into

    def pread(self, rel, offset, size):
        calls.append((rel, offset, size))
        return real(self, rel, offset, size)

    def pread_into(self, rel, offset, out):
        calls.append((rel, offset, out.nbytes))
        return real_into(self, rel, offset, out)

    monkeypatch.setattr(RootFiles, "pread", pread)
    monkeypatch.setattr(RootFiles, "pread_into", pread_into)
    return calls


def test_pfn_reads_are_batched(monkeypatch):
    calls = record_preads(monkeypatch)
    pm = read_page_map(DUPS[0], root=HOST)
    by_file: dict[str, int] = {}
    for rel, _, _ in calls:
        by_file[rel] = by_file.get(rel, 0) + 1
    assert by_file[f"proc/{DUPS[0]}/pagemap"] == 1  # one read per area
    distinct = {p.pfn for p in pm if p.pfn is not None}
    assert by_file["proc/kpageflags"] == by_file["proc/kpagecount"] <= len(distinct)


def same_maps(a: pagemap.PageMap, b: pagemap.PageMap) -> None:
    assert list(a) == list(b) and a.counts == b.counts and a.areas == b.areas
    for state in PageState:
        assert a.pfns(state) == b.pfns(state)
        for x, y in zip(a.page_pfns(state), b.page_pfns(state), strict=True):
            assert np.array_equal(x, y)
    for p in a:
        if p.pfn is None:
            continue
        fa, fb = a.kpageflags(p.pfn), b.kpageflags(p.pfn)
        if p.state in (PageState.KSM, PageState.ZERO):
            assert fa == fb is not None
        elif fa is not None and fb is not None:  # read in both: an exclusive page may not be
            assert fa == fb


@pytest.mark.parametrize("chunk", [1, 7, 50, 127])
def test_reads_and_lookups_across_chunk_boundaries(monkeypatch, chunk):
    whole = {pid: read_page_map(pid, root=HOST) for pid in DUPS}
    (area,) = whole[DUPS[0]].areas
    parts = [
        Area(area.start, area.start + 70 * PAGE_SIZE),
        Area(area.start + 70 * PAGE_SIZE, area.end),
    ]
    split = read_page_map(DUPS[0], parts, root=HOST)
    calls = record_preads(monkeypatch)
    monkeypatch.setattr(pagemap, "_CHUNK", chunk)
    for pid in DUPS:
        same_maps(read_page_map(pid, root=HOST), whole[pid])
    # pagemap read in pieces of `chunk` entries, each area on its own
    rel = f"proc/{DUPS[0]}/pagemap"
    base = area.start // PAGE_SIZE * 8
    offsets = [(o - base) // 8 for r, o, _ in calls if r == rel]
    assert offsets == list(range(0, AREA_PAGES, chunk))
    assert sum(n for r, _, n in calls if r == rel) == AREA_PAGES * 8
    calls.clear()
    same_maps(read_page_map(DUPS[0], parts, root=HOST), split)
    offsets = [(o - base) // 8 for r, o, _ in calls if r == rel]
    assert offsets == [*range(0, 70, chunk), *range(70, AREA_PAGES, chunk)]


def test_flags_and_counts_on_two_threads_give_the_same_map(monkeypatch):
    whole = read_page_map(DUPS[0], root=HOST)
    monkeypatch.setattr(pfnreads, "PARALLEL", 0)
    same_maps(read_page_map(DUPS[0], root=HOST), whole)
    real = RootFiles.pread

    def pread(self, rel, offset, size):
        if rel == "proc/kpagecount":  # read on the second thread
            raise PermissionError(13, "Permission denied")
        return real(self, rel, offset, size)

    monkeypatch.setattr(RootFiles, "pread", pread)
    with pytest.raises(NotRoot):
        read_page_map(DUPS[0], root=HOST)


def test_kpageflags_only_for_pfns_of_the_map():
    pm = read_page_map(DUPS[0], root=HOST)
    # the pages not exclusively mapped (smaps' KSM count is met by them)
    mine = {p.pfn for p in pm if p.state in (PageState.KSM, PageState.ZERO)}
    (reads,) = pm._flags
    # pfns inside a read but at no page of the map (the gaps a read spans)
    length = np.diff(reads.offset, append=len(reads.flags))
    spanned = {f + i for f, n in zip(reads.first, length, strict=True) for i in range(n)}
    assert spanned > mine
    assert all(pm.kpageflags(pfn) is None for pfn in spanned - mine)
    assert all(pm.kpageflags(pfn) is not None for pfn in mine)
    assert pm.kpageflags(min(mine) - 1) is None and pm.kpageflags(max(mine) + 1) is None


def raw_entries(pid: int) -> np.ndarray:
    (area,) = mergeable_areas(pid, HOST)
    data = RootFiles(HOST).pread(f"proc/{pid}/pagemap", area.start // PAGE_SIZE * 8,
                                 area.pages * 8)
    return np.frombuffer(data, np.uint64)


def test_exclusive_pages_are_one_mapper_and_their_flags_unread(monkeypatch):
    """Pages pagemap marks exclusively mapped are present pages with one
    mapper; once the shared pages hold smaps' KSM count, their kpageflags
    and kpagecount are never read."""
    calls = record_preads(monkeypatch)
    for i, pid in enumerate(DUPS):
        calls.clear()
        pm = read_page_map(pid, root=HOST)
        assert [p.state for p in pm] == expected_states(i)
        entries = raw_entries(pid)
        exclusive = ((entries >> np.uint64(56)) & np.uint64(1)).astype(bool)
        present = [p.state is PageState.PRESENT for p in pm]
        assert exclusive.tolist() == present  # the recorded kernel's bits, as the layout says
        read = {o // 8 + k for r, o, n in calls if r == "proc/kpageflags" for k in range(n // 8)}
        for p in pm.pages(PageState.PRESENT):
            assert p.mappers == 1 and p.pfn not in read and pm.kpageflags(p.pfn) is None
        assert pm.ksm_pages == pm.areas[0].ksm == procfs.read_ksm_stat(pid, HOST).ksm_merging_pages


@pytest.mark.parametrize("more", [1, 1000])
def test_an_area_short_of_its_smaps_ksm_count_has_its_exclusive_pages_read(tmp_path, more):
    """smaps read before pagemap may count KSM pages gone since (a page
    written meanwhile): the exclusive pages are then read too, the map is
    the same, and their flags are known."""
    pid = DUPS[0]
    shutil.copytree(HOST, tmp_path / "root", symlinks=True)
    smaps = tmp_path / "root" / f"proc/{pid}/smaps"
    text = smaps.read_text()
    line = re.compile(rf"^KSM: +{63 * PAGE_SIZE // 1024} kB$", re.M)
    assert len(line.findall(text)) == 1
    smaps.write_text(line.sub(f"KSM: {(63 + more) * PAGE_SIZE // 1024} kB", text))
    pm = read_page_map(pid, root=tmp_path / "root")
    assert pm.areas[0].ksm == 63 + more
    whole = read_page_map(pid, root=HOST)
    assert list(pm) == list(whole) and pm.counts == whole.counts
    for p in pm.pages(PageState.PRESENT):
        assert pm.kpageflags(p.pfn) is not None and whole.kpageflags(p.pfn) is None
        assert p.mappers == 1


def test_page_pfns_per_state():
    maps = [read_page_map(pid, root=HOST) for pid in DUPS]
    for pm in maps:
        for state in (PageState.KSM, PageState.ZERO, PageState.PRESENT):
            pfns, mappers = pm.page_pfns(state)
            pages = list(pm.pages(state))
            assert pfns.dtype == mappers.dtype == np.int64
            assert pfns.tolist() == [p.pfn for p in pages]
            assert mappers.tolist() == [p.mappers for p in pages]
            assert pm.pfns(state) == dict(zip(pfns.tolist(), mappers.tolist(), strict=True))
        pfns, mappers = pm.page_pfns(PageState.ABSENT)
        assert len(pfns) == len(mappers) == 0
    ksm = [pm.page_pfns(PageState.KSM)[0] for pm in maps]
    assert [len(k) for k in ksm] == [N_DUP - 1, N_DUP, N_DUP]  # dup-0 copied one on write
    # The KSM pages all three share, without a loop over pages.
    shared = np.intersect1d(np.intersect1d(ksm[0], ksm[1]), ksm[2])
    assert len(shared) == LAYOUT["duplicate_contents"]
    # The copies are the caller's own.
    ksm[1][:] = 0
    assert maps[1].page_pfns(PageState.KSM)[0].all()


def test_live_files_stay_open_while_held(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/kpagecount").write_bytes(bytes(range(64)))
    files = RootFiles(tmp_path)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    assert files.pread("proc/kpagecount", 8, 8) == bytes(range(8, 16))
    assert fds() == before  # opened and closed
    with files.held_open():
        assert files.pread("proc/kpagecount", 0, 4) == bytes(range(4))
        with files.held_open():  # re-entrant: the same fd
            assert files.pread("proc/kpagecount", 60, 8) == bytes(range(60, 64))
        assert fds() == before + 1
    assert fds() == before
    assert files.pread("proc/kpagecount", 16, 2) == bytes([16, 17])


def test_vanished_process_tree(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(HOST, root)
    shutil.rmtree(root / f"proc/{DUPS[0]}")
    with pytest.raises(NoProcess):
        read_page_map(DUPS[0], root=root)


def with_maps(tmp_path, pid: int, widen: int = 0) -> Path:
    """A copy of the 6.18 tree with /proc/<pid>/maps: the recorded smaps'
    header lines (what maps shows), the mergeable area's end moved by `widen`
    pages (as if the VMA changed between the two reads)."""
    root = tmp_path / "root"
    shutil.copytree(HOST, root, symlinks=True)
    (area,) = mergeable_areas(pid, HOST)
    lines = []
    for line in (root / f"proc/{pid}/smaps").read_text().splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:
            if first == f"{area.start:x}-{area.end:x}":
                line = line.replace(first, f"{area.start:x}-{area.end + widen * PAGE_SIZE:x}")
            lines.append(line)
    (root / f"proc/{pid}/maps").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("widen", [0, 5, -5])
def test_areas_read_ahead_while_smaps_is_read_give_the_same_map(tmp_path, monkeypatch, widen):
    """The private writable areas of maps are read from pagemap, in two
    halves on two threads, while smaps is read: a mergeable area is then
    taken from what was read ahead when it lies inside it (same or wider in
    maps), else read again; the map is the same either way."""
    pid = DUPS[0]
    root = with_maps(tmp_path, pid, widen)
    whole = read_page_map(pid, root=HOST)
    monkeypatch.setattr(pagemap, "_AHEAD", 1)
    guesses = pagemap._maps_guesses(RootFiles(root), pid)
    (area,) = whole.areas
    assert Area(area.start, area.end + widen * PAGE_SIZE) in guesses
    calls = record_preads(monkeypatch)
    pm = read_page_map(pid, root=root)
    same_maps(pm, whole)
    rel = f"proc/{pid}/pagemap"
    base = area.start // PAGE_SIZE * 8
    guess = area.pages + widen
    span = max(guess, area.pages) * 8
    reads = sorted((o - base, n) for r, o, n in calls if r == rel and 0 <= o - base < span)
    halves = [(0, guess // 2 * 8), (guess // 2 * 8, (guess - guess // 2) * 8)]  # two threads
    if widen >= 0:  # inside the area read ahead: read once
        assert reads == halves
    else:  # the area read ahead ends short of it: read again
        assert reads == sorted([*halves, (0, area.pages * 8)])


def test_no_maps_or_small_areas_read_nothing_ahead(tmp_path, monkeypatch):
    pid = DUPS[0]
    assert pagemap._maps_guesses(RootFiles(HOST), pid) == []  # no maps file
    root = with_maps(tmp_path, pid)
    assert pagemap._maps_guesses(RootFiles(root), pid) == []  # all below _AHEAD
    monkeypatch.setattr(pagemap, "_AHEAD", 1)
    lines = [ln.split() for ln in (root / f"proc/{pid}/maps").read_text().splitlines()]
    private_writable = [Area(*(int(x, 16) for x in f[0].split("-"))) for f in lines
                        if f[1][1] == "w" and f[1][3] == "p"]
    assert 0 < len(private_writable) < len(lines)
    assert pagemap._maps_guesses(RootFiles(root), pid) == private_writable
