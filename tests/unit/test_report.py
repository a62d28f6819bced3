"""`report` and `timeline` on a recording made with `ksmtrace record` on the
real host: the report is the collector's final snapshot, its stages agree
with each other and with the raw events, and the timeline is a loadable
trace with one slice per scan round and instants on each process's track."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ksmtrace import report
from ksmtrace.collector import observe
from ksmtrace.kernel.identity import Workload
from ksmtrace.model import EventKind, iter_events
from ksmtrace.record import Recorder, Recording
from ksmtrace.sources.replay import ReplaySource

FIX = Path(__file__).parent.parent / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"


@pytest.fixture(scope="module")
def rep() -> dict:
    return report.summarise(str(FIX))


@pytest.fixture(scope="module")
def events():
    with Recording(FIX) as r:
        return [e for t in r.ticks() for e in iter_events(t.events)]


@pytest.fixture(scope="module")
def trace() -> dict:
    return report.timeline(str(FIX))


def test_report_totals_are_the_replayed_collectors(rep):
    with observe(ReplaySource(FIX)) as obs:
        snaps = list(obs.snapshots())
    last = snaps[-1]
    assert rep["totals"] == last.totals
    assert rep["ticks"] == len(snaps)
    assert rep["seconds"] == round(last.wall - snaps[0].wall, 3) > 0
    assert rep["lost_events"] == last.lost_events == 0
    assert rep["closed"] and not rep["truncated"]


def test_stages_agree_with_each_other_and_the_events(rep, events):
    kinds = Counter(EventKind(e.kind).name.lower() for e in events)
    assert rep["events"]["by_kind"] == dict(sorted(kinds.items()))
    assert rep["events"]["recorded"] == len(events) == rep["events"]["sent"]

    s, m, c, u = rep["searching"], rep["merging"], rep["counting"], rep["updating"]
    assert s["scan_rounds"] == s["full_scans"] == kinds["scan_stop"] > 0
    assert sum(x["count"] for x in s["round_duration"]) == s["scan_rounds"]
    assert all(x["high_ns"] == 2 * x["low_ns"] for x in s["round_duration"])

    merges = [e for e in events if e.kind == EventKind.MERGE]
    assert m["merges"] == sum(m["by_kind"].values()) == len(merges) > 0
    assert m["by_kind"]["zero_page"] == sum(1 for e in merges if e.sub == 2) > 0
    assert m["failures"] == sum(m["failures_by_kind"].values()) == 0
    assert m["latency"] == []  # tracepoints have no exit: no latency here

    procs = c["processes"]
    assert len(procs) == 3
    assert sum(p["merges"] for p in procs) == m["merges"]
    for p in procs:
        assert p["merges"] == sum(1 for e in merges if e.pid == p["pid"])
        # the last ksm_stat: merged pages minus the ones written to
        assert p["merging_pages"] + p["zero_pages"] <= p["merges"]
    # ksm:ksm_exit does not fire for every mm that leaves KSM (tracefs agrees;
    # tests/fixtures/README.md): the fixture has 3 enters and 2 exits
    assert c["mm_enters"] == kinds["ksm_enter"] == 3
    assert c["mm_exits"] == kinds["ksm_exit"] <= 3

    # tracepoint-only host: COW per process is the exact cow_ksm, split by faults
    assert u["cow_estimated"] and all(p["cow_estimated"] for p in procs)
    assert sum(p["cow_breaks"] for p in procs) == u["cow_ksm"] == u["wp_faults"] > 0
    assert u["cow_breaks"] is None and u["unshares"] is None  # not observed, not 0
    assert u["stable_nodes_removed"] == kinds["remove_ksm_page"]
    assert u["rmap_items_removed"] == kinds["remove_rmap_item"]


def test_probe_plan_and_missed_probes(rep):
    names = {p["probe"] for p in rep["probes"]}
    assert {"scan_rounds", "merges", "cow_breaks", "unshares"} <= names
    assert rep["missed_probes"] == [p["probe"] for p in rep["probes"] if not p["attached"]]
    assert "unshares" in rep["missed_probes"]
    # figures of polled probes are not presented as traced zeros
    assert rep["searching"]["scan_batches"] is None


def test_text_report(rep):
    text = report.format_report(rep)
    for heading in ("\nsearching\n", "\nmerging\n", "\ncounting\n", "\nupdating\n", "\nprobes\n"):
        assert heading in text
    assert "not observed on this kernel" in text
    assert "~ estimated" in text and "unshares: MISSED" in text
    assert f"lost {rep['lost_events']}" in text
    for p in rep["counting"]["processes"]:
        assert f"~{p['cow_breaks']}" in text and str(p["pid"]) in text


def test_cli_report_text_and_json(rep):
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "report", str(FIX), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert json.loads(r.stdout) == json.loads(json.dumps(rep))
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "report", str(FIX)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("recording host-6.18-workload.ksmrec: ")


def test_report_of_a_killed_recorder_says_so(tmp_path):
    data = FIX.read_bytes()
    p = tmp_path / "killed.ksmrec"
    p.write_bytes(data[:-30])  # inside the END record
    r = report.summarise(str(p))
    assert not r["closed"] and r["truncated"]
    assert "not closed by its recorder" in report.format_report(r)


def test_count_kinds_reads_only_the_kind_field(events):
    with Recording(FIX) as r:
        counts: dict[int, int] = {}
        for t in r.ticks():
            report.count_kinds(t.events, counts)
    assert counts == dict(Counter(e.kind for e in events))


# ---------------------------------------------------------------- timeline
def test_timeline_is_loadable_trace_event_json(trace, tmp_path):
    out = tmp_path / "trace.json"
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "timeline", str(FIX), "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(out.read_text())
    assert loaded == json.loads(json.dumps(trace))
    assert all(e["ph"] in "XiMC" and "pid" in e and "tid" in e for e in loaded["traceEvents"])


def test_scan_rounds_are_slices_on_ksmd(trace, rep, events):
    ev = trace["traceEvents"]
    slices = [e for e in ev if e["ph"] == "X"]
    assert len(slices) == rep["searching"]["scan_rounds"]
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in slices)
    ksmd = {e["pid"] for e in slices}
    assert len(ksmd) == 1
    (pid,) = ksmd
    assert pid == next(e.tid for e in events if e.kind == EventKind.SCAN_START)
    names = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert names[pid] == "ksmd"
    # rounds do not overlap: ksmd runs one at a time
    slices.sort(key=lambda e: e["ts"])
    assert all(a["ts"] + a["dur"] <= b["ts"] + 1 for a, b in itertools.pairwise(slices))


def test_merges_and_cow_are_instants_per_process(trace, rep):
    ev = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    merges = [e for e in ev if e["ph"] == "i" and e["name"].startswith("merge")]
    faults = [e for e in ev if e["ph"] == "i" and e["name"].startswith("write-protect")]
    procs = {p["pid"]: p for p in rep["counting"]["processes"]}
    assert Counter(e["pid"] for e in merges) == {pid: p["merges"] for pid, p in procs.items()}
    assert len(faults) == rep["updating"]["wp_faults"]
    for e in merges + faults:
        assert e["tid"] == e["pid"] and e["s"] == "t" and e["ts"] >= 0
        assert {"kind", "err", "pfn", "mm"} <= set(e["args"])
        assert names[e["pid"]] == f"{procs[e['pid']]['comm']} {e['pid']}"
    assert {e["args"]["kind"] for e in merges} == {"new_ksm_page", "into_ksm_page", "zero_page"}


def test_timestamps_start_at_zero(trace):
    ts = [e["ts"] for e in trace["traceEvents"] if "ts" in e]
    assert min(ts) == 0 and all(t >= 0 for t in ts)


# ---------------------------------------------------------------- workloads
VM1 = Workload("vm", "vm1", "", (("manager", "libvirt"),))
CTR = Workload("container", "3f2a9c1b2d4e", "3f2a9c1b2d4e" * 5 + "abcd",
               (("runtime", "docker"),))


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> Path:
    """The fixture recorded again (version 3) with two of its processes in
    one VM and the third in a container."""
    with Recording(FIX) as r:
        header = {k: v for k, v in r.header.items() if k not in ("format", "ksmtrace")}
        ticks = list(r.ticks())
    pids = sorted({p.pid for t in ticks for p in t.counters.processes})
    owner = {pids[0]: VM1, pids[1]: VM1, pids[2]: CTR}
    out = tmp_path_factory.mktemp("wl") / "tagged.ksmrec"
    with Recorder(out, header) as w:
        for t in ticks:
            procs = tuple(dataclasses.replace(p, workload=owner[p.pid])
                          for p in t.counters.processes)
            w.write(dataclasses.replace(t, counters=dataclasses.replace(t.counters,
                                                                        processes=procs)))
    return out


def test_report_by_workload_sums_each_workloads_processes(tagged):
    per_process = report.summarise(str(tagged))["counting"]["processes"]
    r = report.summarise(str(tagged), "workload")
    assert r["counting"]["by"] == "workload"
    rows = {(p["workload"]["kind"], p["workload"]["name"]): p for p in r["counting"]["processes"]}
    assert set(rows) == {("vm", "vm1"), ("container", "3f2a9c1b2d4e")}
    vm = [p for p in per_process if p["workload"]["name"] == "vm1"]
    assert len(vm) == 2 and rows["vm", "vm1"]["comm"] == "2 procs"
    for f in ("merges", "merging_pages", "zero_pages", "rmap_items", "profit_bytes",
              "cow_breaks"):
        assert rows["vm", "vm1"][f] == sum(p[f] for p in vm), f
    assert rows["container", "3f2a9c1b2d4e"]["workload"]["detail"] == {"runtime": "docker"}
    # the totals do not depend on the grouping
    assert sum(p["merges"] for p in rows.values()) == r["merging"]["merges"]
    text = report.format_report(r)
    assert "vm:vm1" in text and "ctr:3f2a9c1b2d4e" in text


def test_stat_lines_by_workload(tagged):
    from ksmtrace.stat import format_line

    with observe(ReplaySource(tagged)) as obs:
        last = list(obs.snapshots())[6]
    lines = format_line(last, "workload").splitlines()[1:]
    assert [ln.split(":", 2)[0].strip() + ":" + ln.split(":", 2)[1].split(" ")[0]
            for ln in lines] == ["vm:vm1", "ctr:3f2a9c1b2d4e"]
    assert "(2 procs)" in lines[0]
