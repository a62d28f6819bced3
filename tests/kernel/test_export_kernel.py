"""`ksmtrace export` scraped by a real Prometheus (Debian's package) while
the workload generator makes KSM merge, break and waste pages.

Through Prometheus's HTTP API: every PromQL expression of the Grafana
dashboard and of the alert rules returns data; each alert condition is
evaluated with `bool` and must be true exactly when the test produced it;
the exporter's KSM figures equal sysfs while ksmd is frozen (run=0); its
event counters equal the kernel's own counts for the workload. Also: a live
scrape passes `promtool check metrics`, 100 concurrent scrapes succeed,
`--sysfs-only` works as user nobody, and the default bind is 127.0.0.1.
Prometheus and the exporter are ended on every path, failures included.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest

from ksmtrace.figures import SYSFS as SYSFS_FIGURES
from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import procfs, sysfs
from ksmtrace.spawn import reap
from ksmtrace.workload import Workload, WorkloadSpec, other_ksm_users

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "ksmtrace.json"
RULES = ROOT / "dashboards" / "ksmtrace-alerts.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
KSM_SYSFS = Path("/sys/kernel/mm/ksm")
RATE_WINDOW = "20s"  # what $__rate_interval stands for at a 1 s scrape interval

# Families a kernel may lack, each with how the test sees, without asking
# ksmtrace, that the running kernel cannot give it. An expression without
# data is excused only by such a witness; everything else must return data.
# Function probes (fentry/fexit, kprobe/kretprobe): metric -> (probe, function).
FN_ONLY = {
    "ksmtrace_merge_latency_seconds_bucket": ("merges", "try_to_merge_one_page"),
    "ksmtrace_cow_latency_seconds_bucket": ("cow_breaks", "do_wp_page"),
    "ksmtrace_unshare_latency_seconds_bucket": ("unshares", "break_ksm"),
    "ksmtrace_unshares_total": ("unshares", "break_ksm"),
}
# ksm:* tracepoints (6.1 has none): metric -> the tracepoint that fills it.
TRACEPOINT_ONLY = {
    "ksmtrace_scan_round_seconds_bucket": "ksm/ksm_stop_scan",
    "ksmtrace_scan_rounds_total": "ksm/ksm_stop_scan",
    "ksmtrace_ksm_pages_removed_total": "ksm/ksm_remove_ksm_page",
    "ksmtrace_rmap_items_removed_total": "ksm/ksm_remove_rmap_item",
}
# No panel shows ksmtrace_scan_batch_seconds: ksm_do_scan is inlined
# on 6.1, 6.12 and 6.18, so nothing can fill it on a kernel we support (see
# docs/metrics.md). ksmtrace_bpf_program_*: the exporters run with
# --bpf-stats, so the own-cost panel is held to returning data like the rest.


def why_absent(metric: str, facts, fn_allowed: bool) -> str | None:
    """The kernel's reason why `metric` can have no series here, seen
    independently of ksmtrace's plan, or None (then its absence is a defect).
    With `fn_allowed` False no function-probe family is ever excused."""
    if metric in FN_ONLY:
        if not fn_allowed:
            return None
        probe, fn = FN_ONLY[metric]
        forced = os.environ.get("KSMTRACE_ATTACH")
        if forced == "tracepoint":
            return f"{fn}: the tracepoint backend is forced (KSMTRACE_ATTACH)"
        if not facts.kprobe.ok and not facts.fentry.ok:
            return (f"{fn}: no kprobe ({facts.kprobe.detail}) and no fentry "
                    f"({facts.fentry.detail}) on this kernel")
        if not facts.kallsyms.get(fn, False):
            return f"{fn} is not in /proc/kallsyms (inlined)"
        return None
    if metric in TRACEPOINT_ONLY:
        ev = TRACEPOINT_ONLY[metric]
        if facts.tracefs and not (Path(facts.tracefs) / "events" / ev).is_dir():
            return f"no tracepoint {ev.replace('/', ':')} in {facts.tracefs}/events"
        return None
    for sm in SYSFS_FIGURES:
        if metric == sysfs_name(sm) and not (KSM_SYSFS / sm.name).exists():
            return f"no {KSM_SYSFS / sm.name} on this kernel"
    if metric == "ksmtrace_ksm_advisor_mode" and not (KSM_SYSFS / "advisor_mode").exists():
        return f"no {KSM_SYSFS / 'advisor_mode'} on this kernel"
    if metric in ("ksmtrace_process_profit_bytes", "ksmtrace_cgroup_profit_bytes",
                  "ksmtrace_workload_profit_bytes") and \
            "ksm_process_profit" not in Path("/proc/self/ksm_stat").read_text():
        return "no ksm_process_profit in /proc/<pid>/ksm_stat on this kernel"
    return None


# ---------------------------------------------------------------- pure helpers

def _split_top(expr: str, word: str) -> list[str]:
    """Split at `word` where it stands outside (), {}, [] and quotes."""
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif depth == 0 and re.match(rf"\s{word}\s", expr[i:]):
            parts.append(expr[start:i])
            i += len(word) + 1
            start = i
            continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def with_bool(expr: str) -> str:
    """An alert condition as 0/1 instead of a filter: each top-level
    comparison gets `bool` and `a and b` becomes `(a) * (b)`, so the result
    has a series (with its truth) whenever the metrics behind it exist."""
    out = []
    for part in _split_top(expr, "and"):
        res, depth, quote, i = "", 0, None, 0
        while i < len(part):
            c = part[i]
            if quote:
                if c == quote:
                    quote = None
                res += c
            elif c in "\"'":
                quote = c
                res += c
            elif c in "({[":
                depth += 1
                res += c
            elif c in ")}]":
                depth -= 1
                res += c
            elif depth == 0 and (m := re.match(r"(==|!=|>=|<=|>|<)", part[i:])):
                res += f"{m.group(1)} bool"
                i += len(m.group(1))
                continue
            else:
                res += c
            i += 1
        out.append(f"({res})")
    return " * ".join(out)


def test_with_bool_rewrites_conditions_only():
    assert with_bool('x{method!="none"} == 0') == '(x{method!="none"} == bool 0)'
    assert with_bool("a == 1\nand (b + c) > 0 and d >= e") == \
        "(a == bool 1) * ((b + c) > bool 0) * (d >= bool e)"
    assert with_bool("increase(c[5m]) > clamp_min(0.1 * (a > 0), 1)") == \
        "(increase(c[5m]) > bool clamp_min(0.1 * (a > 0), 1))"


def dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def rule_exprs() -> dict[str, str]:
    """alert name -> expr, read from the rules file (flow-style YAML scalars
    `expr: >-` folded like YAML does; no PyYAML needed)."""
    rules, name, lines = {}, None, RULES.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"\s*- alert: (\S+)", line):
            name = m.group(1)
        elif m := re.match(r"(\s*)expr: (.*)", line):
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest in (">-", ">", "|", "|-"):
                body = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or
                                          len(lines[i]) - len(lines[i].lstrip()) > indent):
                    body.append(lines[i].strip())
                    i += 1
                rest = " ".join(b for b in body if b)
                i -= 1
            rules[name] = rest
        i += 1
    return rules


def test_rules_are_read_like_promtool_reads_them():
    rules = rule_exprs()
    assert set(rules) == {"KsmCowBreakStorm", "KsmNegativeProfit", "KsmtraceProbesMissing",
                          "KsmtraceEventsLost", "KsmEnabledNothingMerging",
                          "KsmCrossTenantSharing", "KsmCowStormExposure"}
    assert rules["KsmNegativeProfit"] == "ksmtrace_ksm_general_profit_bytes < 0"
    assert rules["KsmEnabledNothingMerging"].count(" and ") == 2


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process and its waited-for children (clock ticks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15])


def wait_for(what: str, cond, timeout: float = 120, every: float = 0.2, pid: int | None = None):
    """Until `cond()` is true. With `pid`, `timeout` is how long that
    process may go without using any CPU: a loaded host slows its work (bcc
    compiling, BPF loading) but never stops it, so the deadline follows the
    work done instead of a guess."""
    deadline = time.monotonic() + timeout
    last, ticks = None, cpu_ticks(pid) if pid else None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except OSError:
            last = None  # not listening yet
        if last:
            return last
        time.sleep(every)
        if pid:
            now = cpu_ticks(pid)
            if now != ticks:
                ticks, deadline = now, time.monotonic() + timeout
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f" (process {pid} used no CPU meanwhile)" if pid else ""))


@contextlib.contextmanager
def exporter(*args: str, argv_prefix=None, env=None, cwd=None, listen: str | None = None):
    """`ksmtrace export` as a child process; yields (port, process). Ended
    with SIGTERM (then SIGKILL) on every path."""
    port = free_port() if listen is None else int(listen.rpartition(":")[2])
    argv = list(argv_prefix or [sys.executable, "-m", "ksmtrace"]) + ["export", *args]
    if listen is None:
        argv += ["--listen", f"127.0.0.1:{port}"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=cwd or ROOT)
    try:
        def ready():
            if p.poll() is not None:
                raise AssertionError(f"exporter exited {p.returncode}: {p.stderr.read()}")
            return b"ksmtrace_collector_cycles_total" in http_get(
                f"http://127.0.0.1:{port}/metrics", 5)
        wait_for("the exporter's first snapshot", ready, 60, pid=p.pid)
        yield port, p
    finally:
        reap(p, 60)


class Prometheus:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params) -> dict:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        d = json.loads(http_get(url))
        assert d["status"] == "success", d
        return d["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def has_data(self, expr: str, start: float, end: float) -> bool:
        """A finite value at some 1 s step of [start, end]."""
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step="1")
        assert data["resultType"] == "matrix", (expr, data)
        return any(math.isfinite(float(v)) for series in data["result"]
                   for _, v in series["values"])

    def value(self, expr: str) -> float:
        r = self.query(expr)
        assert len(r) == 1, (expr, r)
        return float(r[0]["value"][1])

    def alerts(self) -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in self.api("alerts")["alerts"]}


@contextlib.contextmanager
def prometheus(tmp: Path, target: str):
    """Debian's Prometheus on a free port, scraping `target` every second,
    with the alert rules loaded; killed on every path."""
    port = free_port()
    (tmp / "data").mkdir()
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n  - job_name: ksmtrace\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n")
    log = open(tmp / "prometheus.log", "w")
    p = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        prom = Prometheus(port)
        wait_for("Prometheus ready", lambda: http_get(f"{prom.base}/-/ready", 5), 60, pid=p.pid)
        wait_for("the first scrape", lambda: prom.query('up{job="ksmtrace"} == 1'), 120)
        yield prom
    finally:
        reap(p, 30)
        log.close()


def scraped_after(prom: Prometheus, t: float) -> None:
    """Wait until Prometheus holds a sample of a snapshot polled after `t`."""
    wait_for(f"a scraped snapshot newer than {t:.3f}", lambda: (
        r := prom.query("ksmtrace_last_snapshot_timestamp_seconds")) and
        float(r[0]["value"][1]) > t, 60)


def sysfs_name(m) -> str:
    return f"ksmtrace_{m.metric_name}" + ("_total" if m.kind == "counter" else "")


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bksmtrace_[a-z0-9_]+", expr))


def check_exprs(prom: Prometheus, exprs: list[tuple[str, str]], scrape: str, start: float,
                end: float, excuse) -> list[str]:
    """Each expression, evaluated over [start, end] the way a Grafana panel
    does (a range query, 1 s steps), has a finite value at some step (a
    histogram_quantile over buckets that never moved is NaN: no data). An
    expression without data is excused only when every ksmtrace metric in it
    is absent from `scrape` and `excuse(metric)` gives the kernel's reason.
    Returns the excused ones."""
    present = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines()
               if line and not line.startswith("#")}
    explained, empty = [], []
    for title, expr in exprs:
        q = expr.replace("$__rate_interval", RATE_WINDOW).replace("$instance", ".*")
        if prom.has_data(q, start, end):
            continue
        missing = {n for n in metric_names(q) if n not in present}
        why = {n: excuse(n) for n in sorted(missing)}
        if missing and all(why.values()):
            explained.append(f"{title}: {expr} ({'; '.join(why.values())})")
        else:
            empty.append(f"{title}: {q} (absent from the scrape, unexcused: "
                         f"{sorted(n for n, w in why.items() if not w)})")
    assert not empty, "expressions without data:\n" + "\n".join(empty)
    return explained


def per_pid_cow(prom: Prometheus) -> dict[str, float]:
    return {s["metric"]["pid"]: float(s["value"][1])
            for s in prom.query("ksmtrace_process_cow_breaks_total")}


def conditions(prom: Prometheus, excuse=lambda metric: None) -> dict[str, set[float]]:
    """Each alert's condition, evaluated as 0/1 per series now; a condition
    is left out only when `excuse` gives the kernel's reason for each of its
    metrics (e.g. no general_profit on 6.1)."""
    out = {}
    for name, expr in rule_exprs().items():
        r = prom.query(with_bool(expr))
        if not r and all(excuse(n) for n in metric_names(expr)):
            continue
        assert r, f"alert {name}: no data for {with_bool(expr)}"
        out[name] = {float(s["value"][1]) for s in r}
        assert out[name] <= {0.0, 1.0}, (name, out[name])
    return out


# ---------------------------------------------------------------- the tests

@pytest.mark.kernel
def test_real_prometheus_scrapes_the_exporter_during_a_workload(facts, quiet_ksm, tmp_path,
                                                             count_programs,
                                                             programs_back_to):
    programs_before = count_programs()
    with exporter("--interval", "0.5", "--top", "2", "--bpf-stats", "--sharing-interval", "2") \
            as (port, proc):
        base = sysfs.read_sysfs()  # ksmd stopped: stable since the exporter attached
        base_cow = procfs.read_ksm_vmstat().cow_ksm
        scrape0 = http_get(f"http://127.0.0.1:{port}/metrics").decode()
        assert "ksmtrace_traced 1.0" in scrape0, scrape0[:2000]
        with prometheus(tmp_path, f"127.0.0.1:{port}") as prom:
            start = time.time()
            spec = WorkloadSpec(processes=3, pages=2000, distinct=20, zero_pages=300,
                                use_zero_pages=True)
            with Workload(spec, drive_ksmd=True) as w:
                w.wait_merged()
                merged_at = time.time()
                e = w.expected()
                scraped_after(prom, merged_at)
                # every traced merge, by kind, equals the kernel's own counts
                m = w.measure()
                assert prom.value('ksmtrace_merges_total{kind="new_ksm_page",result="ok"}') \
                    == e.pages_shared == m.pages_shared > 0
                assert prom.value('ksmtrace_merges_total{kind="into_ksm_page",result="ok"}') \
                    == e.pages_sharing == m.pages_sharing
                assert prom.value('ksmtrace_merges_total{kind="zero_page",result="ok"}') \
                    == e.ksm_zero_pages == m.ksm_zero_pages == 900
                assert prom.value('sum(ksmtrace_merges_total{result="failed"})') == 0

                written = w.cow(0.25)  # a COW storm: 1,500 breaks of 6,000 merged pages
                w.wait_expected()
                assert sum(written.values()) == 1500
                time.sleep(3)  # a few scrapes with ksmd running again: rate windows fill

                scrape = http_get(f"http://127.0.0.1:{port}/metrics").decode()
                # the host's 6.18 has no kprobes and refuses fentry: only the
                # function-probe families may be absent, and only for that
                # reason (test_function_probe_panels_... proves them in the
                # tests/vm/ guests)
                explained = check_exprs(prom, dashboard_exprs(), scrape, start, time.time(),
                                        lambda n: why_absent(n, facts, fn_allowed=True))
                for line in explained:
                    warnings.warn(f"dashboard expression not observable here: {line}",
                                  stacklevel=1)
                cond = conditions(prom)
                assert cond["KsmCowBreakStorm"] == {1.0}
                assert cond["KsmNegativeProfit"] == {0.0}
                assert cond["KsmtraceProbesMissing"] == {0.0}
                assert cond["KsmtraceEventsLost"] == {0.0}
                assert cond["KsmEnabledNothingMerging"] == {0.0}
                wait_for("KsmCowBreakStorm pending", lambda: prom.alerts().get(
                    "KsmCowBreakStorm") in ("pending", "firing"), 30)

                # promtool lints a live scrape
                r = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape.encode(),
                                   capture_output=True, timeout=60)
                assert r.returncode == 0, r.stdout + r.stderr
                # 100 scrapes at once, all answered with a whole snapshot
                results: list = [None] * 100
                barrier = threading.Barrier(100)

                def scraper(i: int) -> None:
                    try:
                        barrier.wait(timeout=60)
                        results[i] = http_get(f"http://127.0.0.1:{port}/metrics", 60)
                    except BaseException as ex:  # noqa: BLE001 - asserted below
                        results[i] = ex

                threads = [threading.Thread(target=scraper, args=(i,)) for i in range(100)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=120)
                bad = [x for x in results if not isinstance(x, bytes)]
                assert not bad, bad[:3]
                assert all(x.startswith(b"# HELP ksmtrace_ksm_run ")
                           and b"\nksmtrace_collector_cycles_total " in x for x in results)

                # freeze ksmd: the exporter's figures must equal sysfs exactly
                with sysfs.KsmKnobs() as k:
                    k.set(run=0)
                    frozen = sysfs.read_sysfs()
                    cow_now = procfs.read_ksm_vmstat().cow_ksm
                    scraped_after(prom, time.time())
                    for sm in SYSFS_FIGURES:
                        v = getattr(frozen, sm.name)
                        assert v is not None, sm.name  # 6.18 has every file
                        got = prom.value(sysfs_name(sm))
                        assert got == pytest.approx(v / sm.divisor, rel=1e-12), sm.name
                    assert prom.value("ksmtrace_ksm_saved_bytes") == frozen.saved_pages * 4096
                    assert prom.value("ksmtrace_cow_ksm_total") == cow_now
                    assert prom.value(
                        f'ksmtrace_ksm_advisor_mode{{mode="{frozen.advisor_mode}"}}') == 1
                    # event counters: the kernel's counts for this workload
                    assert prom.value("ksmtrace_scan_rounds_total") == \
                        frozen.full_scans - base.full_scans > 0
                    breaks = cow_now - base_cow
                    assert breaks == sum(written.values())
                    assert prom.value("sum(ksmtrace_cow_breaks_total)") == breaks
                    assert prom.value("sum(ksmtrace_process_cow_breaks_total)") == breaks
                    # per process: the top 2 by name, the third as "other"
                    stats = {pid: procfs.read_ksm_stat(pid) for pid in w.pids}
                    series = prom.query("ksmtrace_process_merging_pages")
                    by_pid = {s["metric"]["pid"]: float(s["value"][1]) for s in series}
                    assert len(by_pid) == 3 and "other" in by_pid, by_pid
                    for pid, st in stats.items():
                        if str(pid) in by_pid:
                            assert by_pid[str(pid)] == st.ksm_merging_pages
                    assert sum(by_pid.values()) == sum(s.ksm_merging_pages for s in stats.values())
                    assert prom.value("ksmtrace_processes") == 3
                    assert prom.value("sum(ksmtrace_process_profit_bytes)") == \
                        sum(s.ksm_process_profit for s in stats.values())
                    assert sysfs.read_sysfs() == frozen  # nothing moved meanwhile

            # KSM that only costs: unique pages registered, nothing to merge
            spec = WorkloadSpec(processes=1, pages=0, unique_pages=20000)
            with Workload(spec, drive_ksmd=True) as w:
                w.wait_expected()
                pid = w.pids[0]
                wait_for("rmap items costing more than nothing saves", lambda: (
                    (sysfs.read_sysfs().general_profit or 0) <= -20000 * 64), 120)
                with sysfs.KsmKnobs() as k:
                    k.set(run=0)
                    frozen = sysfs.read_sysfs()
                    profit = procfs.read_ksm_stat(pid).ksm_process_profit
                    scraped_after(prom, time.time())
                    assert frozen.general_profit < 0 and profit < 0
                    assert prom.value("ksmtrace_ksm_general_profit_bytes") == frozen.general_profit
                    assert prom.value(f'ksmtrace_process_profit_bytes{{pid="{pid}"}}') == profit
                scraped_after(prom, time.time())  # ksmd running again
                cond = conditions(prom)
                assert cond["KsmNegativeProfit"] == {1.0}
                assert cond["KsmEnabledNothingMerging"] == {1.0}
                assert cond["KsmtraceProbesMissing"] == {0.0}
                assert cond["KsmtraceEventsLost"] == {0.0}
                states = wait_for("both alerts pending", lambda: (a := prom.alerts()) and all(
                    a.get(n) in ("pending", "firing")
                    for n in ("KsmNegativeProfit", "KsmEnabledNothingMerging")) and a, 30)
                assert "KsmNegativeProfit" in states

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        err = proc.stderr.read()
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err
    assert programs_back_to(programs_before)  # probes detached


@pytest.mark.kernel
@pytest.mark.vm
@pytest.mark.traced
@pytest.mark.fn_probes
def test_function_probe_panels_return_data_from_a_real_prometheus(facts, quiet_ksm, tmp_path,
                                                                 count_programs,
                                                                 programs_back_to):
    """Where fentry or kprobe work (the tests/vm/ guests' fentry and kprobe
    passes; the host has neither), the panels the host cannot fill are held
    to data: merge latency, COW-break latency, unshares. A workload merges,
    writes into a quarter of its merged pages (COW) and unmerges the rest
    (MADV_UNMERGEABLE: unshares); a real Prometheus scrapes the exporter
    throughout. Every dashboard and rule expression returns data over that
    time, excused only where the kernel lacks the source (6.1: no ksm:*
    tracepoints, no general_profit ...), never for a function-probe family;
    and the figures are the kernel's, exactly."""
    plan = caps.plan(facts, os.environ.get("KSMTRACE_ATTACH"))
    fn = {}
    for probe in ("merges", "cow_breaks", "unshares"):
        c = plan.get(probe)
        assert c.method in ("fentry", "kprobe") and not c.estimated, (
            f"{probe} is observed by {c.method or 'nothing'} here, not by fentry/kprobe: "
            "this test needs a kernel with kprobes or fentry (the tests/vm/ guests)")
        fn[probe] = c.method
    programs_before = count_programs()
    cow_pre = procfs.read_ksm_vmstat().cow_ksm  # before the exporter attached
    with exporter("--interval", "0.5", "--top", "2", "--bpf-stats", "--sharing-interval", "2") \
            as (port, proc):
        cow_base = procfs.read_ksm_vmstat().cow_ksm  # ksmd stopped, no other KSM user
        with prometheus(tmp_path, f"127.0.0.1:{port}") as prom:
            start = time.time()
            attached = {(s["metric"]["probe"], s["metric"]["method"])
                        for s in prom.query("ksmtrace_probe_attached == 1")}
            assert set(fn.items()) <= attached, (fn, attached)
            spec = WorkloadSpec(processes=2, pages=600, distinct=6)
            with Workload(spec, drive_ksmd=True) as w:
                m = w.wait_merged()
                merged = m.pages_shared + m.pages_sharing
                assert merged == sum(w.expected().merging_pages) == 1200
                scraped_after(prom, time.time())
                # the sharing map is read by a child every 2 s (several seconds
                # each under TCG): the two processes share frames until they
                # unmerge, so the panel's data must be in before that
                for _ in range(600):
                    if prom.query("ksmtrace_sharing_bytes"):
                        break
                    time.sleep(0.2)
                # every merge traced, each with its latency: == Δshared + Δsharing
                assert prom.value('sum(ksmtrace_merges_total{result="ok"})') == merged
                assert prom.value('sum(ksmtrace_merges_total{result="failed"})') == 0
                assert prom.value("ksmtrace_merge_latency_seconds_count") == merged

                # user writes: one COW break each, per process, == Δcow_ksm
                cow0 = procfs.read_ksm_vmstat().cow_ksm
                written = w.cow(0.25)
                writes = procfs.read_ksm_vmstat().cow_ksm - cow0
                assert writes == sum(written.values()) == 300
                w.wait_expected()
                scraped_after(prom, time.time())
                assert prom.value("sum(ksmtrace_cow_breaks_total)") == \
                    procfs.read_ksm_vmstat().cow_ksm - cow_base == writes, (
                    "cow_ksm before the exporter started", cow_pre, "after", cow_base,
                    "traced", prom.query("ksmtrace_cow_breaks_total"),
                    "per process", prom.query("ksmtrace_process_cow_breaks_total"),
                    "workers", w.pids, written,
                    "KSM users (this process included)", os.getpid(),
                    [(u.pid, u.comm, u.rmap_items, u.merging_pages)
                     for u in other_ksm_users(exclude=())] + [procfs.read_ksm_stat(os.getpid())])
                assert per_pid_cow(prom) == {str(pid): n for pid, n in written.items()}, (
                    "traced", prom.query("ksmtrace_cow_breaks_total"),
                    "cow_ksm since the exporter started",
                    procfs.read_ksm_vmstat().cow_ksm - cow_base,
                    "processes", prom.query('{__name__=~"ksmtrace_process.*"}'),
                    "sysfs", sysfs.read_sysfs())
                still = {pid: procfs.read_ksm_stat(pid).ksm_merging_pages for pid in w.pids}
                merging = sum(still.values())
                assert merging == sum(w.expected().merging_pages) == merged - writes

                # unmerge (MADV_UNMERGEABLE): break_ksm for every registered
                # address, one unshare fault per page still merged
                cow1 = procfs.read_ksm_vmstat().cow_ksm
                w.unmerge()
                unshared = procfs.read_ksm_vmstat().cow_ksm - cow1
                assert unshared == merging
                w.wait_expected()
                scraped_after(prom, time.time())
                assert procfs.read_ksm_vmstat().cow_ksm - cow_base == writes + unshared

                def v(expr: str) -> float:
                    return prom.value(expr)

                got = {
                    "merges": v('sum(ksmtrace_merges_total{result="ok"})'),
                    "merge latencies": v("ksmtrace_merge_latency_seconds_count"),
                    "cow writes": v('ksmtrace_cow_breaks_total{kind="write",estimated="false"}'),
                    "cow unshares": v('ksmtrace_cow_breaks_total'
                                      '{kind="unshare",estimated="false"}'),
                    "cow latencies": v("ksmtrace_cow_latency_seconds_count"),
                    "cow_ksm": v("ksmtrace_cow_ksm_total") - cow_base,
                    "per process": per_pid_cow(prom),
                    "unshares": v("ksmtrace_unshares_total"),
                    "unshare latencies": v("ksmtrace_unshare_latency_seconds_count"),
                }
                want = {
                    "merges": merged,
                    "merge latencies": merged,
                    "cow writes": writes,
                    "cow unshares": unshared,
                    "cow latencies": writes + unshared,
                    "cow_ksm": writes + unshared,
                    # unmerged, the processes have left KSM: like exited ones,
                    # their counters (writes, then their pages still merged,
                    # unshared) went into "other"
                    "per process": {"other": sum(written[pid] + still[pid] for pid in w.pids)},
                    "unshares": spec.processes * spec.region_pages,
                    "unshare latencies": spec.processes * spec.region_pages,
                }
                assert got == want

                scrape = http_get(f"http://127.0.0.1:{port}/metrics").decode()
                end = time.time()

                def excuse(n: str) -> str | None:
                    return why_absent(n, facts, fn_allowed=False)

                explained = check_exprs(prom, dashboard_exprs(), scrape, start, end, excuse)
                explained += check_exprs(prom, [(a, with_bool(e)) for a, e in
                                                rule_exprs().items()], scrape, start, end, excuse)
                assert not any(n in x for x in explained for n in FN_ONLY), explained
                for line in explained:
                    warnings.warn(f"not observable on this kernel: {line}", stacklevel=1)
                cond = conditions(prom, excuse)
                assert cond["KsmtraceProbesMissing"] == {0.0}
                assert cond["KsmtraceEventsLost"] == {0.0}

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        err = proc.stderr.read()
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err
    assert programs_back_to(programs_before)


@pytest.mark.kernel
def test_sysfs_only_as_nobody_on_the_default_localhost_bind(quiet_ksm, as_nobody):
    """Unprivileged, no --listen: it serves sysfs figures on 127.0.0.1:9949
    and on no other address."""
    import importlib

    argv, env, dest = as_nobody
    # Debian's python3 has none of the exporter's PyPI dependencies: give
    # nobody the venv's copies
    for name in ("prometheus_client", "waitress", "msgspec"):
        pkg = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(pkg, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        for p in [dest / name, *(dest / name).rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    with Workload(WorkloadSpec(processes=2, pages=500, distinct=5)) as w:
        w.wait_merged()
        with sysfs.KsmKnobs() as k:
            k.set(run=0)
            frozen = sysfs.read_sysfs()
            with exporter("--sysfs-only", "--interval", "0.2", argv_prefix=argv, env=env,
                          cwd=dest, listen="127.0.0.1:9949") as (port, proc):
                text = http_get(f"http://127.0.0.1:{port}/metrics").decode()
                listening = _listeners(port)
                assert listening == {"127.0.0.1"}, listening
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
                err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "serving http://127.0.0.1:9949/metrics" in err
    assert "source: sysfs-only" in err
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#") and "{" not in line}
    assert values["ksmtrace_traced"] == 0
    for sm in SYSFS_FIGURES:
        assert values[sysfs_name(sm)] == pytest.approx(getattr(frozen, sm.name) / sm.divisor)
    assert values["ksmtrace_ksm_pages_sharing"] == frozen.pages_sharing > 0
    assert "ksmtrace_merges_total" not in text and "ksmtrace_events_lost" not in text
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _listeners(port: int) -> set[str]:
    """Local addresses listening on `port` (from /proc/net/tcp and tcp6)."""
    out = set()
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(path).read_text().splitlines()[1:]:
            f = line.split()
            addr, p = f[1].split(":")
            if int(p, 16) != port or f[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            if v6:
                out.add(socket.inet_ntop(socket.AF_INET6, b"".join(
                    raw[i:i + 4][::-1] for i in range(0, 16, 4))))
            else:
                out.add(socket.inet_ntoa(raw[::-1]))
    return out

