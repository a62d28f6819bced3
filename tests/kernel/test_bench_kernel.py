"""ksmtrace's own BPF cost against independent witnesses, and the ksmd
benchmark's smoke run (it runs and produces its rows; figures are not
checked here, they live in bench/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ksmtrace.collector import observe
from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import sysfs
from ksmtrace.sources.live import LiveSource
from ksmtrace.workload import Workload, WorkloadSpec

pytestmark = pytest.mark.kernel
BENCH = Path(__file__).resolve().parent.parent.parent / "bench"


def bpftool_progs() -> dict[int, dict]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: p for p in json.loads(out)}


def test_program_costs_equal_bpftool_and_the_programs_own_counts(facts, quiet_ksm):
    plan = caps.plan(facts, None)
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        sysctl_before = f.read()
    src = LiveSource(facts, plan)
    with observe(src) as obs:
        assert src.stats.how == "fd", src.stats.error  # 6.18: bpf(BPF_ENABLE_STATS)
        obs.sample()
        with Workload(WorkloadSpec(processes=2, pages=2000, distinct=20)) as w:
            w.wait_merged()
            with sysfs.KsmKnobs() as k:
                k.set(run=0)  # ksmd still: the ksm:* programs stop running
                snap = obs.sample()
                ids = src.program_ids()
                witness = bpftool_progs()
        costs = {p.name: p for p in snap.programs}
        assert set(costs) == set(ids) and costs
        merge = costs["raw:ksm_merge_with_ksm_page"]
        # one run per merge attempt: the merges and failures the program
        # counted itself (an attempt can fail, e.g. -EBUSY on a page another
        # reference holds for a moment, and ksmd retries it on a later pass)
        attempts = snap.totals["merges"] + snap.totals["merge_failures"]
        assert merge.run_count == attempts
        assert snap.totals["merges"] == snap.totals["merged_pages"] == 4000
        assert merge.run_time_ns > 0
        for name, p in costs.items():
            if not name.startswith(("ksm:", "raw:")):
                continue  # page faults and locks go on system-wide meanwhile
            b = witness[ids[name]]
            assert (b.get("run_cnt", 0), b.get("run_time_ns", 0)) == (p.run_count,
                                                                      p.run_time_ns), name
        assert costs["ksm:ksm_start_scan"].run_count == snap.totals["scan_starts"]
    assert src.stats.fd == -1  # closed with the source: stats off again
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        assert f.read() == sysctl_before


def test_ksmd_benchmark_runs_and_produces_its_rows(quiet_ksm, monkeypatch):
    sys.path.insert(0, str(BENCH.parent))
    try:
        from bench import ksmd_overhead
    finally:
        sys.path.remove(str(BENCH.parent))
    monkeypatch.setattr(ksmd_overhead, "LOCK_HELD", True)  # the kernel tier holds it
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        sysctl_before = f.read()
    results = ksmd_overhead.measure(quick=True, reps=1)
    assert sorted(r["mode"] for r in results) == sorted(ksmd_overhead.MODES)
    for r in results:
        assert r["seconds"] > 0
        if r["mode"] not in ("untraced", "sysfs"):
            assert r["merges"] == 10000, r  # every tracer saw the whole burst
        if r["mode"] == "stream":  # and the stream carried every merge to the reader
            assert r["events_lost"] == 0 and r["events_received"] >= 10000, r
        if r["mode"] == "bpftrace-stats":  # the kernel counted every run of bpftrace's programs
            assert r["stats"] == "fd", r  # 6.18: bpf(BPF_ENABLE_STATS), held by the bench
            progs = {name: (ns, n) for name, ns, n in r["programs"]}
            ns, n = progs["ksm:ksm_merge_with_ksm_page"]
            assert n == r["counts"]["ksm_merge_with_ksm_page"] >= 10000 and ns > 0, r
    assert all(r["pages"] == 10000 for r in results)
    rows = ksmd_overhead.rows_from(results)
    names = [r["name"] for r in rows]
    for m in ("untraced", "ksmtrace default", "ksmtrace + event stream", "bpftrace count-only",
              "ksmtrace default + --bpf-stats", "ksmtrace --sysfs-only (no BPF)"):
        assert f"merge 10k pages: {m}" in names
    assert "merge time ratio to untraced: ksmtrace default" in names
    assert "lost events during the burst: ksmtrace + event stream" in names
    assert "ksmtrace BPF run time in ksmd / ksmd CPU: ksmtrace default + --bpf-stats" in names
    assert "bpftrace BPF run time in ksmd / ksmd CPU: bpftrace count-only + BPF stats" in names
    per_merge = {r["name"]: r for r in rows if r["name"].startswith("BPF run time per merge")}
    assert set(per_merge) == {
        "BPF run time per merge event: ksmtrace default + --bpf-stats",
        "BPF run time per merge event: bpftrace count-only + BPF stats",
        "BPF run time per merge event: ksmtrace / bpftrace count-only (floor)"}
    assert all(r["value"] > 0 for r in per_merge.values())
    ratio = next(r for r in rows if r["name"] == "merge time ratio to untraced: ksmtrace default")
    assert ratio["target"] == "<= 1.02x and < bpftrace" and isinstance(ratio["met"], bool)
    assert "median of 1 interleaved pairs" in ratio["note"]
    assert "bpftrace count-only in this run: median" in ratio["note"]
    for r in rows:
        assert set(r) == {"name", "value", "unit", "target", "met", "note"}
    assert sysfs.read_knob("run") == 0
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        assert f.read() == sysctl_before  # the stats fd is closed: stats off again


def test_doctor_measures_the_programs_cost_for_real(facts, quiet_ksm):
    """doctor's cost section is a real measured run: a merge of 4,000 pages
    during its window shows up as exactly 4,000 runs of the merge program."""
    import threading
    import time

    from ksmtrace import doctor

    plan = caps.plan(facts, None)
    before = set(bpftool_progs())
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(doctor.measure_cost(facts, plan, 15.0)))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not any("ksm" in p.get("name", "")
                      for i, p in bpftool_progs().items() if i not in before):
            assert time.monotonic() < deadline, "doctor's programs never attached"
            time.sleep(0.05)
        time.sleep(0.3)  # every tracepoint attached (bcc attaches them one by one)
        with Workload(WorkloadSpec(processes=2, pages=2000, distinct=20)) as w:
            w.wait_merged()
    finally:
        t.join()
    assert out["error"] is None and out["stats"] == "fd"
    progs = {p["name"]: p for p in out["programs"]}
    merge = progs["raw:ksm_merge_with_ksm_page"]
    assert merge["runs"] == 4000 and merge["run_time_ns"] > 0
    assert merge["ns_per_run"] == round(merge["run_time_ns"] / 4000)
    text = doctor.render_cost(out)
    assert "raw:ksm_merge_with_ksm_page" in text and "4,000" in text
    # doctor's programs are gone with its measured run (raw tracepoint
    # programs are freed by the kernel a moment after their link closes)
    deadline = time.monotonic() + 5
    while left := [p for i, p in bpftool_progs().items()
                   if i not in before and "ksm" in p.get("name", "")]:
        assert time.monotonic() < deadline, left
        time.sleep(0.05)
