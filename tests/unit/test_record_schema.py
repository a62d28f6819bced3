"""The one schema of a recording's JSON (ksmtrace/recschema.py): every field
of the header, the ticks and END is of its type and in its range, or the
recording is corrupt (BadRecording, exit 9) with a message naming the field
and the record's byte offset; ticks in order, END counting what is there,
events of known kinds. On copies of the recording made on the real host."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest
from recbytes import FIX, HEAD, records, tick_parts, tick_payload

from ksmtrace import recschema
from ksmtrace.errors import BadRecording, Exit
from ksmtrace.kernel.procfs import KsmStat, KsmVmstat
from ksmtrace.kernel.sysfs import KsmSysfs
from ksmtrace.model import EVENT_SIZE, BpfTotals, MmStats, ProbeStatus, ProgramCost, Tick
from ksmtrace.record import (
    DATA_START,
    TICK,
    Recorder,
    Recording,
    encode_record,
    tick_from_json,
    tick_to_json,
)


# ------------------------------------------------------------------ helpers
def build(data: bytes, recs: list[tuple[int, bytes]]) -> bytes:
    return data[:DATA_START] + b"".join(encode_record(k, p) for k, p in recs)


def edit(data: bytes, index: int, fn) -> bytes:
    """The recording with record `index`'s JSON changed by fn(doc) (which
    returns the new doc, or raw JSON bytes), checksums recomputed."""
    recs = [(k, p) for _, k, p in records(data)]
    kind, p = recs[index]
    doc, events = tick_parts(p) if kind == TICK else (json.loads(p), b"")
    new = fn(doc)
    js = new if isinstance(new, bytes) else json.dumps(new).encode()
    recs[index] = (kind, tick_payload(js, events) if kind == TICK else js)
    return build(data, recs)


def read_all(path: Path) -> Recording:
    with Recording(path, warn=None) as r:
        list(r.ticks())
    return r


@pytest.fixture(scope="module")
def data() -> bytes:
    return FIX.read_bytes()


@pytest.fixture(scope="module")
def busy(data) -> int:
    """Index of a record whose tick has processes, BPF mms and events."""
    for i, (_, kind, p) in enumerate(records(data)):
        if kind == TICK:
            d, events = tick_parts(p)
            if d["processes"] and d["bpf"]["mms"] and events:
                return i
    raise AssertionError("no busy tick in the fixture")


def assert_bad(tmp_path: Path, damaged: bytes, offset: int, *texts: str) -> BadRecording:
    p = tmp_path / "bad.ksmrec"
    p.write_bytes(damaged)
    with pytest.raises(BadRecording) as e:
        read_all(p)
    msg = e.value.message
    assert e.value.exit_code == Exit.BAD_RECORDING
    assert msg.endswith(f"at byte offset {offset}"), msg
    for t in texts:
        assert t in msg, msg
    assert "\n" not in msg
    return e.value


def set_at(path: tuple, value: Any):
    """fn(doc) setting doc[path] = value; "*" in path: the first key there."""
    def fn(doc):
        node = doc
        for i, k in enumerate(path):
            k = next(iter(node)) if k == "*" else k
            if i == len(path) - 1:
                node[k] = value
            else:
                node = node[k]
        return doc
    return fn


# -------------------------------------------------------- the schema itself
@pytest.mark.parametrize("struct_type,model", [
    (recschema.KsmSysfsJ, KsmSysfs), (recschema.KsmStatJ, KsmStat),
    (recschema.KsmVmstatJ, KsmVmstat), (recschema.ProbeJ, ProbeStatus),
])
def test_schema_fields_are_the_models_in_order(struct_type, model):
    """Decoded structs become the model's dataclasses positionally."""
    assert struct_type.__struct_fields__ == tuple(f.name for f in dataclasses.fields(model))


def test_bpf_and_mm_schemas_cover_the_model():
    names = {f.name for f in dataclasses.fields(BpfTotals)}
    assert set(recschema.BpfJ.__struct_fields__) == names
    assert len(recschema.MmJ.__args__) == len(dataclasses.fields(MmStats))


def test_every_fixture_tick_round_trips_through_the_schema():
    with Recording(FIX) as r:
        ticks = list(r.ticks())
    for t in ticks:
        d = tick_to_json(t)
        assert tick_from_json(d, t.events) == t
        assert tick_from_json(json.loads(json.dumps(d)), t.events) == t


def test_a_tick_with_every_part_round_trips(tmp_path):
    with Recording(FIX) as r:
        t = list(r.ticks())[-1]
    bpf = BpfTotals({"merges_new_ksm_page": 3}, {"merge_latency_seconds": {0: 4, 63: 1}},
                    {"into_ksm_page:-16": 2}, {2**64 - 1: MmStats((1, 2, 3), 4, (5, 6), 7, 8, 9)},
                    {1: MmStats()}, {2**64 - 1: 42}, perf_lost=5, comms={42: "qemu"},
                    programs=(ProgramCost("kp_cow", 2**63 - 1, 0),))
    ksm = dataclasses.replace(t.counters.ksm, extra={"new_knob": "7"}, general_profit=-2**63,
                              pages_scanned=2**63 - 1)
    c = dataclasses.replace(t.counters, ksm=ksm, ksmd_cpu_ticks=12)
    tick = Tick(7, c, bpf, b"")
    assert tick_from_json(tick_to_json(tick), b"") == tick
    with Recorder(tmp_path / "r.ksmrec", {}) as w:
        w.write(tick)
    with Recording(tmp_path / "r.ksmrec") as r:
        assert list(r.ticks()) == [tick]


def test_tick_from_json_refuses_what_is_not_a_tick():
    with Recording(FIX) as r:
        t = list(r.ticks())[0]
    d = tick_to_json(t)
    d["ksm"]["pages_shared"] = "x"
    with pytest.raises(recschema.SchemaError, match=r"`\$\.ksm\.pages_shared`") as e:
        tick_from_json(d, b"")
    assert isinstance(e.value, ValueError)


# ------------------------------------------------ wrong types, out of range
# (record: "header" / "end" / "tick" (the busy one), path, value, text)
BAD_FIELDS = [
    ("tick", ("ksm", "pages_shared"), "x",
     "`$.ksm.pages_shared`: expected `int | null`, got `str`"),
    ("tick", ("ksm", "general_profit"), 1.5, "`$.ksm.general_profit`"),
    ("tick", ("ksm", "pages_scanned"), -1, "`$.ksm.pages_scanned`: expected `int` >= 0"),
    ("tick", ("ksm", "pages_scanned"), 2**63, "`$.ksm.pages_scanned`"),
    ("tick", ("ksm", "extra"), {"a": 1}, "`$.ksm.extra[...]`"),
    ("tick", ("ksm", "new_file"), 1, "unknown field `new_file`"),
    ("tick", ("seq",), -1, "`$.seq`: expected `int` >= 0"),
    ("tick", ("seq",), "3", "`$.seq`"),
    ("tick", ("mono",), 1e300, "`$.mono`"),
    ("tick", ("mono",), -0.5, "`$.mono`"),
    ("tick", ("wall",), None, "`$.wall`"),
    ("tick", ("vmstat", "cow_ksm"), True, "`$.vmstat.cow_ksm`: expected `int | null`, got `bool`"),
    ("tick", ("processes", 0, 0), 0, "`$.processes[0][0]`: expected `int` >= 1"),
    ("tick", ("processes", 0, 0), 4194304, "`$.processes[0][0]`: expected `int` <= 4194303"),
    ("tick", ("processes", 0, 1), ["python"], "`$.processes[0][1]`"),
    ("tick", ("processes", 0, 3, "ksm_mergeable"), 1, "`$.processes[0][3].ksm_mergeable`"),
    ("tick", ("processes", 0, 3, "ksm_process_profit"), "5", "`$.processes[0][3]"),
    ("tick", ("bpf", "counters", "scan_rounds"), -5, "`$.bpf.counters[...]`"),
    ("tick", ("bpf", "hist", "scan_round_seconds", "64"), 1, "`$.bpf.hist[...]`"),
    ("tick", ("bpf", "hist", "scan_round_seconds", "-1"), 1, "`$.bpf.hist[...]`"),
    ("tick", ("bpf", "mms", "*"), [[1, 2], 0, [0, 0], 0, 0, 0], "`$.bpf.mms[...][0]`"),
    ("tick", ("bpf", "mms", "*"), [[[1]], 0, [0, 0], 0, 0, 0], "`$.bpf.mms[...]"),
    ("tick", ("bpf", "owners", "18446744073709551616"), 1, "`$.bpf.owners`"),
    ("tick", ("bpf", "owners", "*"), -1, "`$.bpf.owners[...]`"),
    ("tick", ("bpf", "comms", "x"), "a", "`$.bpf.comms`"),
    ("tick", ("bpf", "perf_lost"), 0.0, "`$.bpf.perf_lost`"),
    ("tick", ("bpf", "programs"), [["kp", 1]], "`$.bpf.programs[0]`"),
    ("tick", ("bpf", "errors"), [], "`$.bpf.errors`"),
    ("tick", ("bpf",), 5, "`$.bpf`"),
    ("header", ("notes",), 5, "`$.notes`: expected `array`, got `int`"),
    ("header", ("notes",), [["a"]], "`$.notes[0]`"),
    ("header", ("probes", 0, "targets"), [["a"]], "`$.probes[0].targets[0]`: expected `str`"),
    ("header", ("probes", 0, "attached"), "yes", "`$.probes[0].attached`"),
    ("header", ("probes", 0), "merges", "`$.probes[0]`"),
    ("header", ("format",), 3, "`$.format`"),
    ("header", ("interval",), 0, "`$.interval`: expected `float` > 0"),
    ("header", ("cow_estimated",), "true", "`$.cow_estimated`"),
    ("header", ("facts", "tracepoints"), ["ksm:ksm_advisor"], "`$.facts.tracepoints`"),
    ("header", ("facts",), 7, "`$.facts`"),
    ("header", ("pids",), [-1], "`$.pids[0]`"),
    ("header", ("kernel",), 6.18, "`$.kernel`"),
    ("end", ("ticks",), "25", "`$.ticks`"),
    ("end", ("events",), -1, "`$.events`"),
    ("end", ("closed",), True, "unknown field `closed`"),
]


@pytest.mark.parametrize("where,path,value,text", BAD_FIELDS,
                         ids=[f"{w}:{'.'.join(map(str, p))}={v!r}"[:60]
                              for w, p, v, _ in BAD_FIELDS])
def test_a_field_of_the_wrong_type_or_range_names_the_field_and_the_offset(
        tmp_path, data, busy, where, path, value, text):
    recs = records(data)
    index = {"header": 0, "end": len(recs) - 1, "tick": busy}[where]
    what = {"header": "header record does not describe a recording header",
            "end": "end record does not describe a recording's end",
            "tick": "tick record does not describe a tick"}[where]
    assert_bad(tmp_path, edit(data, index, set_at(path, value)), recs[index][0], what, text)


@pytest.mark.parametrize("where", ["header", "tick", "end"])
@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 5000,
                                 "[" * 2000 + "]" * 2000, "{" + '"a":{' * 2000 + "}" * 2001])
def test_raw_json_values_deep_nesting_and_huge_numbers(tmp_path, data, busy, where, raw):
    """No RecursionError, no float('nan') or inf reaching a consumer."""
    recs = records(data)
    index = {"header": 0, "end": len(recs) - 1, "tick": busy}[where]
    key = {"header": "facts", "tick": "mono", "end": "ticks"}[where]

    def fn(doc):
        doc[key] = "\0RAW\0"
        return json.dumps(doc).replace('"\\u0000RAW\\u0000"', raw).encode()

    assert_bad(tmp_path, edit(data, index, fn), recs[index][0], f"{where} record")


@pytest.mark.parametrize("where", ["header", "tick", "end"])
def test_a_whole_record_of_deep_nesting(tmp_path, data, busy, where):
    recs = records(data)
    index = {"header": 0, "end": len(recs) - 1, "tick": busy}[where]
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_bad(tmp_path, edit(data, index, lambda d: deep), recs[index][0], f"{where} record")


def test_the_header_may_hold_keys_it_does_not_know(tmp_path, data):
    p = tmp_path / "h.ksmrec"
    p.write_bytes(edit(data, 0, lambda d: {**d, "future": {"x": [1, 2]}}))
    with Recording(p) as r:
        assert r.header["future"] == {"x": [1, 2]}
        assert len(list(r.ticks())) == 25


def test_a_header_without_optional_fields_reads_with_defaults(tmp_path):
    p = tmp_path / "min.ksmrec"
    Recorder(p, {}).close()
    with Recording(p) as r:
        assert r.probes == () and list(r.ticks()) == [] and r.end is not None


# ------------------------------------------------------------- tick order
def _ticks(data: bytes) -> list[int]:
    return [i for i, (_, k, _) in enumerate(records(data)) if k == TICK]


def test_ticks_in_reverse_order_are_corrupt(tmp_path, data):
    recs = [(k, p) for _, k, p in records(data)]
    recs[1:-1] = recs[1:-1][::-1]
    second = DATA_START + sum(HEAD.size + len(p) for _, p in recs[:2])
    assert_bad(tmp_path, build(data, recs), second, "tick 24 follows tick 25",
               "tick numbers must increase")


def test_a_duplicated_tick_is_corrupt(tmp_path, data):
    recs = [(k, p) for _, k, p in records(data)]
    i = _ticks(data)[3]
    recs.insert(i, recs[i])
    at = DATA_START + sum(HEAD.size + len(p) for _, p in recs[:i + 1])
    assert_bad(tmp_path, build(data, recs), at, "tick 4 follows tick 4")


def test_time_going_back_is_corrupt(tmp_path, data):
    i = _ticks(data)[5]
    prev_mono = tick_parts(records(data)[i - 1][2])[0]["mono"]
    damaged = edit(data, i, lambda d: {**d, "mono": prev_mono - 12.003})
    assert_bad(tmp_path, damaged, records(data)[i][0], "tick 6 is 12.003000 s older than tick 5")


def test_equal_times_and_gaps_in_tick_numbers_are_fine(tmp_path, data):
    i = _ticks(data)[5]
    prev_mono = tick_parts(records(data)[i - 1][2])[0]["mono"]
    p = tmp_path / "ok.ksmrec"
    p.write_bytes(edit(data, i, lambda d: {**d, "mono": prev_mono, "seq": d["seq"] + 0}))
    with Recording(p) as r:
        assert len(list(r.ticks())) == 25
    p.write_bytes(edit(data, _ticks(data)[-1], lambda d: {**d, "seq": 1000}))
    with Recording(p) as r:
        assert list(r.ticks())[-1].seq == 1000


@pytest.mark.parametrize("key,delta", [("ticks", 1), ("ticks", -1), ("events", 1),
                                       ("events", -2691)])
def test_an_end_count_that_is_not_the_files_is_corrupt(tmp_path, data, key, delta):
    end = len(records(data)) - 1
    damaged = edit(data, end, lambda d: {**d, key: d[key] + delta})
    assert_bad(tmp_path, damaged, records(data)[end][0], "the end record counts",
               "the recording holds 25 and 2691")


def test_an_end_after_a_dropped_tick_is_corrupt(tmp_path, data):
    recs = [(k, p) for _, k, p in records(data)]
    del recs[3]
    at = DATA_START + sum(HEAD.size + len(p) for _, p in recs[:-1])
    assert_bad(tmp_path, build(data, recs), at, "the end record counts 25 ticks")


# ------------------------------------------------------------------- events
@pytest.mark.parametrize("kind", [0, 12, 255, 0x0103, 0xFFFF])
def test_an_event_of_an_unknown_kind_is_corrupt(tmp_path, data, busy, kind):
    recs = [(k, p) for _, k, p in records(data)]
    d, events = tick_parts(recs[busy][1])
    ev = bytearray(events)
    struct.pack_into("<H", ev, 2 * EVENT_SIZE + 52, kind)
    recs[busy] = (TICK, tick_payload(json.dumps(d).encode(), bytes(ev)))
    assert_bad(tmp_path, build(data, recs), records(data)[busy][0],
               f"tick event 2 has unknown kind {kind}")


def test_any_other_event_field_value_is_read(tmp_path, data, busy):
    """Events are kept as the kernel wrote them: every other field is any
    value of its C type, and report and timeline cope (test_record_fuzz)."""
    recs = [(k, p) for _, k, p in records(data)]
    d, events = tick_parts(recs[busy][1])
    ev = bytearray(events)
    struct.pack_into("<QQQQQIIiH", ev, 0, *([2**64 - 1] * 5), 2**32 - 1, 2**32 - 1, -2**31, 0xFFFF)
    struct.pack_into("<H", ev, 52, 3)
    recs[busy] = (TICK, tick_payload(json.dumps(d).encode(), bytes(ev)))
    p = tmp_path / "ev.ksmrec"
    p.write_bytes(build(data, recs))
    assert len(list(Recording(p).ticks())) == 25


# --------------------------------------------------------------------- CLI
def test_cli_names_the_field_in_one_line(tmp_path, data, busy, capsys):
    from ksmtrace.cli import main

    p = tmp_path / "x.ksmrec"
    p.write_bytes(edit(data, busy, set_at(("ksm", "pages_shared"), "x")))
    for argv in (["report", str(p)], ["report", "--json", str(p)],
                 ["timeline", str(p), "-o", str(tmp_path / "t.json")]):
        assert main(argv) == 9
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and err.startswith("ksmtrace: ")
        assert "`$.ksm.pages_shared`: expected `int | null`, got `str`) at byte offset " \
            f"{records(data)[busy][0]}" in err
    assert not (tmp_path / "t.json").exists()


def test_msgspec_is_strict_as_assumed():
    """No coercion: the schema's strictness rests on these."""
    for raw, t in ((b'"1"', int), (b"true", int), (b"1", bool), (b"1.0", int), (b"null", str)):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(raw, type=t)


@pytest.mark.parametrize("key", ["o\nners", "x" * 100_000, "\x1b[2J\r"])
def test_text_from_the_file_in_a_message_is_one_short_line(tmp_path, data, busy, key):
    """An unknown key's name is quoted escaped and cut short."""
    damaged = edit(data, busy, lambda d: {**d, "bpf": {**d["bpf"], key: 1}})
    e = assert_bad(tmp_path, damaged, records(data)[busy][0], "`$.bpf`: object contains "
                   "unknown field")
    assert e.message.isprintable() and len(e.message) < 400 + len(str(tmp_path))
