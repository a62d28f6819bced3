"""`ksmtrace trace`: one line per KSM event, as it happens."""

from __future__ import annotations

import argparse
import errno as errno_mod
import json
import sys
from dataclasses import asdict

from ksmtrace import argtypes, session
from ksmtrace.kernel import procfs
from ksmtrace.kernel.capabilities import STAGES
from ksmtrace.model import CowKind, Event, EventKind, MergeKind, iter_events

EPILOG = """\
examples:
  sudo ksmtrace trace                       every KSM event until Ctrl-C
  sudo ksmtrace trace --stage merging -p 1234
  sudo ksmtrace trace -j | jq 'select(.err != 0)'   failed merges as JSON

columns: TIME (s since start), STAGE, EVENT, PID and COMM of the process
whose page it is (merges happen in ksmd, on another process's page), then
what the event says: merge kind and result, pfn, scan round seq and rmap
entries and duration, copy-on-write kind and latency.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace",
        help="one line per KSM event (scans, merges, COW breaks, removals)",
        description="Trace KSM's events as they happen, one line each.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage", choices=STAGES, action="append",
                   help="only events of this stage (repeatable)")
    p.add_argument("-j", "--json", action="store_true", help="one JSON object per event")
    p.add_argument("--duration", type=argtypes.duration, default=0, help="stop after S seconds")
    session.add_source_options(p, stream_default=True)
    p.set_defaults(func=run)


def _err(e: int) -> str:
    if e == 0:
        return "ok"
    return errno_mod.errorcode.get(-e, str(e))


def describe(e: Event) -> tuple[str, str]:
    k = EventKind(e.kind)
    if k == EventKind.MERGE:
        kind = ("new KSM page", "into KSM page", "zero page")[MergeKind(e.sub)]
        lat = f" {e.value / 1000:.1f}us" if e.value else ""
        return "merge", f"{kind} pfn={e.pfn:#x} {_err(e.err)}{lat}"
    if k in (EventKind.SCAN_START, EventKind.SCAN_STOP):
        dur = f" took {e.value / 1e6:.3f}ms" if k == EventKind.SCAN_STOP and e.value else ""
        return k.name.lower(), f"seq={e.scan_seq} rmap_entries={e.rmap_entries}{dur}"
    if k == EventKind.COW:
        what = "write" if e.sub == CowKind.WRITE else "unshare"
        return "cow_break", f"{what} pfn={e.pfn:#x} {e.value / 1000:.1f}us"
    if k == EventKind.REMOVE_KSM_PAGE:
        return "remove_ksm_page", f"pfn={e.pfn:#x}"
    if k == EventKind.REMOVE_RMAP_ITEM:
        return "remove_rmap_item", f"pfn={e.pfn:#x}"
    if k == EventKind.UNSHARE:
        return "unshare", f"break_ksm {_err(e.err)} {e.value / 1000:.1f}us"
    if k == EventKind.WP_FAULT:
        return "wp_fault", f"write-protect fault at {e.aux:#x} (COW estimate basis)"
    if k == EventKind.ADVISOR:
        return "advisor", f"scan_time={e.value} pages_to_scan={e.aux} cpu={e.sub}%"
    return k.name.lower(), f"mm={e.mm:#x}"


def run(args: argparse.Namespace) -> int:
    src = session.open_source(args, need_bpf=True)
    comms: dict[int, str] = {}
    stages = set(args.stage or STAGES)
    wanted = set(args.pid or [])
    with src:
        session.enforce_strict(args, src.probes)
        if not args.json:
            for line in session.describe_probes(src.probes):
                print(f"# {line}", file=sys.stderr)
            print(f"{'TIME(s)':>12} {'STAGE':10} {'EVENT':16} {'PID':>7} {'COMM':16} DETAIL",
                  flush=True)
        t0 = None
        lost = 0
        count = int(args.duration / 0.2) if args.duration else 0
        for tick in src.ticks(0.2, count):
            owners = tick.bpf.owners if tick.bpf else {}
            if tick.bpf:
                comms.update(tick.bpf.comms)
            for e in iter_events(tick.events):
                if e.kind == EventKind.KSM_ENTER and e.pid:
                    comms.setdefault(e.pid, e.comm)
                if e.stage not in stages:
                    continue
                pid = e.pid or owners.get(e.mm, 0)
                if wanted and pid not in wanted:
                    continue
                t0 = t0 if t0 is not None else e.ts_ns
                if pid and pid not in comms:
                    comms[pid] = procfs.read_comm(pid) or "?"
                comm = comms.get(pid, "?") if pid else e.comm
                name, detail = describe(e)
                if args.json:
                    d = asdict(e)
                    d.update(stage=e.stage, event=name, owner_pid=pid, owner_comm=comm)
                    if e.kind in (EventKind.SCAN_START, EventKind.SCAN_STOP):
                        d.update(seq=e.scan_seq, rmap_entries=e.rmap_entries)
                    print(json.dumps(d), flush=False)
                else:
                    print(f"{(e.ts_ns - t0) / 1e9:12.6f} {e.stage:10} {name:16} {pid:>7} "
                          f"{comm[:16]:16} {detail}")
            sys.stdout.flush()
            if tick.bpf:
                now = tick.bpf.counters.get("events_lost", 0) + tick.bpf.perf_lost
                if now > lost:
                    print(f"# LOST {now - lost} events (stream overflow)", file=sys.stderr)
                    lost = now
    return 0
