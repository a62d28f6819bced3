"""record/report/replay against the real kernel: a recording's report equals
what the kernel counted and what a collector replaying it computes, replay
gives the live run's snapshots, a recorder killed with SIGKILL leaves a
readable file, and no BPF program outlives a recorder."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksmtrace import session
from ksmtrace.cli import build_parser
from ksmtrace.collector import observe
from ksmtrace.errors import BadRecording
from ksmtrace.kernel import sysfs
from ksmtrace.kernel.tracefs import find_tracefs
from ksmtrace.record import Recorder, Recording
from ksmtrace.report import recording_header
from ksmtrace.sources.replay import ReplaySource
from ksmtrace.workload import Workload, WorkloadSpec, other_ksm_users

pytestmark = pytest.mark.kernel

# Our programs as `bpftool prog show` names them (sources/loader.py
# kernel_name): the event or function, fentry f_*, fexit x_*, kprobes kp_*,
# kretprobes kr_*.
OUR_PROGRAMS = ("ksm_", "page_fault_user", "mmap_lock_start", "f_", "x_", "kp_", "kr_")


def our_programs() -> list[str]:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(p.get("name", "") for p in json.loads(out or "[]")
                  if p.get("name", "").startswith(OUR_PROGRAMS))


def assert_programs_back_to(before: list[str]) -> None:
    """Programs go when their last fd closes, a moment after the process exits."""
    now = our_programs()
    for _ in range(50):
        if now == before:
            return
        time.sleep(0.1)
        now = our_programs()
    assert now == before, f"BPF programs left loaded: {sorted(set(now) - set(before))}"


def ticks_on_disk(path: Path) -> int:
    try:
        with Recording(path, warn=None) as r:
            return sum(1 for _ in r.ticks())
    except BadRecording:  # the header is not completely written yet
        return 0


def wait_ticks(path: Path, n: int, rec: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (have := ticks_on_disk(path)) < n:
        if rec.poll() is not None:
            raise AssertionError(f"recorder exited {rec.returncode}: {rec.stderr.read()}")
        if time.monotonic() > deadline:
            rec.kill()
            raise AssertionError(f"recorder wrote {have} ticks in {timeout} s, not {n}")
        time.sleep(0.05)
    return have


def start_recorder(path: Path, interval: str) -> subprocess.Popen:
    """`ksmtrace record`, returned once its first tick is on disk (probes attached)."""
    rec = subprocess.Popen([sys.executable, "-m", "ksmtrace", "record", "-o", str(path),
                            interval], stderr=subprocess.PIPE, text=True)
    wait_ticks(path, 1, rec, timeout=120)
    return rec


def report_json(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "report", str(path), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def replayed_totals(path: Path) -> dict[str, int]:
    with observe(ReplaySource(path, warn=None)) as obs:
        *_, snap = obs.snapshots()
    return snap.totals


@pytest.mark.vm
@pytest.mark.traced
def test_report_of_a_recording_equals_the_kernel(tmp_path):
    assert sysfs.read_knob("run") == 0
    assert not other_ksm_users(), "another process uses KSM: deltas would not be exact"
    before = our_programs()
    path = tmp_path / "w.ksmrec"
    rec = start_recorder(path, "0.2")
    try:
        with Workload(WorkloadSpec(processes=3, pages=2000, distinct=20)) as w:
            merged = w.wait_merged()
            expected = w.expected()
            pids = list(w.pids)
            written = w.cow(0.1)
            w.wait_expected()
            wait_ticks(path, ticks_on_disk(path) + 3, rec)
        wait_ticks(path, ticks_on_disk(path) + 2, rec)
        rec.send_signal(signal.SIGINT)
        assert rec.wait(timeout=60) == 0
        stderr = rec.stderr.read()
        assert "stopped by Ctrl-C" in stderr and "Traceback" not in stderr, stderr
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
    rep = report_json(path)
    t = rep["totals"]

    # the report is the collector's final snapshot of the same ticks
    assert t == replayed_totals(path)
    assert rep["closed"] and not rep["truncated"]
    # ... and the kernel's own figures, exactly
    assert merged.pages_shared + merged.pages_sharing == \
        expected.pages_shared + expected.pages_sharing == 6000
    assert t["merges"] == rep["merging"]["merges"] == 6000
    assert sum(written.values()) == w.expected_cow_ksm == 600
    assert t["cow_ksm"] == rep["updating"]["cow_ksm"] == sum(written.values())
    per_pid = {p["pid"]: p for p in rep["counting"]["processes"]}
    assert [per_pid[pid]["merges"] for pid in pids] == list(merged.merging_pages) == [2000] * 3
    assert sum(per_pid[pid]["cow_breaks"] for pid in pids) == t["cow_ksm"]
    assert t["full_scans"] > 0
    tracefs = find_tracefs()
    if tracefs and Path(tracefs, "events/ksm/ksm_start_scan").is_dir():
        assert rep["searching"]["scan_rounds"] == t["full_scans"]
    else:  # 6.1: nothing traces a round, and the report says so
        assert rep["searching"]["scan_rounds"] is None
    assert rep["lost_events"] == 0
    assert rep["events"]["by_kind"]["merge"] == t["merges"]  # every merge was streamed
    assert_programs_back_to(before)


def test_replay_gives_the_live_snapshots(tmp_path):
    """In one process: the live source's ticks go to a collector and to a
    recording; replaying the recording gives the same snapshots."""
    assert sysfs.read_knob("run") == 0
    before = our_programs()
    path = tmp_path / "live.ksmrec"
    args = build_parser().parse_args(["record", "-o", str(path), "0.2"])
    live = []
    with observe(session.open_source(args, need_bpf=True)) as obs:
        with Recorder(path, recording_header(obs.src, 0.2)) as rec, \
                Workload(WorkloadSpec(processes=2, pages=500, distinct=5)) as w:
            done_at = None
            for tick in obs.src.ticks(0.2):
                live.append(obs.collector.add_tick(tick))
                rec.write(tick)
                if done_at is None and w.measure().matches(w.expected()):
                    w.cow(0.2)
                    done_at = tick.seq
                if done_at is not None and tick.seq >= done_at + 5:
                    break
                assert tick.seq < 600, "the workload never merged"
    with observe(ReplaySource(path)) as obs:
        again = [dataclasses.replace(s, source="live") for s in obs.snapshots()]
    assert again == live
    assert live[-1].totals["merges"] >= 1000 and any(s.events for s in live)
    assert_programs_back_to(before)


def test_sigkill_leaves_a_readable_recording(tmp_path):
    before = our_programs()
    path = tmp_path / "k.ksmrec"
    rec = start_recorder(path, "0.1")
    try:
        wait_ticks(path, 5, rec)
        during = our_programs()
        assert "ksm_start_scan" in during and "ksm_exit" in during, during
    finally:
        rec.send_signal(signal.SIGKILL)
        rec.wait(timeout=30)
    assert rec.returncode == -signal.SIGKILL
    rep = report_json(path)
    assert rep["ticks"] >= 5 and not rep["closed"]
    assert_programs_back_to(before)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_close_the_recording(tmp_path, sig):
    before = our_programs()
    path = tmp_path / "s.ksmrec"
    rec = start_recorder(path, "0.1")
    wait_ticks(path, 3, rec)
    assert len(our_programs()) > len(before)
    rec.send_signal(sig)
    assert rec.wait(timeout=60) == 0
    err = rec.stderr.read()
    assert f"stopped by {'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'}" in err, err
    with Recording(path) as r:
        n = sum(1 for _ in r.ticks())
        assert r.end is not None and r.end["ticks"] == n >= 3 and not r.truncated
    assert_programs_back_to(before)
