"""`ksmtrace trace`: one line per KSM event, as it happens."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ksmtrace import argtypes, session
from ksmtrace.collector import ALL_EVENTS, observe
from ksmtrace.kernel.capabilities import STAGES
from ksmtrace.model import EventKind

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


DESCRIPTION = "Trace KSM's events as they happen, one line each."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = argtypes.subcommand(
        sub, "trace", "one line per KSM event (scans, merges, COW breaks, removals)",
        DESCRIPTION, EPILOG)
    p.add_argument("--stage", choices=STAGES, action="append",
                   help="only events of this stage (repeatable)")
    p.add_argument("-j", "--json", action="store_true", help="one JSON object per event")
    p.add_argument("--duration", type=argtypes.duration, default=0, help="stop after S seconds")
    session.add_source_options(p, stream_default=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = session.open_source(args, need_bpf=True)
    stages = set(args.stage or STAGES)
    wanted = set(args.pid or [])
    with observe(src, ALL_EVENTS) as obs:
        session.enforce_strict(args, src.probes)
        if not args.json:
            for line in session.describe_probes(src.probes):
                print(f"# {line}", file=sys.stderr)
            print(f"{'TIME(s)':>12} {'STAGE':10} {'EVENT':16} {'PID':>7} {'COMM':16} DETAIL",
                  flush=True)
        t0 = None
        lost = 0
        count = int(args.duration / 0.2) if args.duration else 0
        for snap in obs.snapshots(0.2, count):
            for e in snap.events:
                if e.stage not in stages or (wanted and e.pid not in wanted):
                    continue
                t0 = t0 if t0 is not None else e.ts_ns
                # the owner's comm; ksmd's own events (no owner) keep the thread's
                comm = snap.comm_of(e.pid) if e.pid else e.comm
                if args.json:
                    d = asdict(e)
                    d.update(stage=e.stage, event=e.name, owner_pid=e.pid, owner_comm=comm)
                    if e.kind in (EventKind.SCAN_START, EventKind.SCAN_STOP):
                        d.update(seq=e.scan_seq, rmap_entries=e.rmap_entries)
                    print(json.dumps(d), flush=False)
                else:
                    print(f"{(e.ts_ns - t0) / 1e9:12.6f} {e.stage:10} {e.name:16} {e.pid:>7} "
                          f"{comm[:16]:16} {e.describe()}")
            sys.stdout.flush()
            if snap.lost_events > lost:
                print(f"# LOST {snap.lost_events - lost} events (stream overflow)",
                      file=sys.stderr)
                lost = snap.lost_events
    return 0
