"""Recording format, replay, report and timeline, on a recording made with
`ksmtrace record` on the real host (tests/fixtures/README.md says how)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ksmtrace import report
from ksmtrace.collector import Collector
from ksmtrace.errors import BadRecording, Exit
from ksmtrace.record import MAGIC, Recorder, Recording
from ksmtrace.sources.replay import ReplaySource

FIX = Path(__file__).parent.parent / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"


def test_round_trip_is_exact(tmp_path):
    rec = Recording(FIX)
    ticks = list(rec.ticks())
    assert len(ticks) > 10 and any(t.events for t in ticks)
    out = tmp_path / "copy.ksmrec"
    with Recorder(out, {k: v for k, v in rec.header.items() if k not in ("format", "ksmtrace")}
                  ) as w:
        for t in ticks:
            w.write(t)
    again = list(Recording(out).ticks())
    assert again == ticks


def test_replay_gives_the_same_snapshots_twice():
    def snaps():
        src = ReplaySource(FIX)
        col = Collector(src.kind, src.probes, src.notes, src.cow_estimated)
        return [col.add_tick(t) for t in src.ticks()]

    a, b = snaps(), snaps()
    assert [s.totals for s in a] == [s.totals for s in b]
    assert a[-1].totals["scan_rounds"] == a[-1].totals["full_scans"]


def test_every_truncation_reads_a_prefix(tmp_path):
    data = FIX.read_bytes()
    full = len(list(Recording(FIX).ticks()))
    last_n = None
    for cut in range(len(data) - 1, len(data) - 3000, -97):
        p = tmp_path / "cut.ksmrec"
        p.write_bytes(data[:cut])
        r = Recording(p, warn=None)
        n = len(list(r.ticks()))
        assert n <= full and r.truncated
        last_n = n
    assert last_n is not None and last_n >= full - 3


@pytest.mark.parametrize("damage,what", [
    (lambda d: b"NOTKSMTRACE!!" + d[13:], "bad magic"),
    (lambda d: d[:300] + bytes([d[300] ^ 0xFF]) + d[301:], "checksum mismatch"),
])
def test_corruption_is_a_clear_error(tmp_path, damage, what):
    p = tmp_path / "bad.ksmrec"
    p.write_bytes(damage(FIX.read_bytes()))
    with pytest.raises(BadRecording) as e:
        list(Recording(p, warn=None).ticks())
    assert what in e.value.message
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "report", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == Exit.BAD_RECORDING
    assert "Traceback" not in r.stderr and what in r.stderr


def test_not_a_recording(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    with pytest.raises(BadRecording):
        Recording(p)
    assert MAGIC.endswith(b"\n")


def test_report_matches_replayed_totals():
    r = report.summarise(str(FIX))
    src, snaps, _ = report.replay_all(str(FIX))
    assert r["totals"] == snaps[-1].totals
    assert r["stages"]["merging"]["merges"] == sum(p["merges"] for p in r["processes"])
    assert r["lost_events"] == 0


def test_timeline_has_rounds_and_per_process_instants(tmp_path):
    t = report.timeline(str(FIX))
    json.dumps(t)
    ev = t["traceEvents"]
    rounds = [e for e in ev if e["ph"] == "X"]
    merges = [e for e in ev if e["ph"] == "i" and e["name"].startswith("merge")]
    assert rounds and all(e["dur"] > 0 for e in rounds)
    assert len({e["pid"] for e in merges}) == 3
    names = {e["pid"] for e in ev if e["ph"] == "M"}
    assert {e["pid"] for e in merges} <= names


def test_collector_memory_is_bounded_under_process_churn():
    import dataclasses

    from ksmtrace import collector as collector_mod

    ticks = list(Recording(FIX).ticks())
    base = next(t for t in ticks if t.counters.processes)
    template = base.counters.processes[0]
    col = Collector("replay")
    for i in range(collector_mod.MAX_EXITED * 4):
        # a new short-lived process every tick
        procs = (dataclasses.replace(template, pid=100000 + i),)
        c = dataclasses.replace(base.counters, mono=base.counters.mono + i, processes=procs)
        col.add_tick(dataclasses.replace(base, seq=i, counters=c, events=b""))
    assert len(col._procs) <= collector_mod.MAX_EXITED + 2
