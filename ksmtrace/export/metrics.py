"""Metric families from one Snapshot: the whole translation from ksmtrace's
vocabulary to Prometheus names, types, units and labels, and nothing else.

Pure formatting of immutable data: no kernel access, no clock, no state.
`families(snapshot)` is called once per snapshot (not per scrape) by
`SnapshotCollector.publish`; scrapes only serialise the result.
"""

from __future__ import annotations

import errno as errno_mod
import platform
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from ksmtrace import __version__
from ksmtrace.kernel.procfs import CLK_TCK
from ksmtrace.model import MERGE_KIND_NAMES, PAGE_SIZE, ProcessRow, Snapshot

PREFIX = "ksmtrace"
DEFAULT_TOP = 20  # processes (and cgroups) exported one by one; the rest is "other"
OTHER = "other"  # label value of the aggregate of everything beyond the top N


@dataclass(frozen=True)
class SysfsMetric:
    field: str  # KsmSysfs attribute = file in /sys/kernel/mm/ksm
    name: str  # metric name without the prefix
    kind: str  # "gauge" or "counter"
    divisor: int  # divide the file's value by this (ms -> s, percent -> ratio)
    node: str | None  # node_exporter's name for the same figure, if it has one
    help: str


# Every file of /sys/kernel/mm/ksm. node_exporter's ksmd collector exports
# nine of them; those keep its meaning and unit (full_scans as a counter,
# sleep_millisecs in seconds) under the ksmtrace_ksm_ prefix.
SYSFS_METRICS: tuple[SysfsMetric, ...] = (
    SysfsMetric("run", "ksm_run", "gauge", 1, "node_ksmd_run",
                "ksmd state (sysfs run): 0 stopped, 1 merging, 2 unmerging everything"),
    SysfsMetric("full_scans", "ksm_full_scans", "counter", 1, "node_ksmd_full_scans_total",
                "Complete passes ksmd made over all mergeable memory (sysfs full_scans)"),
    SysfsMetric("pages_scanned", "ksm_pages_scanned", "counter", 1, None,
                "Pages ksmd has scanned (sysfs pages_scanned)"),
    SysfsMetric("pages_skipped", "ksm_pages_skipped", "counter", 1, None,
                "Pages smart scan skipped (sysfs pages_skipped)"),
    SysfsMetric("pages_shared", "ksm_pages_shared", "gauge", 1, "node_ksmd_pages_shared",
                "KSM pages in use: distinct merged contents (sysfs pages_shared)"),
    SysfsMetric("pages_sharing", "ksm_pages_sharing", "gauge", 1, "node_ksmd_pages_sharing",
                "Extra mappings of KSM pages: pages saved (sysfs pages_sharing)"),
    SysfsMetric("pages_unshared", "ksm_pages_unshared", "gauge", 1, "node_ksmd_pages_unshared",
                "Unique pages ksmd keeps checking (sysfs pages_unshared)"),
    SysfsMetric("pages_volatile", "ksm_pages_volatile", "gauge", 1, "node_ksmd_pages_volatile",
                "Pages changing too fast to merge (sysfs pages_volatile)"),
    SysfsMetric("stable_node_chains", "ksm_stable_node_chains", "gauge", 1, None,
                "KSM pages that reached max_page_sharing and became chains "
                "(sysfs stable_node_chains)"),
    SysfsMetric("stable_node_dups", "ksm_stable_node_dups", "gauge", 1, None,
                "Duplicate KSM pages inside chains (sysfs stable_node_dups)"),
    SysfsMetric("ksm_zero_pages", "ksm_zero_pages", "gauge", 1, None,
                "Pages merged with the zero page, use_zero_pages=1 (sysfs ksm_zero_pages)"),
    SysfsMetric("general_profit", "ksm_general_profit_bytes", "gauge", 1, None,
                "Memory KSM saves minus what its rmap items cost, bytes; negative when KSM "
                "costs more than it saves (sysfs general_profit)"),
    SysfsMetric("pages_to_scan", "ksm_pages_to_scan", "gauge", 1, "node_ksmd_pages_to_scan",
                "Pages ksmd scans per batch (sysfs pages_to_scan)"),
    SysfsMetric("sleep_millisecs", "ksm_sleep_seconds", "gauge", 1000,
                "node_ksmd_sleep_seconds", "ksmd's sleep between batches (sysfs sleep_millisecs)"),
    SysfsMetric("merge_across_nodes", "ksm_merge_across_nodes", "gauge", 1,
                "node_ksmd_merge_across_nodes",
                "1 if pages of different NUMA nodes may merge (sysfs merge_across_nodes)"),
    SysfsMetric("use_zero_pages", "ksm_use_zero_pages", "gauge", 1, None,
                "1 if empty pages merge with the zero page (sysfs use_zero_pages)"),
    SysfsMetric("max_page_sharing", "ksm_max_page_sharing", "gauge", 1, None,
                "Most mappings one KSM page may have (sysfs max_page_sharing)"),
    SysfsMetric("stable_node_chains_prune_millisecs", "ksm_stable_node_chains_prune_seconds",
                "gauge", 1000, None,
                "How often chains are pruned (sysfs stable_node_chains_prune_millisecs)"),
    SysfsMetric("smart_scan", "ksm_smart_scan", "gauge", 1, None,
                "1 if ksmd skips pages that did not merge last time (sysfs smart_scan)"),
    SysfsMetric("advisor_max_cpu", "ksm_advisor_max_cpu_ratio", "gauge", 100, None,
                "CPU share the scan-time advisor may give ksmd (sysfs advisor_max_cpu / 100)"),
    SysfsMetric("advisor_min_pages_to_scan", "ksm_advisor_min_pages_to_scan", "gauge", 1, None,
                "Advisor's lower bound for pages_to_scan (sysfs advisor_min_pages_to_scan)"),
    SysfsMetric("advisor_max_pages_to_scan", "ksm_advisor_max_pages_to_scan", "gauge", 1, None,
                "Advisor's upper bound for pages_to_scan (sysfs advisor_max_pages_to_scan)"),
    SysfsMetric("advisor_target_scan_time", "ksm_advisor_target_scan_time_seconds", "gauge", 1,
                None, "Advisor's target time for a full scan (sysfs advisor_target_scan_time)"),
)

# Event counters traced with BPF: (metric name, BPF counter, the probe that
# counts it or None, help). A counter whose probe is not traced on this
# kernel (missed, or only polled) has no series rather than a false zero.
EVENT_COUNTERS = (
    ("scan_rounds", "scan_rounds", "scan_rounds",
     "Scan rounds ksmd completed, traced (ksm_stop_scan)"),
    ("ksm_pages_removed", "ksm_pages_removed", "stable_removals",
     "KSM pages (stable nodes) torn down, traced (ksm_remove_ksm_page)"),
    ("rmap_items_removed", "rmap_items_removed", "stable_removals",
     "Pages that left KSM's tracking: unmerged or unregistered, traced (ksm_remove_rmap_item)"),
    ("mm_enters", "mm_enters", "mm_owners",
     "Address spaces that registered with KSM, traced (ksm_enter)"),
    ("mm_exits", "mm_exits", "mm_owners", "Address spaces that left KSM, traced (ksm_exit)"),
    ("write_protect_faults", "wp_faults", "cow_breaks",
     "User write faults on write-protected pages in KSM processes (basis of the COW estimate)"),
    ("advisor_runs", "advisor_runs", None,
     "Runs of the scan-time advisor, traced (ksm_advisor)"),
    ("scan_batches", "scan_batches", "scan_batches",
     "Batches of pages_to_scan pages, traced (ksm_do_scan)"),
    ("pages_compared", "pages_compared", "page_compares",
     "Page comparisons, traced (memcmp_pages)"),
    ("events_sent", "events_sent", None, "Events put on the per-event stream"),
)

# histogram -> (metric name, probe that fills it, attach methods that can, help)
HISTOGRAM_METRICS = {
    "scan_round_seconds": ("scan_round_duration_seconds", "scan_rounds",
                           ("fentry", "kprobe", "tracepoint"),
                           "Duration of ksmd's scan rounds (ksm_start_scan to ksm_stop_scan)"),
    "merge_latency_seconds": ("merge_latency_seconds", "merges", ("fentry", "kprobe"),
                              "Time to merge one page (try_to_merge_one_page entry to exit)"),
    "cow_latency_seconds": ("cow_break_latency_seconds", "cow_breaks", ("fentry", "kprobe"),
                            "Time to break a KSM page on write (do_wp_page entry to exit)"),
    "unshare_latency_seconds": ("unshare_latency_seconds", "unshares", ("fentry", "kprobe"),
                                "Time of one KSM unshare (break_ksm entry to exit)"),
    "scan_batch_seconds": ("scan_batch_duration_seconds", "scan_batches", ("fentry", "kprobe"),
                           "Duration of one ksmd batch (ksm_do_scan)"),
}

# log2 slot k of a BPF histogram counts durations in [2^k, 2^(k+1)) ns. The
# exported buckets are fixed (a series per `le` must not come and go):
# le = 2^(k+1) ns for k in LOW_SLOT..HIGH_SLOT, i.e. about 1 us .. 69 s;
# faster events fall in the first bucket, slower ones only in +Inf.
LOW_SLOT, HIGH_SLOT = 9, 35
BUCKET_BOUNDS = tuple((2 ** (k + 1)) / 1e9 for k in range(LOW_SLOT, HIGH_SLOT + 1))



def _name(n: str) -> str:
    return f"{PREFIX}_{n}"


def histogram_buckets(slots: dict[int, int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets (le in seconds) from log2(ns) slot counts."""
    out: list[tuple[str, float]] = []
    acc = sum(n for k, n in slots.items() if k < LOW_SLOT)
    for k, le in zip(range(LOW_SLOT, HIGH_SLOT + 1), BUCKET_BOUNDS, strict=True):
        acc += slots.get(k, 0)
        out.append((repr(le), float(acc)))
    out.append(("+Inf", float(sum(slots.values()))))
    return out


def errno_label(err: int) -> str:
    e = abs(err)
    return errno_mod.errorcode.get(e, str(e))


def _sysfs(snap: Snapshot) -> Iterable[Metric]:
    k = snap.ksm
    for m in SYSFS_METRICS:
        v = getattr(k, m.field)
        if v is None:
            continue  # this kernel lacks the file: no series, not a zero
        cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
        yield cls(_name(m.name), m.help, value=v / m.divisor if m.divisor != 1 else v)
    if k.advisor_mode is not None:
        g = GaugeMetricFamily(_name("ksm_advisor_mode"),
                              "Selected KSM advisor (sysfs advisor_mode): 1 for the active one",
                              labels=["mode"])
        g.add_metric([k.advisor_mode], 1)
        yield g
    extra = [(f, v) for f, v in sorted(k.extra.items()) if _is_number(v)]
    if extra:
        g = GaugeMetricFamily(_name("ksm_sysfs_other"),
                              "Numeric KSM sysfs files this ksmtrace does not know yet",
                              labels=["file"])
        for f, v in extra:
            g.add_metric([f], float(v))
        yield g
    yield GaugeMetricFamily(
        _name("ksm_saved_bytes"),
        "Memory KSM saves: (pages_sharing + ksm_zero_pages) x page size",
        value=snap.saved_bytes)
    vm = snap.vmstat
    if vm.cow_ksm is not None:
        yield CounterMetricFamily(
            _name("cow_ksm"),
            "Copy-on-write breaks of KSM pages, all processes, exact (/proc/vmstat cow_ksm)",
            value=vm.cow_ksm)
    if vm.ksm_swpin_copy is not None:
        yield CounterMetricFamily(
            _name("ksm_swapin_copies"),
            "KSM pages copied on swap-in (/proc/vmstat ksm_swpin_copy)", value=vm.ksm_swpin_copy)
    if "ksmd_cpu_ticks" in snap.totals:
        yield CounterMetricFamily(
            _name("ksmd_cpu_seconds"),
            "CPU time ksmd used since ksmtrace started (/proc/<ksmd>/stat utime+stime)",
            value=snap.totals["ksmd_cpu_ticks"] / CLK_TCK)


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _probe(snap: Snapshot, name: str):
    for p in snap.probes:
        if p.probe == name:
            return p
    return None


def _traced_probe(p) -> bool:
    return p is not None and p.attached and p.method not in (None, "polling")


def _events(snap: Snapshot) -> Iterable[Metric]:
    t = snap.totals
    if _traced_probe(_probe(snap, "merges")):
        m = CounterMetricFamily(
            _name("merges"),
            "Merge attempts traced, by kind (new_ksm_page: a page became a KSM page; "
            "into_ksm_page: joined one; zero_page: merged with the zero page) and result",
            labels=["kind", "result"])
        for kind in MERGE_KIND_NAMES:
            m.add_metric([kind, "ok"], t.get(f"merges_{kind}", 0))
            m.add_metric([kind, "failed"], t.get(f"merge_failures_{kind}", 0))
        yield m
        f = CounterMetricFamily(_name("merge_failures"),
                                "Failed merge attempts by kind and errno",
                                labels=["kind", "errno"])
        for key, n in sorted(snap.errors.items()):
            kind, _, err = key.partition(":")
            f.add_metric([kind, errno_label(int(err))], n)
        yield f
    for name, counter, probe, help_ in EVENT_COUNTERS:
        p = _probe(snap, probe) if probe else None
        if probe and not _traced_probe(p):
            continue
        if counter == "wp_faults" and not p.estimated:
            continue  # counted only as the basis of the estimate
        yield CounterMetricFamily(_name(name), help_, value=t.get(counter, 0))

    cow = _probe(snap, "cow_breaks")
    c = CounterMetricFamily(
        _name("cow_breaks"),
        "Copy-on-write breaks of KSM pages by kind (write: a user write; unshare: "
        "FAULT_FLAG_UNSHARE, break_ksm or a GUP pin). estimated=\"true\": this kernel "
        "cannot tell the kinds apart (no kprobe/fentry on do_wp_page), so the exact "
        "cow_ksm count, all kinds, is reported as writes",
        labels=["kind", "estimated"])
    if _traced_probe(cow) and not cow.estimated and not snap.cow_estimated:
        c.add_metric(["write", "false"], t.get("cow_writes", 0))
        c.add_metric(["unshare", "false"], t.get("cow_unshares", 0))
    elif "cow_ksm" in t:
        c.add_metric(["write", "true"], t["cow_ksm"])
    yield c
    uns = _probe(snap, "unshares")
    if _traced_probe(uns):
        yield CounterMetricFamily(_name("unshares"),
                                  "KSM pages unshared by break_ksm (unmerge, MADV_UNMERGEABLE)",
                                  value=t.get("unshares", 0))

    for hist, (name, probe, methods, help_) in HISTOGRAM_METRICS.items():
        p = _probe(snap, probe)
        slots = snap.hist.get(hist) or {}
        if not slots and not (p is not None and p.attached and p.method in methods):
            continue  # the kernel does not let us measure it: no series
        h = HistogramMetricFamily(_name(name), help_ + "; log2 buckets measured in the kernel")
        h.add_metric([], histogram_buckets(slots), sum_value=None)
        # no _sum: the kernel keeps log2 buckets only; _count is exact
        h.samples.append(Sample(h.name + "_count", {}, float(sum(slots.values())), None, None))
        yield h


PROC_LABELS = ["pid", "comm", "cgroup"]


def _processes(snap: Snapshot, top: int) -> Iterable[Metric]:
    # Live processes ranked by merging pages (the collector's order). An
    # exited process's ksm_stat is stale: it leaves the gauges at once; its
    # traced counters stay (in "other") while the collector keeps its row.
    alive = [r for r in snap.processes if r.alive]
    shown = alive[:top]
    rest = alive[top:] + [r for r in snap.processes if not r.alive]
    est = "true" if snap.cow_estimated else "false"
    yield GaugeMetricFamily(_name("processes"),
                            "Live processes known to KSM (mergeable, or merged pages since "
                            "start)", value=len(alive))
    fams = {
        "merging": GaugeMetricFamily(
            _name("process_merging_pages"),
            "Pages of the process mapped to KSM pages (/proc/<pid>/ksm_stat ksm_merging_pages)",
            labels=PROC_LABELS),
        "zero": GaugeMetricFamily(
            _name("process_zero_pages"),
            "Pages of the process merged with the zero page (ksm_stat ksm_zero_pages)",
            labels=PROC_LABELS),
        "profit": GaugeMetricFamily(
            _name("process_profit_bytes"),
            "What KSM saves for the process minus its rmap items' cost, bytes, signed "
            "(ksm_stat ksm_process_profit)", labels=PROC_LABELS),
        "rmap": GaugeMetricFamily(
            _name("process_rmap_items"), "KSM rmap items of the process (ksm_stat)",
            labels=PROC_LABELS),
    }
    merges = CounterMetricFamily(
        _name("process_merges"), "Pages of the process merged, traced, since ksmtrace started",
        labels=PROC_LABELS)
    cow = CounterMetricFamily(
        _name("process_cow_breaks"),
        "Copy-on-write breaks of the process's KSM pages since ksmtrace started "
        "(estimated=\"true\": the exact cow_ksm count split by write-protect faults)",
        labels=PROC_LABELS + ["estimated"])
    traced_merges = snap.traced and _traced_probe(_probe(snap, "merges"))
    traced_cow = snap.traced and _traced_probe(_probe(snap, "cow_breaks"))

    def add(labels: list[str], group: Iterable[ProcessRow]) -> None:
        group = list(group)
        for key, field in (("merging", "merging_pages"), ("zero", "zero_pages"),
                           ("profit", "profit_bytes"), ("rmap", "rmap_items")):
            vals = [getattr(r, field) for r in group
                    if r.alive and getattr(r, field) is not None]
            if vals:
                fams[key].add_metric(labels, sum(vals))
        if traced_merges:
            merges.add_metric(labels, sum(r.merges for r in group))
        if traced_cow:
            cow.add_metric(labels + [est], sum(r.cow_breaks for r in group))

    for r in shown:
        add([str(r.pid), r.comm, r.cgroup], [r])
    if rest:
        add([OTHER, OTHER, OTHER], rest)
    yield from fams.values()
    if traced_merges:
        yield merges
    if traced_cow:
        yield cow
    if rest:
        yield GaugeMetricFamily(_name("processes_other"),
                                "Processes aggregated into the pid=\"other\" series (exited "
                                "ones included)", value=len(rest))

    # cgroups: every live process counts, the top N cgroups by merging pages each
    # get a series, the rest one "other" series
    by_cg: dict[str, list[ProcessRow]] = {}
    for r in alive:
        by_cg.setdefault(r.cgroup, []).append(r)
    agg = sorted(((sum(r.merging_pages or 0 for r in rs), cg, rs) for cg, rs in by_cg.items()),
                 key=lambda x: (-x[0], x[1]))
    cg_merging = GaugeMetricFamily(_name("cgroup_merging_pages"),
                                   "Pages mapped to KSM pages, summed over the cgroup's processes",
                                   labels=["cgroup"])
    cg_profit = GaugeMetricFamily(_name("cgroup_profit_bytes"),
                                  "ksm_process_profit summed over the cgroup's processes, bytes",
                                  labels=["cgroup"])
    cg_procs = GaugeMetricFamily(_name("cgroup_processes"), "KSM processes in the cgroup",
                                 labels=["cgroup"])
    def add_profit(labels: list[str], rs: list[ProcessRow]) -> None:
        # no ksm_process_profit on this kernel (< 6.4): no series, not a false 0
        profits = [r.profit_bytes for r in rs if r.profit_bytes is not None]
        if profits:
            cg_profit.add_metric(labels, sum(profits))

    other: list[ProcessRow] = []
    for i, (merging, cg, rs) in enumerate(agg):
        if i >= top:
            other.extend(rs)
            continue
        cg_merging.add_metric([cg], merging)
        add_profit([cg], rs)
        cg_procs.add_metric([cg], len(rs))
    if other:
        cg_merging.add_metric([OTHER], sum(r.merging_pages or 0 for r in other))
        add_profit([OTHER], other)
        cg_procs.add_metric([OTHER], len(other))
    yield cg_merging
    yield cg_profit
    yield cg_procs


def _self(snap: Snapshot, cycle_seconds: float | None, cycles: int) -> Iterable[Metric]:
    b = GaugeMetricFamily(_name("build_info"),
                          "ksmtrace version, its source of data and the kernel it runs on",
                          labels=["version", "source", "kernel", "python"])
    b.add_metric([__version__, snap.source, platform.release(), platform.python_version()], 1)
    yield b
    yield GaugeMetricFamily(_name("traced"),
                            "1 if events are traced with BPF, 0 if only counters are polled "
                            "(sysfs-only)", value=int(snap.traced))
    p = GaugeMetricFamily(
        _name("probe_attached"),
        "1 if the probe is attached; method=\"none\": this kernel offers no way to observe it",
        labels=["probe", "stage", "method", "estimated"])
    for s in snap.probes:
        p.add_metric([s.probe, s.stage, s.method or "none", str(s.estimated).lower()],
                     int(s.attached))
    yield p
    if snap.traced:
        yield CounterMetricFamily(_name("events_lost"),
                                  "Events lost by the per-event stream (ring or perf buffer)",
                                  value=snap.lost_events)
    yield GaugeMetricFamily(_name("last_snapshot_timestamp_seconds"),
                            "Unix time of the kernel poll behind these figures", value=snap.wall)
    yield GaugeMetricFamily(_name("snapshot_interval_seconds"),
                            "Seconds between the last two polls", value=snap.interval)
    yield CounterMetricFamily(_name("collector_cycles"), "Snapshots made since start",
                              value=cycles)
    if cycle_seconds is not None:
        yield GaugeMetricFamily(
            _name("collector_cycle_seconds"),
            "Time the last cycle took: aggregating one tick into a snapshot and preparing "
            "its metrics (reading the kernel is not included)", value=cycle_seconds)
    if snap.programs:
        rt = CounterMetricFamily(_name("bpf_program_run_seconds"),
                                 "Run time of ksmtrace's own BPF programs (kernel BPF stats)",
                                 labels=["program"])
        rc = CounterMetricFamily(_name("bpf_program_runs"),
                                 "Runs of ksmtrace's own BPF programs (kernel BPF stats)",
                                 labels=["program"])
        for prog in snap.programs:
            rt.add_metric([prog.name], prog.run_time_ns / 1e9)
            rc.add_metric([prog.name], prog.run_count)
        yield rt
        yield rc


def families(snap: Snapshot, top: int = DEFAULT_TOP, cycle_seconds: float | None = None,
             cycles: int = 0) -> list[Metric]:
    """Every metric family for one snapshot. Event families only when the
    snapshot is traced (sysfs-only has no series for them, not zeros)."""
    out = list(_sysfs(snap))
    if snap.traced:
        out += _events(snap)
    out += _processes(snap, top)
    out += _self(snap, cycle_seconds, cycles)
    return out


__all__ = ["families", "histogram_buckets", "SYSFS_METRICS", "PAGE_SIZE", "DEFAULT_TOP"]
