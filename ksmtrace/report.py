"""`ksmtrace record`, `report` and `timeline`: write a recording, summarise
one, and turn one into a Chrome/Perfetto trace."""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from dataclasses import asdict
from typing import Any

from ksmtrace import session
from ksmtrace.collector import Collector
from ksmtrace.model import (
    CowKind,
    EventKind,
    MergeKind,
    Snapshot,
    iter_events,
)
from ksmtrace.record import Recorder, probe_json
from ksmtrace.sources.replay import ReplaySource

RECORD_EPILOG = """\
examples:
  sudo ksmtrace record -o ksm.rec                 until Ctrl-C, a tick per second
  sudo ksmtrace record -o ksm.rec --duration 60 0.5
  ksmtrace report ksm.rec                         what happened, stage by stage
  ksmtrace timeline ksm.rec -o trace.json         open in ui.perfetto.dev or chrome://tracing
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="record KSM's events and counters to a file",
                       description="Record every tick (counter poll, in-kernel aggregates, "
                       "raw events) to a file that `report`, `timeline` and replay read.",
                       epilog=RECORD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="recording file to write")
    p.add_argument("--duration", type=float, default=0, help="stop after S seconds")
    p.add_argument("interval", nargs="?", type=float, default=1.0, help="seconds per tick")
    session.add_source_options(p, stream_default=True)
    p.set_defaults(func=run_record)

    p = sub.add_parser("report", help="summarise a recording, stage by stage",
                       description="Replay a recording through the collector and report "
                       "totals per stage, per process, histograms, the probe plan and lost "
                       "events.", epilog=RECORD_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=run_report)

    p = sub.add_parser("timeline", help="a recording as Chrome/Perfetto trace-event JSON",
                       description="Scan rounds become slices on a ksmd track; merges and "
                       "COW breaks become instants on each process's track.",
                       epilog=RECORD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True, help="trace JSON to write")
    p.set_defaults(func=run_timeline)


# ------------------------------------------------------------------ record
def run_record(args: argparse.Namespace) -> int:
    src = session.open_source(args, need_bpf=True)
    with src:
        session.enforce_strict(args, src.probes)
        header = {
            "kernel": platform.release(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "interval": args.interval,
            "source": src.kind,
            "probes": [probe_json(p) for p in src.probes],
            "cow_estimated": src.cow_estimated,
            "notes": list(src.notes),
            "facts": src.facts.as_dict(),
            "plan": src.plan.as_dict(),
        }
        count = int(args.duration / args.interval) if args.duration else 0
        tty = sys.stderr.isatty()
        with Recorder(args.output, header) as rec:
            try:
                for tick in src.ticks(args.interval, count):
                    rec.write(tick)
                    if tty:
                        print(f"\rksmtrace record: {rec.ticks} ticks, {rec.events} events, "
                              f"{rec.bytes / 1e6:.1f} MB", end="", file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                pass  # Ctrl-C ends a recording; what was written is complete
            print(f"\nksmtrace record: wrote {args.output}: {rec.ticks} ticks, "
                  f"{rec.events} events", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ report
def replay_all(path: str) -> tuple[ReplaySource, list[Snapshot], dict[int, int]]:
    src = ReplaySource(path)
    col = Collector(src.kind, src.probes, src.notes, src.cow_estimated)
    snaps = []
    event_counts: dict[int, int] = {}
    for tick in src.ticks():
        snaps.append(col.add_tick(tick))
        for e in iter_events(tick.events):
            event_counts[e.kind] = event_counts.get(e.kind, 0) + 1
    if not snaps:
        from ksmtrace.errors import BadRecording
        raise BadRecording(f"{path} holds no complete tick", "record for at least one interval")
    return src, snaps, event_counts


STAGE_TOTALS = {
    "searching": ("pages_scanned", "full_scans", "scan_rounds", "scan_batches",
                  "pages_compared", "advisor_runs"),
    "merging": ("merges", "merges_new_ksm_page", "merges_into_ksm_page", "merges_zero_page",
                "merge_failures", "merged_pages", "ksm_zero_pages"),
    "counting": ("mm_enters", "mm_exits", "owners_resolved"),
    "updating": ("cow_ksm", "cow_breaks", "cow_writes", "cow_unshares", "wp_faults",
                 "ksm_pages_removed", "rmap_items_removed", "unshares"),
}


DIRECT_COW = ("cow_breaks", "cow_writes", "cow_unshares")


def summarise(path: str) -> dict[str, Any]:
    src, snaps, event_counts = replay_all(path)
    last = snaps[-1]
    h = src.recording.header
    return {
        "file": path,
        "kernel": h.get("kernel"),
        "host": h.get("host"),
        "started": h.get("started"),
        "ticks": len(snaps),
        "seconds": round(last.wall - snaps[0].wall, 3),
        "truncated": src.recording.truncated,
        # where COW is estimated no probe counted COW breaks directly: leave
        # those (zero) figures out rather than print a misleading 0
        "stages": {s: {k: last.totals[k] for k in keys if k in last.totals
                       and not (last.cow_estimated and k in DIRECT_COW)}
                   for s, keys in STAGE_TOTALS.items()},
        "totals": last.totals,
        "histograms": {k: {str(2 ** slot): n for slot, n in sorted(v.items())}
                       for k, v in last.hist.items() if v},
        "merge_failures_by_errno": last.errors,
        "processes": [asdict(r) for r in last.processes],
        "probes": [asdict(p) for p in last.probes],
        "cow_estimated": last.cow_estimated,
        "lost_events": last.lost_events,
        "events_recorded": sum(event_counts.values()),
        "events_by_kind": {EventKind(k).name.lower(): n for k, n in sorted(event_counts.items())},
    }


def run_report(args: argparse.Namespace) -> int:
    r = summarise(args.file)
    if args.json:
        json.dump(r, sys.stdout, indent=2, default=str)
        print()
        return 0
    out = [f"recording {r['file']}: {r['ticks']} ticks over {r['seconds']} s, "
           f"kernel {r['kernel']} on {r['host']}, started {r['started']}"
           + (" (truncated)" if r["truncated"] else "")]
    for stage, figures in r["stages"].items():
        out.append(f"\n{stage}")
        for k, v in figures.items():
            est = " (estimated per process)" if k == "cow_ksm" and r["cow_estimated"] else ""
            out.append(f"  {k:28}{v:>12}{est}")
    for name, slots in r["histograms"].items():
        out.append(f"\n{name} (log2 buckets, ns lower bound: count)")
        width = max(slots.values())
        for lo, n in slots.items():
            out.append(f"  {int(lo):>14} {n:>9} {'#' * max(1, 40 * n // width)}")
    if r["merge_failures_by_errno"]:
        out.append("\nmerge failures by kind:errno")
        out += [f"  {k:28}{v:>12}" for k, v in r["merge_failures_by_errno"].items()]
    out.append(f"\n{'pid':>8} {'comm':16} {'merges':>8} {'merging':>8} {'cow':>8} {'profit':>12}")
    for p in r["processes"]:
        est = "~" if p["cow_estimated"] else ""
        out.append(f"{p['pid']:>8} {p['comm'][:16]:16} {p['merges']:>8} "
                   f"{p['merging_pages'] if p['merging_pages'] is not None else '-':>8} "
                   f"{est}{p['cow_breaks']:>7} {p['profit_bytes'] or 0:>12}")
    if r["cow_estimated"]:
        out.append("  ~ estimated: the exact cow_ksm delta split by write-protect faults")
    out.append("\nprobes")
    for p in r["probes"]:
        how = f"{p['method']} {'+'.join(p['targets'])}" if p["attached"] else \
            f"MISSED ({p['error']})"
        out.append(f"  {p['stage']}/{p['probe']}: {how}")
    out.append(f"\nevents recorded {r['events_recorded']}, lost {r['lost_events']}")
    print("\n".join(out))
    return 0


# ---------------------------------------------------------------- timeline
def timeline(path: str) -> dict[str, Any]:
    src = ReplaySource(path)
    trace: list[dict[str, Any]] = []
    t0: int | None = None
    starts: dict[int, int] = {}
    names: dict[int, str] = {0: "ksmd (scan rounds)"}
    for tick in src.ticks():
        if tick.bpf:
            for pid, comm in tick.bpf.comms.items():
                names.setdefault(pid, f"{comm} ({pid})")
        for p in tick.counters.processes:
            names.setdefault(p.pid, f"{p.comm} ({p.pid})")
        owners = tick.bpf.owners if tick.bpf else {}
        for e in iter_events(tick.events):
            t0 = e.ts_ns if t0 is None else t0
            us = (e.ts_ns - t0) / 1000
            k = EventKind(e.kind)
            if k == EventKind.SCAN_START:
                starts[e.scan_seq] = e.ts_ns
            elif k == EventKind.SCAN_STOP:
                begin = starts.pop(e.scan_seq, None)
                if begin is None and e.value:
                    begin = e.ts_ns - e.value
                if begin is not None:
                    trace.append({"name": f"scan round {e.scan_seq}", "ph": "X", "pid": 0,
                                  "tid": 0, "ts": (begin - t0) / 1000,
                                  "dur": max((e.ts_ns - begin) / 1000, 0.001),
                                  "args": {"rmap_entries": e.rmap_entries}})
            elif k in (EventKind.MERGE, EventKind.COW, EventKind.WP_FAULT):
                pid = e.pid or owners.get(e.mm, 0)
                if k == EventKind.MERGE:
                    name = f"merge {MergeKind(e.sub).name.lower()}" + (
                        "" if e.err == 0 else f" err {e.err}")
                elif k == EventKind.COW:
                    name = f"cow {CowKind(e.sub).name.lower()}"
                else:
                    name = "write-protect fault"
                trace.append({"name": name, "ph": "i", "s": "t", "pid": pid, "tid": pid,
                              "ts": us, "args": {"pfn": e.pfn, "mm": hex(e.mm), "err": e.err}})
    for pid, name in names.items():
        trace.append({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
                      "args": {"name": name}})
    return {"traceEvents": trace, "displayTimeUnit": "ms",
            "otherData": {"recording": os.path.basename(path),
                          "kernel": src.recording.header.get("kernel")}}


def run_timeline(args: argparse.Namespace) -> int:
    t = timeline(args.file)
    with open(args.output, "w") as f:
        json.dump(t, f)
    n = len(t["traceEvents"])
    print(f"ksmtrace timeline: wrote {args.output} ({n} trace events); open it in "
          "ui.perfetto.dev or chrome://tracing", file=sys.stderr)
    return 0


