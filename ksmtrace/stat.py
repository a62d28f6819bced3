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

from ksmtrace.collector import Collector
from ksmtrace.errors import NoProcess, not_root
from ksmtrace.kernel import sysfs
from ksmtrace.model import Snapshot
from ksmtrace.sources import counters

EPILOG = """\
examples:
  ksmtrace stat                     KSM counters every second until Ctrl-C
  ksmtrace stat 5 12                every 5 s, 12 lines
  ksmtrace stat -p 1234 -j          JSON lines, with pid 1234's ksm_stat
  sudo ksmtrace stat --demo 1 15    start a demo workload (4 processes merging,
                                    then copy-on-write storms) and watch it

columns: scan/s skip/s = pages scanned/skipped by ksmd per second (sysfs);
rounds = full scans; shared/sharing/unshared/volatile = sysfs pages_*;
zero = ksm_zero_pages; merge/s = change of pages_shared+pages_sharing per s;
cow/s = copy-on-write breaks of KSM pages per s (/proc/vmstat cow_ksm);
saved = pages_sharing + ksm_zero_pages, in bytes.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stat",
        help="one line of KSM figures per interval (vmstat-like)",
        description="Print KSM's figures once per interval: scanning, merging, sharing, "
        "copy-on-write breaks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("interval", nargs="?", type=float, default=1.0, help="seconds (default 1)")
    p.add_argument(
        "count", nargs="?", type=int, default=0, help="lines to print (default: until Ctrl-C)"
    )
    p.add_argument(
        "-p", "--pid", type=int, action="append", help="also show this process (repeatable)"
    )
    p.add_argument("-j", "--json", action="store_true", help="one JSON object per interval")
    p.add_argument(
        "--sysfs-only", action="store_true", help="counters only, no BPF (works without root)"
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="run the demo workload while printing (root; restores every knob)",
    )
    p.set_defaults(func=run)


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


HEADER = (
    f"{'time':>8} {'run':>3} {'scan/s':>9} {'skip/s':>8} {'rounds':>6} {'shared':>8} "
    f"{'sharing':>8} {'unshared':>8} {'volatile':>8} {'zero':>7} {'merge/s':>8} "
    f"{'cow/s':>7} {'saved':>8}"
)


def format_line(s: Snapshot) -> str:
    k, r = s.ksm, s.rates

    def rate(name: str) -> str:
        return f"{r[name]:.0f}" if name in r else "-"

    line = (
        f"{time.strftime('%H:%M:%S', time.localtime(s.wall)):>8} {k.run!s:>3} "
        f"{rate('pages_scanned'):>9} {rate('pages_skipped'):>8} {k.full_scans!s:>6} "
        f"{k.pages_shared!s:>8} {k.pages_sharing!s:>8} {k.pages_unshared!s:>8} "
        f"{k.pages_volatile!s:>8} {k.ksm_zero_pages if k.ksm_zero_pages is not None else '-'!s:>7} "
        f"{rate('merged_pages'):>8} {rate('cow_ksm'):>7} {human(s.saved_bytes):>8}"
    )
    for p in s.processes:
        st = p.stat
        line += (
            f"\n{'':8} pid {p.pid} {p.comm}: merging={st.ksm_merging_pages} "
            f"rmap_items={st.ksm_rmap_items} zero={st.ksm_zero_pages} "
            f"profit={human(st.ksm_process_profit or 0)}"
        )
    return line


@contextlib.contextmanager
def _demo() -> Iterator[list[int]]:
    from ksmtrace import workload

    if os.geteuid() != 0:
        raise not_root("--demo (it drives ksmd's knobs)")
    with workload.demo() as pids:
        yield pids


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise SystemExit("ksmtrace stat: interval must be > 0")
    for pid in args.pid or []:
        if not os.path.exists(f"/proc/{pid}"):
            raise NoProcess(f"no process {pid}", "check the pid with `ps` or `pgrep`")
    sysfs.read_sysfs()  # fails early and clearly on a kernel without KSM
    collector = Collector("sysfs-only")
    demo = _demo() if args.demo else contextlib.nullcontext([])
    with demo as demo_pids:
        pids = (args.pid or []) + list(demo_pids)
        collector.add_sample(counters.sample(pids=pids or None, all_processes=False))
        printed = 0
        if not args.json:
            print(HEADER, flush=True)
        next_t = time.monotonic()
        while not args.count or printed < args.count:
            next_t += args.interval
            time.sleep(max(0.0, next_t - time.monotonic()))
            snap = collector.add_sample(counters.sample(pids=pids or None, all_processes=False))
            if args.json:
                print(json.dumps(snap.as_dict(), default=str), flush=True)
            else:
                if printed and printed % 20 == 0:
                    print(HEADER)
                print(format_line(snap), flush=True)
            printed += 1
    return 0
