"""What tracing costs ksmd: time and ksmd CPU to merge 200,000 duplicate
pages (4 processes x 50,000 pages of 1,000 distinct contents; quick: 10,000
pages), pages_to_scan=100000, sleep_millisecs=0, as KERNEL-NOTES.md measured.

Modes, taking turns within each repetition (the order rotates):
- untraced: nothing attached;
- ksmtrace default: `LiveSource(stream=False)` (in-kernel aggregation only)
  with a collector ticking every 0.5 s, in its own process, as `ksmtrace
  stat` runs;
- ksmtrace stream: the same with the per-event ring buffer on, drained by
  that process;
- bpftrace: `tracepoint:ksm:* { @[probe] = count(); }`, the minimal
  count-only program on the same ksm tracepoints;
- ksmtrace default with the kernel's BPF stats on (`--bpf-stats`): what
  ksmtrace's measuring of its own cost (two clock reads per program run)
  costs ksmd, and its programs' run time per merge event;
- bpftrace with the kernel's BPF stats on: the same count-only program,
  with the bench holding a bpf(BPF_ENABLE_STATS) fd from before the settle
  until ksmd stops (the sysctl kernel.bpf_stats_enabled, restored, on
  kernels without that command); its programs' run time and runs over the
  burst, read from /proc/<bpftrace>/fdinfo: the floor of what a BPF program
  on these tracepoints costs per merge event. The plain bpftrace mode runs
  without stats, so its ratio carries none of their cost;
- ksmtrace --sysfs-only: the same process and collector polling the
  kernel's counters, no BPF: what the user-space side alone costs ksmd.

Each tracer is started before the burst and left 1 s to settle (the same
pause is taken untraced).

One workload is filled once; each burst starts from nothing merged (run=2
unmerges everything, synchronously), the tracer is attached and ready, then
run=1 starts ksmd and the clock; the burst ends when pages_shared +
pages_sharing (sysfs, polled every millisecond) reach the expected 200,000.
ksmd's CPU is utime+stime of /proc/<ksmd>/stat over the same span. The
figures are medians per mode and their ratios to untraced.

The ratios are per repetition (each traced burst against the untraced
burst of the same repetition: an interleaved pair), then their median over
the repetitions (21 in a full run: 9 could not tell 1.02 from 1.04 on
the CI host); the default mode's target is the issue's
(#15): at most 1.02x untraced, and below bpftrace's count-only ratio in the
same run.

Also from the same bursts: lost events per mode (the kernel's own count of
failed ring-buffer writes; the stream must carry every merge), ksmtrace's
own BPF cost per program (kernel BPF stats, which ksmtrace turns on while it
runs) divided by ksmd's CPU time, and the BPF run time per merge event
(run_time_ns of the programs on ksm tracepoints / runs of the merge
tracepoints' programs) of ksmtrace beside bpftrace's.

Holds /run/lock/ksmtrace-kernel-tests.lock for its whole run (KSM is
global), refuses to run while other processes use KSM, restores every KSM
knob it or the workload changed, on every exit path, and leaves run=0.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from bench.common import ROOT, median, median_interval, row, spread
except ImportError:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import ROOT, median, median_interval, row, spread

LOCK_PATH = "/run/lock/ksmtrace-kernel-tests.lock"
LOCK_HELD = False  # True when the caller holds the lock already (the pytest kernel tier)
MODES = ("untraced", "default", "stream", "bpftrace", "stats", "bpftrace-stats", "sysfs")
SETTLE_S = 1.0  # after a tracer is ready, before the burst: start-up transients pass
TARGET_RATIO = 1.02  # issue #15
BPFTRACE_PROG = 'BEGIN { printf("ready\\n"); } tracepoint:ksm:* { @[probe] = count(); }'
KSM = Path("/sys/kernel/mm/ksm")
MERGE_TPS = ("ksm_merge_with_ksm_page", "ksm_merge_one_page")
TICK_S = 0.5


# ------------------------------------------------------------------ tracers
def tracer_main(mode: str, facts_path: str) -> int:
    """Child process: run ksmtrace's live source + collector until stdin
    closes; print "ready", then a JSON report at the end."""
    from ksmtrace.collector import observe
    from ksmtrace.kernel import capabilities as caps
    from ksmtrace.sources.counters import SysfsSource
    from ksmtrace.sources.live import LiveSource

    facts = caps.Facts.from_dict(json.loads(Path(facts_path).read_text()))
    plan = caps.plan(facts, os.environ.get("KSMTRACE_ATTACH"))
    src = (SysfsSource() if mode == "sysfs" else
           LiveSource(facts, plan, stream=(mode == "stream"), bpf_stats=(mode == "stats")))
    with observe(src) as obs:
        col = obs.collector
        snap = obs.sample()
        wait = getattr(src, "poll", time.sleep)  # the sysfs-only source has no stream
        print("ready", flush=True)
        events = 0
        stop = False
        next_t = time.monotonic() + TICK_S
        while not stop:
            while (left := next_t - time.monotonic()) > 0:
                if select.select([sys.stdin], [], [], 0)[0]:
                    stop = True
                    break
                wait(min(left, 0.05))
            next_t += TICK_S
            tick = src.tick()
            events += len(tick.events) // 72
            snap = col.add_tick(tick)
        report = {
            "stats": getattr(getattr(src, "stats", None), "how", None),
            "programs": [[p.name, p.run_time_ns, p.run_count] for p in snap.programs],
            "events_received": events,
            "events_sent": snap.totals.get("events_sent", 0),
            "events_lost": snap.lost_events,
            "merges": snap.totals.get("merges", 0),
        }
    print(json.dumps(report), flush=True)
    return 0


class Tracer:
    """One tracing mode attached for one burst (a child process)."""

    def __init__(self, mode: str, facts_path: str):
        self.mode = mode
        self.proc: subprocess.Popen | None = None
        if mode in ("default", "stream", "stats", "sysfs"):
            argv = [sys.executable, str(Path(__file__).resolve()), "--tracer", mode, facts_path]
        elif mode in ("bpftrace", "bpftrace-stats"):
            argv = ["bpftrace", "-B", "line", "-e", BPFTRACE_PROG]
        else:
            return
        # bpftrace warns on stderr that it cannot raise RLIMIT_MEMLOCK (no
        # CAP_SYS_RESOURCE here; harmless, BPF memory is memcg-accounted)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL if argv[0] == "bpftrace" else None,
                                     text=True, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 180
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{mode} tracer exited before it was ready "
                                   f"(status {self.proc.wait()})")
            if line.strip() == "ready":
                break
        else:
            self.kill()
            raise RuntimeError(f"{mode} tracer not ready in 180 s")

    def cpu_ticks(self) -> int:
        from ksmtrace.kernel import procfs

        return (procfs.read_cpu_ticks(self.proc.pid) or 0) if self.proc else 0

    def programs(self) -> dict[int, tuple[int, int]]:
        """bpftrace's programs on tracepoints (all on ksm:*; its BEGIN
        program is a uprobe): prog id -> (run_time_ns, run_cnt) from
        /proc/<bpftrace>/fdinfo, the figures `bpftool prog show` prints."""
        from ksmtrace.sources.bpfstats import read_fdinfo
        from ksmtrace.sources.bpfsys import PROG_TRACEPOINT

        assert self.proc is not None
        pid = str(self.proc.pid)
        out = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                    continue
                info = read_fdinfo(int(fd), pid)
            except OSError:
                continue  # closed meanwhile
            if info.get("prog_type") == PROG_TRACEPOINT and "prog_id" in info:
                out[info["prog_id"]] = (info.get("run_time_ns", 0), info.get("run_cnt", 0))
        return out

    def tracepoints(self) -> dict[int, str]:
        """prog id -> the tracepoint it runs on, from `bpftool perf show`
        (empty without bpftool: the programs are then named by id)."""
        assert self.proc is not None
        try:
            out = subprocess.run(["bpftool", "-j", "perf", "show"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
            return {x["prog_id"]: x["tracepoint"] for x in json.loads(out)
                    if x.get("pid") == self.proc.pid and "tracepoint" in x}
        except (OSError, subprocess.SubprocessError, ValueError, KeyError):
            return {}

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        p = self.proc  # kept until it has ended: on a timeout, kill() still ends it
        if self.mode in ("bpftrace", "bpftrace-stats"):
            p.send_signal(signal.SIGINT)
            out, _ = p.communicate(timeout=60)
            self.proc = None
            counts = {}
            for line in out.splitlines():
                if line.startswith("@[") and "]:" in line:
                    k, _, v = line[2:].partition("]:")
                    counts[k.split(":")[-1]] = int(v)
            return {"merges": counts.get("ksm_merge_with_ksm_page", 0), "counts": counts}
        assert p.stdin is not None and p.stdout is not None
        p.stdin.close()
        out = p.stdout.read()
        status = p.wait(timeout=60)
        self.proc = None
        if status != 0:
            raise RuntimeError(f"{self.mode} tracer failed (status {p.returncode})")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


# ------------------------------------------------------------------ bursts
def _merged() -> int:
    return (int((KSM / "pages_shared").read_text())
            + int((KSM / "pages_sharing").read_text()))


def _run_ns(pid: int) -> int | None:
    """Time on CPU in ns (/proc/<pid>/schedstat, CONFIG_SCHED_INFO): the
    same figure as utime+stime, without its 10 ms granularity."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait(cond, timeout: float, what: str, step: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def burst(knobs, ksmd: int, mode: str, facts_path: str, pages: int) -> dict:
    """Unmerge everything, attach `mode`, merge `pages` pages: seconds, ksmd
    CPU seconds, the tracer's report."""
    from ksmtrace.kernel import procfs
    from ksmtrace.sources.bpfstats import BpfStats

    knobs.set(run=2)  # unmerges synchronously, untraced
    _wait(lambda: _merged() == 0, 60, "the unmerge")
    knobs.set(run=0)
    tracer = Tracer(mode, facts_path)
    stats = BpfStats()  # on for bpftrace-stats only, from the settle until ksmd stops
    try:
        if mode == "bpftrace-stats":
            if stats.open().how is None:
                raise RuntimeError(f"cannot turn the kernel's BPF stats on: {stats.error}")
            p0 = tracer.programs()
        time.sleep(SETTLE_S)
        hz = os.sysconf("SC_CLK_TCK")
        c0, n0, tc0 = procfs.read_cpu_ticks(ksmd), _run_ns(ksmd), tracer.cpu_ticks()
        t0 = time.monotonic()
        knobs.set(sleep_millisecs=0, run=1)
        _wait(lambda: _merged() >= pages, 120, f"{pages} merged pages")
        t1 = time.monotonic()
        c1, n1, tc1 = procfs.read_cpu_ticks(ksmd), _run_ns(ksmd), tracer.cpu_ticks()
        # tracers detach between bursts, and on 6.18 a detach waits for an
        # RCU Tasks grace period that a ksmd at sleep_millisecs=0 was seen to
        # hold off: between bursts ksmd is at 1 ms
        knobs.set(run=0, sleep_millisecs=1)
        extra = {}
        if mode == "bpftrace-stats":
            p1 = tracer.programs()
            stats.close()
            names = tracer.tracepoints()
            extra = {"stats": stats.how, "programs": [
                [f"ksm:{names.get(i, f'prog {i}')}", ns - p0.get(i, (0, 0))[0],
                 n - p0.get(i, (0, 0))[1]] for i, (ns, n) in sorted(p1.items())]}
        report = {**tracer.stop(), **extra}
    finally:
        stats.close()  # stats off again on every path (a closed fd, or the sysctl put back)
        tracer.kill()
    return {"mode": mode, "pages": pages, "seconds": t1 - t0,
            "ksmd_cpu": ((c1 or 0) - (c0 or 0)) / hz,
            "ksmd_run_s": (n1 - n0) / 1e9 if n0 is not None and n1 is not None else None,
            "tracer_cpu": (tc1 - tc0) / hz, **report}


@contextlib.contextmanager
def kernel_lock():
    if LOCK_HELD:
        yield
        return
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    with open(LOCK_PATH, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def measure(quick: bool, reps: int | None = None, modes: tuple[str, ...] = MODES) -> list[dict]:
    from ksmtrace.kernel import capabilities as caps
    from ksmtrace.kernel import procfs, sysfs
    from ksmtrace.workload import Workload, WorkloadSpec, other_ksm_users

    if os.geteuid() != 0:
        raise RuntimeError("the ksmd benchmark needs root (KSM knobs, BPF)")
    spec = (WorkloadSpec(processes=2, pages=5000, distinct=100) if quick
            else WorkloadSpec(processes=4, pages=50000, distinct=1000))
    pages = spec.processes * spec.pages
    reps = reps or (2 if quick else 21)
    with kernel_lock():
        if sysfs.read_knob("run") != 0:
            raise RuntimeError("ksmd is running: another KSM user is active")
        if others := other_ksm_users():
            raise RuntimeError(f"other processes use KSM: {', '.join(map(str, others))}")
        ksmd = procfs.find_ksmd()
        facts = caps.probe_host()
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="ksmtrace-facts-") as ff:
            json.dump(facts.as_dict(), ff)
            ff.flush()
            results: list[dict] = []
            with sysfs.KsmKnobs() as knobs:
                # save run's and sleep_millisecs's values now: the workload
                # changes both before our first burst, and restore must put
                # back what was there before, not that
                knobs.set(run=0, sleep_millisecs=sysfs.read_knob("sleep_millisecs"))
                try:
                    with Workload(spec, drive_ksmd=True, pages_to_scan=100000) as w:
                        try:
                            w.wait_merged()  # warm-up merge, not measured
                            for r in range(reps):
                                k = r % len(modes)
                                for mode in modes[k:] + modes[:k]:
                                    results.append(burst(knobs, ksmd, mode, ff.name, pages))
                                    print(f"bench: ksmd: rep {r + 1}/{reps} {mode:9} "
                                          f"{results[-1]['seconds']:.3f} s", file=sys.stderr)
                        finally:
                            # on every path, while the children live: leave nothing
                            # merged (exited processes' pages would stay counted
                            # until ksmd next runs, spoiling the next user's deltas)
                            knobs.set(run=2)
                            _wait(lambda: _merged() == 0, 60, "the final unmerge")
                finally:
                    knobs.set(run=0)
    return results


def rows_from(results: list[dict]) -> list[dict]:
    pages = results[0]["pages"]
    by = {m: [r for r in results if r["mode"] == m] for m in MODES}
    by = {m: v for m, v in by.items() if v}
    t = {m: median([r["seconds"] for r in v]) for m, v in by.items()}
    cpu = {m: median([r["ksmd_cpu"] for r in v]) for m, v in by.items()}
    # ratios per repetition (each traced burst against the untraced one of
    # the same repetition), then their median: robust to drifting load
    reps = len(by.get("untraced", []))

    def ratios(mode: str, key: str) -> list[float]:
        u, m = by["untraced"], by[mode]
        return [m[i][key] / u[i][key] for i in range(min(reps, len(m))) if u[i][key] > 0]

    names = {"untraced": "untraced", "default": "ksmtrace default",
             "stream": "ksmtrace + event stream", "bpftrace": "bpftrace count-only",
             "stats": "ksmtrace default + --bpf-stats",
             "bpftrace-stats": "bpftrace count-only + BPF stats",
             "sysfs": "ksmtrace --sysfs-only (no BPF)"}
    out = []
    for m in by:
        xs = [r["seconds"] for r in by[m]]
        tc = median([r["tracer_cpu"] for r in by[m]])
        out.append(row(f"merge {pages // 1000}k pages: {names[m]}", t[m], "s", None, None,
                       f"median, {spread(xs, '{:.3f}')}; ksmd CPU median {cpu[m]:.2f} s"
                       + (f"; the tracer process's own CPU {tc:.2f} s per burst"
                          if m != "untraced" else "")))
    brs = ratios("bpftrace", "seconds") if "bpftrace" in by and "untraced" in by else []
    bt = median(brs) if brs else None
    for m in ("default", "stream", "bpftrace", "stats", "bpftrace-stats", "sysfs"):
        if m not in by or "untraced" not in by:
            continue
        rs = ratios(m, "seconds")
        v = median(rs)
        target, met = None, None
        lo, hi = median_interval(rs)
        note = (f"median of {len(rs)} interleaved pairs (each burst / the untraced burst of "
                f"the same repetition), {spread(rs, '{:.3f}')}, 90 % bootstrap interval of "
                f"the median {lo:.3f}..{hi:.3f}; ratio of the medians {t[m] / t['untraced']:.3f}")
        if m == "default":
            target = f"<= {TARGET_RATIO:g}x and < bpftrace"
            met = v <= TARGET_RATIO and (bt is None or v < bt)
            note += (f"; target (issue #15) <= {TARGET_RATIO:g}x untraced and below bpftrace "
                     f"count-only in the same run: {'met' if met else 'NOT met'}; "
                     + (f"bpftrace count-only in this run: median {bt:.3f}, "
                        f"{spread(brs, '{:.3f}')}" if bt is not None
                        else "bpftrace count-only not measured in this run"))
        out.append(row(f"merge time ratio to untraced: {names[m]}", v, "x", target, met, note))
        cs = ratios(m, "ksmd_cpu")
        note = f"utime+stime of /proc/<ksmd>/stat (10 ms ticks), {spread(cs, '{:.3f}')}"
        if all(r.get("ksmd_run_s") for r in by[m] + by["untraced"]):
            ns = ratios(m, "ksmd_run_s")
            note += (f"; from /proc/<ksmd>/schedstat (ns): median {median(ns):.3f}, "
                     f"{spread(ns, '{:.3f}')}")
        out.append(row(f"ksmd CPU ratio to untraced: {names[m]}", median(cs), "x", None, None,
                       note))
    for m in ("default", "stream"):
        if m not in by:
            continue
        lost = max(r["events_lost"] for r in by[m])
        sent = [r["events_received"] for r in by[m]]
        merges = [r["merges"] for r in by[m]]
        if m == "stream":
            ok = lost == 0 and all(s >= n for s, n in zip(sent, merges, strict=True))
            out.append(row(f"lost events during the burst: {names[m]}", lost, "events",
                           "0", ok, f"worst burst; events received per burst "
                           f"{min(sent):,}..{max(sent):,}, merges traced {min(merges):,}.."
                           f"{max(merges):,}; ring buffer drained by a Python callback per "
                           f"event, drainer CPU median "
                           f"{median([r['tracer_cpu'] for r in by[m]]):.2f} s per burst"))
        else:
            out.append(row(f"lost events during the burst: {names[m]}", lost, "events", None,
                           None, "no stream in default mode: in-kernel counters only; "
                           f"merges traced {min(merges):,}..{max(merges):,}"))
    if "bpftrace" in by:
        out.append(row("lost events during the burst: bpftrace count-only", 0, "events", None,
                       None, "no stream (map counts only); ksm_merge_with_ksm_page counted "
                       + ", ".join(str(r['merges']) for r in by["bpftrace"])))
    # the run-time statistics are on only in these modes
    def desc(items) -> str:
        return "; ".join(f"{name}: {sum(n for _, n in v):,} runs, "
                         f"{sum(ns for ns, _ in v) / max(1, sum(n for _, n in v)):.0f} ns/run"
                         for name, v in sorted(items, key=lambda kv: -sum(x for x, _ in kv[1]))
                         if sum(n for _, n in v))

    per_merge: dict[str, float] = {}
    for m, who in (("stats", "ksmtrace"), ("bpftrace-stats", "bpftrace")):
        if m not in by:
            continue
        per: dict[str, list[tuple[int, int]]] = {}
        for r in by[m]:
            for name, ns, n in r["programs"]:
                per.setdefault(name, []).append((ns, n))
        ksmd_cpu = sum(r.get("ksmd_run_s") or r["ksmd_cpu"] for r in by[m])
        # programs on ksm tracepoints run in ksmd (and in registering tasks);
        # the others (page faults, mmap locks) run system-wide, in whoever faults
        ksm = [(k, v) for k, v in per.items() if k.startswith(("ksm:", "raw:"))]
        other = [(k, v) for k, v in per.items() if not k.startswith(("ksm:", "raw:"))]
        ksm_ns = sum(ns for _, v in ksm for ns, _ in v)
        share = 100 * ksm_ns / 1e9 / ksmd_cpu if ksmd_cpu else float("nan")
        span = ("attach to detach" if m == "stats"
                else "stats on from before the settle until ksmd stopped")
        out.append(row(f"{who} BPF run time in ksmd / ksmd CPU: {names[m]}", share, "%",
                       None, None,
                       f"kernel BPF stats of the programs on ksm tracepoints, summed over the "
                       f"bursts ({span}) / ksmd's CPU (schedstat) in them: {desc(ksm)}. "
                       f"System-wide programs meanwhile: {desc(other) or 'none ran'}"))
        # a merge event: one run of a merge tracepoint's program (a merge
        # attempt, ksm_merge_with_ksm_page or, zero pages, ksm_merge_one_page)
        merge_runs = sum(n for k, v in ksm if k.endswith(MERGE_TPS) for _, n in v)
        merge_ns = sum(ns for k, v in ksm if k.endswith(MERGE_TPS) for ns, _ in v)
        if not merge_runs:
            continue
        per_merge[m] = ksm_ns / merge_runs
        merges = [r["merges"] for r in by[m]]
        out.append(row(f"BPF run time per merge event: {names[m]}", per_merge[m], "ns", None,
                       None,
                       f"run_time_ns of every program on ksm tracepoints / runs of the merge "
                       f"tracepoints' programs ({merge_runs:,} over {len(by[m])} bursts; "
                       f"merges traced per burst {min(merges):,}..{max(merges):,}); the merge "
                       f"program alone {merge_ns / merge_runs:.0f} ns per run; kernel BPF "
                       f"stats ({by[m][0].get('stats')}), their own clock reads included"
                       + ("; the floor: the minimal count-only program on the same "
                          "tracepoints (perf-event tracepoints: the trace record they build "
                          "before the program runs is not in its run time)"
                          if m == "bpftrace-stats" else "")))
    if len(per_merge) == 2:
        k, b = per_merge["stats"], per_merge["bpftrace-stats"]
        out.append(row("BPF run time per merge event: ksmtrace / bpftrace count-only (floor)",
                       k / b, "x", None, None,
                       f"{k:.0f} ns against {b:.0f} ns per merge event, the same bursts' "
                       f"kernel BPF stats read the same way"))
    return out


def run(quick: bool) -> list[dict]:
    return rows_from(measure(quick))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        description="What tracing costs ksmd: interleaved merge bursts, untraced and traced.",
        epilog="examples:\n"
               "  python bench/ksmd_overhead.py                  every mode, 21 repetitions\n"
               "  python bench/ksmd_overhead.py --reps 9 --modes untraced,default,bpftrace,sysfs\n"
               "                                                 the #15 target, quicker",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10,000 pages, 2 repetitions")
    p.add_argument("--reps", type=int, help="repetitions (default 21; quick 2)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated, from {', '.join(MODES)} (untraced is always run)")
    p.add_argument("--json", metavar="FILE", help="also write each burst's figures here")
    a = p.parse_args(argv)
    modes = tuple(dict.fromkeys(["untraced", *a.modes.split(",")]))
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode(s): {', '.join(bad)}")
    if a.reps is not None and not 1 <= a.reps <= 200:
        p.error("--reps: 1 to 200")
    results = measure(a.quick, a.reps, modes)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    for x in rows_from(results):
        print(x)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--tracer":
        sys.exit(tracer_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
