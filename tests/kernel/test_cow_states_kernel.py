"""Copy-on-write breaks of KSM pages in every page state, against the
kernel's own counters (docs/cow-breaks.md has the paths per kernel).

Merged pages are put in a state, some written, then unmerged. The kernel's
own accounting is checked first, so the test is known to reach each path:

- each write to a merged page is one cow_ksm (a store, or for PROT_NONE
  pages a FOLL_FORCE write through /proc/self/mem);
- unmerging costs one cow_ksm per page that was mapped to a KSM page
  before and is not after (smaps' KSM, else the page map): a KSM zero page
  is not a KSM page, a discarded page is no page, and 6.1's break_ksm
  leaves PROT_NONE and userfaultfd write-protected pages merged.

Then ksmtrace, with the backend KSMTRACE_ATTACH forces (every one a kernel
offers, in the guests): with a function probe on do_wp_page, user writes
and unshares each equal their cow_ksm, per process; with the tracepoint
backend (the host), the per-process COW figures, estimated, still sum to
Δcow_ksm exactly.
"""

from __future__ import annotations

import os

import pytest

from ksmtrace.collector import observe
from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import procfs
from ksmtrace.kernel.pagemap import Area, read_page_map
from ksmtrace.sources.live import LiveSource
from ksmtrace.workload import PAGE_SIZE, PAGE_STATES, Workload, WorkloadSpec

pytestmark = [pytest.mark.kernel, pytest.mark.vm, pytest.mark.traced]

STATES = (
    "plain",
    *PAGE_STATES,
    "zero_page",
    pytest.param("prctl", marks=pytest.mark.prctl_merge),
)


def spec_for(state: str) -> WorkloadSpec:
    if state == "zero_page":  # 200 pages per process merged into the zero page
        return WorkloadSpec(processes=2, pages=400, distinct=4, zero_pages=200,
                            use_zero_pages=True)
    return WorkloadSpec(processes=2, pages=400, distinct=4,
                        register="prctl" if state == "prctl" else "madvise")


def ksm_mapped(w: Workload) -> dict[int, int]:
    """Pages of each child's region mapped to a KSM page: the `KSM:` lines
    of its VMAs in smaps (6.10+), else its page map. 6.12's kpageflags sets
    KPF_KSM on every anonymous page (stable_page_flags tests
    `mapping & PAGE_MAPPING_KSM`, which PAGE_MAPPING_ANON alone satisfies);
    smaps asks folio_test_ksm."""
    out = {}
    for pid, (a, b) in w.regions().items():
        kb, seen, inside = 0, False, False
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = a <= lo and hi <= b
                elif head == "KSM:":
                    seen = True
                    if inside:
                        kb += int(line.split()[1])
        out[pid] = kb * 1024 // PAGE_SIZE if seen else read_page_map(pid, [Area(a, b)]).ksm_pages
    return out


def zero_mapped(w: Workload) -> dict[int, int]:
    return {pid: read_page_map(pid, [Area(a, b)]).zero_pages for pid, (a, b) in w.regions().items()}


def cow_ksm() -> int:
    return procfs.read_vmstat()["cow_ksm"]


@pytest.mark.parametrize("state", STATES)
def test_cow_breaks_add_up_to_cow_ksm_in_every_page_state(facts, quiet_ksm, state):
    plan = caps.plan(facts, os.environ.get("KSMTRACE_ATTACH"))
    src = LiveSource(facts, plan, stream=False)
    with observe(src) as obs:
        col = obs.collector
        obs.sample()
        spec = spec_for(state)
        with Workload(spec, drive_ksmd=True) as w:
            w.wait_merged()
            pids = w.pids
            if state == "zero_page":
                assert zero_mapped(w) == dict.fromkeys(pids, spec.zero_pages)
            before = obs.sample()  # also resolves the owners (6.1: no ksm_enter)
            cow0 = cow_ksm()
            put = {}
            if state in PAGE_STATES:
                put = w.set_state(state, 0.5)
                assert all(len(p) == 200 for p in put.values()), put
            written = dict.fromkeys(pids, 0)
            if state == "protnone":  # half of them, through /proc/self/mem
                written = w.cow(0.5, among="protnone")
            elif state in ("plain", "prctl", "zero_page"):
                written = w.cow(0.25)
            cow1 = cow_ksm()
            mapped = ksm_mapped(w)
            w.unmerge()
            cow2 = cow_ksm()
            left = ksm_mapped(w)
            tick = src.tick()
            after = col.add_tick(tick)

    unmerged = {pid: mapped[pid] - left[pid] for pid in mapped}
    # the kernel's own accounting: the workload reached the state's path
    assert all(n > 0 for n in written.values()) or state in ("uffd_wp", "discard")
    assert cow1 - cow0 == sum(written.values())
    assert cow2 - cow1 == sum(unmerged.values()), (mapped, left)
    if state == "discard":
        assert mapped == dict.fromkeys(pids, 200)  # the discarded half is gone
    if state in ("uffd_wp", "protnone"):  # may stay merged (6.1), none other may
        assert all(left[pid] <= len(put[pid]) - written[pid] for pid in pids), (left, put)
    else:
        assert left == dict.fromkeys(pids, 0)

    def d(name: str) -> int:
        return after.totals.get(name, 0) - before.totals.get(name, 0)

    def row_cow(snap) -> dict[int, int]:
        return {r.pid: r.cow_breaks for r in snap.processes}

    rows0, rows1 = row_cow(before), row_cow(after)
    per_row = {pid: n - rows0.get(pid, 0) for pid, n in rows1.items() if n != rows0.get(pid, 0)}
    assert d("cow_ksm") == cow2 - cow0
    assert sum(per_row.values()) == cow2 - cow0, per_row
    assert after.lost_events == 0
    if src.cow_estimated:
        assert plan.get("cow_breaks").estimated and after.cow_estimated
        return
    mms = {tick.bpf.owners[mm]: st for mm, st in tick.bpf.mms.items() if mm in tick.bpf.owners}
    got = {
        "cow_writes": d("cow_writes"),
        "cow_unshares": d("cow_unshares"),
        "per_pid": {pid: mms[pid].cow if pid in mms else (0, 0) for pid in pids},
        "rows": per_row,
    }
    want = {
        "cow_writes": cow1 - cow0,
        "cow_unshares": cow2 - cow1,
        "per_pid": {pid: (written[pid], unmerged[pid]) for pid in pids},
        "rows": {pid: written[pid] + unmerged[pid] for pid in pids
                 if written[pid] + unmerged[pid]},
    }
    assert got == want
