"""Pure pieces of the tracing core: the exact COW split, the plan -> cflags
translation on recorded facts, and event decoding."""

import dataclasses
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ksmtrace import probes
from ksmtrace.collector import split_exact
from ksmtrace.kernel import capabilities as caps
from ksmtrace.model import EVENT_SIZE, EVENT_STRUCT, Event, EventKind, iter_events

FACTS = Path(__file__).parent.parent / "fixtures" / "facts" / "host-6.18.json"


def host() -> caps.Facts:
    return caps.Facts.from_dict(json.loads(FACTS.read_text()))


@given(st.integers(0, 10**6), st.dictionaries(st.integers(0, 50), st.integers(0, 10**4)))
def test_split_is_exact_and_proportional(total, weights):
    parts = split_exact(total, weights)
    if total > 0 and sum(weights.values()) > 0:
        assert sum(parts.values()) == total
        wsum = sum(weights.values())
        for k, n in parts.items():
            assert abs(n - total * weights[k] / wsum) < 1
    else:
        assert parts == {}


def test_split_matches_equal_writers():
    assert split_exact(600, {1: 200, 2: 200, 3: 200}) == {1: 200, 2: 200, 3: 200}


def test_host_build_is_tracepoints_only():
    f = host()
    b = probes.build(caps.plan(f), f, stream=False)
    assert set(b.parts) == {"SCAN_TP", "ADVISOR_TP", "MERGE_TP", "MERGE_SLOT", "MM_TP",
                            "RESOLVER", "COW_EST", "REMOVE_TP"}
    assert b.kprobes == () and b.stream == probes.STREAM_NONE and b.cow_estimated
    assert f"-DOFF_TASK_MM={f.layout['task_struct.mm']}" in b.cflags
    missed = [p.probe for p in b.probes if not p.attached]
    assert missed == ["unshares"]


def test_advisor_is_planned_only_where_the_kernel_has_one():
    f = host()
    assert caps.plan(f).get("advisor").method == "tracepoint"
    knobs = {k: v for k, v in f.ksm_knobs.items() if k != "advisor_mode"}
    older = dataclasses.replace(f, ksm_knobs=knobs)
    assert "advisor" not in {c.probe for c in caps.plan(older).choices}
    assert "ADVISOR_TP" not in probes.build(caps.plan(older), older, stream=False).parts
    # with the advisor but not its tracepoint: planned, and missed
    tps = dict(f.tracepoints, **{"ksm:ksm_advisor": False})
    c = caps.plan(dataclasses.replace(f, tracepoints=tps)).get("advisor")
    assert c.method is None and "not in this kernel" in c.missed[0].why


def test_merge_slot_only_with_scan_rounds_and_merges_traced():
    f = host()
    assert probes.build(caps.plan(f), f, stream=False).merge_slot
    no_tp = dataclasses.replace(f, tracepoints={k: False for k in f.tracepoints})
    assert not probes.build(caps.plan(no_tp), no_tp, stream=False).merge_slot


def test_kprobe_build_attaches_entry_and_exit():
    f = dataclasses.replace(host(), kprobe=caps.Trial(True, "attached"))
    b = probes.build(caps.plan(f, "kprobe"), f, stream=True)
    assert "-DMERGE_FN=2" in b.cflags and "-DCOW_FN=2" in b.cflags
    fns = {(k.function, k.ret) for k in b.kprobes}
    for fn in ("try_to_merge_one_page", "try_to_merge_with_ksm_page", "do_wp_page",
               "break_ksm"):
        assert (fn, False) in fns and (fn, True) in fns
    assert not b.cow_estimated and b.stream == probes.STREAM_RINGBUF


def test_event_layout_matches_header():
    header = (probes.BPF_DIR / "ksmtrace.h").read_text()
    assert "/* 72 bytes */" in header and EVENT_SIZE == 72
    raw = EVENT_STRUCT.pack(5, 0xFFFF8881, 0x1234, 900, 7 | (200 << 32), 42, 43, -16,
                            EventKind.SCAN_STOP, 0, b"ksmd")
    e = Event.unpack(raw)
    assert (e.scan_seq, e.rmap_entries, e.err, e.comm, e.stage) == (7, 200, -16, "ksmd",
                                                                    "searching")
    assert list(iter_events(raw * 3)) == [e, e, e]
