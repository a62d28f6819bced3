"""The knob writer against the real kernel's rules."""

import pytest

from ksmtrace.kernel import sysfs

pytestmark = pytest.mark.kernel


def test_advisor_round_trip_keeps_pages_to_scan():
    # The kernel refuses pages_to_scan while the advisor runs, and resets it to
    # 100 when the advisor is switched off: the writer must undo both.
    with sysfs.KsmKnobs() as outer:
        outer.set(pages_to_scan=777)
        with sysfs.KsmKnobs() as inner:
            inner.set(advisor_mode="scan-time")
            assert sysfs.read_knob("advisor_mode") == "scan-time"
        assert inner.restore_errors == []
        assert sysfs.read_knob("advisor_mode") == "none"
        assert sysfs.read_knob("pages_to_scan") == 777


def test_restored_after_exception_in_body():
    before = sysfs.read_sysfs()
    with pytest.raises(RuntimeError), sysfs.KsmKnobs() as k:
        k.set(pages_to_scan=4321, sleep_millisecs=7, use_zero_pages=1)
        raise RuntimeError("body failed")
    after = sysfs.read_sysfs()
    for name in ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "run"):
        assert getattr(after, name) == getattr(before, name)
