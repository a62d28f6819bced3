"""The figure catalogue against the BPF header, and its decoders."""

import re

import pytest

from ksmtrace import figures
from ksmtrace.figures import FIGURES, MergeKind, errno_name, merge_kind, split_error_key
from ksmtrace.model import EVENT_OFFSETS, EVENT_SIZE, EventKind
from ksmtrace.probes import BPF_DIR

HEADER = (BPF_DIR / "ksmtrace.h").read_text()


def _enum(name: str) -> list[str]:
    body = re.search(r"enum " + name + r" \{(.*?)\};", HEADER, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return [re.sub(r"=.*", "", x).strip() for x in body.split(",") if x.strip()]


def test_counter_slots_are_the_header_enum_in_order():
    names = _enum("ksm_counter")
    assert names[-1] == "C_NR"
    assert [n.removeprefix("C_").lower() for n in names[:-1]] == list(figures.COUNTER_SLOTS)


def test_histogram_slots_are_the_header_enum_in_order():
    assert [n.removeprefix("H_").lower() for n in _enum("ksm_hist")] == \
        list(figures.HISTOGRAM_SLOTS)


def test_merge_and_event_kinds_match_the_header():
    merge = _enum("ksm_merge_kind")
    assert [n.removeprefix("MERGE_") for n in merge] == ["NEW_PAIR", "INTO_KSM", "ZERO"]
    assert len(merge) == len(MergeKind) == len(figures.MERGE_KINDS)
    kinds = {re.sub(r"=.*", "", n).strip(): int(n.split("=")[1])
             for n in re.search(r"enum ksm_event_kind \{(.*?)\};", HEADER, re.S).group(1)
             .split("\n") if "=" in n for n in [n.split(",")[0].strip()]}
    assert {k.removeprefix("EV_"): v for k, v in kinds.items()} == \
        {k.name: k.value for k in EventKind}


def test_event_offsets_match_the_header_comments():
    body = re.search(r"struct ksm_event \{(.*?)\};", HEADER, re.S).group(1)
    offsets = {m.group(2): int(m.group(3))
               for m in re.finditer(r"(\w+)\s+(\w+)(?:\[\d+\])?;\s*/\*\s*(\d+):", body)}
    assert offsets == EVENT_OFFSETS
    assert f"/* {EVENT_SIZE} bytes */" in HEADER


def test_every_traced_figure_names_a_probe_of_the_plan():
    from ksmtrace.kernel.capabilities import PROBES

    probes = {p.name for p in PROBES}
    for f in FIGURES.values():
        if f.source == "bpf" and f.probe is not None:
            assert f.probe in probes, f.name
        assert f.stage in ("searching", "merging", "counting", "updating", "self"), f.name
        assert f.kind in ("counter", "gauge", "histogram"), f.name


def test_aggregates_sum_their_parts():
    c = {"merges_new_ksm_page": 2, "merges_into_ksm_page": 3, "merges_zero_page": 4,
         "cow_writes": 5, "cow_unshares": 6}
    assert figures.aggregate("merges", c) == 9
    assert figures.aggregate("cow_breaks", c) == 11
    assert figures.aggregate("merge_failures", c) == 0


@pytest.mark.parametrize("err,name", [(0, "ok"), (-16, "EBUSY"), (16, "EBUSY"),
                                      (-14, "EFAULT"), (-4095, "4095")])
def test_errno_name(err, name):
    assert errno_name(err) == name


def test_merge_kind_and_error_keys():
    assert merge_kind(1) == "into_ksm_page" and merge_kind(7) == "7"
    assert figures.error_key(1, -16) == "into_ksm_page:-16"
    assert split_error_key("into_ksm_page:-16") == ("into_ksm_page", -16)
    assert split_error_key("garbage") == ("garbage", None)
