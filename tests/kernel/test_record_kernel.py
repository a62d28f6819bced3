"""record/report against the kernel: a recording's report equals what the
kernel counted, and a recorder killed with SIGKILL leaves a readable file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from ksmtrace.kernel import sysfs
from ksmtrace.record import Recording
from ksmtrace.workload import Workload, WorkloadSpec, other_ksm_users

pytestmark = pytest.mark.kernel


def programs() -> int:
    return subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True,
                          check=True).stdout.count("\n")


def start_recorder(path, interval="0.2"):
    p = subprocess.Popen([sys.executable, "-m", "ksmtrace", "record", "-o", str(path), interval],
                         stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # until the first tick is on disk: probes are attached
        if path.exists() and path.stat().st_size > 0:
            try:
                if next(Recording(path, warn=None).ticks(), None) is not None:
                    return p
            except Exception:
                pass
        if p.poll() is not None:
            raise AssertionError(p.stderr.read())
        time.sleep(0.1)
    p.kill()
    raise AssertionError("recorder wrote no tick")


def test_report_of_a_recording_equals_the_kernel(tmp_path):
    assert sysfs.read_knob("run") == 0
    assert not other_ksm_users(), "another process uses KSM: deltas would not be exact"
    before = programs()
    path = tmp_path / "w.ksmrec"
    rec = start_recorder(path)
    try:
        with Workload(WorkloadSpec(processes=3, pages=2000, distinct=20)) as w:
            w.wait_merged()
            pids = list(w.pids)
            merged = w.measure()
            written = w.cow(0.1)
            w.wait_expected()
            time.sleep(1)
        time.sleep(1)
        rec.send_signal(signal.SIGINT)
        assert rec.wait(timeout=60) == 0, rec.stderr.read()
    finally:
        if rec.poll() is None:
            rec.kill()
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "report", str(path), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    t = rep["totals"]
    assert t["merges"] == merged.pages_shared + merged.pages_sharing == 6000
    assert t["cow_ksm"] == sum(written.values())
    per_pid = {p["pid"]: p for p in rep["processes"]}
    assert [per_pid[pid]["merges"] for pid in pids] == [2000, 2000, 2000]
    assert sum(per_pid[pid]["cow_breaks"] for pid in pids) == t["cow_ksm"]
    assert t["scan_rounds"] == t["full_scans"]
    assert rep["lost_events"] == 0
    # the event stream holds every merge the counters saw
    assert rep["events_by_kind"]["merge"] == t["merges"]
    time.sleep(0.5)
    assert programs() == before


def test_sigkill_leaves_a_readable_recording(tmp_path):
    before = programs()
    path = tmp_path / "k.ksmrec"
    rec = start_recorder(path, "0.1")
    time.sleep(1.5)
    rec.send_signal(signal.SIGKILL)
    rec.wait(timeout=30)
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "report", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert len(list(Recording(path, warn=None).ticks())) >= 2
    for _ in range(50):
        if programs() == before:
            break
        time.sleep(0.1)
    assert programs() == before
