"""The agent's own footprint, side by side in one run on this host:

- start-up: `ksmtrace export` started, time until its /metrics carries a
  traced series (`ksmtrace_scan_rounds_total`), `ksmtrace stat -j 0.1`
  until it prints its first line (one 0.1 s interval included), and
  `ksmtrace top` in a real terminal (tmux, 120x40) until a frame shows a live
  sample. Cold: an empty cache, so bcc compiles in its child, the mechanisms
  are proved and vmlinux BTF is read again; warm: the second start, from the
  cache. Each measured `reps` times, alternating, medians.
- memory: the exporter with live BPF scraped every second for `seconds`
  (600 in the full run) while a workload merges and breaks pages in cycles;
  VmRSS and RssAnon at the start, at minute 2 (or a fifth of the run) and at
  the end, against `export --sysfs-only` and node_exporter with only its
  ksmd collector, started at the same time and scraped the same way.

Root. It drives ksmd through the workload (knobs restored) and holds the
kernel-test lock, so no kernel test runs meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

try:
    from bench.common import interleaved, row
    from bench.pagemap import kernel_lock
except ImportError:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import interleaved, row
    from bench.pagemap import kernel_lock

from ksmtrace.spawn import python_argv, reap

TARGET_START_S = 0.5
TARGET_RSS_MB, TARGET_ANON_MB, TARGET_GROWTH_MB = 48.0, 32.0, 2.0
TRACED = b"ksmtrace_scan_rounds_total"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read()


@contextlib.contextmanager
def _process(argv: list[str], env: dict | None = None,
             stdout: int = subprocess.DEVNULL) -> Iterator[subprocess.Popen]:
    p = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, env=env)
    try:
        yield p
    finally:
        reap(p, 30)


def _status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def _export_start(env: dict) -> float:
    """Seconds from spawning `ksmtrace export` to a traced series."""
    port = _port()
    t0 = time.monotonic()
    with _process(python_argv("ksmtrace", "export", "--listen", f"127.0.0.1:{port}",
                              "--sharing-interval", "0"), env) as p:
        while time.monotonic() - t0 < 120:
            if p.poll() is not None:
                raise RuntimeError(f"export exited: {p.stderr.read().decode()[-500:]}")
            try:
                if TRACED in _scrape(port, 0.5):
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.01)
    raise RuntimeError("export served no traced series in 120 s")


def _stat_start(env: dict) -> float:
    """Seconds from spawning `ksmtrace stat -j 0.1` to its first line (the
    first interval's 0.1 s included: a line carries rates)."""
    t0 = time.monotonic()
    with _process(python_argv("ksmtrace", "stat", "-j", "0.1", "3"), env,
                  stdout=subprocess.PIPE) as p:
        line = p.stdout.readline()  # type: ignore[union-attr]
        took = time.monotonic() - t0
    if b'"traced": true' not in line:
        raise RuntimeError(f"stat printed no traced line: {line[:200]!r}")
    return took


def _top_start(env: dict) -> float:
    """Seconds from starting `ksmtrace top` in a real terminal (tmux, 120x40)
    to a frame that shows a live sample ("live @" in its header)."""
    session = f"ksmtrace-bench-{os.getpid()}"
    argv = [shlex.quote(a) for a in python_argv("ksmtrace", "top")]
    envs = [f"KSMTRACE_CACHE={shlex.quote(env['KSMTRACE_CACHE'])}"]
    t0 = time.monotonic()
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40",
                    " ".join(["env", *envs, *argv])], check=True)
    try:
        while time.monotonic() - t0 < 120:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                    capture_output=True, text=True).stdout
            if "live @" in screen:
                return time.monotonic() - t0
            time.sleep(0.003)
        raise RuntimeError(f"top showed no live sample in 120 s: {screen[-500:]}")
    finally:
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], capture_output=True)
        for _ in range(100):  # q detaches and ends it; then the session closes
            if subprocess.run(["tmux", "has-session", "-t", session],
                              capture_output=True).returncode:
                break
            time.sleep(0.1)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def startup(reps: int) -> dict[str, list[float]]:
    base = Path(tempfile.mkdtemp(prefix="ksmtrace-bench-cache.", dir="/run"))
    env = {**os.environ, "KSMTRACE_CACHE": str(base)}
    out: dict[str, list[float]] = {"export cold": [], "export warm": [], "stat cold": [],
                                   "stat warm": [], "top cold": [], "top warm": []}
    starts = {"export": _export_start, "stat": _stat_start, "top": _top_start}
    try:
        def run(cmd: str) -> float:
            fn = starts[cmd]
            for part in ("bpf", "trials", "btf"):  # cold: nothing compiled, proved or read yet
                shutil.rmtree(base / part, ignore_errors=True)
            cold = fn(env)
            warm = fn(env)
            out[f"{cmd} cold"].append(cold)
            out[f"{cmd} warm"].append(warm)
            return warm
        interleaved({cmd: (lambda c=cmd: run(c)) for cmd in starts}, reps)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def memory(seconds: float) -> dict[str, list[tuple[float, dict[str, float]]]]:
    from ksmtrace.workload import Workload, WorkloadSpec

    ports = {"export": _port(), "export --sysfs-only": _port(), "node_exporter": _port()}
    argvs = {
        "export": python_argv("ksmtrace", "export", "--listen", f"127.0.0.1:{ports['export']}"),
        "export --sysfs-only": python_argv("ksmtrace", "export", "--sysfs-only", "--listen",
                                           f"127.0.0.1:{ports['export --sysfs-only']}"),
        "node_exporter": ["prometheus-node-exporter", "--collector.disable-defaults",
                          "--collector.ksmd",
                          f"--web.listen-address=127.0.0.1:{ports['node_exporter']}"],
    }
    if not shutil.which("prometheus-node-exporter"):
        del argvs["node_exporter"]
    samples: dict[str, list[tuple[float, dict[str, float]]]] = {k: [] for k in argvs}
    with contextlib.ExitStack() as stack:
        procs = {k: stack.enter_context(_process(a)) for k, a in argvs.items()}
        t0 = time.monotonic()
        spec = WorkloadSpec(processes=4, pages=20000, distinct=200)
        while time.monotonic() - t0 < seconds:
            with Workload(spec, drive_ksmd=True) as w:  # merges, then breaks a quarter
                w.wait_merged()
                w.cow(0.25)
                cycle_end = time.monotonic() + 10
                while time.monotonic() < min(cycle_end, t0 + seconds):
                    for k, p in procs.items():
                        if p.poll() is not None:
                            raise RuntimeError(f"{k} exited: {p.stderr.read().decode()[-300:]}")
                        try:
                            _scrape(ports[k])
                        except OSError:
                            pass
                        samples[k].append((time.monotonic() - t0, _status(p.pid)))
                    time.sleep(1.0)
    return samples


def _at(series: list[tuple[float, dict[str, float]]], t: float) -> dict[str, float]:
    return min(series, key=lambda s: abs(s[0] - t))[1]


def run(quick: bool) -> list[dict]:
    if os.geteuid() != 0:
        raise RuntimeError("the footprint benchmark needs root (live BPF, ksmd)")
    reps = 2 if quick else 5
    seconds = 60.0 if quick else 600.0
    rows: list[dict] = []
    with kernel_lock():
        s = startup(reps)
        for name, v in s.items():
            target = f"<= {TARGET_START_S} s" if name.endswith("warm") else None
            med = statistics.median(v)
            rows.append(row(f"start-up, {name} (to live traced figures)", med, "s", target,
                            med <= TARGET_START_S if target else None,
                            f"median of {len(v)}, min {min(v):.3f}, max {max(v):.3f}; "
                            + ("compiled in a child (bcc), trials run, BTF read" if "cold" in name
                               else "programs from the cache: no compiler")))
        m = memory(seconds)
    early = min(120.0, seconds / 5)
    for name, series in m.items():
        first, at2, last = series[0][1], _at(series, early), series[-1][1]
        growth = last["VmRSS"] - at2["VmRSS"]
        live = name == "export"
        rows.append(row(f"RSS, {name}, after {seconds / 60:.0f} min of 1 s scrapes", last["VmRSS"],
                        "MiB", f"<= {TARGET_RSS_MB:.0f} MiB" if live else None,
                        last["VmRSS"] <= TARGET_RSS_MB if live else None,
                        f"anonymous {last.get('RssAnon', 0):.1f} MiB, file "
                        f"{last.get('RssFile', 0):.1f} MiB; at start {first['VmRSS']:.1f}, "
                        f"at {early:.0f} s {at2['VmRSS']:.1f}; a workload merged and broke "
                        "pages throughout"))
        if live:
            rows.append(row(f"anonymous RSS, {name}", last.get("RssAnon", 0), "MiB",
                            f"<= {TARGET_ANON_MB:.0f} MiB",
                            last.get("RssAnon", 0) <= TARGET_ANON_MB, "RssAnon at the end"))
            rows.append(row(f"RSS growth, {name}, {early:.0f} s to end", growth, "MiB",
                            f"<= {TARGET_GROWTH_MB:.0f} MiB", growth <= TARGET_GROWTH_MB,
                            f"{len(series)} samples"))
    return rows


if __name__ == "__main__":
    for x in run(quick="--quick" in sys.argv):
        print(x)
