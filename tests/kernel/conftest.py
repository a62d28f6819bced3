"""Fixtures every kernel-tier test file shares."""

from __future__ import annotations

import subprocess
import time

import pytest

from ksmtrace import signals
from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import sysfs
from ksmtrace.workload import other_ksm_users


@pytest.fixture(scope="session", autouse=True)
def _unwind_on_sigterm():
    """SIGTERM (a CI time limit) unwinds the running test like Ctrl-C, so
    every workload ends its children and every KSM knob is put back."""
    with signals.installed():
        yield


@pytest.fixture(scope="module")
def facts() -> caps.Facts:
    return caps.probe_host()


@pytest.fixture
def quiet_ksm():
    """Exact deltas need ksmd stopped, no other process mergeable and no
    pages of exited processes still counted."""
    assert sysfs.read_knob("run") == 0, "ksmd is running: another KSM user is active"
    others = other_ksm_users()
    assert not others, f"other processes use KSM: {', '.join(map(str, others))}"
    _drain_exited_mms()
    yield
    if not other_ksm_users():  # what the test's processes left behind goes too
        _drain_exited_mms()


def _drain_exited_mms(timeout: float = 60.0) -> None:
    """Pages of processes that exited while ksmd was stopped stay counted in
    pages_shared/pages_sharing until ksmd walks their mm slot again, and
    would then vanish in the middle of a test's deltas. With no KSM user
    left, let ksmd walk them now (knobs restored) until the count is 0."""
    if sysfs.read_sysfs().merged_pages == 0:
        return
    deadline = time.monotonic() + timeout
    with sysfs.KsmKnobs() as k:
        k.set(pages_to_scan=10000, sleep_millisecs=0, run=1)
        while sysfs.read_sysfs().merged_pages and time.monotonic() < deadline:
            time.sleep(0.05)
    left = sysfs.read_sysfs().merged_pages
    assert left == 0, f"{left} KSM pages still counted with no KSM user after {timeout:.0f} s"


def _count_programs() -> int:
    out = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return out.count("\n")


@pytest.fixture
def count_programs():
    """`count_programs()`: lines of `bpftool prog show`, to see that every
    program ksmtrace loaded is gone again."""
    return _count_programs


@pytest.fixture
def programs_back_to():
    """`programs_back_to(n)`: whether `bpftool prog show` is back to `n`
    lines within 10 s. The kernel frees a closed program after an RCU grace
    period, not at close (0.2 s on the 6.18 host), so a count taken at once
    can still show detached programs."""
    def wait(n: int) -> bool:
        for _ in range(100):
            if _count_programs() == n:
                return True
            time.sleep(0.1)
        return _count_programs() == n
    return wait
