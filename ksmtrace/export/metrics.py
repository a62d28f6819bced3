"""Metric families from one Snapshot: the whole translation from ksmtrace's
vocabulary to Prometheus names, types, units and labels, and nothing else.

Pure formatting of immutable data: no kernel access, no clock, no state.
`families(snapshot)` is called once per snapshot (not per scrape) by
`SnapshotCollector.publish`; scrapes only serialise the result.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from ksmtrace import __version__
from ksmtrace.figures import (
    COUNTERS,
    FIGURES,
    HISTOGRAMS,
    MERGE_KINDS,
    SYSFS,
    errno_name,
    split_error_key,
)
from ksmtrace.grouping import by_workload, workload_of
from ksmtrace.kernel.procfs import CLK_TCK
from ksmtrace.model import PAGE_SIZE, ProcessRow, Snapshot

PREFIX = "ksmtrace"
DEFAULT_TOP = 20  # processes (and cgroups) exported one by one; the rest is "other"
OTHER = "other"  # label value of the aggregate of everything beyond the top N


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


def _family(name: str, value: float):
    f = FIGURES[name]
    cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
    return cls(_name(f.metric_name), f.help, value=value)


def _sysfs(snap: Snapshot) -> Iterable[Metric]:
    k = snap.ksm
    for f in SYSFS:
        v = getattr(k, f.name)
        if v is None:
            continue  # this kernel lacks the file: no series, not a zero
        yield _family(f.name, v / f.divisor if f.divisor != 1 else v)
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
        yield _family("cow_ksm", vm.cow_ksm)
    if vm.ksm_swpin_copy is not None:
        yield CounterMetricFamily(
            _name("ksm_swapin_copies"),
            "KSM pages copied on swap-in (/proc/vmstat ksm_swpin_copy)", value=vm.ksm_swpin_copy)
    if "ksmd_cpu_ticks" in snap.totals:
        yield _family("ksmd_cpu_ticks", snap.totals["ksmd_cpu_ticks"] / CLK_TCK)


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _events(snap: Snapshot) -> Iterable[Metric]:
    t = snap.totals
    if snap.observed("merges"):
        m = CounterMetricFamily(_name("merges"), FIGURES["merges"].help,
                                labels=["kind", "result"])
        for kind in MERGE_KINDS:
            m.add_metric([kind, "ok"], t.get(f"merges_{kind}", 0))
            m.add_metric([kind, "failed"], t.get(f"merge_failures_{kind}", 0))
        yield m
        f = CounterMetricFamily(_name("merge_failures"), FIGURES["merge_failures"].help,
                                labels=["kind", "errno"])
        for key, n in sorted(snap.errors.items()):
            kind, err = split_error_key(key)
            f.add_metric([kind, "?" if err is None else errno_name(err)], n)
        yield f
    for fig in COUNTERS:
        # a counter whose probe does not observe it here has no series, not a false zero
        if fig.exported and snap.observed(fig.name):
            yield _family(fig.name, t.get(fig.name, 0))

    c = CounterMetricFamily(_name("cow_breaks"), FIGURES["cow_breaks"].help,
                            labels=["kind", "estimated"])
    if snap.observed("cow_breaks") and not snap.cow_estimated:
        c.add_metric(["write", "false"], t.get("cow_writes", 0))
        c.add_metric(["unshare", "false"], t.get("cow_unshares", 0))
    elif "cow_ksm" in t:
        c.add_metric(["write", "true"], t["cow_ksm"])
    yield c

    for fig in HISTOGRAMS:
        if not snap.observed(fig.name):
            continue  # the kernel does not let us measure it: no series
        slots = snap.hist.get(fig.name) or {}
        h = HistogramMetricFamily(_name(fig.name), fig.help)
        h.add_metric([], histogram_buckets(slots), sum_value=None)
        # no _sum: the kernel keeps log2 buckets only; _count is exact
        h.samples.append(Sample(h.name + "_count", {}, float(sum(slots.values())), None, None))
        yield h


PROC_LABELS = ["pid", "comm", "cgroup", "workload", "workload_kind"]


def _ranked(groups: dict, top: int) -> tuple[list, list[ProcessRow]]:
    """The top groups by merging pages of their live processes (ties by key),
    and the processes of the rest."""
    def merging(rs: list[ProcessRow]) -> int:
        return sum(r.merging_pages or 0 for r in rs if r.alive)

    order = sorted(groups.items(), key=lambda kv: (-merging(kv[1]), str(kv[0])))
    return order[:top], [r for _, rs in order[top:] for r in rs]


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
    gauges = {field: GaugeMetricFamily(_name(f"process_{field}"),
                                       FIGURES[f"process_{field}"].help, labels=PROC_LABELS)
              for field in ("merging_pages", "zero_pages", "profit_bytes", "rmap_items")}
    merges = CounterMetricFamily(_name("process_merges"), FIGURES["process_merges"].help,
                                 labels=PROC_LABELS)
    cow = CounterMetricFamily(_name("process_cow_breaks"), FIGURES["process_cow_breaks"].help,
                              labels=PROC_LABELS + ["estimated"])
    traced_merges = snap.observed("process_merges")
    traced_cow = snap.observed("process_cow_breaks")

    def add(labels: list[str], group: Iterable[ProcessRow]) -> None:
        group = list(group)
        for field, fam in gauges.items():
            vals = [getattr(r, field) for r in group
                    if r.alive and getattr(r, field) is not None]
            if vals:
                fam.add_metric(labels, sum(vals))
        if traced_merges:
            merges.add_metric(labels, sum(r.merges for r in group))
        if traced_cow:
            cow.add_metric(labels + [est], sum(r.cow_breaks for r in group))

    for r in shown:
        w = workload_of(r)
        add([str(r.pid), r.comm, r.cgroup, w.name, w.kind], [r])
    if rest:
        add([OTHER] * len(PROC_LABELS), rest)
    yield from gauges.values()
    if traced_merges:
        yield merges
    if traced_cow:
        yield cow
    if rest:
        yield GaugeMetricFamily(_name("processes_other"),
                                "Processes aggregated into the pid=\"other\" series (exited "
                                "ones included)", value=len(rest))
    yield from _cgroups(alive, top)
    yield from _workloads(snap, top, traced_merges, traced_cow, est)


def _profit(rs: list[ProcessRow]) -> int | None:
    # no ksm_process_profit on this kernel (< 6.4): no series, not a false 0
    profits = [r.profit_bytes for r in rs if r.alive and r.profit_bytes is not None]
    return sum(profits) if profits else None


def _one_workload(rs: list[ProcessRow]) -> list[str]:
    ws = {workload_of(r) for r in rs}
    if len(ws) == 1:
        (w,) = ws
        return [w.name, w.kind]
    kinds = {w.kind for w in ws}
    return ["(several)", kinds.pop() if len(kinds) == 1 else "mixed"]


def _cgroups(alive: list[ProcessRow], top: int) -> Iterable[Metric]:
    """Every live process counts; the top N cgroups by merging pages each get
    a series, the rest "other". A cgroup's workload is its processes' one, or
    "(several)" (workload_kind "mixed" unless they are all of one kind)."""
    by_cg: dict[str, list[ProcessRow]] = {}
    for r in alive:
        by_cg.setdefault(r.cgroup, []).append(r)
    labels = ["cgroup", "workload", "workload_kind"]
    merging = GaugeMetricFamily(_name("cgroup_merging_pages"),
                                "Pages mapped to KSM pages, summed over the cgroup's processes",
                                labels=labels)
    profit = GaugeMetricFamily(_name("cgroup_profit_bytes"),
                               "ksm_process_profit summed over the cgroup's processes, bytes",
                               labels=labels)
    procs = GaugeMetricFamily(_name("cgroup_processes"), "KSM processes in the cgroup",
                              labels=labels)
    ranked, other = _ranked(by_cg, top)
    rows = [([cg, *_one_workload(rs)], rs) for cg, rs in ranked]
    if other:
        rows.append(([OTHER] * len(labels), other))
    for values, rs in rows:
        merging.add_metric(values, sum(r.merging_pages or 0 for r in rs))
        if (p := _profit(rs)) is not None:
            profit.add_metric(values, p)
        procs.add_metric(values, len(rs))
    yield merging
    yield profit
    yield procs


def _workloads(snap: Snapshot, top: int, traced_merges: bool, traced_cow: bool,
               est: str) -> Iterable[Metric]:
    """Per workload (VM, container, service, or a lone process): the top N by
    merging pages, the rest "other". Gauges from live processes; traced
    counters from every process the collector still keeps."""
    labels = ["workload", "workload_kind"]
    fams = {n: (CounterMetricFamily if FIGURES[n].kind == "counter" else GaugeMetricFamily)(
        _name(n), FIGURES[n].help, labels=labels + (["estimated"] if n.endswith("cow_breaks")
                                                    else []))
        for n in ("workload_merging_pages", "workload_profit_bytes", "workload_processes",
                  "workload_merges", "workload_cow_breaks")}
    ranked, other = _ranked(by_workload(snap.processes), top)
    rows = [([w.name, w.kind], rs) for w, rs in ranked]
    if other:
        rows.append(([OTHER, OTHER], other))
    for values, rs in rows:
        live = [r for r in rs if r.alive]
        fams["workload_merging_pages"].add_metric(values, sum(r.merging_pages or 0
                                                              for r in live))
        if (p := _profit(rs)) is not None:
            fams["workload_profit_bytes"].add_metric(values, p)
        fams["workload_processes"].add_metric(values, len(live))
        fams["workload_merges"].add_metric(values, sum(r.merges for r in rs))
        fams["workload_cow_breaks"].add_metric(values + [est], sum(r.cow_breaks for r in rs))
    yield from (fams[n] for n in ("workload_merging_pages", "workload_profit_bytes",
                                  "workload_processes"))
    if traced_merges:
        yield fams["workload_merges"]
    if traced_cow:
        yield fams["workload_cow_breaks"]


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


def sharing_families(r: dict, top: int, wall: float) -> list[Metric]:
    """Families of one sharing map (`share.summarise(..., "workload")`): the
    top N pairs by frames in common, cross-tenant frames, the exposure of the
    top workloads and MemAvailable to compare it with, and the read's cost."""
    def gauge(name: str, value: float, labels: list[str] | None = None):
        return GaugeMetricFamily(_name(name), FIGURES[name].help, value=value, labels=labels)

    pairs = GaugeMetricFamily(_name("sharing_bytes"), FIGURES["sharing_bytes"].help,
                              labels=["a", "b"])
    for p in r["pairs"][:top]:
        pairs.add_metric([p["a"], p["b"]], p["bytes"])
    out = [pairs]
    by = {f["what"]: f for f in r["findings"]}
    cross = by.get("cross-tenant sharing", {}).get("frames", 0)
    out.append(gauge("sharing_cross_tenant_frames", cross))
    out.append(gauge("sharing_exposure_bytes", by.get("exposure", {}).get("bytes", 0)))
    if r["mem_available"] is not None:
        out.append(gauge("sharing_mem_available_bytes", r["mem_available"]))
    out.append(gauge("sharing_read_seconds", r["seconds"]))
    out.append(gauge("sharing_timestamp_seconds", wall))
    return out


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


__all__ = ["families", "histogram_buckets", "PAGE_SIZE", "DEFAULT_TOP"]
