"""`ksmtrace workload`: run the phases, print prediction against kernel."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ksmtrace import argtypes, signals
from ksmtrace.errors import Exit, KsmtraceError, not_root
from ksmtrace.signals import Terminated
from ksmtrace.workload.child import child_main
from ksmtrace.workload.model import (
    DEFAULT_TIMEOUT,
    MAX_PAGES_TO_SCAN,
    PAGE_STATES,
    Expectation,
    PageStateName,
    WorkloadError,
    WorkloadSpec,
)
from ksmtrace.workload.parent import Workload
from ksmtrace.workload.reads import Measurement, other_ksm_users, signed

# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

DESCRIPTION = """\
Run a KSM workload and show, phase by phase, what the kernel should show
(the prediction) next to what it shows (measured deltas of
/sys/kernel/mm/ksm, /proc/<pid>/ksm_stat and /proc/vmstat cow_ksm).

N child processes map M pages each, cycling through D distinct contents
(every content is in every process), optionally plus unique pages and zero
pages, and register them with madvise(MADV_MERGEABLE) or
prctl(PR_SET_MEMORY_MERGE). Phases: fill+register -> merge -> COW writes
-> unmerge -> hold -> exit. By default ksmd is driven fast
(pages_to_scan=100000, sleep_millisecs=0, run=1; paused during COW writes
and unmerge, which keeps cow_ksm exact) and every knob is put back on exit,
Ctrl-C and SIGTERM included. Needs root.

The global figures are deltas of system-wide counters: another KSM user
merging meanwhile (a VM: QEMU's default is mem-merge=on) makes them
differ. The per-process ksm_stat figures belong to the workload alone."""

EPILOG = """\
examples:
  ksmtrace workload                          2 x 1000 pages, 10 contents
  ksmtrace workload -n 4 -p 50000 -d 1000    200,000 pages to merge (benchmark size)
  ksmtrace workload -n 2 -p 600 -d 1         1200 copies of one content: a
                                             stable-node chain of 5 KSM pages
  ksmtrace workload -z 500 --use-zero-pages 1
                                             zero pages merged into the zero page
  ksmtrace workload --register prctl --cow-fraction 0.5 --cow-rate 2000 --unmerge
  ksmtrace workload --state protnone --state uffd_wp:0.5 --cow-fraction 0.3 --unmerge
                                             COW and unmerge of PROT_NONE and
                                             userfaultfd write-protected pages
  ksmtrace workload --hold                   keep the pages merged until Ctrl-C
  ksmtrace workload --loop                   merge, COW storm, re-merge... until Ctrl-C
  ksmtrace workload --json                   one JSON object per phase

exit status: 0 when every figure matched the prediction, 1 when one did not
(or ksmd did not reach it within --timeout), 130 on Ctrl-C."""


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add `workload` to a subparsers object; `run_cli` runs it."""
    p = argtypes.subcommand(
        subparsers, "workload",
        "run a KSM workload and compare the kernel's figures with the prediction",
        DESCRIPTION, EPILOG)
    shape = p.add_argument_group("shape")
    shape.add_argument("-n", "--processes", type=argtypes.positive, default=2, metavar="N",
                       help="child processes (default 2)")
    shape.add_argument("-p", "--pages", type=argtypes.count, default=1000, metavar="M",
                       help="duplicate pages per process (default 1000)")
    shape.add_argument("-d", "--distinct", type=argtypes.positive, default=10, metavar="D",
                       help="distinct contents among them, page i has content i%%D (default 10)")
    shape.add_argument("-u", "--unique-pages", type=argtypes.count, default=0, metavar="U",
                       help="extra pages per process that never merge (default 0)")
    shape.add_argument("-z", "--zero-pages", type=argtypes.count, default=0, metavar="Z",
                       help="extra all-zero pages per process (default 0)")
    shape.add_argument("--register", choices=("madvise", "prctl"), default="madvise",
                       help="madvise(MADV_MERGEABLE) on the area, or "
                       "prctl(PR_SET_MEMORY_MERGE) before mapping it (default madvise)")
    ksmd = p.add_argument_group("ksmd")
    ksmd.add_argument("--drive-ksmd", action=argparse.BooleanOptionalAction, default=True,
                      help="set pages_to_scan, sleep_millisecs=0, run=1 while running and "
                      "restore them after (default: on)")
    ksmd.add_argument("--pages-to-scan", type=argtypes.positive, default=None, metavar="N",
                      help=f"pages_to_scan when driving ksmd (default {MAX_PAGES_TO_SCAN})")
    ksmd.add_argument("--use-zero-pages", type=int, choices=(0, 1), default=None,
                      help="use_zero_pages while running (default: leave as it is)")
    ksmd.add_argument("--timeout", type=argtypes.seconds, default=DEFAULT_TIMEOUT,
                      metavar="SECONDS",
                      help="give up waiting for ksmd when its figures have not changed for "
                      f"this long (default {DEFAULT_TIMEOUT:g})")
    phases = p.add_argument_group("phases")
    phases.add_argument("--cow-fraction", type=argtypes.fraction, default=0.0, metavar="F",
                        help="after merging, write to this fraction (0..1) of each "
                        "process's merged pages (default 0)")
    phases.add_argument("--cow-rate", type=argtypes.rate, default=0.0, metavar="PAGES/S",
                        help="COW writes per second, all processes together (default 0: as "
                        "fast as possible)")
    phases.add_argument("--state", action="append", default=[], type=_page_state,
                        metavar="STATE[:F]",
                        help="after merging, put fraction F (default 0.5) of each process's "
                        "merged pages not yet in a state into STATE, before any COW: protnone "
                        "(mprotect PROT_NONE; COW writes to them go through /proc/self/mem), "
                        "uffd_wp (userfaultfd write-protected; never written), discard "
                        "(MADV_DONTNEED); repeatable. See docs/cow-breaks.md")
    phases.add_argument("--unmerge", action="store_true",
                        help="finally unmerge (MADV_UNMERGEABLE, or PR_SET_MEMORY_MERGE 0)")
    phases.add_argument("--hold", type=argtypes.duration, nargs="?", const=math.inf,
                        default=0.0, metavar="SECONDS",
                        help="keep the processes alive this long at the end; without a value, "
                        "until Ctrl-C")
    phases.add_argument("--loop", action="store_true",
                        help="repeat merge, COW storm (--cow-fraction, default 0.3), re-merge "
                        "until Ctrl-C")
    p.add_argument("-j", "--json", action="store_true",
                   help="print one JSON object per phase instead of text")
    p.set_defaults(func=run_cli)
    return p


def _page_state(text: str) -> tuple[PageStateName, float]:
    name, _, frac = text.partition(":")
    if name not in PAGE_STATES:
        raise argparse.ArgumentTypeError(f"unknown page state {name!r}: {', '.join(PAGE_STATES)}")
    return name, argtypes.fraction(frac) if frac else 0.5  # type: ignore[return-value]




class _Printer:
    """Text or JSON-lines output, and progress on a terminal."""

    def __init__(self, as_json: bool):
        self.json = as_json
        self.tty = sys.stdout.isatty()
        self._last = 0.0
        self._dirty = False
        self._began: dict[str, float] = {}

    def event(self, name: str, text: str | None = None, **data: Any) -> None:
        self._clear()
        if self.json:
            print(json.dumps({"event": name, **data}), flush=True)
        elif text is not None:
            print(text, flush=True)

    def progress(self, phase: str, done: int, total: int) -> None:
        if self.json:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last > 0.1 or done >= total:
                pct = f"{100 * done // total}%" if total else ""
                print(f"\r  {phase}: {done}/{total} {pct}   ", end="", flush=True)
                self._dirty = True
                self._last = now
        elif now - self._began.setdefault(phase, now) > 2.0 and now - self._last > 2.0:
            # In a log, only steps long enough to wonder about.
            print(f"  {phase}: {done}/{total}", flush=True)
            self._last = now

    def _clear(self) -> None:
        if self._dirty:
            print("\r" + " " * 60 + "\r", end="", flush=True)
            self._dirty = False



def _compare(e: Expectation, m: Measurement, pids: Sequence[int]) -> tuple[list[str], bool]:
    ok = m.matches(e)
    rows = [
        f"  {'':22}{'expected':>10}{'measured':>10}",
        *(
            f"  {name:22}{ev:>+10d}{signed(mv):>10}{'' if mv in (None, ev) else '   <- differs'}"
            for name, ev, mv in (
                ("pages_shared", e.pages_shared, m.pages_shared),
                ("pages_sharing", e.pages_sharing, m.pages_sharing),
                ("ksm_zero_pages", e.ksm_zero_pages, m.ksm_zero_pages),
            )
        ),
        "  per process (ksm_stat):   ksm_merging_pages   ksm_zero_pages",
    ]
    for i, pid in enumerate(pids):
        em, mm = e.merging_pages[i], m.merging_pages[i]
        ez, mz = e.zero_pages[i], m.zero_pages[i]
        bad = "" if (em, ez) == (mm, mz) else "   <- differs"
        rows.append(f"    pid {pid:<10}  {em:>9} / {mm!s:<9} {ez:>7} / {mz!s:<7}{bad}")
    return rows, ok


def run_cli(args: argparse.Namespace) -> int:
    """`ksmtrace workload`: run the phases, print prediction vs kernel."""
    spec = WorkloadSpec(
        processes=args.processes,
        pages=args.pages,
        distinct=args.distinct,
        zero_pages=args.zero_pages,
        unique_pages=args.unique_pages,
        register=args.register,
        use_zero_pages=None if args.use_zero_pages is None else bool(args.use_zero_pages),
    )
    spec.validate()
    if args.state and args.loop:
        raise WorkloadError("--state cannot be combined with --loop (re-merging restores contents "
                            "into pages that may be PROT_NONE or write-protected)")
    if os.geteuid() != 0 and args.drive_ksmd:
        raise not_root("driving ksmd (--drive-ksmd)")
    out = _Printer(args.json)
    all_ok = True
    # Ctrl-C, SIGTERM and SIGHUP unwind the with-block (children ended, knobs
    # restored): the caller installed ksmtrace.signals (the CLI, or main()).
    try:
        w = Workload(
            spec,
            drive_ksmd=args.drive_ksmd,
            pages_to_scan=args.pages_to_scan,
            progress=out.progress,
        )
        t0 = time.monotonic()
        with w:
            b = w.baseline.sysfs if w.baseline else None
            knobs = (
                f"ksmd driven: pages_to_scan={w.pages_to_scan} sleep_millisecs=0 run=1"
                if args.drive_ksmd
                else f"ksmd as it is: run={b.run if b else '?'}"
            )
            out.event(
                "start",
                f"workload: {spec.describe()}\n  {knobs}, use_zero_pages="
                f"{int(w.use_zero_pages)}, max_page_sharing={w.max_page_sharing}\n"
                f"  pids {' '.join(map(str, w.pids))}; filled and registered in "
                f"{time.monotonic() - t0:.2f} s",
                spec=asdict(spec),
                pids=w.pids,
                drive_ksmd=args.drive_ksmd,
                pages_to_scan=w.pages_to_scan if args.drive_ksmd else None,
                use_zero_pages=w.use_zero_pages,
                max_page_sharing=w.max_page_sharing,
            )
            others = other_ksm_users(w.pids)
            if others:
                out.event(
                    "warning",
                    "  note: other processes use KSM, so the global deltas may differ: "
                    + "; ".join(map(str, others[:5])),
                    others=[asdict(o) for o in others],
                )
            all_ok &= _phase(out, w, "merge", "merged", args.timeout)
            if args.loop:
                _loop(out, w, args)
                return Exit.OK
            for state, fraction in args.state:
                put = w.set_state(state, fraction)
                out.event(
                    "state",
                    f"[state] {state}: {sum(map(len, put.values()))} merged pages "
                    f"({fraction:g} of each process's)",
                    state=state,
                    pages={str(k): len(v) for k, v in put.items()},
                )
            if args.cow_fraction:
                cow0 = w.measure().cow_ksm
                tc = time.monotonic()
                written = w.cow(args.cow_fraction, args.cow_rate or None)
                n = sum(written.values())
                cow = w.measure().cow_ksm - cow0
                rate = f"{args.cow_rate:g} pages/s" if args.cow_rate else "full speed"
                ok = cow == n
                all_ok &= ok
                out.event(
                    "cow",
                    f"[cow] wrote {n} merged pages ({rate}) in {time.monotonic() - tc:.2f} s: "
                    f"cow_ksm expected {n:+d}, measured {cow:+d}" + ("" if ok else "   <- differs"),
                    written={str(k): v for k, v in written.items()},
                    cow_ksm_expected=n,
                    cow_ksm_measured=cow,
                    ok=ok,
                )
                all_ok &= _phase(
                    out, w, "cow-noticed", "after ksmd noticed the writes", args.timeout
                )
            if args.unmerge and args.state:
                # whether PROT_NONE and uffd-wp pages unmerge is the kernel's
                # choice (6.1: they stay merged): report, do not predict
                cow0 = w.measure().cow_ksm
                w.unmerge()
                cow = w.measure().cow_ksm - cow0
                want = w.expected_cow_ksm
                out.event(
                    "unmerge",
                    f"[unmerge] cow_ksm {cow:+d}: one per page still mapped to a KSM page, "
                    "less those this kernel leaves merged (docs/cow-breaks.md)",
                    cow_ksm=cow,
                    cow_ksm_expected_total=want,
                )
            elif args.unmerge:
                cow0 = w.measure().cow_ksm
                w.unmerge()
                all_ok &= _phase(
                    out, w, "unmerge", "unmerged", args.timeout, cow_ksm=w.measure().cow_ksm - cow0
                )
            if args.hold:
                until = "Ctrl-C" if math.isinf(args.hold) else f"{args.hold:g} s"
                out.event("hold", f"[hold] holding the pages until {until}", seconds=args.hold)
                _hold(args.hold)
        out.event(
            "exit",
            "[exit] children ended" + (", knobs restored" if args.drive_ksmd else ""),
            ok=all_ok,
        )
        return Exit.OK if all_ok else Exit.FAILURE
    except KeyboardInterrupt:
        out.event("interrupted", "[exit] interrupted: children ended, knobs restored")
        return Exit.INTERRUPTED
    except Terminated as e:
        return int(e.code)


def _phase(
    out: _Printer, w: Workload, phase: str, title: str, timeout: float, **extra: Any
) -> bool:
    t = time.monotonic()
    m = w.wait_expected(timeout, phase=phase)
    e = w.expected()
    rows, ok = _compare(e, m, w.pids)
    if "cow_ksm" in extra:
        rows.append(f"  cow_ksm {extra['cow_ksm']:+d} (the kernel broke each merged page)")
    out.event(
        phase,
        f"[{phase}] {title} after {time.monotonic() - t:.2f} s, {m.full_scans} full scans "
        f"since start{'' if ok else ' -- DIFFERS from the prediction'}\n" + "\n".join(rows),
        expected=e.as_dict(),
        measured=m.as_dict(),
        seconds=round(time.monotonic() - t, 3),
        ok=ok,
        **extra,
    )
    return ok


def _loop(out: _Printer, w: Workload, args: argparse.Namespace) -> None:
    stop = threading.Event()
    out.event("loop", "[loop] merge -> COW storm -> re-merge until Ctrl-C")

    def on_phase(step: str, m: Measurement) -> None:
        out.event(
            step,
            f"[{step}] pages_shared {m.pages_shared:+d} pages_sharing {m.pages_sharing:+d} "
            f"ksm_zero_pages {signed(m.ksm_zero_pages)} cow_ksm {m.cow_ksm:+d}",
            measured=m.as_dict(),
        )

    w.demo_loop(
        stop,
        cow_fraction=args.cow_fraction or 0.3,
        cow_rate=args.cow_rate or None,
        timeout=args.timeout,
        on_phase=on_phase,
    )


def _hold(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 3600.0))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ksmtrace.workload ...`: the CLI without the rest of ksmtrace."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    parser = argtypes.Parser(prog="ksmtrace")
    sub = parser.add_subparsers()
    add_cli(sub)
    args = parser.parse_args(["workload", *argv])
    signals.install()
    try:
        return run_cli(args)
    except KsmtraceError as e:
        return e.report()
