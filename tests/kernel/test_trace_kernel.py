"""The tracing core against the kernel's own counters, exactly.

Each test attaches the live source first (ksmd stopped), then runs a real
workload, so "from a clean start" holds: every merge, scan round and COW
break the kernel counts happened while we traced.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time

import pytest

from ksmtrace.collector import Observed, observe
from ksmtrace.errors import Busy
from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import procfs, sysfs
from ksmtrace.model import EVENT_SIZE, EventKind, iter_events
from ksmtrace.sources.live import LiveSource
from ksmtrace.workload import Workload, WorkloadSpec

pytestmark = pytest.mark.kernel


def traced(facts, stream=False, force=None) -> Observed:
    plan = caps.plan(facts, force or os.environ.get("KSMTRACE_ATTACH"))
    return observe(LiveSource(facts, plan, stream=stream))


@pytest.mark.vm
@pytest.mark.traced
def test_merges_scan_rounds_and_cow_equal_kernel_counters(facts, quiet_ksm):
    with traced(facts) as obs:
        obs.sample()
        spec = WorkloadSpec(processes=3, pages=2000, distinct=20)
        with Workload(spec, drive_ksmd=True) as w:
            w.wait_merged()
            merged = obs.sample()
            # every successful merge traced == the kernel's merged pages
            assert merged.totals["merges"] == merged.totals["merged_pages"] == 6000
            # a page that became a new KSM page is one pages_shared; one that
            # joined a KSM page is one pages_sharing (chains: max_page_sharing)
            e = w.expected()
            assert merged.totals["merges_new_ksm_page"] == e.pages_shared == 40
            assert merged.totals["merges_into_ksm_page"] == e.pages_sharing == 5960
            rows = {r.pid: r for r in merged.processes}
            for pid in w.pids:
                stat = procfs.read_ksm_stat(pid)
                assert rows[pid].merges == stat.ksm_merging_pages == 2000
            written = w.cow(0.1)
            w.wait_expected()
            cow = obs.sample()
            # on every kernel: total COW breaks == Δcow_ksm == pages written
            assert cow.totals["cow_ksm"] == sum(written.values())
            rows = {r.pid: r for r in cow.processes}
            assert sum(rows[pid].cow_breaks for pid in w.pids) == cow.totals["cow_ksm"]
            if cow.cow_estimated:
                assert all(rows[pid].cow_estimated for pid in w.pids)
            else:  # kprobe/fentry on do_wp_page: exact per process
                for pid, n in written.items():
                    assert rows[pid].cow_breaks == n
        time.sleep(0.5)  # ksmd stopped by the workload's knob restore
        final = obs.sample()
        assert final.ksm.run == 0
        assert final.totals["full_scans"] > 0
        if obs.src.plan.get("scan_rounds").method == "polling":
            # 6.1: no ksm:* tracepoints and ksm_do_scan inlined, nothing
            # traces a round; the view shows sysfs full_scans only
            assert final.totals["scan_rounds"] == 0
            assert not facts.tracepoints.get("ksm:ksm_start_scan")
        else:
            assert final.totals["scan_rounds"] == final.totals["full_scans"]
        assert final.lost_events == 0


@pytest.mark.vm
@pytest.mark.traced
def test_per_process_merges_stay_exact_across_exits_and_new_processes(facts, quiet_ksm):
    """ksmd's merges gather in a slot before they reach the per-mm table
    (MERGE_SLOT in bpf/ksmtrace.bpf.c, where the kernel has the scan-round
    tracepoints). Each process's merges must still equal its
    ksm_merging_pages while they sit in the slot, an exited process must
    keep its figure, and a later process (often given the freed mm_struct's
    address) must not inherit it."""
    with traced(facts) as obs:
        obs.sample()
        expected: dict[int, int] = {}
        for pages, distinct in ((1500, 15), (700, 7), (300, 3)):
            # the duplicates come first in the area, 20,000 unique pages after
            # them: ksmd, slowed down, is stopped after the last merge and
            # long before the round ends (where the slot is emptied)
            spec = WorkloadSpec(processes=1, pages=pages, distinct=distinct, unique_pages=20000)
            with Workload(spec, drive_ksmd=False) as w:
                pid = w.pids[0]
                with sysfs.KsmKnobs() as k:
                    k.set(pages_to_scan=200, sleep_millisecs=10, run=1)
                    for _ in range(60_000):  # a hang guard, not a time limit
                        if procfs.read_ksm_stat(pid).ksm_merging_pages == pages:
                            break
                        time.sleep(0.002)
                    k.set(run=0)
                    rounds = sysfs.read_sysfs().full_scans
                    if obs.src.spec.merge_slot:  # the merges are still in the slot
                        slot_seq, slot_mm, slot_merges = obs.src._read_slot()
                        assert slot_mm and sum(slot_merges) > 0, (slot_mm, slot_merges)
                    s = obs.sample()
                expected[pid] = procfs.read_ksm_stat(pid).ksm_merging_pages
                assert expected[pid] == pages
                rows = {r.pid: r for r in s.processes}
                assert rows[pid].merges == pages, rows[pid]
            # the process has gone; ksmd runs on until it has let go of its mm:
            # it frees it where it stopped, and the round ends there (a later
            # mm_struct may then take the address)
            with sysfs.KsmKnobs() as k:
                k.set(pages_to_scan=100000, sleep_millisecs=0, run=1)
                for _ in range(60_000):
                    if sysfs.read_sysfs().full_scans > rounds:
                        break
                    time.sleep(0.002)
            s = obs.sample()
            rows = {r.pid: r for r in s.processes}
            for p, n in expected.items():  # every process so far, all exited
                assert rows[p].merges == n and not rows[p].alive, (p, rows[p])
        assert s.totals["merges"] == sum(expected.values()) == 2500
        assert sum(r.merges for r in s.processes) == 2500


@pytest.mark.vm
@pytest.mark.traced
def test_fentry_is_refused_while_ksmd_never_sleeps(facts, quiet_ksm, count_programs,
                                                   programs_back_to):
    """Attaching fentry programs waits for every task to sleep once; ksmd at
    sleep_millisecs=0 never does (the 6.12 guest hung there). A plan with
    fentry is refused with exit 11 and a fix, before anything is loaded;
    kprobes and tracepoints attach as usual."""
    src = traced(facts).src
    before = count_programs()
    with sysfs.KsmKnobs() as k:
        k.set(sleep_millisecs=0, run=1)  # nothing registered: ksmd idles meanwhile
        fentry = [c.probe for c in src.plan.choices if c.method == "fentry"]
        if fentry:
            with pytest.raises(Busy) as e:
                src.__enter__()
            assert e.value.exit_code == 11
            assert "sleep_millisecs" in e.value.message and "--attach kprobe" in e.value.hint
            assert count_programs() == before
        else:
            with src:
                assert count_programs() > before
    assert programs_back_to(before)


@pytest.mark.vm
@pytest.mark.traced
@pytest.mark.ksm_zero_pages
def test_zero_page_merges_equal_ksm_zero_pages(facts, quiet_ksm):
    with traced(facts) as obs:
        obs.sample()
        spec = WorkloadSpec(processes=2, pages=100, distinct=10, zero_pages=300,
                            use_zero_pages=True)
        with Workload(spec, drive_ksmd=True) as w:
            w.wait_merged()
            s = obs.sample()
            assert s.totals["ksm_zero_pages"] == 600
            assert s.totals["merges_zero_page"] == s.totals["ksm_zero_pages"]
            assert s.totals["merges"] - s.totals["merges_zero_page"] == s.totals["merged_pages"]


@pytest.mark.vm
@pytest.mark.traced
def test_no_lost_events_in_a_30k_page_merge_with_the_stream_on(facts, quiet_ksm):
    with traced(facts, stream=True) as obs:
        col = obs.collector
        obs.sample()
        merges_seen = 0
        spec = WorkloadSpec(processes=3, pages=10000, distinct=100)
        with Workload(spec, drive_ksmd=True) as w:
            w.wait_merged()
            tick = obs.src.tick()
            s = col.add_tick(tick)
        merges_seen += sum(1 for e in iter_events(tick.events) if e.kind == EventKind.MERGE)
        assert s.totals["merged_pages"] == 30000
        assert s.lost_events == 0
        assert s.totals["events_lost"] == 0
        # the stream carried every merge the counters saw
        assert merges_seen == s.totals["merges"] == 30000
        assert len(tick.events) % EVENT_SIZE == 0


@pytest.mark.vm
@pytest.mark.traced
def test_a_tick_comes_early_when_its_events_reach_the_bound(facts, quiet_ksm):
    """Whatever the interval, a tick's events stay bounded (a recording's
    tick must stay readable, and the agent's memory bounded): with the bound
    at 500 events, 6,000 merges arrive in ticks taken early, off the 2 s
    grid, and every merge the kernel counts is in one of them."""
    cap = 500 * EVENT_SIZE
    with traced(facts, stream=True) as obs:
        src = obs.src
        src.max_pending = cap
        src.tick()  # before the workload
        ticks = []
        # ksmd paced (100 pages every 10 ms), so events arrive over many
        # reads of the ring: at full speed one read can take them all
        with Workload(WorkloadSpec(processes=3, pages=2000, distinct=20), drive_ksmd=False), \
                sysfs.KsmKnobs() as knobs:
            knobs.set(pages_to_scan=100, sleep_millisecs=10, run=1)
            for t in src.ticks(2.0):
                ticks.append(t)
                if t.counters.ksm.pages_shared + t.counters.ksm.pages_sharing >= 6000:
                    break
            ticks.append(src.tick())  # what came after the last one taken
    # without the bound, one tick per 2 s would carry them all (1 such tick)
    early = [t for t in ticks[1:] if len(t.events) >= cap]
    assert len(early) >= 3
    merges = sum(e.kind == EventKind.MERGE for t in ticks for e in iter_events(t.events))
    ksm = ticks[-1].counters.ksm
    assert merges == ksm.pages_shared + ksm.pages_sharing == 6000
    assert ticks[-1].bpf.counters.get("events_lost", 0) == ticks[-1].bpf.perf_lost == 0


@pytest.mark.vm
@pytest.mark.traced
def test_default_mode_aggregates_without_a_stream(facts, quiet_ksm):
    with traced(facts, stream=False) as obs:
        assert obs.src.spec.stream == 0
        obs.sample()
        with Workload(WorkloadSpec(processes=3, pages=10000, distinct=100)) as w:
            w.wait_merged()
            s = obs.sample()
        assert s.totals["merges"] == s.totals["merged_pages"] == 30000
        assert s.totals["events_sent"] == 0  # nothing was streamed


@pytest.mark.vm
@pytest.mark.traced
def test_owner_of_processes_registered_before_tracing(facts, quiet_ksm):
    """mm -> pid for processes that called madvise before ksmtrace attached."""
    with Workload(WorkloadSpec(processes=2, pages=500, distinct=5)) as w:
        w.wait_merged()
        obs = traced(facts)
        # ksmd is paused while the programs are attached and detached: fentry
        # and fexit wait there for an RCU Tasks grace period, which a ksmd
        # spinning at sleep_millisecs=0 (the workload's setting) never lets
        # end, as it never sleeps voluntarily (found in the 6.12 guest: the
        # attach hung, with "rcu_tasks detected stalls" on ksmd)
        with ksmd_paused():
            obs.__enter__()
        try:
            obs.sample()
            written = w.cow(0.2)
            w.wait_expected()
            s = obs.sample()
        finally:
            with ksmd_paused():
                obs.src.close()
        rows = {r.pid: r for r in s.processes}
        assert set(w.pids) <= set(rows)
        assert sum(rows[p].cow_breaks for p in w.pids) == sum(written.values())
        assert rows.get(0) is None or rows[0].cow_breaks == 0


@contextlib.contextmanager
def ksmd_paused():
    with sysfs.KsmKnobs() as k:
        k.set(run=0)
        yield


def test_sysfs_only_works_without_root_and_matches_sysfs(quiet_ksm, as_nobody):
    argv, env, cwd = as_nobody
    with Workload(WorkloadSpec(processes=2, pages=500, distinct=5)) as w:
        w.wait_merged()
        # ksmd paused: the figures hold still while the unprivileged run reads them
        with sysfs.KsmKnobs() as k:
            k.set(run=0)
            r = subprocess.run([*argv, "stat", "--sysfs-only", "-j", "0.2", "2"],
                               capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
            now = sysfs.read_sysfs()
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2
    for d in lines:
        assert d["source"] == "sysfs-only" and not d["traced"]
        for name in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
            assert d["ksm"][name] == getattr(now, name), name
