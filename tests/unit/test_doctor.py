"""doctor's wording and exit codes, from recorded facts."""

import dataclasses
import json
from pathlib import Path

from ksmtrace import doctor
from ksmtrace.errors import Exit
from ksmtrace.kernel import capabilities as caps

FACTS = Path(__file__).parent.parent / "fixtures" / "facts" / "host-6.18.json"


def host() -> caps.Facts:
    return caps.Facts.from_dict(json.loads(FACTS.read_text()))


def test_exit_codes_are_distinct():
    f = host()
    assert doctor.exit_code(f) == Exit.OK
    assert doctor.exit_code(dataclasses.replace(f, root=False)) == Exit.NOT_ROOT
    assert doctor.exit_code(dataclasses.replace(f, ksm=False)) == Exit.NO_KSM
    dead = caps.Trial(False, "refused")
    no_bpf = dataclasses.replace(f, tracepoint=dead, kprobe=dead, fentry=dead)
    assert doctor.exit_code(no_bpf) == Exit.NO_BPF
    assert len({Exit.NOT_ROOT, Exit.NO_KSM, Exit.NO_BPF, Exit.OK}) == 4


def test_render_names_every_section_and_reason():
    f = host()
    text = doctor.render(f, caps.plan(f), Exit.OK)
    for needle in ("kernel", "tracepoints", "kernel function", "BPF mechanisms",
                   "attach plan", "CONFIG_KPROBES", "EPERM", "[estimated]",
                   "inlined into ksm_scan_thread", "not trusted"):
        assert needle in text, needle
    for tp in caps.KSM_TRACEPOINTS:
        assert f"ksm:{tp}" in text


def test_render_non_root_says_what_root_adds():
    f = dataclasses.replace(host(), root=False)
    text = doctor.render(f, caps.plan(f), Exit.NOT_ROOT)
    assert "as root, doctor would also check" in text
    assert "exit 3" in text
