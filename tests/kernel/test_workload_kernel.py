"""The workload against the real kernel: every figure it predicts must be
what /sys/kernel/mm/ksm, /proc/<pid>/ksm_stat and /proc/vmstat show, exactly,
and every knob and child must be gone afterwards.

Global counters are shared with every KSM user on the host, so each test
first waits until no other process is known to KSM (a VM with QEMU's default
mem-merge=on is one), and says who it was if that never happens.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksmtrace.kernel import procfs, sysfs
from ksmtrace.spawn import reap
from ksmtrace.workload import Workload, WorkloadSpec, other_ksm_users

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
QUIET_TIMEOUT = 900.0  # another helper's VM smoke run can take minutes
MERGE_TIMEOUT = 120.0


@pytest.fixture(autouse=True)
def quiet_ksm():
    """Exact global deltas need nobody else merging meanwhile."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    while others := other_ksm_users():
        if time.monotonic() > deadline:
            pytest.fail(
                "other processes use KSM, so global deltas cannot be exact: "
                + "; ".join(map(str, others))
            )
        time.sleep(2.0)


def knobs_now() -> dict:
    return {k: sysfs.read_knob(k) for k in sysfs.KNOBS}


def zero_counts() -> bool:
    """The kernel counts zero-page merges (ksm_zero_pages, 6.10+); on older
    ones (Debian 12's 6.1) those figures are left out of both sides."""
    return sysfs.read_sysfs().ksm_zero_pages is not None


def kernel_view(w: Workload) -> dict:
    """What the kernel shows, read here rather than through the workload."""
    assert w.baseline is not None
    b, s = w.baseline.sysfs, sysfs.read_sysfs()
    stats = [procfs.read_ksm_stat(pid) for pid in w.pids]
    view = {
        "pages_shared": s.pages_shared - b.pages_shared,
        "pages_sharing": s.pages_sharing - b.pages_sharing,
        "merging_pages": tuple(st.ksm_merging_pages for st in stats),
    }
    if zero_counts():
        view["ksm_zero_pages"] = s.ksm_zero_pages - b.ksm_zero_pages
        view["zero_pages"] = tuple(st.ksm_zero_pages for st in stats)
    return view


def predicted(w: Workload) -> dict:
    e = w.expected()
    want = {
        "pages_shared": e.pages_shared,
        "pages_sharing": e.pages_sharing,
        "merging_pages": e.merging_pages,
    }
    if zero_counts():
        want["ksm_zero_pages"] = e.ksm_zero_pages
        want["zero_pages"] = e.zero_pages
    return want


def cow_ksm() -> int:
    return procfs.read_vmstat()["cow_ksm"]


def gone(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1]
    except (FileNotFoundError, ProcessLookupError):
        return True
    # A reused pid is someone else; a zombie is dead already.
    return b"--child" not in cmdline or status.startswith("Z")


def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"workload children still alive: {[p for p in pids if not gone(p)]}"
            )
        time.sleep(0.05)


SHAPES = {
    "10-contents": WorkloadSpec(processes=2, pages=1000, distinct=10),
    # 1200 copies > max_page_sharing: a stable-node chain of 5 KSM pages.
    "chain": WorkloadSpec(processes=2, pages=600, distinct=1),
    # 513 = 2 x 256 + 1: the last copy has no partner and stays unmerged.
    "chain-leftover": WorkloadSpec(processes=3, pages=171, distinct=1),
    "prctl": WorkloadSpec(
        processes=3, pages=2000, distinct=50, unique_pages=100, zero_pages=50, register="prctl"
    ),
    "zero-as-content": WorkloadSpec(
        processes=2, pages=100, distinct=10, zero_pages=300, use_zero_pages=False
    ),
}


@pytest.mark.vm
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.prctl_merge) if spec.register == "prctl" else n
    for n, spec in SHAPES.items()
])
def test_merge_matches_prediction_exactly(name):
    with Workload(SHAPES[name]) as w:
        w.wait_merged(MERGE_TIMEOUT)
        if name == "chain":
            assert w.max_page_sharing == 256
            assert (w.expected().pages_shared, w.expected().pages_sharing) == (5, 1195)
        assert kernel_view(w) == predicted(w)
        assert all(st.ksm_mergeable in (True, None)  # None: no such line (< 6.14)
                   for st in map(procfs.read_ksm_stat, w.pids))
        if SHAPES[name].register == "prctl":
            # None: no such line (< 6.14, e.g. Debian 13's 6.12)
            assert all(st.ksm_merge_any in (True, None)
                       for st in map(procfs.read_ksm_stat, w.pids))
        pids = w.pids
    wait_gone(pids, timeout=1.0)


@pytest.mark.vm
@pytest.mark.ksm_zero_pages
def test_zero_pages_merge_into_the_zero_page():
    spec = WorkloadSpec(processes=2, pages=100, distinct=10, zero_pages=300, use_zero_pages=True)
    with Workload(spec) as w:
        assert sysfs.read_knob("use_zero_pages") == 1
        w.wait_merged(MERGE_TIMEOUT)
        view = kernel_view(w)
        assert view == predicted(w)
        assert view["ksm_zero_pages"] == 600 and view["zero_pages"] == (300, 300)
        assert view["merging_pages"] == (100, 100)  # zero-page merges are not in it


@pytest.mark.vm
def test_cow_writes_raise_cow_ksm_by_the_number_written():
    spec = WorkloadSpec(processes=2, pages=1500, distinct=30)
    with Workload(spec) as w:
        w.wait_merged(MERGE_TIMEOUT)
        before = cow_ksm()
        written = w.cow(0.25)
        assert set(written) == set(w.pids) and sum(written.values()) == 750
        assert cow_ksm() - before == 750  # counted at the write, before ksmd notices
        w.wait_expected(MERGE_TIMEOUT)  # ksmd dropped the broken pages
        assert kernel_view(w) == predicted(w)
        assert w.expected().merging_pages == (1125, 1125)
        # Paced writes count the same; already-written pages are not chosen again.
        before = cow_ksm()
        more = w.cow(0.2, rate=2000)
        assert cow_ksm() - before == sum(more.values()) == 450
        w.wait_expected(MERGE_TIMEOUT)
        assert kernel_view(w) == predicted(w)
        assert w.measure().cow_ksm == w.expected_cow_ksm == 1200


@pytest.mark.vm
def test_cow_on_a_chain_lets_the_leftover_merge_and_restore_remerges():
    with Workload(WorkloadSpec(processes=3, pages=171, distinct=1)) as w:
        w.wait_merged(MERGE_TIMEOUT)
        before = cow_ksm()
        n = sum(w.cow(0.1).values())
        assert cow_ksm() - before == n == 51
        w.wait_expected(MERGE_TIMEOUT)
        assert kernel_view(w) == predicted(w)
        assert predicted(w)["merging_pages"] == (154, 154, 154)
        # One written page stays written: the other 512 copies are merged
        # again. Into which KSM pages of the chain is up to ksmd's scan order
        # (measured: 2 full ones, or 3 + 509 on 6.1 and, once, on 6.18), so
        # only their sum and each process's own figures are exact.
        assert w.restore_contents() == 50
        w.wait_merged(MERGE_TIMEOUT, exact_global=False)
        view, want = kernel_view(w), predicted(w)
        assert want["merging_pages"] == (171, 171, 170)
        assert view.pop("pages_shared") + view.pop("pages_sharing") == 512
        del want["pages_shared"], want["pages_sharing"]
        assert view == want


@pytest.mark.vm
@pytest.mark.parametrize(
    "register", ["madvise", pytest.param("prctl", marks=pytest.mark.prctl_merge)])
def test_unmerge_breaks_every_merged_page(register):
    spec = WorkloadSpec(processes=2, pages=800, distinct=8, zero_pages=20, register=register)
    with Workload(spec) as w:
        w.wait_merged(MERGE_TIMEOUT)
        merged = sum(w.expected().merging_pages)
        before = cow_ksm()
        w.unmerge()
        assert cow_ksm() - before == merged == 1640  # one COW break per merged page
        w.wait_expected(MERGE_TIMEOUT)
        assert kernel_view(w) == predicted(w)
        assert predicted(w)["merging_pages"] == (0, 0) and predicted(w)["pages_sharing"] == 0


def test_knobs_restored_and_children_ended_when_the_body_raises():
    before = knobs_now()
    with pytest.raises(RuntimeError, match="boom"):
        with Workload(WorkloadSpec(processes=2, pages=500, distinct=5, use_zero_pages=True)) as w:
            assert sysfs.read_knob("run") == 1 and sysfs.read_knob("sleep_millisecs") == 0
            w.wait_merged(MERGE_TIMEOUT)
            pids = w.pids
            raise RuntimeError("boom")
    assert knobs_now() == before
    wait_gone(pids, timeout=1.0)


def _start_cli(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "ksmtrace.workload", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )


def _events_until(proc: subprocess.Popen, wanted: str, timeout: float = MERGE_TIMEOUT) -> dict:
    """JSON events from the CLI until `wanted`; returns them by name. Reads
    the raw fd: a buffered readline after select() can strand a line."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    events: dict = {}
    buf = b""
    deadline = time.monotonic() + timeout
    while wanted not in events:
        if b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            ev = json.loads(line)
            events[ev["event"]] = ev
            continue
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            reap(proc, 60)  # SIGTERM, so it still restores the knobs
            raise AssertionError(f"no {wanted!r} event in {timeout:g} s: {events}")
        chunk = os.read(fd, 65536)
        if not chunk:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"CLI exited before {wanted!r}: {events} {err}")
        buf += chunk
    return events



def test_cli_runs_every_phase_and_reports_agreement():
    before = knobs_now()
    proc = _start_cli(
        "-n", "2", "-p", "600", "-d", "6", "-z", "50", "--use-zero-pages", "1",
        "--cow-fraction", "0.5", "--unmerge", "--json",
    )  # fmt: skip
    out, err = proc.communicate(timeout=4 * MERGE_TIMEOUT)
    events = {e["event"]: e for e in map(json.loads, out.decode().splitlines())}
    assert proc.returncode == 0, (events, err.decode())
    assert events["merge"]["ok"] and events["cow-noticed"]["ok"] and events["unmerge"]["ok"]
    assert events["cow"]["cow_ksm_measured"] == events["cow"]["cow_ksm_expected"] == 600
    assert events["merge"]["measured"]["ksm_zero_pages"] == 100
    assert events["exit"]["ok"]
    assert knobs_now() == before
    wait_gone(events["start"]["pids"], timeout=1.0)


def test_sigterm_to_the_cli_restores_knobs_and_ends_children():
    before = knobs_now()
    proc = _start_cli("-n", "2", "-p", "500", "-d", "5", "--hold", "--json")
    events = _events_until(proc, "hold")
    pids = events["start"]["pids"]
    assert not any(gone(p) for p in pids)
    assert sysfs.read_knob("run") == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert knobs_now() == before
    wait_gone(pids, timeout=1.0)


def test_children_die_with_a_killed_parent():
    # SIGKILL runs no cleanup: the children go by PR_SET_PDEATHSIG. ksmd is
    # driven here, outside the killed process, so the knobs stay ours to restore.
    with sysfs.KsmKnobs() as k:
        k.set(pages_to_scan=100_000, sleep_millisecs=0, run=1)
        proc = _start_cli("-n", "2", "-p", "200", "-d", "2", "--no-drive-ksmd", "--hold", "--json")
        pids = _events_until(proc, "hold")["start"]["pids"]
        proc.kill()
        proc.wait(timeout=60)
        wait_gone(pids)
        # Let ksmd drop the dead children's pages before run goes back to 0:
        # two full scans, or ksmd idle (nothing left on its list).
        settle_ksmd()


def settle_ksmd(timeout: float = MERGE_TIMEOUT) -> None:
    s = sysfs.read_sysfs()
    target, key, since = s.full_scans + 2, (s.full_scans, s.pages_scanned), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = sysfs.read_sysfs()
        if s.full_scans >= target:
            return
        if (s.full_scans, s.pages_scanned) != key:
            key, since = (s.full_scans, s.pages_scanned), time.monotonic()
        elif time.monotonic() - since > 1.0:
            return
        time.sleep(0.01)
