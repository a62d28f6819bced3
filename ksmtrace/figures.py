"""The figure catalogue: every figure ksmtrace shows, declared once.

A figure's `name` is the same everywhere it appears: the BPF slot
(`C_<NAME>` in enum ksm_counter, `H_<NAME>` in enum ksm_hist,
bpf/ksmtrace.h, in catalogue order), the key in a Snapshot's `totals`,
`rates` and `hist`, the name in a recording, and the Prometheus metric
(`ksmtrace_<name>`, `_total` added to counters), except where the exported
unit differs from the kernel's (`metric`, e.g. sleep_millisecs is exported
in seconds as ksm_sleep_seconds).

Each declares its stage, kind, unit, the probe that produces it and the
attach methods with which that probe produces it, whether it is exact, and
its help text. `Snapshot.observed(name)` answers from here whether a figure
was observed in a snapshot; views ask it instead of guessing from zeros.

The small decoders of the kernel's codes live here too, each once: merge
kinds, copy-on-write kinds and errno names.

Pure data: no kernel access, no imports from the rest of ksmtrace.
"""

from __future__ import annotations

import errno as errno_mod
from dataclasses import dataclass
from enum import IntEnum

# --------------------------------------------------------------- decoders


class MergeKind(IntEnum):
    """enum ksm_merge_kind (bpf/ksmtrace.h): what a merge did."""

    NEW_KSM_PAGE = 0  # the page and its twin became a new KSM page
    INTO_KSM_PAGE = 1  # the page joined an existing KSM page
    ZERO_PAGE = 2  # the page was merged with the zero page (use_zero_pages)


# label value (metrics, recordings' error keys, report keys), by MergeKind
MERGE_KINDS = tuple(k.name.lower() for k in MergeKind)
# words for people, by MergeKind
MERGE_KIND_TEXT = ("new KSM page (pair)", "into a KSM page", "into the zero page")


class CowKind(IntEnum):
    """enum ksm_cow_kind: why a KSM page was copied."""

    WRITE = 0  # a user write to a KSM page
    UNSHARE = 1  # FAULT_FLAG_UNSHARE: break_ksm, a GUP pin


COW_KINDS = tuple(k.name.lower() for k in CowKind)


def merge_kind(sub: int) -> str:
    """The label of a merge kind code; an unknown code as its number."""
    return MERGE_KINDS[sub] if 0 <= sub < len(MERGE_KINDS) else str(sub)


def merge_kind_text(sub: int) -> str:
    return MERGE_KIND_TEXT[sub] if 0 <= sub < len(MERGE_KIND_TEXT) else f"kind {sub}"


def cow_kind(sub: int) -> str:
    return COW_KINDS[sub] if 0 <= sub < len(COW_KINDS) else str(sub)


def errno_name(err: int) -> str:
    """'ok' for 0, the symbolic name of -errno or errno (EBUSY), else the number."""
    if err == 0:
        return "ok"
    return errno_mod.errorcode.get(abs(err), str(abs(err)))


def error_key(kind: int, err: int) -> str:
    """The key of a merge failure count: '<merge kind>:<-errno>'."""
    return f"{merge_kind(kind)}:{err}"


def split_error_key(key: str) -> tuple[str, int | None]:
    """'into_ksm_page:-16' -> ('into_ksm_page', -16); a malformed one -> (key, None)."""
    kind, _, err = key.rpartition(":")
    try:
        return kind, int(err)
    except ValueError:
        return key, None


# ---------------------------------------------------------------- figures

TRACED = ("fentry", "kprobe", "tracepoint")  # every method that runs a BPF program
EXIT_PROBES = ("fentry", "kprobe")  # the methods that see a return: latency, results


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    stage: str  # searching, merging, counting, updating; "self" for ksmtrace's own
    kind: str  # counter, gauge or histogram
    unit: str  # events, pages, bytes, seconds, ticks, ratio, ...
    help: str
    source: str  # bpf, sysfs, vmstat, procfs
    probe: str | None = None  # the plan's probe that produces a bpf figure
    methods: tuple[str, ...] = TRACED  # ... when attached with one of these
    exact: bool = True  # False: a labelled estimate
    metric: str | None = None  # exported name when the unit is converted
    divisor: int = 1  # kernel value / divisor = exported value
    node: str | None = None  # node_exporter's name for the same figure
    exported: bool = True  # a family of its own (False: part of another, or none)
    parts: tuple[str, ...] = ()  # an aggregate: the sum of these figures

    @property
    def metric_name(self) -> str:
        return self.metric or self.name


def _bpf(name: str, stage: str, probe: str | None, help_: str, **kw) -> Figure:
    return Figure(name, stage, "counter", "events", help_, "bpf", probe, **kw)


def _merges(prefix: str, what: str) -> tuple[Figure, ...]:
    return tuple(_bpf(f"{prefix}_{k}", "merging", "merges",
                      f"{what} ({MERGE_KIND_TEXT[i]}), traced", exported=False)
                 for i, k in enumerate(MERGE_KINDS))


# In enum ksm_counter order: the slot of each is its index.
COUNTERS: tuple[Figure, ...] = (
    _bpf("scan_starts", "searching", "scan_rounds", "Scan rounds ksmd started, traced",
         exported=False),
    _bpf("scan_rounds", "searching", "scan_rounds",
         "Scan rounds ksmd completed, traced (ksm_stop_scan)"),
    *_merges("merges", "Successful merges"),
    *_merges("merge_failures", "Failed merge attempts"),
    _bpf("ksm_pages_removed", "updating", "stable_removals",
         "KSM pages (stable nodes) torn down, traced (ksm_remove_ksm_page)"),
    _bpf("rmap_items_removed", "updating", "stable_removals",
         "Pages that left KSM's tracking: unmerged or unregistered, traced "
         "(ksm_remove_rmap_item)"),
    _bpf("mm_enters", "counting", "mm_owners",
         "Address spaces that registered with KSM, traced (ksm_enter)"),
    _bpf("mm_exits", "counting", "mm_owners", "Address spaces that left KSM, traced (ksm_exit)"),
    _bpf("cow_writes", "updating", "cow_breaks", "Copy-on-write breaks by a user write, traced",
         methods=EXIT_PROBES, exported=False),
    _bpf("cow_unshares", "updating", "cow_breaks",
         "Copy-on-write breaks by an unshare (FAULT_FLAG_UNSHARE), traced",
         methods=EXIT_PROBES, exported=False),
    # counted only where the per-process COW figures are estimated from them
    _bpf("wp_faults", "updating", "cow_breaks",
         "User write faults on write-protected pages in KSM processes (basis of the COW "
         "estimate)", methods=("tracepoint",)),
    _bpf("unshares", "updating", "unshares",
         "KSM pages unshared by break_ksm (unmerge, MADV_UNMERGEABLE)", methods=EXIT_PROBES),
    _bpf("advisor_runs", "searching", "advisor",
         "Runs of the scan-time advisor, traced (ksm_advisor)"),
    _bpf("events_sent", "self", None, "Events put on the per-event stream"),
    _bpf("events_lost", "self", None, "Events lost by the per-event stream", exported=False),
    _bpf("owners_resolved", "counting", "mm_owners", "mm -> process owners resolved in BPF",
         exported=False),
    _bpf("scan_batches", "searching", "scan_batches",
         "Batches of pages_to_scan pages, traced (ksm_do_scan)", methods=EXIT_PROBES),
    _bpf("pages_compared", "searching", "page_compares",
         "Page comparisons, traced (cmp_and_merge_page)", methods=EXIT_PROBES),
)


def _hist(name: str, stage: str, probe: str, help_: str, methods=EXIT_PROBES) -> Figure:
    return Figure(name, stage, "histogram", "seconds",
                  help_ + "; log2 buckets measured in the kernel", "bpf", probe, methods)


# In enum ksm_hist order.
HISTOGRAMS: tuple[Figure, ...] = (
    _hist("scan_round_seconds", "searching", "scan_rounds",
          "Duration of ksmd's scan rounds (ksm_start_scan to ksm_stop_scan)", TRACED),
    _hist("merge_latency_seconds", "merging", "merges",
          "Time to merge one page (try_to_merge_one_page entry to exit)"),
    _hist("cow_latency_seconds", "updating", "cow_breaks",
          "Time to break a KSM page on write (do_wp_page entry to exit)"),
    _hist("unshare_latency_seconds", "updating", "unshares",
          "Time of one KSM unshare (break_ksm entry to exit)"),
    _hist("scan_batch_seconds", "searching", "scan_batches",
          "Duration of one ksmd batch (ksm_do_scan)"),
)

# Sums of slots, in the order the collector adds them to totals.
AGGREGATES: tuple[Figure, ...] = (
    _bpf("merges", "merging", "merges",
         "Merge attempts traced, by kind (new_ksm_page: a page became a KSM page; "
         "into_ksm_page: joined one; zero_page: merged with the zero page) and result",
         parts=tuple(f"merges_{k}" for k in MERGE_KINDS)),
    _bpf("merge_failures", "merging", "merges", "Failed merge attempts by kind and errno",
         parts=tuple(f"merge_failures_{k}" for k in MERGE_KINDS)),
    _bpf("cow_breaks", "updating", "cow_breaks",
         "Copy-on-write breaks of KSM pages by kind (write: a user write; unshare: "
         "FAULT_FLAG_UNSHARE, break_ksm or a GUP pin). estimated=\"true\": this kernel "
         "cannot tell the kinds apart (no kprobe/fentry on do_wp_page), so the exact "
         "cow_ksm count, all kinds, is reported as writes",
         methods=EXIT_PROBES, parts=("cow_writes", "cow_unshares")),
)


def _sysfs(name: str, kind: str, help_: str, *, metric: str | None = None, divisor: int = 1,
           node: str | None = None, stage: str = "counting", unit: str = "pages") -> Figure:
    return Figure(name, stage, kind, unit, help_ + f" (sysfs {name})", "sysfs",
                  methods=(), metric=metric or f"ksm_{name}", divisor=divisor, node=node)


# Every file of /sys/kernel/mm/ksm. node_exporter's ksmd collector exports
# nine of them; those keep its meaning and unit (full_scans as a counter,
# sleep_millisecs in seconds) under the ksmtrace_ksm_ prefix.
SYSFS: tuple[Figure, ...] = (
    _sysfs("run", "gauge", "ksmd state: 0 stopped, 1 merging, 2 unmerging everything",
           node="node_ksmd_run", stage="searching", unit="state"),
    _sysfs("full_scans", "counter", "Complete passes ksmd made over all mergeable memory",
           node="node_ksmd_full_scans_total", stage="searching", unit="scans"),
    _sysfs("pages_scanned", "counter", "Pages ksmd has scanned", stage="searching"),
    _sysfs("pages_skipped", "counter", "Pages smart scan skipped", stage="searching"),
    _sysfs("pages_shared", "gauge", "KSM pages in use: distinct merged contents",
           node="node_ksmd_pages_shared"),
    _sysfs("pages_sharing", "gauge", "Extra mappings of KSM pages: pages saved",
           node="node_ksmd_pages_sharing"),
    _sysfs("pages_unshared", "gauge", "Unique pages ksmd keeps checking",
           node="node_ksmd_pages_unshared"),
    _sysfs("pages_volatile", "gauge", "Pages changing too fast to merge",
           node="node_ksmd_pages_volatile"),
    _sysfs("stable_node_chains", "gauge",
           "KSM pages that reached max_page_sharing and became chains"),
    _sysfs("stable_node_dups", "gauge", "Duplicate KSM pages inside chains"),
    _sysfs("ksm_zero_pages", "gauge", "Pages merged with the zero page, use_zero_pages=1",
           metric="ksm_zero_pages", stage="merging"),
    _sysfs("general_profit", "gauge",
           "Memory KSM saves minus what its rmap items cost, bytes; negative when KSM costs "
           "more than it saves", metric="ksm_general_profit_bytes", unit="bytes"),
    _sysfs("pages_to_scan", "gauge", "Pages ksmd scans per batch",
           node="node_ksmd_pages_to_scan", stage="searching", unit="knob"),
    _sysfs("sleep_millisecs", "gauge", "ksmd's sleep between batches",
           metric="ksm_sleep_seconds", divisor=1000, node="node_ksmd_sleep_seconds",
           stage="searching", unit="knob"),
    _sysfs("merge_across_nodes", "gauge", "1 if pages of different NUMA nodes may merge",
           node="node_ksmd_merge_across_nodes", unit="knob"),
    _sysfs("use_zero_pages", "gauge", "1 if empty pages merge with the zero page", unit="knob"),
    _sysfs("max_page_sharing", "gauge", "Most mappings one KSM page may have", unit="knob"),
    _sysfs("stable_node_chains_prune_millisecs", "gauge", "How often chains are pruned",
           metric="ksm_stable_node_chains_prune_seconds", divisor=1000, unit="knob"),
    _sysfs("smart_scan", "gauge", "1 if ksmd skips pages that did not merge last time",
           stage="searching", unit="knob"),
    _sysfs("advisor_max_cpu", "gauge",
           "CPU share the scan-time advisor may give ksmd, as a ratio",
           metric="ksm_advisor_max_cpu_ratio", divisor=100, stage="searching", unit="knob"),
    _sysfs("advisor_min_pages_to_scan", "gauge", "Advisor's lower bound for pages_to_scan",
           stage="searching", unit="knob"),
    _sysfs("advisor_max_pages_to_scan", "gauge", "Advisor's upper bound for pages_to_scan",
           stage="searching", unit="knob"),
    _sysfs("advisor_target_scan_time", "gauge", "Advisor's target time for a full scan",
           metric="ksm_advisor_target_scan_time_seconds", stage="searching", unit="knob"),
)

# Kernel figures that are not one sysfs file.
DERIVED: tuple[Figure, ...] = (
    Figure("merged_pages", "merging", "gauge", "pages",
           "KSM-merged pages: pages_shared + pages_sharing", "sysfs", methods=(),
           exported=False),
    Figure("cow_ksm", "updating", "counter", "events",
           "Copy-on-write breaks of KSM pages, all processes, exact (/proc/vmstat cow_ksm)",
           "vmstat", methods=()),
    Figure("ksmd_cpu_ticks", "searching", "counter", "ticks",
           "CPU time ksmd used since ksmtrace started (/proc/<ksmd>/stat utime+stime)",
           "procfs", methods=(), metric="ksmd_cpu_seconds"),
)

# Per process (ProcessRow fields without the prefix), labelled pid, comm, cgroup.
PROCESS: tuple[Figure, ...] = (
    Figure("process_merging_pages", "counting", "gauge", "pages",
           "Pages of the process mapped to KSM pages (/proc/<pid>/ksm_stat ksm_merging_pages)",
           "procfs", methods=()),
    Figure("process_zero_pages", "counting", "gauge", "pages",
           "Pages of the process merged with the zero page (ksm_stat ksm_zero_pages)",
           "procfs", methods=()),
    Figure("process_profit_bytes", "counting", "gauge", "bytes",
           "What KSM saves for the process minus its rmap items' cost, bytes, signed "
           "(ksm_stat ksm_process_profit)", "procfs", methods=()),
    Figure("process_rmap_items", "counting", "gauge", "items",
           "KSM rmap items of the process (ksm_stat)", "procfs", methods=()),
    _bpf("process_merges", "merging", "merges",
         "Pages of the process merged, traced, since ksmtrace started"),
    # estimated where cow_breaks is: the exact cow_ksm count split by write faults
    _bpf("process_cow_breaks", "updating", "cow_breaks",
         "Copy-on-write breaks of the process's KSM pages since ksmtrace started "
         "(estimated=\"true\": the exact cow_ksm count split by write-protect faults)"),
)

# Per workload (the VM, container, service or lone process of kernel/identity.py),
# labelled workload, workload_kind: sums of its processes' figures.
WORKLOAD: tuple[Figure, ...] = (
    Figure("workload_merging_pages", "counting", "gauge", "pages",
           "Pages of the workload's live processes mapped to KSM pages (ksm_stat)", "procfs",
           methods=()),
    Figure("workload_profit_bytes", "counting", "gauge", "bytes",
           "ksm_process_profit summed over the workload's live processes, bytes", "procfs",
           methods=()),
    Figure("workload_processes", "counting", "gauge", "processes",
           "Live KSM processes of the workload", "procfs", methods=()),
    _bpf("workload_merges", "merging", "merges",
         "Pages of the workload merged, traced, since ksmtrace started"),
    _bpf("workload_cow_breaks", "updating", "cow_breaks",
         "Copy-on-write breaks of the workload's KSM pages since ksmtrace started "
         "(estimated=\"true\": the exact cow_ksm count split by write-protect faults)"),
)

# The sharing map (ksmtrace/sharing.py), read on its own slower interval.
SHARING: tuple[Figure, ...] = (
    Figure("sharing_bytes", "counting", "gauge", "bytes",
           "KSM page frames two workloads both map, in bytes (labels a, b: workloads; the "
           "top pairs only)", "procfs", methods=()),
    Figure("sharing_cross_tenant_frames", "counting", "gauge", "frames",
           "KSM page frames mapped by two different VMs or containers (the precondition of "
           "KSM side channels)", "procfs", methods=()),
    Figure("sharing_exposure_bytes", "counting", "gauge", "bytes",
           "Memory the host would need if the five workloads with the most KSM pages wrote "
           "them all", "procfs", methods=()),
    Figure("sharing_mem_available_bytes", "counting", "gauge", "bytes",
           "MemAvailable (/proc/meminfo) when the sharing map was read", "procfs", methods=()),
    Figure("sharing_read_seconds", "self", "gauge", "seconds",
           "Time the last sharing map took to read (every KSM process's page map)", "procfs",
           methods=()),
    Figure("sharing_timestamp_seconds", "self", "gauge", "seconds",
           "Unix time the last sharing map was read", "procfs", methods=()),
)

# Kernel counters the collector turns into totals since start and rates, in
# the order it adds them.
RATES = ("pages_scanned", "pages_skipped", "full_scans", "merged_pages", "ksm_zero_pages",
         "cow_ksm", "ksmd_cpu_ticks")

FIGURES: dict[str, Figure] = {
    f.name: f for f in (*COUNTERS, *HISTOGRAMS, *AGGREGATES, *SYSFS, *PROCESS, *WORKLOAD,
                        *SHARING, *DERIVED)}
assert len(FIGURES) == len(COUNTERS) + len(HISTOGRAMS) + len(AGGREGATES) + len(SYSFS) \
    + len(PROCESS) + len(WORKLOAD) + len(SHARING) + len(DERIVED), \
    "a figure name is declared twice"
assert all(n in FIGURES for n in RATES)

COUNTER_SLOTS = tuple(f.name for f in COUNTERS)  # enum ksm_counter order
HISTOGRAM_SLOTS = tuple(f.name for f in HISTOGRAMS)  # enum ksm_hist order


def figure(name: str) -> Figure:
    return FIGURES[name]


def aggregate(name: str, counters: dict[str, int]) -> int:
    """An aggregate figure's value from BPF counter values."""
    return sum(counters.get(p, 0) for p in FIGURES[name].parts)
