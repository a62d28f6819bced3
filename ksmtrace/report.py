"""`ksmtrace record`, `report` and `timeline`: write a recording, summarise
one stage by stage, and turn one into a Chrome/Perfetto trace.

`report` replays the recording through the same Collector `stat` uses and
reports its final snapshot, so a report's totals are the live run's totals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from ksmtrace import argtypes, session
from ksmtrace.collector import ALL_EVENTS, observe
from ksmtrace.errors import BadRecording, KsmtraceError
from ksmtrace.figures import (
    MERGE_KIND_TEXT,
    MERGE_KINDS,
    cow_kind,
    errno_name,
    merge_kind,
    split_error_key,
)
from ksmtrace.grouping import GROUPS, group_rows, workload_of
from ksmtrace.kernel.identity import Workload
from ksmtrace.model import (
    EVENT_NAMES,
    EVENT_OFFSETS,
    EVENT_SIZE,
    EventKind,
    ProbeStatus,
    Snapshot,
)
from ksmtrace.outfile import open_output
from ksmtrace.record import Recorder, probe_to_json
from ksmtrace.signals import Terminated
from ksmtrace.sources.replay import ReplaySource

EPILOG = """\
examples:
  sudo ksmtrace record -o ksm.rec                 a tick per second until Ctrl-C
  sudo ksmtrace record -o ksm.rec --duration 60 0.5
  ksmtrace report ksm.rec                         what happened, stage by stage
  ksmtrace report ksm.rec --json | jq .merging
  ksmtrace report ksm.rec --by workload           the counting table per VM, container
  ksmtrace timeline ksm.rec -o trace.json         open in ui.perfetto.dev or chrome://tracing
"""

PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


RECORD_DESCRIPTION = (
    "Record every tick (counter poll, in-kernel aggregates, raw events)\n"
    "to FILE, flushed tick by tick, until Ctrl-C, SIGTERM or --duration.\n"
    "`report`, `timeline` and replay read it.")

REPORT_DESCRIPTION = (
    "Replay a recording through the collector and report, per stage,\n"
    "its totals and histograms, the per-process table, the probe plan (with\n"
    "missed probes) and lost events.")

TIMELINE_DESCRIPTION = (
    "Write Chrome/Perfetto trace-event JSON: scan rounds become slices\n"
    "on a ksmd track, merges and copy-on-write breaks instants on their\n"
    "process's track, KSM page counts a counter track.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = argtypes.subcommand(sub, "record", "record KSM's events and counters to a file",
                            RECORD_DESCRIPTION, EPILOG)
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="recording to write (replaced if it exists)")
    p.add_argument("--duration", type=argtypes.duration, default=0.0, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C or SIGTERM)")
    p.add_argument("interval", nargs="?", type=argtypes.seconds, default=1.0,
                   help="seconds per tick (default 1)")
    session.add_source_options(p, stream_default=True)
    p.set_defaults(func=run_record)

    p = argtypes.subcommand(sub, "report", "summarise a recording, stage by stage",
                            REPORT_DESCRIPTION, EPILOG)
    p.add_argument("file", help="a recording made by `ksmtrace record`")
    p.add_argument("-j", "--json", action="store_true", help="one JSON object")
    p.add_argument("--by", choices=GROUPS, default="process",
                   help="the counting table per process (default), per workload (VM, "
                   "container, service) or per kind of workload")
    p.set_defaults(func=run_report)

    p = argtypes.subcommand(sub, "timeline", "a recording as Chrome/Perfetto trace-event JSON",
                            TIMELINE_DESCRIPTION, EPILOG)
    p.add_argument("file", help="a recording made by `ksmtrace record`")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="trace JSON to write")
    p.set_defaults(func=run_timeline)


# ------------------------------------------------------------------ record

def _progress(tty: bool, rec: Recorder, end: str) -> None:
    line = (f"ksmtrace record: {rec.ticks} ticks, {rec.events} events, "
            f"{rec.bytes / 1e6:.2f} MB")
    print(("\r" + line) if tty else line, end=end, file=sys.stderr, flush=True)


def recording_header(src: Any, interval: float) -> dict[str, Any]:
    """What a recording says about where it comes from (an entered source:
    its probe statuses are the attached ones)."""
    facts, plan = getattr(src, "facts", None), getattr(src, "plan", None)
    return {
        "kernel": platform.release(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "started_unix": time.time(),
        "interval": interval,
        "source": src.kind,
        "pids": getattr(src, "pids", None),  # -p: the only processes sampled
        "probes": [probe_to_json(p) for p in src.probes],
        "cow_estimated": src.cow_estimated,
        "notes": list(src.notes),
        "facts": facts.as_dict() if facts is not None else None,
        "plan": plan.as_dict() if plan is not None else None,
    }


def run_record(args: argparse.Namespace) -> int:
    src = session.open_source(args, need_bpf=True)
    with src:
        session.enforce_strict(args, src.probes)
        header = recording_header(src, args.interval)
        # the first tick is taken at once, then one per interval: count more
        count = round(args.duration / args.interval) if args.duration else 0
        tty = sys.stderr.isatty()
        stopped = "duration reached" if count else "stopped"
        try:
            rec = Recorder(args.output, header)
        except OSError as e:
            raise KsmtraceError(f"cannot write the recording {args.output}: {e.strerror}",
                                "check the path and its directory's permissions") from e
        with rec:
            last_line = time.monotonic()
            try:
                for tick in src.ticks(args.interval, count):
                    rec.write(tick)
                    now = time.monotonic()
                    if tty:
                        _progress(True, rec, "")
                    elif now - last_line >= PROGRESS_EVERY:
                        _progress(False, rec, "\n")
                        last_line = now
            except KeyboardInterrupt:
                stopped = "stopped by Ctrl-C"
            except Terminated as e:
                stopped = f"stopped by {signal.Signals(e.signum).name}"
            rec.close()  # END, with signals held: a second Ctrl-C cannot cut it
            if tty:
                print(file=sys.stderr)
            print(f"ksmtrace record: {stopped}: wrote {args.output}: {rec.ticks} ticks, "
                  f"{rec.events} events, {rec.bytes} bytes", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ report
@dataclass
class Replayed:
    """A recording run through the collector: its source (closed), the first
    and last snapshots, the tick count, and the events counted by kind (from
    the raw blobs, without decoding them)."""

    source: ReplaySource
    first: Snapshot
    last: Snapshot
    ticks: int
    events_by_kind: dict[str, int]


def count_kinds(blob: bytes, counts: dict[int, int]) -> None:
    """Add the events in `blob` to `counts` by kind, reading only the kind
    field's low byte (little-endian; every kind fits in it)."""
    kinds = blob[EVENT_OFFSETS["kind"]::EVENT_SIZE]
    for k in set(kinds):
        counts[k] = counts.get(k, 0) + kinds.count(k)


def replay(path: str) -> Replayed:
    first = last = None
    n = 0
    kinds: dict[int, int] = {}
    # a cut-off end is warned about after reading: one inside the first tick is an error
    src = ReplaySource(path, warn=None)
    with observe(src) as obs:
        for tick in src.ticks():
            last = obs.collector.add_tick(tick)  # snapshots are totals since start: keep two
            first = first or last
            n += 1
            count_kinds(tick.events, kinds)
    rec = src.recording
    if first is None or last is None:
        cut = "" if rec.cut_at is None else f" (it ends inside one at byte offset {rec.cut_at})"
        raise BadRecording(f"{path} holds no complete tick{cut}: record for at least one "
                           "interval")
    if (warning := rec.cut_warning()) is not None:
        print(warning, file=sys.stderr)
    by_kind = {EVENT_NAMES.get(k, str(k)): c for k, c in sorted(kinds.items())}
    return Replayed(src, first, last, n, by_kind)


def _hist(slots: dict[int, int]) -> list[dict[str, int]]:
    """log2 slot s counts durations in [2**s, 2**(s+1)) ns."""
    return [{"slot": s, "low_ns": 2 ** s, "high_ns": 2 ** (s + 1), "count": n}
            for s, n in sorted(slots.items()) if n]


def _errno_label(key: str) -> str:
    """'into_ksm_page:-16' -> 'into_ksm_page: -16 EBUSY'."""
    kind, err = split_error_key(key)
    return key if err is None else f"{kind}: {err} {errno_name(err)}"


def _workload_json(w: Workload) -> dict[str, Any]:
    return {"kind": w.kind, "name": w.name, "id": w.id, "detail": dict(w.detail)}


def summarise(path: str, by: str = "process") -> dict[str, Any]:
    """The report as one JSON-able dict (what `report --json` prints)."""
    r = replay(path)
    first, last = r.first, r.last
    h = r.source.header
    rec = r.source.recording
    t = last.totals
    est = last.cow_estimated

    def fig(name: str) -> int | None:
        """A total, or None where it was not observed."""
        return t.get(name) if last.observed(name) else None

    processes = [{
        "pid": p.pid, "comm": p.comm, "cgroup": p.cgroup, "merges": p.merges,
        "merging_pages": p.merging_pages, "zero_pages": p.zero_pages,
        "rmap_items": p.rmap_items, "profit_bytes": p.profit_bytes,
        "cow_breaks": p.cow_breaks, "cow_estimated": p.cow_estimated,
        "workload": _workload_json(workload_of(p)),
    } for p in group_rows(last.processes, by, last_known=True)]
    return {
        "file": path,
        "format": rec.version,
        "recorded_by": h.get("ksmtrace"),
        "kernel": h.get("kernel"),
        "host": h.get("host"),
        "started": h.get("started"),
        "interval": h.get("interval"),
        "first_tick_unix": first.wall,
        "last_tick_unix": last.wall,
        "seconds": round(last.wall - first.wall, 3),
        "ticks": r.ticks,
        "closed": rec.end is not None,  # False: the recorder was killed
        "truncated": rec.truncated,  # True: a cut-off last record was dropped
        "searching": {
            "scan_rounds": fig("scan_rounds"),
            "full_scans": t.get("full_scans"),
            "pages_scanned": t.get("pages_scanned"),
            "pages_skipped": t.get("pages_skipped"),
            "scan_batches": fig("scan_batches"),
            "pages_compared": fig("pages_compared"),
            **({"advisor_runs": fig("advisor_runs")} if last.observed("advisor_runs") else {}),
            "round_duration": _hist(last.hist.get("scan_round_seconds", {})),
            "batch_duration": _hist(last.hist.get("scan_batch_seconds", {})),
        },
        "merging": {
            "merges": fig("merges"),
            "by_kind": {k: fig(f"merges_{k}") for k in MERGE_KINDS},
            "failures": fig("merge_failures"),
            "failures_by_kind": {k: fig(f"merge_failures_{k}") for k in MERGE_KINDS},
            "failures_by_errno": dict(sorted(last.errors.items())),
            "merged_pages": t.get("merged_pages"),  # Δ(pages_shared + pages_sharing)
            "ksm_zero_pages": t.get("ksm_zero_pages"),
            "latency": _hist(last.hist.get("merge_latency_seconds", {})),
        },
        "counting": {
            "by": by,
            "mm_enters": fig("mm_enters"),
            "mm_exits": fig("mm_exits"),
            "owners_resolved": fig("owners_resolved"),
            "processes": processes,
        },
        "updating": {
            # the kernel's exact count; per process it is split by
            # write-protect faults where `cow_estimated`
            "cow_ksm": t.get("cow_ksm"),
            "cow_estimated": est,
            "cow_breaks": fig("cow_breaks"),
            "cow_writes": fig("cow_writes"),
            "cow_unshares": fig("cow_unshares"),
            "wp_faults": fig("wp_faults"),
            "stable_nodes_removed": fig("ksm_pages_removed"),
            "rmap_items_removed": fig("rmap_items_removed"),
            "unshares": fig("unshares"),
            "cow_latency": _hist(last.hist.get("cow_latency_seconds", {})),
            "unshare_latency": _hist(last.hist.get("unshare_latency_seconds", {})),
        },
        "probes": [probe_to_json(p) for p in last.probes],
        "missed_probes": [p.probe for p in last.missed_probes],
        "notes": list(last.notes),
        "lost_events": last.lost_events,
        "events": {"recorded": sum(r.events_by_kind.values()),
                   "sent": t.get("events_sent"), "by_kind": r.events_by_kind},
        "totals": t,  # the collector's final totals, every name
    }


def _duration(ns: int) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g}{unit}"
    return f"{ns}ns"


def _num(v: int | None, note: str = "") -> str:
    if v is None:
        return f"{'-':>12}  not observed on this kernel"
    return f"{v:>12}" + (f"  {note}" if note else "")


def _hist_lines(title: str, slots: list[dict[str, int]]) -> list[str]:
    if not slots:
        return []
    out = [f"  {title} (log2 buckets)"]
    width = max(s["count"] for s in slots)
    for s in slots:
        span = f"{_duration(s['low_ns'])} .. {_duration(s['high_ns'])}"
        out.append(f"    {span:>20} {s['count']:>9} {'#' * max(1, 40 * s['count'] // width)}")
    return out


def format_report(r: dict[str, Any]) -> str:
    name = os.path.basename(r["file"])
    state = ("closed in order" if r["closed"] else "not closed by its recorder (killed?)")
    if r["truncated"]:
        state += "; a cut-off last record was dropped"
    out = [f"recording {name}: {r['ticks']} ticks over {r['seconds']:g} s "
           f"(interval {r['interval']} s), {state}",
           f"  kernel {r['kernel']} on {r['host']}, started {r['started']}, "
           f"ksmtrace {r['recorded_by']}, format {r['format']}"]

    def row(label: str, v: int | None, note: str = "") -> None:
        out.append(f"  {label:37}{_num(v, note)}")

    s = r["searching"]
    out.append("\nsearching")
    row("scan rounds (traced)", s["scan_rounds"])
    row("full scans (sysfs)", s["full_scans"])
    row("pages scanned (sysfs)", s["pages_scanned"])
    row("pages skipped (sysfs)", s["pages_skipped"])
    row("scan batches (traced)", s["scan_batches"])
    row("pages compared (traced)", s["pages_compared"])
    if "advisor_runs" in s:
        row("advisor runs (traced)", s["advisor_runs"])
    out += _hist_lines("scan round duration", s["round_duration"])
    out += _hist_lines("scan batch duration", s["batch_duration"])

    m = r["merging"]
    out.append("\nmerging")
    row("merges (traced)", m["merges"])
    for text, v in zip(MERGE_KIND_TEXT, m["by_kind"].values(), strict=True):
        row(f"  {text}", v)
    row("failed merge attempts (traced)", m["failures"])
    for k, v in m["failures_by_errno"].items():
        row(f"  {_errno_label(k)}", v)
    row("merged pages (sysfs shared+sharing)", m["merged_pages"], "change over the recording")
    row("zero-page merges (sysfs)", m["ksm_zero_pages"], "change over the recording")
    out += _hist_lines("merge latency", m["latency"])

    c = r["counting"]
    u = r["updating"]
    out.append("\ncounting")
    row("mms entering KSM (traced)", c["mm_enters"])
    row("mms leaving KSM (traced)", c["mm_exits"])
    est = u["cow_estimated"]
    out.append(f"  {'pid':>8} {'comm':16} {'merges':>8} {'merging':>8} {'zero':>6} "
               f"{'cow':>8} {'profit':>12}  workload")
    for p in c["processes"]:
        dash = "-"
        cow = f"{'~' if p['cow_estimated'] else ''}{p['cow_breaks']}"
        w = p["workload"]
        label = Workload(w["kind"], w["name"]).label
        out.append(f"  {p['pid']:>8} {p['comm'][:16]:16} {p['merges']:>8} "
                   f"{p['merging_pages'] if p['merging_pages'] is not None else dash:>8} "
                   f"{p['zero_pages'] if p['zero_pages'] is not None else dash:>6} "
                   f"{cow:>8} "
                   f"{p['profit_bytes'] if p['profit_bytes'] is not None else dash:>12}  {label}")
    if not c["processes"]:
        out.append("  (no process used KSM)")
    out.append("  merging, zero, profit: the process's last ksm_stat (bytes for profit)")
    if est:
        out.append("  ~ estimated: the exact cow_ksm count split by each process's "
                   "write-protect faults (no kprobe/fentry on do_wp_page on this kernel)")

    out.append("\nupdating")
    row("cow breaks (/proc/vmstat cow_ksm)", u["cow_ksm"], "exact, all processes")
    if est:
        row("write-protect faults (traced)", u["wp_faults"], "basis of the per-process estimate")
    else:
        row("cow breaks (traced)", u["cow_breaks"])
        row("  by a write", u["cow_writes"])
        row("  by an unshare", u["cow_unshares"])
    row("stable nodes removed (traced)", u["stable_nodes_removed"])
    row("rmap items removed (traced)", u["rmap_items_removed"])
    row("unshares (traced)", u["unshares"])
    out += _hist_lines("cow latency", u["cow_latency"])
    out += _hist_lines("unshare latency", u["unshare_latency"])

    out.append("\nprobes")
    out += [f"  {line}" for line in session.describe_probes(
        tuple(ProbeStatus(p["probe"], p["stage"], p["method"], tuple(p["targets"]),
                          p["attached"], p["estimated"], p["error"]) for p in r["probes"]))]
    if r["missed_probes"]:
        out.append(f"  missed: {', '.join(r['missed_probes'])}")
    out += [f"  note: {n}" for n in r["notes"]]

    ev = r["events"]
    kinds = ", ".join(f"{k} {n}" for k, n in ev["by_kind"].items())
    out.append(f"\nevents: {ev['recorded']} recorded ({kinds or 'none'}), "
               f"lost {r['lost_events']}")
    return "\n".join(out)


def run_report(args: argparse.Namespace) -> int:
    r = summarise(args.file, args.by)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(format_report(r))
    return 0


# ---------------------------------------------------------------- timeline
KSMD_SORT = -1  # ksmd's track first


def _timeline_events(src: ReplaySource) -> tuple[list[dict[str, Any]], dict[int, str], int | None]:
    """Trace events with "ts" in ns and pid None for ksmd's track; pid ->
    comm; ksmd's pid (from the scan events)."""
    raw: list[dict[str, Any]] = []
    starts: dict[int, int] = {}  # scan seq -> start ns
    names: dict[int, str] = {}
    ksmd = None
    for snap in observe(src, ALL_EVENTS).snapshots():
        for pid, comm in snap.comms.items():
            names.setdefault(pid, comm)
        k = snap.ksm
        pages = {"shared": k.pages_shared, "sharing": k.pages_sharing, "zero": k.ksm_zero_pages}
        raw.append({"name": "KSM pages", "ph": "C", "pid": None, "ts": snap.mono * 1e9,
                    "args": {n: v for n, v in pages.items() if v is not None}})
        for e in snap.events:
            kind = e.kind
            if kind == EventKind.SCAN_START:
                ksmd = ksmd or e.tid
                starts[e.scan_seq] = e.ts_ns
            elif kind == EventKind.SCAN_STOP:
                ksmd = ksmd or e.tid
                begin = starts.pop(e.scan_seq, None)
                if begin is None and e.value:  # started before the recording
                    begin = e.ts_ns - e.value
                if begin is not None:
                    raw.append({"name": f"scan round {e.scan_seq}", "cat": "searching",
                                "ph": "X", "pid": None, "ts": begin,
                                "dur_ns": e.ts_ns - begin,
                                "args": {"seq": e.scan_seq, "rmap_entries": e.rmap_entries}})
            elif kind in (EventKind.MERGE, EventKind.COW, EventKind.WP_FAULT,
                          EventKind.UNSHARE):
                if kind == EventKind.MERGE:
                    what = merge_kind(e.sub)
                    name = f"merge {what}" if e.err == 0 else \
                        f"merge {what} failed ({errno_name(e.err)})"
                    cat = "merging"
                elif kind == EventKind.COW:
                    what = cow_kind(e.sub)
                    name, cat = f"cow break ({what})", "updating"
                elif kind == EventKind.WP_FAULT:
                    # tracepoint-only kernels: the basis of the COW estimate
                    what = "wp_fault"
                    name, cat = "write-protect fault (cow estimate)", "updating,estimated"
                else:
                    what, name, cat = "unshare", "unshare", "updating"
                args = {"kind": what, "err": e.err, "pfn": hex(e.pfn), "mm": hex(e.mm)}
                if e.value:
                    args["latency_ns"] = e.value
                raw.append({"name": name, "cat": cat, "ph": "i", "s": "t", "pid": e.pid,
                            "tid": e.pid, "ts": e.ts_ns, "args": args})
                if e.pid and kind != EventKind.MERGE:  # merges run in ksmd: its comm
                    names.setdefault(e.pid, e.comm)
            elif kind == EventKind.KSM_ENTER and e.pid:  # the registering task
                names.setdefault(e.pid, e.comm)
    return raw, names, ksmd


def timeline(path: str) -> dict[str, Any]:
    """The trace-event JSON object (Chrome's format, which Perfetto reads).

    Timestamps are µs since the earliest thing recorded (the first tick or
    event): the event clock (bpf_ktime_get_ns) and the ticks' time.monotonic()
    are both CLOCK_MONOTONIC."""
    with ReplaySource(path) as src:
        raw, names, ksmd = _timeline_events(src)
    t0 = min((ev["ts"] for ev in raw), default=0)
    ksmd_pid = ksmd if ksmd is not None else -1  # -1: no scan events, a track of its own
    trace: list[dict[str, Any]] = []
    pids: set[int] = set()
    for ev in raw:
        ev["ts"] = round((ev["ts"] - t0) / 1000, 3)
        if ev["pid"] is None:  # ksmd's track: scan rounds and KSM page counters
            ev["pid"] = ev["tid"] = ksmd_pid
        if "dur_ns" in ev:
            ev["dur"] = max(round(ev.pop("dur_ns") / 1000, 3), 0.001)  # never a 0-length slice
        pids.add(ev["pid"])
        trace.append(ev)
    meta = []
    for pid in sorted(pids):
        if pid == ksmd_pid:
            pname, tname = "ksmd", "scan rounds"
        elif pid == 0:
            pname = tname = "(owner unknown)"
        else:
            pname = tname = f"{names.get(pid, '?')} {pid}"
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
                     "args": {"name": pname}})
        meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": pid,
                     "args": {"name": tname}})
        if pid == ksmd_pid:
            meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": pid,
                         "args": {"sort_index": KSMD_SORT}})
    h = src.header
    return {"traceEvents": meta + trace, "displayTimeUnit": "ms",
            "otherData": {"recording": os.path.basename(path), "kernel": h.get("kernel"),
                          "host": h.get("host"), "started": h.get("started"),
                          "cow_estimated": src.cow_estimated}}


def run_timeline(args: argparse.Namespace) -> int:
    t = timeline(args.file)  # a bad recording raises before anything is written
    try:
        with open_output(args.output, inputs=[args.file], text=True) as f:
            json.dump(t, f, separators=(",", ":"))
    except OSError as e:
        raise KsmtraceError(f"cannot write {args.output}: {e.strerror}",
                            "check the path and its directory's permissions") from e
    n = len(t["traceEvents"])
    print(f"ksmtrace timeline: wrote {args.output} ({n} trace events); open it in "
          "ui.perfetto.dev or chrome://tracing", file=sys.stderr)
    return 0
