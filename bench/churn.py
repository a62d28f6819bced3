"""Scale of the per-mm tables (issue #15): 10,000 short-lived KSM processes
(quick: 1,000) start, have their pages merged by ksmd, break one page and
exit, at most ALIVE of them at once, while the real agent runs.

- The agent: `ksmtrace export` (live BPF, default options, the sharing map
  read every 60 s included) on a free localhost port, scraped every second,
  as Prometheus would. Its VmRSS and RssAnon, the size of each scrape
  (bytes, series) and its
  `ksmtrace_processes` / `ksmtrace_processes_other` gauges are sampled every
  STEP processes started (1,000; quick: 100).
- Its kernel maps: the per-mm LRU hashes `mm_stats` and `owners` (MAX_MMS
  entries each, bpf/ksmtrace.bpf.c), found through the exporter's own
  descriptors (/proc/<pid>/fdinfo: map_id, memlock); entries counted by
  `bpftool map dump`. LRU hashes are preallocated, so their memory is fixed
  at load; the entry count says whether exited mms are deleted.
- The agent's tables: a second agent, the same live source and collector
  ticking every second in a child of this bench (as bench/ksmd_overhead.py's
  tracer), reports the length of each per-pid and per-mm table it keeps
  (collector and source) at the same moments. The exporter does not export
  them, so they are read in this twin.

The churn: one prepared parent (this file, --churner) forks every process;
no interpreter starts per process. Each child maps PAGES pages whose
contents duplicate the other children's (DISTINCT contents), marks them
MADV_MERGEABLE, waits until ksmd merged all of them
(/proc/self/ksm_merging_pages), holds HOLD_S so that the agents' one-second
polls see it, writes one merged page (a copy-on-write break of a KSM page:
cow_ksm + 1) and exits. Children die with the churner (PR_SET_PDEATHSIG),
the churner with this bench, and the churner's session is killed on every
exit path.

Exactness at the end: the merges the exporter traced against what the
children merged (every page of every child once: N x PAGES), and the
exporter's cow_ksm against the children's one break each.

Holds /run/lock/ksmtrace-kernel-tests.lock for its whole run (KSM is
global), refuses to run while other processes use KSM, restores every KSM
knob it changes on every exit path and leaves run=0.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    from bench import ksmd_overhead
    from bench.common import ROOT, row
    from bench.footprint import _port, _scrape, _status
except ImportError:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import ksmd_overhead
    from bench.common import ROOT, row
    from bench.footprint import _port, _scrape, _status

from ksmtrace.spawn import python_argv

PAGES = 32  # pages per churn process
DISTINCT = 64  # contents shared across processes
ALIVE = 200  # churn processes alive at once, at most
HOLD_S = 1.5  # a merged process lives this long before its COW break and exit
MERGE_TIMEOUT_S = 60.0  # a child not merged by then exits with status 3
KNOBS = {"pages_to_scan": 2000, "sleep_millisecs": 10}  # ~200k pages/s of scanning, at most
TARGET_GROWTH_MIB = 2.0  # agent RSS growth from 2k to 10k processes
MAP_NAMES = ("mm_stats", "owners")
PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1
COMM = b"ksmchurn"


# ------------------------------------------------------------------ the churner
def _prctl(option: int, arg) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _child(index: int, contents: list[bytes]) -> int:
    """One churn process (a fork of the churner): exit status 0 merged and
    broken, 3 not merged in time."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return 4  # the churner died before the prctl
    size = PAGES * mmap.PAGESIZE
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(PAGES):
        o = i * mmap.PAGESIZE
        m[o:o + mmap.PAGESIZE] = contents[(index + i) % DISTINCT]
    m.madvise(mmap.MADV_MERGEABLE)
    deadline = time.monotonic() + MERGE_TIMEOUT_S
    path = "/proc/self/ksm_merging_pages"
    while True:
        with open(path, "rb") as f:
            if int(f.read()) >= PAGES:
                break
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.02)
    time.sleep(HOLD_S)
    m[8:16] = index.to_bytes(8, "little")  # one KSM page copied: its content now unique
    return 0


def churner_main(total: int, alive: int, step: int) -> int:
    """Fork `total` churn processes, at most `alive` at once; print
    "started N" every `step`, then one JSON line of exit statuses."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_NAME, ctypes.c_char_p(COMM))
    contents = [bytes([c + 1]) * 64 + bytes(mmap.PAGESIZE - 64) for c in range(DISTINCT)]
    sys.stdout.flush()
    running: set[int] = set()
    statuses: dict[int, int] = {}
    started = 0
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    while started < total or running:
        while len(running) < alive and started < total:
            pid = os.fork()
            if pid == 0:
                code = 5
                try:
                    code = _child(started, contents)
                finally:
                    os._exit(code)
            running.add(pid)
            started += 1
            if started % step == 0:
                print(f"started {started}", flush=True)
        pid, status = os.wait()
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        statuses[code] = statuses.get(code, 0) + 1
    print(json.dumps({"statuses": statuses}), flush=True)
    return 0


# ------------------------------------------------------------------ the twin agent
def twin_main() -> int:
    """Child: the live source and collector ticking every second, as `export`
    does; for each line on stdin, one JSON line of its tables' sizes."""
    from ksmtrace.collector import observe
    from ksmtrace.kernel import capabilities as caps
    from ksmtrace.sources import counters
    from ksmtrace.sources.live import LiveSource

    facts = caps.probe_host()
    src = LiveSource(facts, caps.plan(facts, os.environ.get("KSMTRACE_ATTACH")), bpf_stats=False)
    with observe(src) as obs:
        col = obs.collector
        obs.sample()
        print("ready", flush=True)
        next_t = time.monotonic() + 1.0
        while True:
            while (left := next_t - time.monotonic()) > 0:
                if select.select([sys.stdin], [], [], min(left, 0.05))[0]:
                    line = sys.stdin.readline()
                    if not line:
                        return 0
                    sizes = {
                        "collector._procs": len(col._procs),
                        "collector._mm_seen": len(col._mm_seen),
                        "collector._owner": len(col._owner),
                        "collector._wp_total": len(col._wp_total),
                        "collector._cow_given": len(col._cow_given),
                        "source._resolved": len(src._resolved),
                        "source._resolve_tries": len(src._resolve_tries),
                        "source._owner_pids": len(src._owner_pids),
                        "counters._identities": len(counters._identities),
                    }
                    print(json.dumps({"sizes": sizes, **_status(os.getpid())}), flush=True)
            next_t += 1.0
            obs.sample()


# ------------------------------------------------------------------ measuring
class _Child:
    """A child process in its own session, killed with its session on exit."""

    def __init__(self, argv: list[str], what: str, stdin: bool = True, eof_ends: bool = False):
        self.what = what
        self.eof_ends = eof_ends  # it ends by itself at the end of its stdin
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     start_new_session=True)

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"{self.what}: nothing said in {timeout:g} s")
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"{self.what} exited (status {self.proc.wait()})")
        return out.strip()

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            if self.eof_ends:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the session
        self.proc.wait()


def _metric(text: str, name: str, having: str = "") -> float | None:
    """The sum of a metric's series (those whose labels hold `having`) in a
    text exposition; None if it has none."""
    vals = [float(m.group(2)) for m in
            re.finditer(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.MULTILINE)
            if having in (m.group(1) or "")]
    return sum(vals) if vals else None


def _maps_of(pid: int) -> dict[str, dict]:
    """The per-mm maps a process holds: name -> {id, memlock, max_entries}."""
    from ksmtrace.sources.bpfstats import read_fdinfo

    out: dict[str, dict] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            info = read_fdinfo(int(fd), str(pid))
        except OSError:
            continue
        mid = info["map_id"]
        show = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(mid)],
                                         capture_output=True, text=True, check=True).stdout)
        if show.get("name") in MAP_NAMES:
            out[show["name"]] = {"id": mid, "memlock": info["memlock"],
                                 "max_entries": info["max_entries"],
                                 "type": show.get("type")}
    return out


def _entries(map_id: int) -> int:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                         capture_output=True, text=True, check=True).stdout
    return len(json.loads(out))


def _sample(started: int, t: float, export: _Child, port: int, maps: dict[str, dict],
            twin: _Child) -> dict:
    body = _scrape(port, 5.0)
    text = body.decode()
    twin.say("sizes")
    tw = json.loads(twin.line(30))
    st = _status(export.proc.pid)
    return {
        "started": started, "t": t, "rss": st["VmRSS"], "anon": st["RssAnon"],
        "scrape_bytes": len(body),
        "series": sum(1 for ln in text.splitlines() if ln and not ln.startswith("#")),
        "processes": _metric(text, "ksmtrace_processes"),
        "processes_other": _metric(text, "ksmtrace_processes_other") or 0,
        "entries": {n: _entries(m["id"]) for n, m in maps.items()},
        "twin": tw,
    }


def _log(s: dict) -> None:
    print(f"bench: churn: {s['started']:>6} started, {s['t']:6.1f} s: export RSS "
          f"{s['rss']:.1f} MiB (anon {s['anon']:.1f}), scrape {s['series']} series "
          f"{s['scrape_bytes']} B, maps {s['entries']}, twin RSS {s['twin']['VmRSS']:.1f} "
          f"tables {s['twin']['sizes']}", file=sys.stderr, flush=True)


def measure(total: int, alive: int = ALIVE, step: int = 1000) -> dict:
    from ksmtrace.kernel import sysfs
    from ksmtrace.workload import other_ksm_users

    if os.geteuid() != 0:
        raise RuntimeError("the churn benchmark needs root (KSM knobs, BPF)")
    with ksmd_overhead.kernel_lock():
        if sysfs.read_knob("run") != 0:
            raise RuntimeError("ksmd is running: another KSM user is active")
        if others := other_ksm_users():
            raise RuntimeError(f"other processes use KSM: {', '.join(map(str, others))}")
        children: list[_Child] = []
        with sysfs.KsmKnobs() as knobs:
            knobs.set(run=0)  # saved as 0, and restored last
            try:
                return _measure(knobs, children, total, alive, step)
            finally:
                for c in reversed(children):
                    c.kill()
                # nothing merged left behind: the exited children's pages stay
                # counted until ksmd walks their slots (no KSM user is left)
                knobs.set(pages_to_scan=10000, sleep_millisecs=0, run=1)
                ksmd_overhead._wait(lambda: ksmd_overhead._merged() == 0, 60, "the drain", 0.05)
                knobs.set(run=0)


def _measure(knobs, children: list[_Child], total: int, alive: int, step: int) -> dict:
    from ksmtrace.kernel import procfs

    port = _port()
    export = _Child(python_argv("ksmtrace", "export", "--listen", f"127.0.0.1:{port}"),
                    "ksmtrace export", stdin=False)
    children.append(export)
    twin = _Child([sys.executable, str(Path(__file__).resolve()), "--twin"], "the twin agent",
                  eof_ends=True)
    children.append(twin)
    deadline = time.monotonic() + 180
    while True:
        try:
            if b"ksmtrace_scan_rounds_total" in _scrape(port, 5.0):
                break
        except OSError:
            pass
        if export.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("ksmtrace export never served traced figures")
        time.sleep(0.1)
    if twin.line(180) != "ready":
        raise RuntimeError("the twin agent did not start")
    maps = _maps_of(export.proc.pid)
    if set(maps) != set(MAP_NAMES):
        raise RuntimeError(f"the exporter holds no maps named {MAP_NAMES}: {maps}")
    cow0 = procfs.read_ksm_vmstat().cow_ksm
    text0 = _scrape(port, 5.0).decode()
    merges0 = _metric(text0, "ksmtrace_merges_total", 'result="ok"') or 0
    samples = [_sample(0, 0.0, export, port, maps, twin)]
    _log(samples[0])
    churner = _Child([sys.executable, str(Path(__file__).resolve()), "--churner", str(total),
                      str(alive), str(step)], "the churner")
    children.append(churner)
    if churner.line(60) != "ready":
        raise RuntimeError("the churner did not start")
    knobs.set(**KNOBS)
    knobs.set(run=1)
    t0 = time.monotonic()
    churner.say("go")
    next_scrape = t0
    result = None
    while result is None:
        now = time.monotonic()
        if now >= next_scrape:  # a scrape a second, as Prometheus would
            _scrape(port, 5.0)
            next_scrape += 1.0
        if export.proc.poll() is not None:
            raise RuntimeError(f"ksmtrace export exited (status {export.proc.returncode})")
        assert churner.proc.stdout is not None
        if not select.select([churner.proc.stdout], [], [], max(0.0, next_scrape - now))[0]:
            continue
        line = churner.line(1)
        if line.startswith("started "):
            samples.append(_sample(int(line.split()[1]), time.monotonic() - t0, export, port,
                                   maps, twin))
            _log(samples[-1])
        else:
            result = json.loads(line)
    seconds = time.monotonic() - t0
    time.sleep(3.0)  # the last exits reach a tick, the exited mms are drained
    end = _sample(total, time.monotonic() - t0, export, port, maps, twin)
    _log(end)
    text1 = _scrape(port, 5.0).decode()
    return {"total": total, "alive": alive, "seconds": seconds, "samples": samples, "end": end,
            "statuses": result["statuses"], "maps": maps,
            "cow_ksm": procfs.read_ksm_vmstat().cow_ksm - cow0,
            "merges": (_metric(text1, "ksmtrace_merges_total", 'result="ok"') or 0) - merges0,
            "memory": int(Path("/proc/meminfo").read_text().split()[1])}


# ------------------------------------------------------------------ rows
def _at(samples: list[dict], started: int) -> dict:
    return min(samples, key=lambda s: abs(s["started"] - started))


def rows_from(r: dict) -> list[dict]:
    total, samples, end = r["total"], r["samples"], r["end"]
    ok = int(r["statuses"].get("0", 0))
    first = _at(samples, total // 10)
    base = _at(samples, total // 5)
    growth = end["rss"] - base["rss"]
    anon_growth = end["anon"] - base["anon"]
    n = {"1k": total // 10, "2k": total // 5}  # the labels of the full run: 1k, 2k of 10k
    curve = ", ".join(f"{s['started']:,}: {s['rss']:.1f}" for s in samples + [end])
    out = [
        row(f"churn: processes started, merged and exited (at most {r['alive']} alive)", total,
            "processes", None, None,
            f"{ok:,} merged all {PAGES} pages and broke one; exit statuses {r['statuses']} "
            f"(3: not merged in {MERGE_TIMEOUT_S:g} s); ksmd at {KNOBS}"),
        row("churn: processes per second", total / r["seconds"], "processes/s", None, None,
            f"{total:,} in {r['seconds']:.1f} s; each lived about {HOLD_S:g} s once merged"),
        row(f"agent RSS at {n['1k']:,} processes", first["rss"], "MiB", None, None,
            f"ksmtrace export (live BPF, default options) scraped every "
            f"second; anonymous "
            f"{first['anon']:.1f} MiB; before the churn {samples[0]['rss']:.1f} MiB"),
        row(f"agent RSS at {total:,} processes", end["rss"], "MiB", None, None,
            f"anonymous {end['anon']:.1f} MiB; RSS (MiB) by processes started: {curve}"),
        row(f"agent memory bounded: RSS growth from {n['2k']:,} to {total:,} processes",
            growth, "MiB", f"<= {TARGET_GROWTH_MIB:g} MiB", growth <= TARGET_GROWTH_MIB,
            f"anonymous RSS growth {anon_growth:+.2f} MiB"),
    ]
    for name, m in r["maps"].items():
        peak = max(s["entries"][name] for s in samples + [end])
        out.append(row(f"kernel map {name}: most entries during the churn", peak, "entries",
                       None, None,
                       f"{m['type']}, {m['max_entries']:,} entries at most, preallocated: "
                       f"{m['memlock'] / 2**20:.1f} MiB (memlock) whatever it holds; "
                       f"{end['entries'][name]} entries at the end"))
    tw0, tw1 = samples[0]["twin"], end["twin"]
    peaks = {k: max(s["twin"]["sizes"][k] for s in samples + [end]) for k in tw1["sizes"]}
    out.append(row("agent tables: largest per-pid/per-mm table at the end", max(
        tw1["sizes"].values()), "entries", None, None,
        "a twin live source + collector ticking every second (the exporter does not export "
        f"them): at the end {tw1['sizes']}, peaks {peaks}; twin RSS {tw0['VmRSS']:.1f} -> "
        f"{tw1['VmRSS']:.1f} MiB"))
    s0, s1 = samples[0], end
    out.append(row("scrape size before / after the churn", s1["series"], "series", None, None,
                   f"before: {s0['series']} series, {s0['scrape_bytes']:,} bytes; after: "
                   f"{s1['series']} series, {s1['scrape_bytes']:,} bytes; most during: "
                   f"{max(s['series'] for s in samples)} series; ksmtrace_processes "
                   f"{s1['processes']:g}, processes_other {s1['processes_other']:g} at the end"))
    expect = ok * PAGES
    out.append(row("merges traced by the exporter during the churn", r["merges"], "merges",
                   f"= {expect:,} (every page of every merged process once)",
                   r["merges"] == expect,
                   f"ksmtrace_merges_total delta; cow_ksm rose by {r['cow_ksm']:,} for "
                   f"{ok:,} one-page breaks"))
    return out


def run(quick: bool) -> list[dict]:
    return rows_from(measure(1000 if quick else 10000, ALIVE, 100 if quick else 1000))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--churner":
        sys.exit(churner_main(*map(int, sys.argv[2:])))
    if sys.argv[1:] == ["--twin"]:
        sys.exit(twin_main())
    from ksmtrace import signals

    signals.install()  # Ctrl-C and SIGTERM unwind: children end, knobs are put back
    for x in run(quick="--quick" in sys.argv):
        print(x)
