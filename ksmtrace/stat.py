"""`ksmtrace stat [interval [count]]`: one vmstat-like line per interval.

Reads snapshots from the collector; with `--demo` it also runs the workload
generator (and restores every KSM knob and ends every process on exit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator

from ksmtrace import argtypes, session
from ksmtrace.collector import observe
from ksmtrace.errors import not_root
from ksmtrace.grouping import GROUPS, group_rows, workload_of
from ksmtrace.model import Snapshot

EPILOG = """\
examples:
  sudo ksmtrace stat                traced KSM figures every second until Ctrl-C
  sudo ksmtrace stat 5 12           every 5 s, 12 lines
  ksmtrace stat --sysfs-only        the kernel's counters only, no root needed
  sudo ksmtrace stat -p 1234 -j     JSON lines, with pid 1234's figures
  sudo ksmtrace stat --by workload  a line per VM, container or service
  sudo ksmtrace stat --demo 1 15    start a demo workload (4 processes merging,
                                    then copy-on-write storms) and watch it

columns (kernel counters, exact):
  run       ksmd state: 0 stopped, 1 merging, 2 unmerging
  scan/s    pages ksmd scanned per second (sysfs pages_scanned)
  skip/s    pages smart scan skipped per second (sysfs pages_skipped)
  rounds/s  full scans completed per second (sysfs full_scans)
  shared sharing unshared volatile   sysfs pages_*
  zero      pages merged with the zero page (ksm_zero_pages)
  cow/s     copy-on-write breaks of KSM pages per second (/proc/vmstat cow_ksm)
  saved     pages_sharing + ksm_zero_pages, in bytes
columns (traced with BPF; '-' in --sysfs-only mode):
  merge/s   successful merges traced per second, all kinds
  fail/s    failed merge attempts per second
  rm/s      stable-node (KSM page) removals per second
  lost      events lost since start (always 0 unless the event stream overflowed)
"""


DESCRIPTION = (
    "Print KSM's figures once per interval: scanning, merging, sharing, "
    "copy-on-write breaks. Kernel counters are exact; traced figures come from BPF.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = argtypes.subcommand(sub, "stat", "one line of KSM figures per interval (vmstat-like)",
                            DESCRIPTION, EPILOG)
    p.add_argument("interval", nargs="?", type=argtypes.seconds, default=1.0,
                   help="seconds (default 1)")
    p.add_argument("count", nargs="?", type=argtypes.count, default=0,
                   help="lines to print (default: until Ctrl-C)")
    p.add_argument("-j", "--json", action="store_true", help="one JSON object per interval")
    p.add_argument("--by", choices=GROUPS, default="process",
                   help="a line per process (default), per workload (VM, container, "
                   "service) or per kind of workload under each interval")
    p.add_argument("--demo", action="store_true",
                   help="run the demo workload while printing (root; restores every knob)")
    session.add_source_options(p)
    p.set_defaults(func=run)


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


HEADER = (f"{'time':>8} {'run':>3} {'scan/s':>9} {'skip/s':>7} {'rounds/s':>8} {'shared':>7} "
          f"{'sharing':>8} "
          f"{'unshared':>8} {'volatile':>8} {'zero':>6} {'merge/s':>8} {'fail/s':>6} "
          f"{'cow/s':>7} {'rm/s':>6} {'saved':>8} {'lost':>5}")


def _opt(v: object) -> str:
    return "-" if v is None else str(v)


def format_line(s: Snapshot, by: str = "process") -> str:
    k, r = s.ksm, s.rates

    def rate(name: str) -> str:
        return f"{r[name]:.0f}" if name in r else "-"

    line = (f"{time.strftime('%H:%M:%S', time.localtime(s.wall)):>8} {_opt(k.run):>3} "
            f"{rate('pages_scanned'):>9} {rate('pages_skipped'):>7} {rate('full_scans'):>8} "
            f"{_opt(k.pages_shared):>7} "
            f"{_opt(k.pages_sharing):>8} {_opt(k.pages_unshared):>8} "
            f"{_opt(k.pages_volatile):>8} {_opt(k.ksm_zero_pages):>6} "
            f"{rate('merges'):>8} {rate('merge_failures'):>6} {rate('cow_ksm'):>7} "
            f"{rate('ksm_pages_removed'):>6} {human(s.saved_bytes):>8} "
            f"{s.lost_events if s.traced else '-':>5}")
    for p in group_rows(s.processes, by):
        est = " (estimated)" if p.cow_estimated else ""
        who = f"pid {p.pid} {p.comm}" if by == "process" else \
            f"{workload_of(p).label} ({p.comm})"
        line += (f"\n{'':9}{who}: merging={_opt(p.merging_pages)} "
                 f"merges={p.merges} cow={p.cow_breaks}{est} "
                 f"profit={human(p.profit_bytes or 0)}")
    return line


@contextlib.contextmanager
def demo() -> Iterator[list[int]]:
    from ksmtrace.demo import demo as run_demo

    if os.geteuid() != 0:
        raise not_root("--demo (it drives ksmd's knobs)")
    with run_demo() as pids:
        yield pids


def header_lines(src, snap: Snapshot) -> list[str]:
    lines = [f"# source: {src.kind}"]
    lines += [f"# {line}" for line in session.describe_probes(snap.probes)]
    if snap.cow_estimated:
        lines.append("# cow per process is ESTIMATED: the exact global cow_ksm delta split "
                     "by write-protect faults (no kprobe/fentry on do_wp_page here)")
    lines += [f"# {n}" for n in snap.notes]
    return lines


def run(args: argparse.Namespace) -> int:
    src = session.open_source(args)
    with observe(src) as obs:  # attach first, so the demo's first merges are traced too
        session.enforce_strict(args, src.probes)
        demo_ctx = demo() if args.demo else contextlib.nullcontext([])
        with demo_ctx as demo_pids:
            if demo_pids and args.pid is None:
                src.pids = list(demo_pids)
            printed = 0
            for snap in obs.snapshots(args.interval, args.count):
                if snap.seq == 1:
                    if not args.json:
                        print("\n".join(header_lines(src, snap)), flush=True)
                        print(HEADER, flush=True)
                    continue
                if args.json:
                    d = snap.as_dict()
                    d.pop("events", None)
                    print(json.dumps(d, default=str), flush=True)
                else:
                    if printed and printed % 20 == 0:
                        print(HEADER)
                    print(format_line(snap, args.by), flush=True)
                printed += 1
    return 0
