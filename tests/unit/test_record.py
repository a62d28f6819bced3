"""The recording format and the replay source, on a recording made with
`ksmtrace record` on the real host (tests/fixtures/README.md says how):
exact round trip, every truncation of the last record, every kind of
corruption (a one-line error, exit 9, nothing written), replay pacing."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import recbytes
from recbytes import FIX, HEAD

from ksmtrace import collector as collector_mod
from ksmtrace import record as record_mod
from ksmtrace import recschema
from ksmtrace.collector import Collector, observe
from ksmtrace.errors import BadRecording, Exit, KsmtraceError
from ksmtrace.kernel.identity import Workload
from ksmtrace.model import EVENT_SIZE, BpfTotals, MmStats, ProgramCost, Tick
from ksmtrace.record import (
    DATA_START,
    END,
    HEADER,
    MAGIC,
    READS,
    TICK,
    VERSION,
    Recorder,
    Recording,
    encode_record,
    encode_tick,
)
from ksmtrace.sources.replay import ReplaySource


def records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, kind, total size) of each record."""
    return [(pos, kind, HEAD.size + len(p)) for pos, kind, p in recbytes.records(data)]


@pytest.fixture(scope="module")
def fixture_bytes() -> bytes:
    return FIX.read_bytes()


@pytest.fixture(scope="module")
def fixture_ticks() -> list[Tick]:
    with Recording(FIX) as r:
        return list(r.ticks())


# ------------------------------------------------------------- round trip
def test_fixture_is_a_closed_recording_of_a_format_that_reads(fixture_bytes, fixture_ticks):
    with Recording(FIX) as r:
        # version 2, from before workloads were sampled: it still reads
        assert r.version == r.header["format"] == 2 and 2 in READS
        assert r.header["source"] == "live" and r.header["facts"] and r.header["plan"]
        list(r.ticks())
        assert r.end == {**r.end, "ticks": len(fixture_ticks),
                         "events": sum(len(t.events) // EVENT_SIZE for t in fixture_ticks)}
        assert not r.truncated
    kinds = [k for _, k, _ in records(fixture_bytes)]
    assert kinds == [HEADER] + [TICK] * len(fixture_ticks) + [END]
    assert len(fixture_ticks) >= 10 and sum(bool(t.events) for t in fixture_ticks) >= 3
    assert len(fixture_bytes) < 400_000  # "a few hundred KB at most"


def test_round_trip_is_exact(tmp_path, fixture_bytes, fixture_ticks):
    with Recording(FIX) as r:
        header = {k: v for k, v in r.header.items() if k not in ("format", "ksmtrace")}
    out = tmp_path / "copy.ksmrec"
    with Recorder(out, header) as w:
        for t in fixture_ticks:
            w.write(t)
    with Recording(out) as again:
        assert again.header == {**header, "format": VERSION, "ksmtrace": again.header["ksmtrace"]}
        assert list(again.ticks()) == fixture_ticks
    # byte for byte: every tick record re-encodes to what the recorder wrote
    recs = records(fixture_bytes)
    for (off, _kind, size), t in zip([r for r in recs if r[1] == TICK], fixture_ticks,
                                    strict=True):
        assert fixture_bytes[off:off + size] == encode_tick(t)


def test_round_trip_keeps_types(fixture_ticks):
    """dict keys that JSON turns into strings come back as ints, tuples as tuples."""
    bpf = [t.bpf for t in fixture_ticks if t.bpf is not None]
    assert bpf and all(isinstance(b, BpfTotals) for b in bpf)
    mms = [(mm, s) for b in bpf for mm, s in (*b.mms.items(), *b.exited.items())]
    assert mms and all(isinstance(mm, int) and isinstance(s, MmStats) for mm, s in mms)
    assert all(isinstance(s.merges, tuple) and isinstance(s.cow, tuple) for _, s in mms)
    assert any(b.owners for b in bpf)
    assert all(isinstance(k, int) and isinstance(v, int) for b in bpf for k, v in b.owners.items())
    slots = [s for b in bpf for h in b.hist.values() for s in h]
    assert slots and all(isinstance(s, int) for s in slots)
    procs = [p for t in fixture_ticks for p in t.counters.processes]
    assert procs and all(isinstance(p.stat.ksm_mergeable, bool | None) for p in procs)


def test_a_synthetic_tick_round_trips(tmp_path, fixture_ticks):
    """Values the fixture lacks: exited mms, comms, errors, extra sysfs files."""
    t = fixture_ticks[-1]
    ksm = dataclasses.replace(t.counters.ksm, extra={"new_knob": "7"})
    bpf = BpfTotals({"merges_new_ksm_page": 3}, {"merge_latency_seconds": {12: 4, 63: 1}},
                    {"into_ksm_page:-16": 2}, {0xFFFF8881: MmStats((1, 2, 3), 4, (5, 6), 7, 8, 9)},
                    {0xFFFF8882: MmStats()}, {0xFFFF8881: 42}, perf_lost=5, comms={42: "qemu"},
                    programs=(ProgramCost("ksm:ksm_merge_with_ksm_page", 812345, 30000),
                              ProgramCost("kp_cow", 0, 0)))
    an_event = next(t.events[:EVENT_SIZE] for t in fixture_ticks if t.events)
    tick = Tick(99, dataclasses.replace(t.counters, ksm=ksm), bpf, t.events or an_event)
    no_bpf = Tick(100, t.counters, None, b"")
    p = tmp_path / "s.ksmrec"
    with Recorder(p, {}) as w:
        w.write(tick)
        w.write(no_bpf)
    with Recording(p) as r:
        assert list(r.ticks()) == [tick, no_bpf]


def test_the_recorder_refuses_a_tick_its_reader_would_refuse(tmp_path, fixture_ticks,
                                                              monkeypatch):
    """Over the reader's limit, a tick is refused whole, with a clear error,
    and the recording up to it closes readable (sources bound their ticks
    well below: tests/kernel/test_trace_kernel.py)."""
    first = fixture_ticks[0]
    an_event = next(t.events[:EVENT_SIZE] for t in fixture_ticks if t.events)
    big = dataclasses.replace(first, seq=2, events=an_event * 40)  # 2,880 bytes
    monkeypatch.setattr(record_mod, "MAX_RECORD", 2000)  # the reader's limit too
    p = tmp_path / "big.ksmrec"
    with Recorder(p, {}) as w:
        w.write(first)
        with pytest.raises(KsmtraceError) as e:
            w.write(big)
        assert "40 events" in e.value.message and "shorter interval" in e.value.hint
    with Recording(p, warn=None) as r:
        assert list(r.ticks()) == [first]
        assert r.cut_warning() is None  # END was written: nothing cut


def test_replay_gives_the_snapshots_the_ticks_give(fixture_ticks):
    """Replay feeds the collector exactly the recorded ticks: same snapshots
    as a collector fed those ticks directly (as live did), and every time."""
    def snaps(ticks):
        col = observe(src).collector
        return [dataclasses.replace(col.add_tick(t), source="live") for t in ticks]

    with ReplaySource(FIX) as src:
        assert src.kind == "replay"
        a = snaps(src.ticks())
        b = snaps(src.ticks())
    assert a == b == snaps(fixture_ticks)
    assert a[-1].totals["scan_rounds"] == a[-1].totals["full_scans"] > 0


def test_replay_source_takes_probes_notes_and_cow_mode_from_the_header():
    with Recording(FIX) as r, ReplaySource(FIX) as src:
        assert src.probes == r.probes and src.probes
        assert src.notes == tuple(r.header["notes"])
        assert src.cow_estimated is r.header["cow_estimated"]
        assert not all(p.attached for p in src.probes)  # this host misses some


def test_replay_count_and_interval_as_other_sources(fixture_ticks):
    with ReplaySource(FIX) as src:
        assert [t.seq for t in src.ticks(5.0, 3)] == [t.seq for t in fixture_ticks[:4]]
        assert len(list(src.ticks(1.0, 0))) == len(fixture_ticks)


def test_replay_speed_paces_by_recorded_time(fixture_ticks):
    span = fixture_ticks[-1].counters.mono - fixture_ticks[0].counters.mono
    speed = span / 0.3  # the whole recording in 0.3 s
    t0 = time.monotonic()
    with ReplaySource(FIX, speed=speed) as src:
        seen = [(time.monotonic() - t0, t.counters.mono) for t in src.ticks()]
    assert 0.29 <= seen[-1][0] < 2.0
    first = seen[0][1]
    for at, mono in seen:
        assert at >= (mono - first) / speed - 0.005  # never early
    with pytest.raises(ValueError):
        ReplaySource(FIX, speed=0)


# A child that records the fixture's ticks in a loop (renumbered, later each
# pass: a reader refuses repeated tick numbers and times going back) while the
# test sends it Ctrl-Cs; each KeyboardInterrupt is caught and the loop goes
# on, until SIGUSR1.
_WRITER = """
import dataclasses, mmap, signal, struct, sys
from ksmtrace.record import Recorder, Recording
signal.signal(signal.SIGINT, signal.default_int_handler)
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
with Recording(sys.argv[1]) as r:
    fixture = list(r.ticks())
def tick(k):  # the k-th tick written: w.ticks, counted with the write itself
    n, i = divmod(k, len(fixture))
    t = fixture[i]
    return dataclasses.replace(t, seq=t.seq + 1000 * n, counters=dataclasses.replace(
        t.counters, mono=t.counters.mono + 1000 * n))
with open(sys.argv[3], "r+b") as f:
    shown = mmap.mmap(f.fileno(), 8)  # the hit count, for the test to pace itself
hits = 0
w = Recorder(sys.argv[2], {})
ready = False
while not stop:
    try:
        # back inside the try: only now may the next Ctrl-C come (one in
        # this loop's own lines would end the writer, not test the Recorder)
        struct.pack_into("q", shown, 0, hits)
        if not ready:
            ready = True
            print("ready", flush=True)
        while not stop:
            w.write(tick(w.ticks))
    except KeyboardInterrupt:
        hits += 1
w.close()
print(hits, w.ticks, flush=True)
"""


def test_ctrl_c_never_cuts_a_record(tmp_path):
    """SIGINT arriving at any moment of a write takes effect after the whole
    record (and its count): the file always ends on a record boundary."""
    p = tmp_path / "sig.ksmrec"
    shown = tmp_path / "hits"
    shown.write_bytes(bytes(8))
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(FIX), str(p), str(shown)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        # one SIGINT at a time, each sent as soon as the writer is back in
        # its loop, so that each lands at a different moment of a write
        for n in range(1, 101):
            child.send_signal(signal.SIGINT)
            for _ in range(600_000):  # a hang guard, not a time limit
                if int.from_bytes(shown.read_bytes(), "little") >= n:
                    break
                assert child.poll() is None, f"the writer died at Ctrl-C {n}"
                time.sleep(0.0001)
            else:
                pytest.fail(f"Ctrl-C {n} never reached the writer (SIGINT left blocked?)")
        time.sleep(0.05)
        child.send_signal(signal.SIGUSR1)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0
    hits, ticks = map(int, out.split())
    assert hits == 100
    with Recording(p) as r:
        assert sum(1 for _ in r.ticks()) == ticks
        assert not r.truncated and r.end is not None and r.end["ticks"] == ticks


# -------------------------------------------------------------- truncation
def test_every_cut_of_the_last_records_reads_a_prefix(tmp_path, fixture_bytes, fixture_ticks):
    """A recorder killed mid-write leaves a prefix of what it wrote: cut the
    file at every byte of the last tick record and of END; each cut reads the
    ticks before it, warns once, and is not an error."""
    recs = records(fixture_bytes)
    last_tick_at = [off for off, k, _ in recs if k == TICK][-1]
    end_at = recs[-1][0]
    n = len(fixture_ticks)
    p = tmp_path / "cut.ksmrec"
    p.write_bytes(fixture_bytes)
    for cut in range(len(fixture_bytes) - 1, last_tick_at - 1, -1):
        os.truncate(p, cut)
        warn = io.StringIO()
        with Recording(p, warn=warn) as r:
            ticks = list(r.ticks())
            at_boundary = cut in (last_tick_at, end_at)
            assert len(ticks) == (n if cut >= end_at else n - 1), cut
            assert ticks[-1] == fixture_ticks[len(ticks) - 1]
            assert r.truncated is not at_boundary, cut
            assert r.end is None
        text = warn.getvalue()
        if at_boundary:
            assert text == ""
        else:
            cut_record = max(o for o, _, _ in recs if o <= cut)
            assert text.count("\n") == 1 and f"byte offset {cut_record}" in text, (cut, text)


def test_a_cut_inside_the_header_is_not_a_recording(tmp_path, fixture_bytes):
    p = tmp_path / "h.ksmrec"
    for cut in (0, 5, len(MAGIC), len(MAGIC) + 1, DATA_START, DATA_START + 7, DATA_START + 100):
        p.write_bytes(fixture_bytes[:cut])
        with pytest.raises(BadRecording):
            Recording(p, warn=None)


# -------------------------------------------------------------- corruption
def _splice(data: bytes, index: int, record: bytes) -> bytes:
    """Replace the index-th record (0: the header) by `record`."""
    off, _, size = records(data)[index]
    return data[:off] + record + data[off + size:]


def _tick_payload(js: bytes, events: bytes = b"") -> bytes:
    return struct.pack("<I", len(js)) + js + events


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1:]


def _mid(data: bytes) -> int:
    return len(records(data)) // 2


CORRUPTIONS = {
    "bad magic": (lambda d: b"NOT-KSMTRACE\n" + d[13:], "bad magic at byte offset 0"),
    "empty file": (lambda d: b"", "bad magic at byte offset 0"),
    "unknown version": (lambda d: d[:13] + struct.pack("<H", 99) + d[15:],
                        "format version 99 (byte offset 13) is not supported"),
    "old version 1": (lambda d: d[:13] + struct.pack("<H", 1) + d[15:],
                      "format version 1 (byte offset 13) is not supported"),
    "payload crc": (lambda d: _flip(d, records(d)[_mid(d)][0] + HEAD.size + 3),
                    "tick record checksum mismatch at byte offset {mid}"),
    "length flipped": (lambda d: _flip(d, records(d)[_mid(d)][0] + 3),
                       "record head checksum mismatch at byte offset {mid}"),
    "length beyond the end": (lambda d: d[:records(d)[_mid(d)][0] + 1] + b"\xff\xff\xff\x7f"
                              + d[records(d)[_mid(d)][0] + 5:],
                              "record head checksum mismatch at byte offset {mid}"),
    "unknown kind": (lambda d: _splice(d, _mid(d), encode_record(7, b"{}")),
                     "unknown record kind 7 at byte offset {mid}"),
    "undecodable json": (lambda d: _splice(d, _mid(d), encode_record(TICK, _tick_payload(
        b'{"seq": 1, "mono": '))), "undecodable tick record"),
    "not utf-8": (lambda d: _splice(d, _mid(d), encode_record(TICK, _tick_payload(b"\xff\xfe"))),
                  "undecodable tick record"),
    "json not a tick": (lambda d: _splice(d, _mid(d), encode_record(TICK, _tick_payload(
        b'{"seq": 1}'))), "tick record does not describe a tick"),
    "json not an object": (lambda d: _splice(d, _mid(d), encode_record(TICK, _tick_payload(
        b"[1, 2]"))), "tick record is not a JSON object"),
    "partial event": (lambda d: _splice(d, _mid(d), encode_record(TICK, _tick_payload(
        b"{}", bytes(EVENT_SIZE + 1)))), "not a whole number of 72-byte events"),
    "json length too big": (lambda d: _splice(d, _mid(d), encode_record(
        TICK, struct.pack("<I", 10_000) + b"{}")), "tick JSON length 10000 exceeds its record"),
    "tick too short": (lambda d: _splice(d, _mid(d), encode_record(TICK, b"ab")),
                       "tick record too short"),
    "second header": (lambda d: _splice(d, _mid(d), encode_record(HEADER, b"{}")),
                      "a second header record at byte offset {mid}"),
    "no header": (lambda d: d[:DATA_START] + d[records(d)[1][0]:], "no header record"),
    "undecodable header": (lambda d: _splice(d, 0, encode_record(HEADER, b"{oops")),
                           "undecodable header record"),
    "data after end": (lambda d: d + encode_record(TICK, b""), "data after the end record"),
    "header crc": (lambda d: _flip(d, DATA_START + HEAD.size + 10),
                   "header record checksum mismatch at byte offset 15"),
}


def _expected(data: bytes, text: str) -> str:
    return text.format(mid=records(data)[_mid(data)][0])


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_a_bad_recording_saying_what_and_where(tmp_path, fixture_bytes, case):
    damage, what = CORRUPTIONS[case]
    p = tmp_path / "bad.ksmrec"
    p.write_bytes(damage(fixture_bytes))
    with pytest.raises(BadRecording) as e:
        with Recording(p, warn=None) as r:
            list(r.ticks())
    assert _expected(fixture_bytes, what) in e.value.message
    assert "byte offset" in e.value.message
    assert e.value.exit_code == Exit.BAD_RECORDING


@pytest.mark.parametrize("case,command", [
    ("bad magic", "report"), ("unknown version", "report"), ("undecodable json", "report"),
    ("payload crc", "report"), ("payload crc", "report --json"), ("payload crc", "timeline"),
])
def test_cli_on_a_corrupt_recording_exits_9_with_one_line(tmp_path, fixture_bytes, case,
                                                          command):
    damage, what = CORRUPTIONS[case]
    p = tmp_path / "bad.ksmrec"
    p.write_bytes(damage(fixture_bytes))
    out = tmp_path / "trace.json"
    argv = command.split() + [str(p)] + (["-o", str(out)] if command == "timeline" else [])
    r = subprocess.run([sys.executable, "-m", "ksmtrace", *argv], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == Exit.BAD_RECORDING == 9, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksmtrace: "), r.stderr
    assert _expected(fixture_bytes, what) in lines[0]
    assert not out.exists()  # nothing written anywhere


def test_cli_on_missing_files(tmp_path):
    for path in (tmp_path / "nope.ksmrec", tmp_path):
        r = subprocess.run([sys.executable, "-m", "ksmtrace", "report", str(path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 9 and len(r.stderr.splitlines()) == 1, r.stderr


def test_a_recording_without_end_is_read_and_says_so(tmp_path, fixture_bytes, capsys):
    """SIGKILL after a flush: every tick complete, no END; not an error."""
    p = tmp_path / "killed.ksmrec"
    p.write_bytes(fixture_bytes[:records(fixture_bytes)[-1][0]])
    with Recording(p) as r:
        assert len(list(r.ticks())) == len(records(fixture_bytes)) - 2
        assert r.end is None and not r.truncated
    assert capsys.readouterr().err == ""


def test_header_and_records_are_checksummed_as_documented(fixture_bytes):
    assert fixture_bytes.startswith(MAGIC + struct.pack("<H", 2))
    for off, _kind, size in records(fixture_bytes):
        kind, length, crc, head_crc = struct.unpack_from("<BIII", fixture_bytes, off)
        assert head_crc == zlib.crc32(fixture_bytes[off:off + 9])
        assert crc == zlib.crc32(fixture_bytes[off + HEAD.size:off + size])
    off, _, size = records(fixture_bytes)[0]
    header = json.loads(fixture_bytes[off + HEAD.size:off + size])
    assert header["format"] == 2


# ---------------------------------------------------------------- workloads
VM1 = Workload("vm", "vm1", "", (("manager", "libvirt"),))


def _with_workload(t: Tick, w: Workload) -> Tick:
    procs = tuple(dataclasses.replace(p, workload=w) for p in t.counters.processes)
    return dataclasses.replace(t, counters=dataclasses.replace(t.counters, processes=procs))


def test_version_3_keeps_each_process_workload(tmp_path, fixture_ticks):
    ticks = [_with_workload(t, VM1) for t in fixture_ticks]
    out = tmp_path / "v3.ksmrec"
    with Recorder(out, {"source": "live"}) as w:
        for t in ticks:
            w.write(t)
    with Recording(out) as r:
        assert r.version == VERSION == 3
        assert list(r.ticks()) == ticks
    rows = ReplaySource(out, warn=None)
    with observe(rows) as obs:
        last = list(obs.snapshots())[-1]
    assert {p.workload for p in last.processes if p.pid} == {VM1}


def test_version_2_rows_are_named_from_their_cgroup(fixture_ticks):
    with observe(ReplaySource(FIX, warn=None)) as obs:
        last = list(obs.snapshots())[-1]
    # the fixture's workload processes ran in the root cgroup: plain processes
    assert {(p.workload.kind, p.workload.name) for p in last.processes} == \
        {("process", f"python[{p.pid}]") for p in last.processes}


@pytest.mark.parametrize("name,version,why", [
    ("vm1", 2, "a workload in a version 2 recording"),
    ("vm\x1b[2J", 3, "non-printable"),
    ("x" * 65, 3, "`$.processes[0][4][1]`: expected `str` of length <= 64"),
])
def test_bad_workloads_are_refused(tmp_path, fixture_ticks, name, version, why):
    base = next(t for t in fixture_ticks if t.counters.processes)
    t = _with_workload(base, dataclasses.replace(VM1, name=name))
    js = json.dumps(record_mod.tick_to_json(t)).encode()
    with pytest.raises(recschema.SchemaError, match=re.escape(why)):
        recschema.tick_struct(js, version)


# ------------------------------------------------------------------ collector
def test_collector_memory_is_bounded_under_process_churn(fixture_ticks):
    base = next(t for t in fixture_ticks if t.counters.processes)
    template = base.counters.processes[0]
    col = Collector("replay")
    for i in range(collector_mod.MAX_EXITED * 4):
        # a new short-lived process every tick
        procs = (dataclasses.replace(template, pid=100000 + i),)
        c = dataclasses.replace(base.counters, mono=base.counters.mono + i, processes=procs)
        col.add_tick(dataclasses.replace(base, seq=i, counters=c, events=b""))
    assert len(col._procs) <= collector_mod.MAX_EXITED + 2


def test_collector_forgets_the_owners_of_exited_mms(fixture_ticks):
    col = Collector("replay")
    exited: set[int] = set()
    for t in fixture_ticks:
        col.add_tick(t)
        if t.bpf is not None:
            exited |= set(t.bpf.exited)
    # the recorded workload's three mms exited and were drained
    assert len(exited) == 3 and not exited & set(col._owner)
