"""What the TUI shows, as plain data: the figures of each stage panel and of
the process table, computed from snapshots. No Textual here, so it is unit
tested on recorded snapshots and shared with the benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ksmtrace.diagnose import ksmd_cores
from ksmtrace.grouping import group_rows, workload_of
from ksmtrace.model import ProcessRow, Snapshot

DASH = "-"


def num(v: float | int | None, unit: str = "") -> str:
    """Compact number: 950, 12.3k, 4.1M (DASH for unknown). Whole counts
    below ten million are shown exactly, so they can be checked against the
    kernel's own figures digit for digit."""
    if v is None:
        return DASH
    a = abs(v)
    if isinstance(v, int) and a < 10_000_000:
        return f"{v}{unit}"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.1f}{suffix}{unit}"
    if isinstance(v, float) and a and a < 10:
        return f"{v:.1f}{unit}"
    return f"{v:.0f}{unit}"


def size(nbytes: int | None) -> str:
    if nbytes is None:
        return DASH
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(nbytes)


def sample_time(wall: float) -> str:
    """A sample's local wall-clock time to a tenth of a second (truncated:
    the figures were read within the tenth shown), e.g. '10:37:04.8'."""
    whole = int(wall)
    return time.strftime("%H:%M:%S", time.localtime(whole)) + f".{int((wall - whole) * 10)}"


def duration(ns: float | None) -> str:
    if ns is None:
        return DASH
    for div, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
        if ns >= div:
            return f"{ns / div:.3g}{unit}"
    return f"{ns:.0f}ns"


def percentile_ns(slots: dict[int, int], q: float) -> float | None:
    """Upper bound of the log2 bucket holding quantile q (slot s counts
    durations in [2**s, 2**(s+1)) ns)."""
    total = sum(slots.values())
    if not total:
        return None
    want = q * total
    seen = 0
    for s in sorted(slots):
        seen += slots[s]
        if seen >= want:
            return float(2 ** (s + 1))
    return float(2 ** (max(slots) + 1))


@dataclass(frozen=True)
class Figure:
    label: str
    value: str
    hint: str = ""  # what it means (help, tooltips)


def _rate(s: Snapshot, name: str) -> float | None:
    return s.rates.get(name)


def _seen(s: Snapshot, name: str, text: str, unseen: str = "n/a") -> str:
    """`text` where figure `name` was observed; else `unseen` on a traced
    source (this kernel cannot observe it), DASH without BPF."""
    if s.observed(name):
        return text
    return unseen if s.traced else DASH


def searching(s: Snapshot) -> list[Figure]:
    k = s.ksm
    rounds_rate = _rate(s, "full_scans")
    hist = s.hist.get("scan_round_seconds", {})
    round_time = percentile_ns(hist, 0.5) if hist else None
    if round_time is None and rounds_rate:
        round_time = 1e9 / rounds_rate
    cores = ksmd_cores(s)
    return [
        Figure("scan/s", num(_rate(s, "pages_scanned")), "sysfs pages_scanned per second"),
        Figure("rounds/s", num(rounds_rate), "full scans completed per second (full_scans)"),
        Figure("round", duration(round_time),
               "median scan round time (traced), else 1 / rounds per second"),
        Figure("skip/s", num(_rate(s, "pages_skipped")),
               "pages smart scan skipped per second (sysfs pages_skipped)"),
        Figure("ksmd CPU", DASH if cores is None else f"{cores * 100:.0f}%",
               "ksmd's CPU time over the interval (/proc/<ksmd>/stat)"),
        Figure("batch", f"{num(k.pages_to_scan)}/{num(k.sleep_millisecs)}ms",
               "pages_to_scan per sleep_millisecs"),
        Figure("rounds", num(k.full_scans), "full scans since boot (sysfs full_scans)"),
    ]


def merging(s: Snapshot) -> list[Figure]:
    r = s.rates
    lat = s.hist.get("merge_latency_seconds", {})
    failures = sorted(s.errors.items(), key=lambda kv: -kv[1])
    top_err = f"{failures[0][0]}" if failures else "none"
    lat_text = _seen(s, "merge_latency_seconds",
                     duration(percentile_ns(lat, 0.5)) if lat else "n/a")
    return [
        Figure("merged/s", num(_rate(s, "merged_pages")),
               "Δ(pages_shared + pages_sharing) per second (kernel counters)"),
        Figure("new/s", _seen(s, "merges_new_ksm_page", num(r.get("merges_new_ksm_page"))),
               "traced merges that made a new KSM page, per second"),
        Figure("into/s", _seen(s, "merges_into_ksm_page", num(r.get("merges_into_ksm_page"))),
               "traced merges into an existing KSM page, per second"),
        Figure("zero/s", _seen(s, "merges_zero_page", num(r.get("merges_zero_page"))),
               "traced merges with the zero page (use_zero_pages=1), per second"),
        Figure("failed/s", _seen(s, "merge_failures", num(r.get("merge_failures"))),
               "merge attempts that failed, per second"),
        Figure("p50 lat", lat_text,
               "median merge latency (try_to_merge_one_page exit probes; n/a on "
               "tracepoints)"),
        Figure("top err", _seen(s, "merge_failures", top_err),
               "most frequent failure, kind:errno"),
        Figure("merges", _seen(s, "merges", num(s.totals.get("merges"))),
               "traced merges since start"),
    ]


def counting(s: Snapshot) -> list[Figure]:
    k = s.ksm
    ratio = k.sharing_ratio
    return [
        Figure("shared", num(k.pages_shared), "KSM pages in use (sysfs pages_shared)"),
        Figure("sharing", num(k.pages_sharing), "extra mappings of them: pages saved"),
        Figure("saved", size(s.saved_bytes), "(pages_sharing + ksm_zero_pages) × page size"),
        Figure("profit", size(k.general_profit), "sysfs general_profit (rmap cost counted)"),
        Figure("ratio", DASH if ratio is None else f"{ratio:.1f}",
               "pages_sharing / pages_shared"),
        Figure("unshared", num(k.pages_unshared), "scanned, unique so far (sysfs)"),
        Figure("volatile", num(k.pages_volatile), "changing too fast to merge (sysfs)"),
        Figure("chains", num(k.stable_node_chains),
               "KSM pages at max_page_sharing (stable_node_chains)"),
        Figure("zero", num(k.ksm_zero_pages), "pages merged with the zero page"),
    ]


def updating(s: Snapshot) -> list[Figure]:
    r = s.rates
    unmerges = None
    if "ksm_pages_removed" in r:
        unmerges = r["ksm_pages_removed"] + r.get("rmap_items_removed", 0)
    est = s.cow_estimated
    return [
        Figure("COW/s", num(_rate(s, "cow_ksm")),
               "copy-on-write breaks of KSM pages per second (/proc/vmstat cow_ksm)"),
        Figure("COW", num(s.totals.get("cow_ksm")), "COW breaks since ksmtrace started"),
        Figure("writes/s", _seen(s, "cow_writes", num(r.get("cow_writes")),
                                 "est." if est else "n/a"),
               "user writes to KSM pages (do_wp_page probes)"),
        Figure("unshare/s", _seen(s, "cow_unshares", num(r.get("cow_unshares"))),
               "break_ksm / GUP unshares (FAULT_FLAG_UNSHARE)"),
        Figure("unmerge/s", _seen(s, "ksm_pages_removed", num(unmerges)),
               "stable nodes and rmap items removed per second"),
        Figure("wp flt/s", _seen(s, "wp_faults", num(r.get("wp_faults"))),
               "write-protect faults in KSM processes (the COW estimate's basis)"),
    ]


STAGE_FIGURES = {
    "searching": searching,
    "merging": merging,
    "counting": counting,
    "updating": updating,
}

# The rate each stage's sparkline draws.
STAGE_SPARK = {
    "searching": "pages_scanned",
    "merging": "merged_pages",
    "counting": None,  # pages saved (a level, not a rate)
    "updating": "cow_ksm",
}


def spark_series(history: list[Snapshot], stage: str) -> list[float]:
    name = STAGE_SPARK[stage]
    if name is None:
        return [float(h.ksm.saved_pages) for h in history]
    return [max(h.rates.get(name, 0.0), 0.0) for h in history]


# ----------------------------------------------------------- process table
@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int


COLUMNS = (
    Column("pid", "PID", 7),
    Column("comm", "COMM", 11),
    Column("workload", "WORKLOAD", 8),
    Column("mergeable", "MERGEABLE", 9),
    Column("merging", "MERGING", 7),
    Column("merges", "MERGES/s", 8),
    Column("cow", "COW/s", 6),
    Column("profit", "PROFIT", 8),
)
FIXED_WIDTH = sum(c.width + 2 for c in COLUMNS if c.key != "workload") + 2  # + padding
SORT_KEYS = tuple(c.key for c in COLUMNS)
TEXT_KEYS = ("pid", "comm", "workload")  # sorted A to Z first; the figures largest first


def row_sort_value(p: ProcessRow, key: str) -> float | str:
    if key == "pid":
        return p.pid
    if key == "comm":
        return p.comm
    if key == "workload":
        return workload_of(p).label
    if key == "mergeable":
        return p.rmap_items or 0
    if key == "merging":
        return p.merging_pages or 0
    if key == "merges":
        return p.merges_rate
    if key == "cow":
        return p.cow_rate
    return p.profit_bytes or 0


ROW_FIGURES = ("process_merges", "process_cow_breaks")  # the traced columns


def observed_columns(s: Snapshot) -> frozenset[str]:
    """Which of the process table's traced figures `s` observed."""
    return frozenset(n for n in ROW_FIGURES if s.observed(n))


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def row_cells(p: ProcessRow, observed: frozenset[str], workload_width: int = 8
              ) -> tuple[str, ...]:
    wl = clip(workload_of(p).label, workload_width)
    cow = num(p.cow_rate) + ("~" if p.cow_estimated else "") \
        if "process_cow_breaks" in observed else DASH
    return (
        str(p.pid),
        p.comm,
        wl,
        # pages KSM tracks for it: rmap items (one per scanned mergeable page)
        num(p.rmap_items) if p.mergeable or p.rmap_items else "no",
        num(p.merging_pages),
        num(p.merges_rate) if "process_merges" in observed else DASH,
        cow,
        size(p.profit_bytes),
    )


def select_rows(rows: tuple[ProcessRow, ...], sort: str = "merging", reverse: bool = True,
                text: str = "", by: str = "process") -> list[ProcessRow]:
    """Filter by a substring of pid, comm, workload or cgroup, group (`by`),
    then sort (ties by pid)."""
    text = text.strip().lower()
    if text:
        rows = tuple(p for p in rows if text in str(p.pid) or text in p.comm.lower()
                     or text in workload_of(p).label.lower() or text in p.cgroup.lower())
    rows = group_rows(rows, by)
    return sorted(rows, key=lambda p: (row_sort_value(p, sort), -p.pid if reverse else p.pid),
                  reverse=reverse)
