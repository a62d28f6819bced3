"""The exporter's metric families, registry, HTTP endpoint and command, on
snapshots replayed from the real 6.18 recording (and the real 6.1 sysfs
fixture for a kernel that lacks the newer files). No kernel, no root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ksmtrace.collector import Collector
from ksmtrace.export import metrics
from ksmtrace.export.collector import make_registry, scrape
from ksmtrace.export.server import MetricsServer, parse_listen
from ksmtrace.figures import MERGE_KINDS, SYSFS
from ksmtrace.grouping import workload_of
from ksmtrace.kernel import sysfs
from ksmtrace.kernel.identity import Workload
from ksmtrace.model import PAGE_SIZE
from ksmtrace.sources.replay import ReplaySource

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "tests" / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"
HOST_61 = ROOT / "tests" / "fixtures" / "host-6.1"
DASHBOARDS = ROOT / "dashboards"
PROMTOOL = shutil.which("promtool")


def replay_snapshots(bpf: bool = True):
    src = ReplaySource(RECORDING, warn=None)
    with src:
        kind = src.kind if bpf else "sysfs-only"
        col = Collector(kind, src.probes if bpf else (), src.notes,
                        src.cow_estimated if bpf else False)
        return [col.add_tick(t if bpf else dataclasses.replace(t, bpf=None, events=b""))
                for t in src.ticks()]


@pytest.fixture(scope="module")
def snaps():
    return replay_snapshots()


def registry_for(snap, top=metrics.DEFAULT_TOP):
    reg, col = make_registry(top)
    col.publish(snap)
    return reg


# the fixture's processes share the root cgroup, each its own workload
ROOT_CG = {"cgroup": "/", "workload": "(several)", "workload_kind": "process"}
OTHER_CG = dict.fromkeys(ROOT_CG, "other")


def value(reg, name, **labels):
    return reg.get_sample_value(name, labels)


def test_every_sysfs_file_is_exported_with_its_kernel_value(snaps):
    for snap in snaps:
        reg = registry_for(snap)
        for m in SYSFS:
            v = getattr(snap.ksm, m.name)
            name = f"ksmtrace_{m.metric_name}" + ("_total" if m.kind == "counter" else "")
            assert value(reg, name) == pytest.approx(v / m.divisor), m.name
        assert value(reg, "ksmtrace_ksm_advisor_mode", mode=snap.ksm.advisor_mode) == 1
        assert value(reg, "ksmtrace_cow_ksm_total") == snap.vmstat.cow_ksm
        assert value(reg, "ksmtrace_ksm_saved_bytes") == snap.ksm.saved_pages * PAGE_SIZE
    # node_exporter's units: ms -> s, full_scans a counter
    reg = registry_for(snaps[-1])
    assert value(reg, "ksmtrace_ksm_sleep_seconds") == snaps[-1].ksm.sleep_millisecs / 1000
    assert value(reg, "ksmtrace_ksm_full_scans_total") == 9322976
    # the recording's figures while its pages were merged
    merged = registry_for(snaps[5])
    assert value(merged, "ksmtrace_ksm_pages_sharing") == 1072
    assert value(merged, "ksmtrace_ksm_general_profit_bytes") == 4928512


def test_a_file_the_kernel_lacks_has_no_series():
    old = sysfs.read_sysfs(HOST_61)  # the real 6.1 directory: no general_profit, smart_scan...
    assert old.general_profit is None and old.ksm_zero_pages is None
    snap = dataclasses.replace(replay_snapshots(bpf=False)[0], ksm=old)
    reg = registry_for(snap)
    assert value(reg, "ksmtrace_ksm_general_profit_bytes") is None
    assert value(reg, "ksmtrace_ksm_zero_pages") is None
    assert value(reg, "ksmtrace_ksm_smart_scan") is None
    assert value(reg, "ksmtrace_ksm_pages_shared") == old.pages_shared
    assert value(reg, "ksmtrace_ksm_full_scans_total") == old.full_scans


def test_negative_profit_is_emitted_negative(snaps):
    # the recorded snapshot with its profit figures turned negative (the kernel
    # test produces a real negative general_profit)
    s = snaps[5]
    rows = tuple(dataclasses.replace(r, profit_bytes=-64 * (i + 1))
                 for i, r in enumerate(s.processes))
    snap = dataclasses.replace(s, ksm=dataclasses.replace(s.ksm, general_profit=-1_280_000),
                               processes=rows)
    reg = registry_for(snap)
    assert value(reg, "ksmtrace_ksm_general_profit_bytes") == -1_280_000
    text = scrape(reg).decode()
    assert "\nksmtrace_ksm_general_profit_bytes -1280000.0\n" in text
    assert value(reg, "ksmtrace_cgroup_profit_bytes", **ROOT_CG) == -64 * (1 + 2 + 3)


def test_no_process_profit_on_the_kernel_no_cgroup_profit_series(snaps):
    # 6.1's ksm_stat has no ksm_process_profit: the cgroup sum must not be a false 0
    s = snaps[5]
    rows = tuple(dataclasses.replace(r, profit_bytes=None) for r in s.processes)
    assert rows and all(r.merging_pages for r in rows)
    reg = registry_for(dataclasses.replace(s, processes=rows), top=1)
    text = scrape(reg).decode()
    assert "ksmtrace_process_profit_bytes{" not in text
    assert "ksmtrace_cgroup_profit_bytes{" not in text
    assert value(reg, "ksmtrace_cgroup_merging_pages", **ROOT_CG) == \
        sum(r.merging_pages for r in rows)


def test_event_counters_equal_the_traced_totals(snaps):
    s = snaps[-1]
    reg = registry_for(s)
    for kind in MERGE_KINDS:
        assert value(reg, "ksmtrace_merges_total", kind=kind, result="ok") == \
            s.totals[f"merges_{kind}"]
        assert value(reg, "ksmtrace_merges_total", kind=kind, result="failed") == \
            s.totals[f"merge_failures_{kind}"]
    # what `ksmtrace report` prints for this recording
    assert value(reg, "ksmtrace_merges_total", kind="new_ksm_page", result="ok") == 8
    assert value(reg, "ksmtrace_merges_total", kind="into_ksm_page", result="ok") == 1192
    assert value(reg, "ksmtrace_merges_total", kind="zero_page", result="ok") == 150
    assert value(reg, "ksmtrace_scan_rounds_total") == 68 == s.totals["full_scans"]
    assert value(reg, "ksmtrace_ksm_pages_removed_total") == 8
    assert value(reg, "ksmtrace_rmap_items_removed_total") == 1072
    assert value(reg, "ksmtrace_mm_enters_total") == 3
    # tracepoint-only kernel: the exact cow_ksm count, labelled estimated
    assert value(reg, "ksmtrace_cow_breaks_total", kind="write", estimated="true") == 120
    assert value(reg, "ksmtrace_cow_breaks_total", kind="unshare", estimated="false") is None
    assert value(reg, "ksmtrace_events_lost_total") == 0
    # not observable on that kernel: no series rather than a false zero
    for absent in ("ksmtrace_unshares_total", "ksmtrace_scan_batches_total",
                   "ksmtrace_pages_compared_total", "ksmtrace_merge_latency_seconds_count",
                   "ksmtrace_cow_latency_seconds_count"):
        assert value(reg, absent) is None, absent


def test_scan_round_histogram_from_log2_slots(snaps):
    s = snaps[-1]
    assert s.hist["scan_round_seconds"] == {17: 1, 22: 1, 24: 65, 25: 1}
    reg = registry_for(s)
    h = "ksmtrace_scan_round_seconds"
    # slot k counts [2^k, 2^(k+1)) ns: its bucket is le = 2^(k+1) ns
    assert value(reg, f"{h}_bucket", le=repr(2 ** 17 / 1e9)) == 0
    assert value(reg, f"{h}_bucket", le=repr(2 ** 18 / 1e9)) == 1
    assert value(reg, f"{h}_bucket", le=repr(2 ** 23 / 1e9)) == 2
    assert value(reg, f"{h}_bucket", le=repr(2 ** 25 / 1e9)) == 67
    assert value(reg, f"{h}_bucket", le="+Inf") == 68
    assert value(reg, f"{h}_count") == 68 == s.totals["scan_rounds"]


def test_histogram_buckets_fold_the_ends():
    b = metrics.histogram_buckets({0: 2, metrics.LOW_SLOT: 1, metrics.HIGH_SLOT: 4,
                                   metrics.HIGH_SLOT + 1: 3, 63: 1})
    assert b[0] == (repr(2 ** (metrics.LOW_SLOT + 1) / 1e9), 3.0)  # slot 0 folded in
    assert b[-2][1] == 7.0  # last finite bucket
    assert b[-1] == ("+Inf", 11.0)  # slower than ~69 s: only in +Inf
    counts = [c for _, c in b]
    assert counts == sorted(counts)
    assert len(b) == metrics.HIGH_SLOT - metrics.LOW_SLOT + 2


def test_processes_top_n_and_other(snaps):
    s = snaps[5]
    assert len(s.processes) == 3
    reg = registry_for(s, top=2)
    shown = s.processes[:2]
    for r in shown:
        w = workload_of(r)
        labels = {"pid": str(r.pid), "comm": r.comm, "cgroup": r.cgroup, "workload": w.name,
                  "workload_kind": w.kind}
        assert value(reg, "ksmtrace_process_merging_pages", **labels) == r.merging_pages
        assert value(reg, "ksmtrace_process_profit_bytes", **labels) == r.profit_bytes
        assert value(reg, "ksmtrace_process_merges_total", **labels) == r.merges
        assert value(reg, "ksmtrace_process_cow_breaks_total", estimated="true",
                     **labels) == r.cow_breaks
    rest = s.processes[2]
    other = dict.fromkeys(metrics.PROC_LABELS, "other")
    assert value(reg, "ksmtrace_process_merging_pages", **other) == rest.merging_pages
    assert value(reg, "ksmtrace_processes_other") == 1
    assert value(reg, "ksmtrace_processes") == 3
    # series stay bounded: N + 1 whatever the number of processes
    text = scrape(reg).decode()
    assert text.count("ksmtrace_process_merging_pages{") == 3
    # cgroups count every process
    assert value(reg, "ksmtrace_cgroup_merging_pages", **ROOT_CG) == \
        sum(r.merging_pages for r in s.processes)
    assert value(reg, "ksmtrace_cgroup_processes", **ROOT_CG) == 3
    # top 0: everything in "other"
    reg0 = registry_for(s, top=0)
    assert value(reg0, "ksmtrace_process_merging_pages", **other) == \
        sum(r.merging_pages for r in s.processes)
    assert value(reg0, "ksmtrace_cgroup_merging_pages", **OTHER_CG) == \
        sum(r.merging_pages for r in s.processes)


def test_workload_series_sum_their_processes_top_n_and_other(snaps):
    s = snaps[5]
    vm = Workload("vm", "vm1", "", (("manager", "libvirt"),))
    ctr = Workload("container", "3f2a9c1b2d4e", "3f2a9c1b2d4e" * 5 + "abcd")
    a, b, c = s.processes
    rows = (dataclasses.replace(a, workload=vm, cgroup="/machine.slice/vm1.scope"),
            dataclasses.replace(b, workload=vm, cgroup="/machine.slice/vm1.scope"),
            dataclasses.replace(c, workload=ctr, cgroup="/system.slice/docker-x.scope"))
    reg = registry_for(dataclasses.replace(s, processes=rows), top=1)
    wl = {"workload": "vm1", "workload_kind": "vm"}
    assert value(reg, "ksmtrace_workload_merging_pages", **wl) == \
        a.merging_pages + b.merging_pages
    assert value(reg, "ksmtrace_workload_profit_bytes", **wl) == a.profit_bytes + b.profit_bytes
    assert value(reg, "ksmtrace_workload_processes", **wl) == 2
    assert value(reg, "ksmtrace_workload_merges_total", **wl) == a.merges + b.merges
    assert value(reg, "ksmtrace_workload_cow_breaks_total", estimated="true", **wl) == \
        a.cow_breaks + b.cow_breaks
    other = {"workload": "other", "workload_kind": "other"}
    assert value(reg, "ksmtrace_workload_merging_pages", **other) == c.merging_pages
    assert scrape(reg).decode().count("ksmtrace_workload_merging_pages{") == 2
    # the per-process and per-cgroup series carry the workload too
    assert value(reg, "ksmtrace_process_merging_pages", pid=str(a.pid), comm=a.comm,
                 cgroup=rows[0].cgroup, **wl) == a.merging_pages
    assert value(reg, "ksmtrace_cgroup_processes", cgroup=rows[0].cgroup, **wl) == 2


def test_exited_processes_leave_the_gauges_and_keep_their_counters(snaps):
    s = snaps[-1]  # the recording's workload has exited by its end
    assert s.processes and not any(r.alive for r in s.processes)
    reg = registry_for(s, top=2)
    text = scrape(reg).decode()
    # a dead process's last ksm_stat is not a current figure
    assert "ksmtrace_process_merging_pages{" not in text
    assert "ksmtrace_cgroup_merging_pages{" not in text
    assert value(reg, "ksmtrace_processes") == 0
    other = dict.fromkeys(metrics.PROC_LABELS, "other")
    assert value(reg, "ksmtrace_process_merges_total", **other) == 1350
    assert value(reg, "ksmtrace_process_cow_breaks_total", estimated="true", **other) == 120
    assert value(reg, "ksmtrace_processes_other") == 3


def test_sysfs_only_has_counters_and_no_event_series():
    snaps = replay_snapshots(bpf=False)
    s = snaps[5]
    assert not s.traced
    reg = registry_for(s)
    assert value(reg, "ksmtrace_traced") == 0
    assert value(reg, "ksmtrace_ksm_pages_sharing") == 1072
    text = scrape(reg).decode()
    for name in ("ksmtrace_merges_total", "ksmtrace_cow_breaks_total",
                 "ksmtrace_process_merges_total", "ksmtrace_events_lost_total",
                 "ksmtrace_scan_round_seconds"):
        assert name not in text
    assert value(reg, "ksmtrace_build_info", version="0.1.0", source="sysfs-only",
                 kernel=os.uname().release, python=sys.version.split()[0]) == 1


def test_self_metrics(snaps):
    s = snaps[-1]
    reg, col = make_registry()
    for snap in snaps:
        col.publish(snap)
    assert value(reg, "ksmtrace_collector_cycles_total") == len(snaps)
    assert value(reg, "ksmtrace_collector_cycle_seconds") > 0
    assert value(reg, "ksmtrace_last_snapshot_timestamp_seconds") == s.wall
    for p in s.probes:
        assert value(reg, "ksmtrace_probe_attached", probe=p.probe, stage=p.stage,
                     method=p.method or "none",
                     estimated=str(p.estimated).lower()) == int(p.attached)
    assert value(reg, "ksmtrace_probe_attached", probe="unshares", stage="updating",
                 method="none", estimated="false") == 0


def test_program_cost_when_the_source_reports_it(snaps):
    from ksmtrace.model import ProgramCost

    reg = registry_for(snaps[-1])
    assert value(reg, "ksmtrace_bpf_program_runs_total", program="x") is None
    prog = ProgramCost("tracepoint__ksm__ksm_merge_with_ksm_page", 2_500_000, 1350)
    reg = registry_for(dataclasses.replace(snaps[-1], programs=(prog,)))
    assert value(reg, "ksmtrace_bpf_program_run_seconds_total", program=prog.name) == 0.0025
    assert value(reg, "ksmtrace_bpf_program_runs_total", program=prog.name) == 1350


def test_fast_encoders_write_what_prometheus_client_writes(snaps):
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest

    from ksmtrace.export import encode

    weird = dataclasses.replace(snaps[5].processes[0], comm='a"b\\c\nd é', pid=7,
                                cgroup="/x\\y")
    cases = list(snaps) + replay_snapshots(bpf=False)[:6] + [
        dataclasses.replace(snaps[5], processes=snaps[5].processes + (weird,))]
    for snap in cases:
        reg, col = make_registry()
        col.publish(snap)
        fams = col.current[1]
        assert encode.plain(fams)
        assert encode.text(fams) == scrape(reg)
        assert encode.openmetrics(fams) == om_latest(reg)


def test_exposition_parses_with_types_and_help(snaps):
    text = scrape(registry_for(snaps[-1])).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["ksmtrace_ksm_full_scans"].type == "counter"
    assert fams["ksmtrace_ksm_pages_sharing"].type == "gauge"
    assert fams["ksmtrace_scan_round_seconds"].type == "histogram"
    assert all(f.documentation for f in fams.values())
    assert all(name.startswith("ksmtrace_") for name in fams)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_check_metrics_accepts_a_scrape(snaps):
    for snap in (snaps[-1], replay_snapshots(bpf=False)[5]):
        r = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape(registry_for(snap)),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_checks_and_unit_tests_the_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", "ksmtrace-alerts.yml"], cwd=DASHBOARDS,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "test", "rules", "ksmtrace-alerts.test.yml"], cwd=DASHBOARDS,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_dashboard_json_is_the_generators_output_and_templated():
    sys.path.insert(0, str(DASHBOARDS))
    try:
        import generate
    finally:
        sys.path.remove(str(DASHBOARDS))
    text = (DASHBOARDS / "ksmtrace.json").read_text()
    assert text == generate.render(), "run dashboards/generate.py and commit ksmtrace.json"
    d = json.loads(text)
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "instance"]
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 30
    for e in exprs:
        assert e.count("ksmtrace_") == e.count('instance=~"$instance"'), e
    titles = " ".join(p["title"] for p in d["panels"]).lower()
    for stage in ("searching", "merging", "counting", "updating", "savings", "cow storm",
                  "ksmd cpu", "probes", "top processes", "top cgroups"):
        assert stage in titles, stage


def test_parse_listen():
    assert parse_listen("127.0.0.1:9949") == ("127.0.0.1", 9949)
    assert parse_listen("[::1]:9949") == ("::1", 9949)
    assert parse_listen(":9949") == ("0.0.0.0", 9949)
    for bad in ("9949", "host:port", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_100_concurrent_scrapes_all_succeed(snaps):
    reg, col = make_registry()
    col.publish(snaps[-1])
    with MetricsServer(reg, "127.0.0.1", 0, col) as srv:
        url = f"http://127.0.0.1:{srv.port}/metrics"
        barrier = threading.Barrier(100)
        results: list[tuple[int, bytes] | BaseException] = [None] * 100  # type: ignore

        def scraper(i: int) -> None:
            try:
                barrier.wait(timeout=60)
                results[i] = get(url)
            except BaseException as e:  # noqa: BLE001 - reported below
                results[i] = e

        threads = [threading.Thread(target=scraper, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        errors = [r for r in results if not isinstance(r, tuple)]
        assert not errors, errors[:3]
        assert {r[0] for r in results} == {200}
        assert len({r[1] for r in results}) == 1  # the same snapshot, whole
        assert b"ksmtrace_merges_total" in results[0][1]
        assert get(f"http://127.0.0.1:{srv.port}/")[0] == 200
        with pytest.raises(urllib.error.HTTPError):
            get(f"http://127.0.0.1:{srv.port}/nope")


def test_each_snapshot_is_served_in_every_format_then_replaced(snaps):
    import gzip

    reg, col = make_registry()
    with MetricsServer(reg, "127.0.0.1", 0, col) as srv:
        url = f"http://127.0.0.1:{srv.port}/metrics"

        def fetch(**headers):
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                if r.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                return r.headers["Content-Type"], body.decode()

        for snap in (snaps[5], snaps[-1], snaps[5]):
            col.publish(snap)
            plain = fetch()[1]
            assert plain == scrape(reg).decode()
            assert f"\nksmtrace_ksm_pages_sharing {float(snap.ksm.pages_sharing)}\n" in plain
            assert fetch() == fetch(**{"Accept-Encoding": "gzip"})
            ctype, om = fetch(Accept="application/openmetrics-text; version=1.0.0")
            assert ctype.startswith("application/openmetrics-text")
            assert om.endswith("# EOF\n")
            assert f"\nksmtrace_ksm_pages_sharing {float(snap.ksm.pages_sharing)}\n" in om
            assert fetch(Accept="application/openmetrics-text; version=1.0.0") == (ctype, om)


def test_scrapes_see_whole_snapshots_while_new_ones_are_published(snaps):
    reg, col = make_registry()
    col.publish(snaps[0])
    stop = threading.Event()

    def publisher() -> None:
        i = 0
        while not stop.is_set():
            col.publish(snaps[i % len(snaps)])
            i += 1

    t = threading.Thread(target=publisher)
    t.start()
    try:
        walls = {s.wall: s for s in snaps}
        for _ in range(200):
            text = scrape(reg).decode()
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            wall = fams["ksmtrace_last_snapshot_timestamp_seconds"].samples[0].value
            s = walls[wall]
            # every figure in one scrape comes from the same snapshot
            assert fams["ksmtrace_ksm_pages_sharing"].samples[0].value == s.ksm.pages_sharing
            assert fams["ksmtrace_ksm_full_scans"].samples[0].value == s.ksm.full_scans
    finally:
        stop.set()
        t.join()


# ------------------------------------------------------------------ the command

def ksmtrace(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmtrace", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, **kw)


def test_help_has_examples_and_the_default_bind_is_localhost():
    r = ksmtrace("export", "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "default 127.0.0.1:9949" in r.stdout
    from ksmtrace.cli import build_parser

    args = build_parser().parse_args(["export"])
    assert args.listen == "127.0.0.1:9949"
    assert args.top == 20 and args.interval == 1.0


def test_bad_options_exit_2_without_traceback():
    for argv in (["--listen", "nope"], ["--interval", "0"], ["--top", "-1"]):
        r = ksmtrace("export", "--replay", str(RECORDING), *argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.startswith("ksmtrace: ") and "Traceback" not in r.stderr


def test_a_busy_port_exits_11_with_a_hint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = ksmtrace("export", "--replay", str(RECORDING), "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 11, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in r.stderr
    assert "how to fix:" in r.stderr and "Traceback" not in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_replay_is_served_then_a_signal_stops_it_cleanly(snaps, sig, code):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "ksmtrace", "export", "--replay", str(RECORDING),
                          "--speed", "20", "--listen", f"127.0.0.1:{port}"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            try:
                text = get(f"http://127.0.0.1:{port}/metrics", timeout=5)[1].decode()
            except OSError:
                text = ""
            if f"ksmtrace_collector_cycles_total {float(len(snaps))}" in text:
                break
            time.sleep(0.2)
        assert f"ksmtrace_collector_cycles_total {float(len(snaps))}" in text
        assert 'ksmtrace_merges_total{kind="into_ksm_page",result="ok"} 1192.0' in text
        assert 'source="replay"' in text
        p.send_signal(sig)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert p.returncode == code, err
    assert "serving http://127.0.0.1:" in err and "Traceback" not in err


def test_without_prometheus_client_the_cli_still_works_and_export_says_why(tmp_path):
    """Debian's bare python3 has no prometheus_client: the CLI must import
    lazily, and `export` must say what is missing."""
    py = "/usr/bin/python3"
    if not Path(py).exists():
        pytest.skip("no /usr/bin/python3")
    probe = subprocess.run([py, "-c", "import prometheus_client"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("/usr/bin/python3 has prometheus_client")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([py, "-m", "ksmtrace", "export", "--help"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([py, "-m", "ksmtrace", "export", "--sysfs-only"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 1
    assert "needs the Python package prometheus-client" in r.stderr
    assert "Traceback" not in r.stderr
