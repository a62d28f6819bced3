"""`ksmtrace export`: serve KSM metrics to Prometheus.

The tick loop (source -> collector -> snapshot) runs in the main thread, so
Ctrl-C and SIGTERM unwind it like every other command (probes detached);
the HTTP server answers scrapes from its own threads with the families of
the newest snapshot (export.server: waitress, with limits on connections,
request sizes and times). prometheus_client and waitress are imported only
when the command runs: the rest of the CLI works without them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from ksmtrace import argtypes, session
from ksmtrace.errors import BadRecording, KsmtraceError, UsageError
from ksmtrace.signals import Terminated

DEFAULT_PORT = 9949
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
# as in export.server (not imported here: the CLI must work without waitress)
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_IDLE_TIMEOUT = 120.0

EPILOG = f"""\
examples:
  sudo ksmtrace export                      traced KSM metrics on http://{DEFAULT_LISTEN}/metrics
  ksmtrace export --sysfs-only              the kernel's KSM counters only, no root needed
  sudo ksmtrace export --listen 0.0.0.0:{DEFAULT_PORT} --interval 5 --top 50
                                            for a Prometheus on another host: every interface
  ksmtrace export --replay ksm.rec          serve a recording's snapshots (dashboards demo)
  curl -s localhost:{DEFAULT_PORT}/metrics | grep ^ksmtrace_ksm_pages

The exporter is read-only: it never writes a KSM knob. It binds to 127.0.0.1
unless --listen says otherwise. Point Prometheus at it (deploy/prometheus.yml),
load dashboards/ksmtrace-alerts.yml and import dashboards/ksmtrace.json in Grafana.
Metric names and their node_exporter equivalents: README, section Metrics.

Clients cannot exhaust it: connections cost no thread (one event loop, 4
worker threads), at most --max-connections are open (at the limit the longest
idle one is closed to admit a new one), a connection silent for --idle-timeout
is closed, a request must arrive whole within 10 s and its headers fit in
16 KiB (else 431), and SIGTERM or Ctrl-C stop it at once whatever the clients do.
"""


DESCRIPTION = (
    "Serve KSM figures as Prometheus metrics: every KSM sysfs file, the traced "
    "events of each stage (merges, failures by errno, scan rounds and their durations, COW "
    "breaks, unmerges), the top processes and cgroups, and ksmtrace's own health.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = argtypes.subcommand(sub, "export", "Prometheus exporter of KSM metrics (HTTP /metrics)",
                            DESCRIPTION, EPILOG)
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                   help=f"address to serve /metrics on (default {DEFAULT_LISTEN}; "
                   f"':{DEFAULT_PORT}' or '0.0.0.0:{DEFAULT_PORT}' for every interface)")
    p.add_argument("-i", "--interval", type=argtypes.seconds, default=1.0, metavar="S",
                   help="seconds between kernel polls, i.e. snapshots (default 1)")
    p.add_argument("--top", type=argtypes.count, default=20, metavar="N",
                   help="processes and cgroups exported one by one, the rest summed into "
                   "one 'other' series (default 20)")
    p.add_argument("--max-connections", type=_connections, default=DEFAULT_MAX_CONNECTIONS,
                   metavar="N",
                   help="HTTP connections open at once (default %(default)s; lowered to fit the "
                   "open-files limit, which is raised towards its hard limit if needed)")
    p.add_argument("--idle-timeout", type=argtypes.seconds, default=DEFAULT_IDLE_TIMEOUT,
                   metavar="S",
                   help="close a connection after S seconds without traffic (default "
                   f"{DEFAULT_IDLE_TIMEOUT:g}; keep it above Prometheus's scrape interval "
                   "so its connection is reused)")
    p.add_argument("--sharing-interval", type=argtypes.duration, default=60.0, metavar="S",
                   help="seconds between readings of the sharing map (every KSM process's "
                   "page map: who shares with whom; root, live only; default 60, 0: never)")
    p.add_argument("--replay", metavar="FILE",
                   help="serve the snapshots of a recording (at its pace), then its last one")
    p.add_argument("--speed", type=argtypes.factor, default=1.0, help=argparse.SUPPRESS)
    session.add_source_options(p)
    p.set_defaults(func=run)


def _connections(text: str) -> int:
    n = argtypes.count(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text}")
    return n


def _validate(args: argparse.Namespace) -> tuple[str, int, int]:
    from ksmtrace.export.server import parse_listen  # stdlib + prometheus_client

    if args.replay:
        session.refuse_source_options(args, "--replay")
    top = args.top
    try:
        host, port = parse_listen(args.listen)
    except ValueError as e:
        raise UsageError(str(e), "e.g. --listen 127.0.0.1:9949, [::1]:9949 or :9949") from None
    return host, port, top


def run(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise KsmtraceError(
            "ksmtrace export needs the Python package prometheus-client",
            "install ksmtrace with pip (it depends on it), or "
            "`apt-get install python3-prometheus-client`") from None
    try:
        import waitress  # noqa: F401
    except ImportError:
        raise KsmtraceError(
            "ksmtrace export needs the Python package waitress (its HTTP server)",
            "install ksmtrace with pip (it depends on it), or "
            "`apt-get install python3-waitress`") from None
    from ksmtrace.collector import observe
    from ksmtrace.export.collector import make_registry
    from ksmtrace.export.server import MetricsServer

    host, port, top = _validate(args)
    sharing: SharingThread | None = None
    registry, exporter = make_registry(top)
    # bind before attaching anything: a busy port fails fast and cleanly
    server = MetricsServer(registry, host, port, exporter, max_connections=args.max_connections,
                           idle_timeout=args.idle_timeout)
    try:
        if args.replay:
            from ksmtrace.sources.replay import ReplaySource

            src = ReplaySource(args.replay, speed=args.speed)
        else:
            src = session.open_source(args)
        with observe(src) as obs:
            session.enforce_strict(args, src.probes)
            if not args.replay and args.sharing_interval and os.geteuid() == 0:
                sharing = SharingThread(exporter, args.sharing_interval, top)
                sharing.start()
            server.start()
            print(f"ksmtrace export: serving http://{server.address}/metrics "
                  f"(source: {src.kind}, every {args.interval:g} s, top {top}); "
                  "Ctrl-C stops", file=sys.stderr, flush=True)
            if not args.replay:
                for tick in src.ticks(args.interval):
                    t0 = time.perf_counter()
                    exporter.publish(obs.collector.add_tick(tick), t0)
            else:
                if _replay(obs, exporter, args.replay):
                    print("ksmtrace export: end of the recording; serving its last snapshot",
                          file=sys.stderr, flush=True)
                while True:
                    time.sleep(3600)
    finally:
        if sharing is not None:
            sharing.stop()
        server.close()
    return 0


class SharingThread(threading.Thread):
    """Reads the sharing map now, then every `interval` seconds, off the tick
    loop and the scrapes: its families reach scrapes with the next snapshot.
    Each reading is a child process (`python -m ksmtrace.share`), so the
    exporter never holds numpy or the page maps' arrays: its memory stays
    what the scrapes need. Page maps are only read (no knob, no probe), so
    `stop()` just ends the child being waited for, if any."""

    TIMEOUT = 600.0  # a reading of many large guests' maps; then it is given up

    def __init__(self, exporter, interval: float, top: int):
        super().__init__(name="ksmtrace-sharing", daemon=True)
        self.exporter, self.interval, self.top = exporter, interval, top
        self._halt = threading.Event()
        self._child: subprocess.Popen | None = None

    def run(self) -> None:
        from ksmtrace.export.metrics import sharing_families

        while not self._halt.is_set():
            try:
                r = self._read()
            except KsmtraceError as e:
                if not self._halt.is_set():
                    print(f"ksmtrace export: the sharing map is not available: {e.message}",
                          file=sys.stderr, flush=True)
                return
            self.exporter.set_sharing(sharing_families(r, self.top, time.time()))
            self._halt.wait(self.interval)

    def _read(self) -> dict:
        from ksmtrace.spawn import python_argv

        p = subprocess.Popen(python_argv("ksmtrace.share", str(self.top)), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._child = p
        try:
            out, err = p.communicate(timeout=self.TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise KsmtraceError(f"reading it took more than {self.TIMEOUT:g} s") from None
        finally:
            self._child = None
        if p.returncode != 0:
            raise KsmtraceError(err.decode(errors="replace").strip()[-500:]
                                or f"its reader exited with {p.returncode}")
        try:
            r = json.loads(out)
        except ValueError as e:
            raise KsmtraceError(f"its reader's output is not JSON: {e}") from e
        if not isinstance(r, dict) or not {"groups", "pairs", "findings", "seconds"} <= set(r):
            raise KsmtraceError("its reader's output lacks the sharing map's fields")
        return r

    def stop(self) -> None:
        self._halt.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()


def _replay(obs, exporter, path: str) -> bool:
    """Publish the recording's ticks at its pace; True at its end. A corrupt
    record (or a tick that cannot be served) ends the replay there (False):
    the snapshots before it stay served and one line says where it stopped;
    with none before it, BadRecording (exit 9)."""

    n = 0
    try:
        for tick in obs.src.ticks():
            t0 = time.perf_counter()
            try:
                exporter.publish(obs.collector.add_tick(tick), t0, check=True)
            except Terminated:
                raise  # SIGTERM meanwhile: not a bad tick
            except Exception as e:  # noqa: BLE001 - a tick record.py read but cannot be served
                raise BadRecording(f"{path}: tick {n + 1} cannot be exported ({e!r})") from e
            n += 1
    except BadRecording as e:
        if not n:
            raise
        print(f"ksmtrace export: {e.message}; replay stopped there, serving the snapshot of "
              f"tick {n}", file=sys.stderr, flush=True)
        return False
    return True
