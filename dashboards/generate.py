#!/usr/bin/env python3
"""Writes dashboards/ksmtrace.json, the Grafana dashboard over the metrics of
`ksmtrace export`. Edit this file, run it, commit both (a unit test checks
the JSON is this script's output).

Every selector carries instance=~"$instance"; the datasource is a template
variable, so the file imports into any Grafana with a Prometheus. The
kernel tests run every expression here against a real Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "ksmtrace.json"
I = 'instance=~"$instance"'  # noqa: E741
R = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}


def q(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref}
    if instant:
        t.update({"instant": True, "range": False, "format": "table"})
    return t


def targets(*exprs: tuple[str, str], instant: bool = False) -> list[dict]:
    return [q(e, lg, chr(ord("A") + n), instant) for n, (e, lg) in enumerate(exprs)]


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": self._id(),
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0

    def add(self, kind: str, title: str, desc: str, tgts: list[dict], unit: str = "short",
            w: int = 8, h: int = 8, **extra) -> None:
        if self.x + w > 24:
            self._newline()
        panel = {
            "type": kind, "title": title, "description": desc, "datasource": DS, "id": self._id(),
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": tgts,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
        }
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                                "tooltip": {"mode": "multi"}}
        panel.update(extra)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def top(self, title: str, desc: str, series: str, legend: str, unit: str) -> None:
        """Half a row of horizontal bars: the 10 largest of `series` now."""
        self.add("bargauge", title, desc,
                 targets((f"topk(10, {series}{{{I}}})", "{{instance}} " + legend), instant=True),
                 unit, w=12, options={"orientation": "horizontal", "displayMode": "basic"})


def build() -> dict:
    L = Layout()

    L.row("Savings: what KSM saves, per host")
    L.add("stat", "Memory saved", "(pages_sharing + ksm_zero_pages) x page size, all selected "
          "hosts", targets((f"sum(ksmtrace_ksm_saved_bytes{{{I}}})", "saved")), "bytes", w=6, h=5)
    L.add("stat", "General profit", "sysfs general_profit: saved memory minus the rmap items' "
          "cost; negative means KSM costs memory",
          targets((f"sum(ksmtrace_ksm_general_profit_bytes{{{I}}})", "profit")), "bytes", w=6,
          h=5)
    L.add("stat", "Sharing ratio", "pages_sharing / pages_shared: mappings saved per KSM page",
          targets((f"sum(ksmtrace_ksm_pages_sharing{{{I}}}) / "
                   f"sum(ksmtrace_ksm_pages_shared{{{I}}} > 0)", "ratio")), "none", w=6, h=5)
    L.add("stat", "Hosts exporting", "ksmtrace exporters answering, by data source",
          targets((f"count by (source) (ksmtrace_build_info{{{I}}})", "{{source}}")), "none",
          w=6, h=5)
    L.add("timeseries", "Saved memory and profit", "Per host: memory saved by merging and "
          "general_profit (saved minus KSM's own metadata)",
          targets((f"ksmtrace_ksm_saved_bytes{{{I}}}", "{{instance}} saved"),
                  (f"ksmtrace_ksm_general_profit_bytes{{{I}}}", "{{instance}} profit")),
          "bytes", w=12)
    L.add("timeseries", "Sharing ratio", "pages_sharing / pages_shared per host (max_page_sharing "
          "caps it)", targets((f"ksmtrace_ksm_pages_sharing{{{I}}} / "
                               f"(ksmtrace_ksm_pages_shared{{{I}}} > 0)", "{{instance}}")),
          "none", w=12)

    L.row("Searching: ksmd scanning")
    L.add("timeseries", "Pages scanned and skipped /s", "sysfs pages_scanned and pages_skipped "
          "(smart scan) per second",
          targets((f"rate(ksmtrace_ksm_pages_scanned_total{{{I}}}[{R}])", "{{instance}} scanned"),
                  (f"rate(ksmtrace_ksm_pages_skipped_total{{{I}}}[{R}])", "{{instance}} skipped")),
          "short")
    L.add("timeseries", "Full scans /s", "Complete passes over mergeable memory (sysfs "
          "full_scans; node_ksmd_full_scans_total)",
          targets((f"rate(ksmtrace_ksm_full_scans_total{{{I}}}[{R}])", "{{instance}}")), "short")
    L.add("timeseries", "Scan-round duration", "ksm_start_scan to ksm_stop_scan, p50 and p99 "
          "from the kernel's log2 histogram",
          targets((f"histogram_quantile(0.5, sum by (instance, le) "
                   f"(rate(ksmtrace_scan_round_seconds_bucket{{{I}}}[{R}])))",
                   "{{instance}} p50"),
                  (f"histogram_quantile(0.99, sum by (instance, le) "
                   f"(rate(ksmtrace_scan_round_seconds_bucket{{{I}}}[{R}])))",
                   "{{instance}} p99")), "s")
    L.add("timeseries", "ksmd settings", "run (0 stopped, 1 merging, 2 unmerging), pages_to_scan "
          "per batch, sleep between batches",
          targets((f"ksmtrace_ksm_run{{{I}}}", "{{instance}} run"),
                  (f"ksmtrace_ksm_pages_to_scan{{{I}}}", "{{instance}} pages_to_scan"),
                  (f"ksmtrace_ksm_sleep_seconds{{{I}}}", "{{instance}} sleep s")), "short",
          w=24, h=6)

    L.row("Merging: identical pages become one")
    L.add("timeseries", "Merges /s by kind", "Traced merges: new_ksm_page (a page became a KSM "
          "page), into_ksm_page (joined one), zero_page",
          targets((f"sum by (instance, kind) (rate(ksmtrace_merges_total{{result=\"ok\", {I}}}"
                   f"[{R}]))", "{{instance}} {{kind}}")), "short")
    L.add("timeseries", "Failed merges /s", "By errno where failures were seen, else by kind "
          "(zero when none failed)",
          targets((f"sum by (instance, kind, errno) (rate(ksmtrace_merge_failures_total{{{I}}}"
                   f"[{R}])) or sum by (instance, kind) (rate(ksmtrace_merges_total"
                   f"{{result=\"failed\", {I}}}[{R}]))", "{{instance}} {{kind}} {{errno}}")),
          "short")
    L.add("timeseries", "Merge latency", "try_to_merge_one_page, p50 and p99; needs fentry or "
          "kprobe (see probe health)",
          targets((f"histogram_quantile(0.5, sum by (instance, le) "
                   f"(rate(ksmtrace_merge_latency_seconds_bucket{{{I}}}[{R}])))",
                   "{{instance}} p50"),
                  (f"histogram_quantile(0.99, sum by (instance, le) "
                   f"(rate(ksmtrace_merge_latency_seconds_bucket{{{I}}}[{R}])))",
                   "{{instance}} p99")), "s")

    L.row("Counting: who shares what")
    L.add("timeseries", "KSM pages", "sysfs pages_shared (KSM pages), pages_sharing (mappings "
          "saved), pages_unshared, pages_volatile",
          targets((f"ksmtrace_ksm_pages_shared{{{I}}}", "{{instance}} shared"),
                  (f"ksmtrace_ksm_pages_sharing{{{I}}}", "{{instance}} sharing"),
                  (f"ksmtrace_ksm_pages_unshared{{{I}}}", "{{instance}} unshared"),
                  (f"ksmtrace_ksm_pages_volatile{{{I}}}", "{{instance}} volatile")), "short")
    L.add("timeseries", "Zero pages and chains", "ksm_zero_pages, stable_node_chains and "
          "stable_node_dups (max_page_sharing reached)",
          targets((f"ksmtrace_ksm_zero_pages{{{I}}}", "{{instance}} zero pages"),
                  (f"ksmtrace_ksm_stable_node_chains{{{I}}}", "{{instance}} chains"),
                  (f"ksmtrace_ksm_stable_node_dups{{{I}}}", "{{instance}} dups")), "short")
    L.add("timeseries", "Processes using KSM", "Processes with mergeable memory or merged pages",
          targets((f"ksmtrace_processes{{{I}}}", "{{instance}}")), "short")
    L.top("Top processes: merged pages", "ksm_merging_pages of the top processes "
          "(pid=\"other\": all the rest)",
          "ksmtrace_process_merging_pages", "{{pid}} {{comm}}", "short")
    L.top("Top processes: profit", "ksm_process_profit (saved minus rmap cost)",
          "ksmtrace_process_profit_bytes", "{{pid}} {{comm}}", "bytes")
    L.top("Top workloads: merged pages", "Summed over each VM's, container's or "
          "service's live processes (workload=\"other\": all the rest)",
          "ksmtrace_workload_merging_pages", "{{workload_kind}} {{workload}}", "short")
    L.top("Top workloads: profit", "ksm_process_profit summed per workload",
          "ksmtrace_workload_profit_bytes", "{{workload_kind}} {{workload}}", "bytes")
    L.top("Who shares with whom", "KSM page frames two workloads both map (the "
          "top pairs; read every --sharing-interval)",
          "ksmtrace_sharing_bytes", "{{a}} <-> {{b}}", "bytes")
    L.add("timeseries", "Write-storm exposure", "Memory the top five workloads would need if "
          "they wrote every KSM page they map, against MemAvailable (KsmCowStormExposure)",
          targets((f"ksmtrace_sharing_exposure_bytes{{{I}}}", "{{instance}} exposure"),
                  (f"ksmtrace_sharing_mem_available_bytes{{{I}}}",
                   "{{instance}} MemAvailable")), "bytes", w=12)
    L.top("Top cgroups: merged pages", "Summed over each cgroup's processes",
          "ksmtrace_cgroup_merging_pages", "{{cgroup}}", "short")
    L.top("Top cgroups: profit", "ksm_process_profit summed per cgroup",
          "ksmtrace_cgroup_profit_bytes", "{{cgroup}}", "bytes")

    L.row("Updating: copy-on-write breaks and unmerges")
    L.add("timeseries", "COW breaks /s", "Exact: /proc/vmstat cow_ksm. By kind: traced "
          "(estimated=true where the kernel cannot tell writes from unshares)",
          targets((f"rate(ksmtrace_cow_ksm_total{{{I}}}[{R}])", "{{instance}} cow_ksm"),
                  (f"sum by (instance, kind, estimated) (rate(ksmtrace_cow_breaks_total{{{I}}}"
                   f"[{R}]))", "{{instance}} {{kind}} estimated={{estimated}}")), "short")
    L.add("timeseries", "COW storm: breaks in 5 min / merged pages", "Above 0.1 (and 1,000 "
          "breaks) the KsmCowBreakStorm alert fires",
          targets((f"increase(ksmtrace_cow_ksm_total{{{I}}}[5m]) / clamp_min("
                   f"ksmtrace_ksm_pages_shared{{{I}}} + ksmtrace_ksm_pages_sharing{{{I}}}, 1)",
                   "{{instance}}")), "percentunit")
    L.add("timeseries", "Top processes: COW breaks /s", "Per process (estimated=true: the "
          "exact cow_ksm split by write-protect faults)",
          targets((f"topk(10, rate(ksmtrace_process_cow_breaks_total{{{I}}}[{R}]))",
                   "{{instance}} {{pid}} {{comm}}")), "short")
    L.add("timeseries", "Unmerges /s", "rmap items removed (pages leaving KSM), KSM pages torn "
          "down; unshares need fentry or kprobe on break_ksm",
          targets((f"rate(ksmtrace_rmap_items_removed_total{{{I}}}[{R}])",
                   "{{instance}} rmap items"),
                  (f"rate(ksmtrace_ksm_pages_removed_total{{{I}}}[{R}])",
                   "{{instance}} KSM pages"),
                  (f"rate(ksmtrace_unshares_total{{{I}}}[{R}])", "{{instance}} unshares")),
          "short", w=12)
    L.add("timeseries", "COW-break latency", "do_wp_page on a KSM page, p99; needs fentry or "
          "kprobe",
          targets((f"histogram_quantile(0.99, sum by (instance, le) "
                   f"(rate(ksmtrace_cow_latency_seconds_bucket{{{I}}}[{R}])))",
                   "{{instance}} p99")), "s", w=12)

    L.row("Cost against savings")
    L.add("timeseries", "ksmd CPU", "CPU cores ksmd uses (/proc/<ksmd>/stat)",
          targets((f"rate(ksmtrace_ksmd_cpu_seconds_total{{{I}}}[{R}])", "{{instance}}")),
          "percentunit")
    L.add("timeseries", "Memory saved per ksmd CPU core", "Saved bytes divided by the cores "
          "ksmd burns: is it worth it?",
          targets((f"ksmtrace_ksm_saved_bytes{{{I}}} / "
                   f"(rate(ksmtrace_ksmd_cpu_seconds_total{{{I}}}[{R}]) > 0)", "{{instance}}")),
          "bytes")
    L.add("timeseries", "ksmtrace's own BPF cost", "CPU cores used by ksmtrace's BPF programs "
          "(kernel BPF stats)",
          targets((f"sum by (instance) (rate(ksmtrace_bpf_program_run_seconds_total{{{I}}}"
                   f"[{R}]))", "{{instance}}")), "percentunit")

    L.row("Probe health")
    L.add("table", "Probes", "How each stage is observed (method) and whether it attached; "
          "method none: this kernel offers no way",
          targets((f"ksmtrace_probe_attached{{{I}}}", ""), instant=True), "short", w=12, h=9)
    L.add("timeseries", "Events lost", "Per-event stream overflow (KsmtraceEventsLost)",
          targets((f"increase(ksmtrace_events_lost_total{{{I}}}[{R}])", "{{instance}}")),
          "short", w=6, h=9)
    L.add("timeseries", "Collector", "Time of the last collector cycle, and age of the newest "
          "snapshot at query time",
          targets((f"ksmtrace_collector_cycle_seconds{{{I}}}", "{{instance}} cycle"),
                  (f"time() - ksmtrace_last_snapshot_timestamp_seconds{{{I}}}",
                   "{{instance}} age")), "s", w=6, h=9)
    L.add("table", "Exporters", "Version, data source (live, sysfs-only, replay) and kernel",
          targets((f"ksmtrace_build_info{{{I}}}", ""), instant=True), "short", w=24, h=6)

    return {
        "title": "ksmtrace: Kernel Samepage Merging",
        "uid": "ksmtrace-ksm",
        "description": "KSM's four stages (searching, merging, counting, updating) per host and "
                       "per process, from `ksmtrace export`",
        "tags": ["ksm", "ksmtrace", "memory", "ebpf"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "options": []},
            {"name": "instance", "label": "Host", "type": "query", "datasource": DS,
             "query": {"query": "label_values(ksmtrace_build_info, instance)",
                       "refId": "instance"},
             "definition": "label_values(ksmtrace_build_info, instance)",
             "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
             "sort": 1, "hide": 0, "options": []},
        ]},
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
