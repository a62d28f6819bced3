"""What only a function probe (fentry/fexit or kprobe/kretprobe) can see,
against the kernel's own counters, exactly:

- copy-on-write breaks through do_wp_page, per process, equal to the writes
  each process made and summing to Δcow_ksm;
- unshares (break_ksm: MADV_UNMERGEABLE, run=2) told apart from user writes:
  cow_ksm counts both on 6.1 and 6.12 (6.1's break_ksm even takes a fake
  *write* fault), so only the probe's split shows which is which;
- the merge-latency histogram from try_to_merge_one_page's exit probe, one
  entry per merge attempt.

These tests need kprobes or fentry on those functions. The host kernel has
neither, so they are marked `fn_probes`: the host run deselects them
(pyproject's `-m "not fn_probes"`), and the test-kernel guests (tests/vm/)
run them with `--attach fentry` and `--attach kprobe` forced in turn. Run
anywhere else, a plan without function probes is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from ksmtrace.collector import observe
from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import procfs, sysfs
from ksmtrace.model import MmStats
from ksmtrace.sources.live import LiveSource
from ksmtrace.workload import Workload, WorkloadSpec

pytestmark = [pytest.mark.kernel, pytest.mark.vm, pytest.mark.traced, pytest.mark.fn_probes]

FN_METHODS = ("fentry", "kprobe")


def fn_source(facts: caps.Facts, *probes: str) -> LiveSource:
    """The live source with KSMTRACE_ATTACH's backend; `probes` must be
    observed by a function probe, exactly (not estimated)."""
    plan = caps.plan(facts, os.environ.get("KSMTRACE_ATTACH"))
    for name in probes:
        c = plan.get(name)
        assert c.method in FN_METHODS and not c.estimated, (
            f"{name} is observed by {c.method or 'nothing'} here, not by fentry/kprobe: "
            "this test needs a kernel with kprobes or fentry (the tests/vm/ guests)"
        )
    return LiveSource(facts, plan, stream=False)


def per_pid(tick) -> dict[int, MmStats]:
    """The in-kernel per-mm table, keyed by the owner's pid."""
    b = tick.bpf
    assert b is not None
    return {b.owners[mm]: st for mm, st in b.mms.items() if mm in b.owners}


def cow_ksm() -> int:
    return procfs.read_vmstat()["cow_ksm"]


def test_cow_writes_through_do_wp_page_exactly_per_process(facts, quiet_ksm):
    with observe(fn_source(facts, "cow_breaks")) as obs:
        col = obs.collector
        assert not obs.src.cow_estimated
        obs.sample()
        spec = WorkloadSpec(processes=3, pages=1000, distinct=10)
        with Workload(spec, drive_ksmd=True) as w:
            w.wait_merged()
            a, b, c = w.pids
            before = obs.sample()
            cow0 = cow_ksm()
            # uneven on purpose: a split of the global count would not match
            written = dict.fromkeys(w.pids, 0)
            for pid, fraction in ((a, 0.3), (b, 0.05)):
                for p, n in w.cow(fraction, pids={pid}).items():
                    written[p] += n
            assert written[a] > written[b] > written[c] == 0
            delta_cow = cow_ksm() - cow0
            w.wait_expected()
            tick = obs.src.tick()
            after = col.add_tick(tick)
        assert delta_cow == sum(written.values())
        traced = after.totals["cow_writes"] - before.totals["cow_writes"]
        assert traced == delta_cow
        assert after.totals["cow_unshares"] == 0
        rows = {r.pid: r for r in after.processes}
        mms = per_pid(tick)
        for pid, n in written.items():
            assert rows[pid].cow_breaks == n, pid
            assert not rows[pid].cow_estimated
            assert mms[pid].cow == (n, 0), pid  # (user writes, unshares)
        assert after.lost_events == 0


@pytest.mark.parametrize("how", ["madvise", "run2"])
def test_unshares_are_told_apart_from_user_writes(facts, quiet_ksm, how):
    """Unmerging breaks every merged page through the fault path; cow_ksm
    counts each. The probes must count them as unshares, per process, and
    count no user write."""
    with observe(fn_source(facts, "cow_breaks", "unshares")) as obs:
        col = obs.collector
        obs.sample()
        spec = WorkloadSpec(processes=2, pages=600, distinct=6)
        with Workload(spec, drive_ksmd=True) as w:
            w.wait_merged()
            merging = {pid: procfs.read_ksm_stat(pid).ksm_merging_pages for pid in w.pids}
            assert all(n == 600 for n in merging.values()), merging
            before = obs.sample()  # also resolves the owners (6.1: no ksm_enter)
            with contextlib.ExitStack() as stack:
                cow0 = cow_ksm()
                if how == "madvise":
                    w.unmerge()
                else:
                    # unmerges everything, in this process, before returning;
                    # measured before the knob goes back to 1 (ksmd re-merges)
                    stack.enter_context(sysfs.KsmKnobs()).set(run=2)
                delta_cow = cow_ksm() - cow0
                tick = obs.src.tick()
                after = col.add_tick(tick)
                left = {pid: procfs.read_ksm_stat(pid).ksm_merging_pages for pid in w.pids}

        def d(name: str) -> int:
            return after.totals[name] - before.totals[name]

        assert left == dict.fromkeys(merging, 0)
        mms = per_pid(tick)
        got = {
            "cow_ksm": delta_cow,
            "cow_unshares": d("cow_unshares"),
            "cow_writes": d("cow_writes"),
            # break_ksm runs once for every address of the unmerged ranges
            # (the regions: one VMA per process), faulting where a KSM page is
            "unshares": d("unshares"),
            "unshare_latencies": sum(after.hist.get("unshare_latency_seconds", {}).values()),
            "per_pid": {pid: mms[pid].cow for pid in merging},  # (user writes, unshares)
        }
        want = {
            "cow_ksm": 1200,
            "cow_unshares": 1200,
            "cow_writes": 0,
            "unshares": spec.processes * spec.region_pages,
            "unshare_latencies": after.totals["unshares"],
            "per_pid": {pid: (0, n) for pid, n in merging.items()},
        }
        assert got == want


def test_merge_latency_histogram_counts_every_merge_attempt(facts, quiet_ksm):
    with observe(fn_source(facts, "merges")) as obs:
        obs.sample()
        spec = WorkloadSpec(processes=2, pages=1000, distinct=10)
        with Workload(spec, drive_ksmd=True) as w:
            w.wait_merged()
            s = obs.sample()
    assert s.totals["merges"] == s.totals["merged_pages"] == 2000
    attempts = s.totals["merges"] + s.totals["merge_failures"]
    hist = s.hist.get("merge_latency_seconds", {})
    assert sum(hist.values()) == attempts
