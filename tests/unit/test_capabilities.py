"""The attach-plan rules, on facts `ksmtrace doctor --json` recorded on real kernels."""

import dataclasses
import json
from pathlib import Path

import pytest

from ksmtrace.kernel import capabilities as caps

FACTS = Path(__file__).parent.parent / "fixtures" / "facts"


def load(name: str) -> caps.Facts:
    return caps.Facts.from_dict(json.loads((FACTS / name).read_text()))


@pytest.fixture
def host() -> caps.Facts:
    return load("host-6.18.json")


def test_facts_round_trip(host):
    assert caps.Facts.from_dict(json.loads(json.dumps(host.as_dict()))) == host


def test_host_plan_uses_tracepoints_and_labels_cow_estimated(host):
    p = caps.plan(host)
    assert p.get("scan_rounds").method == "tracepoint"
    assert p.get("scan_rounds").targets == ("ksm:ksm_start_scan", "ksm:ksm_stop_scan")
    merges = p.get("merges")
    assert merges.method == "tracepoint"
    assert [m.method for m in merges.missed] == ["fentry", "kprobe"]
    cow = p.get("cow_breaks")
    assert cow.method == "tracepoint" and cow.estimated and not cow.direct
    assert "estimated" in cow.reason


def test_inlined_scan_function_is_explained(host):
    c = caps.plan(host).get("scan_batches")
    assert c.method == "polling"
    assert any("inlined" in m.why for m in c.missed)


def test_every_stage_has_a_choice(host):
    stages = caps.plan(host).by_stage()
    assert set(stages) == set(caps.STAGES)
    assert all(stages[s] for s in caps.STAGES)


def test_forced_backend_falls_back_to_polling_only(host):
    p = caps.plan(host, "kprobe")
    merges = p.get("merges")
    # kprobes do not work on this host: the forced plan must not sneak in tracepoints
    assert merges.method == "polling"
    assert any("--attach kprobe" in m.why for m in merges.missed)
    assert p.get("cow_breaks").method == "polling"
    # probes kprobes cannot observe keep the automatic choice
    assert p.get("scan_rounds").method == "tracepoint"
    assert p.get("mm_owners").method == "tracepoint"


def test_order_prefers_fentry_then_kprobe(host):
    # The host's facts with one mechanism proven usable: the rule, not the host, is tested.
    kp = dataclasses.replace(host, kprobe=caps.Trial(True, "attached"))
    assert caps.plan(kp).get("merges").method == "kprobe"
    assert caps.plan(kp).get("cow_breaks").method == "kprobe"
    assert caps.plan(kp).get("cow_breaks").exit_probe
    both = dataclasses.replace(kp, fentry=caps.Trial(True, "attached"))
    assert caps.plan(both).get("merges").method == "fentry"
    # an inlined function stays unreachable whatever the mechanism
    assert caps.plan(both).get("scan_batches").method == "polling"


def test_missing_tracepoints_fall_back_to_polling(host):
    no_tp = dataclasses.replace(host, tracepoints={k: False for k in host.tracepoints})
    p = caps.plan(no_tp)
    assert p.get("scan_rounds").method == "polling"
    assert p.get("merges").method == "polling"
    assert "not in this kernel" in p.get("merges").missed[-1].why


def test_unknown_force_rejected(host):
    with pytest.raises(ValueError):
        caps.plan(host, "uprobe")


def test_explain_failure_names_the_cause():
    said = ("bpf: Failed to load program: Operation not permitted",)
    assert "EPERM" in caps.explain_failure("fentry:do_wp_page", "Need super-user", said)
    assert caps.explain_failure("kprobe:x", None, ("something odd",)) == "something odd"
