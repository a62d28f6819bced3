"""`ksmtrace top`: the live observatory (Textual). Sets up the source, the
feed and, with --demo, the workload; the app itself is in ksmtrace/tui/."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from ksmtrace import argtypes, session, signals
from ksmtrace.errors import KsmtraceError, UsageError, not_root

EPILOG = """\
examples:
  sudo ksmtrace top --demo          start a demo workload and watch KSM work on it
                                    (knobs restored, processes ended on exit)
  sudo ksmtrace top                 every process using KSM on this host, traced
  ksmtrace top                      without root: the kernel's counters only
  sudo ksmtrace top -p 1234         only pid 1234
  ksmtrace top --replay ksm.rec     replay a recording (space pauses, + - speed,
                                    [ ] seek, < > ends)

keys: enter page map · s sort · / filter · w why isn't it merging · e events
      k knobs · ? help · ctrl+p command palette · q quit
"""


DESCRIPTION = (
    "The live KSM observatory: searching, merging, counting and updating "
    "as they happen, the processes that share pages, each one's page map, and why "
    "nothing merges when nothing does.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = argtypes.subcommand(
        sub, "top", "live terminal view of KSM's four stages, its processes and their pages",
        DESCRIPTION, EPILOG)
    p.add_argument("-i", "--interval", type=argtypes.seconds, default=1.0,
                   help="seconds between samples (default 1)")
    p.add_argument("--demo", action="store_true",
                   help="run the demo workload (root; restores every knob on exit)")
    p.add_argument("--replay", metavar="FILE", help="replay a recording instead of live data")
    p.add_argument("--speed", type=argtypes.factor, default=1.0,
                   help="replay speed, 1 = as recorded (default 1)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="stream every event for the event log (default: on with --demo)")
    session.add_source_options(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.replay:
        session.refuse_source_options(args, "--replay")
    if args.replay and args.demo:
        raise UsageError("--replay and --demo do not go together",
                            "replay a recording, or watch the demo live")
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        raise UsageError("ksmtrace top needs a terminal",
                            "run it in a terminal; for scripts use `ksmtrace stat` "
                            "or `ksmtrace record`")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ksmtrace.collector import observe
    from ksmtrace.feed import LiveFeed, ReplayFeed

    if args.replay:
        from ksmtrace.sources.replay import ReplaySource

        with observe(ReplaySource(args.replay, warn=None)) as obs, \
                ReplayFeed(obs, speed=args.speed) as feed:
            return _run_app(feed, None, demo_mode=False, stream_off=False)

    if args.demo and os.geteuid() != 0:
        raise not_root("--demo (it drives ksmd's knobs)")
    if args.stream is None:
        args.stream = bool(args.demo)
    src = session.open_source(args)
    if src.kind == "live":
        print("ksmtrace top: compiling and attaching the BPF programs…", file=sys.stderr,
              flush=True)
    with observe(src) as obs:  # attach first, so the demo's first merges are traced too
        session.enforce_strict(args, src.probes)
        demo_ctx = contextlib.nullcontext([])
        if args.demo:
            from ksmtrace.demo import DEMO_SPEC, demo

            print(f"ksmtrace top: starting the demo workload ({DEMO_SPEC.processes} "
                  f"processes, {DEMO_SPEC.pages} pages each)…", file=sys.stderr, flush=True)
            demo_ctx = demo()
        with demo_ctx as demo_pids:
            if demo_pids and args.pid is None:
                src.pids = list(demo_pids)
            knobs = None
            if os.geteuid() == 0:
                from ksmtrace.kernel.sysfs import KsmKnobs

                knobs = KsmKnobs()
            try:
                with LiveFeed(obs, args.interval) as feed:
                    return _run_app(feed, knobs, demo_mode=args.demo,
                                    stream_off=not args.stream)
            finally:
                if knobs is not None and knobs.saved:
                    if args.demo:
                        knobs.restore()  # inside the demo, which restores the rest
                    else:
                        print("ksmtrace: KSM knobs you changed stay set: "
                              + ", ".join(f"{k} (was {v})" for k, v in knobs.saved.items()),
                              file=sys.stderr)


def _run_app(feed, knobs, demo_mode: bool, stream_off: bool) -> int:
    from ksmtrace.tui.app import KsmtraceApp

    app = KsmtraceApp(feed, knobs=knobs, demo_mode=demo_mode, stream_off=stream_off)
    # SIGTERM/SIGHUP end the app the way q does, so every with-block above
    # unwinds (probes detached, demo ended, knobs restored).
    with signals.calling(lambda *_: app.call_later(app.exit), (signal.SIGTERM, signal.SIGHUP)):
        app.run()
    if app.failure is not None:
        if isinstance(app.failure, KsmtraceError | KeyboardInterrupt):
            raise app.failure
        raise KsmtraceError(f"the data source failed: {app.failure!r}",
                            "run `ksmtrace doctor`; report this with its output")
    return 0
