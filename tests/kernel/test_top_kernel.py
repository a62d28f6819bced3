"""`ksmtrace top` on the real host kernel: in a real terminal (tmux), and
under Pilot for the page map and the knobs screen, each checked against the
kernel's own figures."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ksmtrace.kernel import procfs, sysfs
from ksmtrace.kernel.sysfs import KNOBS, KsmKnobs
from ksmtrace.workload import Workload, WorkloadSpec

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent.parent
STAGES = ("Searching", "Merging", "Counting", "Updating")


def knob_values() -> dict:
    k = sysfs.read_sysfs()
    return {name: getattr(k, name) for name in KNOBS}


def workload_children() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "ksmtrace.workload"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def panels(screen: str) -> dict[str, str] | None:
    """The text of each stage panel in a captured pane (None: not drawn yet)."""
    lines = screen.splitlines()
    top = next((i for i, line in enumerate(lines) if "Searching" in line), None)
    if top is None or not all(s in lines[top] for s in STAGES):
        return None
    out = {s: [] for s in STAGES}
    for line in lines[top + 1:]:
        if line.lstrip().startswith("╰"):
            break
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) == 4:
            for stage, cell in zip(STAGES, cells, strict=True):
                out[stage].append(cell)
    return {s: "\n".join(v) for s, v in out.items()}


def figure(panel: str, label: str) -> str | None:
    m = re.search(rf"^{re.escape(label)}\s+(\S+)$", panel, re.M)
    return m.group(1) if m else None


class SysfsHistory:
    """The kernel's (pages_shared, pages_sharing, pages_unshared), read on a
    thread every 20 ms, with the wall-clock time before and after each read:
    what the screen's sample time is compared against."""

    FIELDS = ("pages_shared", "pages_sharing", "pages_unshared")

    def __init__(self) -> None:
        self.reads: list[tuple[float, float, tuple[int, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SysfsHistory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            before = time.time()
            k = sysfs.read_sysfs()
            self.reads.append((before, time.time(), tuple(getattr(k, f) for f in self.FIELDS)))

    def constant_over(self, t0: float, t1: float) -> tuple[int, ...] | None:
        """What sysfs held throughout [t0, t1]: the value of the last read
        done before t0, if every read up to the first one begun after t1
        gave the same (None when it changed, or the reads do not cover it)."""
        reads = list(self.reads)
        before = [i for i, r in enumerate(reads) if r[1] <= t0]
        after = [i for i, r in enumerate(reads) if r[0] >= t1]
        if not before or not after:
            return None
        values = {r[2] for r in reads[before[-1]:after[0] + 1]}
        return values.pop() if len(values) == 1 else None


def sample_wall(screen: str) -> float | None:
    """The shown sample's wall-clock time, from the header ('live @ 10:37:04.8')."""
    m = re.search(r"live @ (\d\d):(\d\d):(\d\d)\.(\d)", screen)
    if not m:
        return None
    h, mi, sec, tenth = map(int, m.groups())
    now = time.time()
    day = time.localtime(now)
    t = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, h, mi, sec, 0, 0, -1)) + tenth / 10
    return t - 86400 if t > now + 60 else t  # shown just before midnight


# A sample's counters are read just after its wall time is taken; allow the
# reading process that long to be descheduled between the two on this
# loaded 2-core machine (ksmd takes one core in the demo).
READ_SLACK = 0.5


@pytest.mark.parametrize("quit_key", ["q", "C-c"])
def test_top_demo_in_tmux_agrees_with_sysfs_and_leaves_nothing_behind(quiet_ksm, quit_key,
                                                                     count_programs):
    assert shutil.which("tmux"), "tmux is installed by scripts/setup.sh"
    before_knobs = knob_values()
    before_progs = count_programs()
    name = f"ksmtrace-test-{int(time.time())}"
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-tmux-"))
    rc_file = tmp / "rc"
    cmd = (f"cd {REPO} && {sys.executable} -m ksmtrace top --demo; "
           f"echo $? > {rc_file}")
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "120", "-y", "40", cmd],
                   check=True)
    try:
        seen: dict[str, set[str]] = {s: set() for s in STAGES}
        checked, samples = 0, set()
        deadline = time.monotonic() + 180
        with SysfsHistory() as history:
            while time.monotonic() < deadline and (
                    checked < 3 or min(map(len, seen.values())) < 2):
                time.sleep(0.4)
                screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", name],
                                        capture_output=True, text=True, check=True).stdout
                p = panels(screen)
                if p is None or figure(p["Counting"], "shared") in (None, "-"):
                    assert not rc_file.exists(), screen
                    continue
                for s in STAGES:
                    seen[s].add(p[s])
                at = sample_wall(screen)
                assert at is not None, f"no sample time in the header:\n{screen}"
                if at in samples:
                    continue
                # sysfs did not change around the moment the shown sample was
                # read: the screen must show exactly the kernel's figures then
                # (however late it was drawn)
                held = history.constant_over(at, at + 0.1 + READ_SLACK)
                if held is None or not held[0]:
                    continue
                samples.add(at)
                shown = tuple(figure(p["Counting"], label)
                              for label in ("shared", "sharing", "unshared"))
                assert shown == tuple(map(str, held)), screen
                checked += 1
        assert checked >= 3, f"no stable moment to compare with sysfs; last screen:\n{screen}"
        for s in STAGES:  # every stage's numbers moved while the demo ran
            assert len(seen[s]) >= 2, f"{s} never changed: {seen[s]}"
        # the sharing screen, read off the UI thread: the demo's four processes
        # map the same KSM frames, drawn as the same letters side by side
        subprocess.run(["tmux", "send-keys", "-t", name, "x"], check=True)

        def side_by_side(screen: str) -> bool:
            maps = [ln for ln in screen.splitlines() if ln.count("│") >= 3]
            return any(re.search(r"│ [A-Za-z0-9·]{8}", ln) for ln in maps)

        for _ in range(300):  # the matrix is drawn first, the maps after it
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", name],
                                    capture_output=True, text=True, check=True).stdout
            if "KSM pages mapped" in screen and "frames in common" in screen \
                    and side_by_side(screen):
                break
            time.sleep(0.1)
        assert "4 KSM processes" in screen, screen
        assert side_by_side(screen), screen
        subprocess.run(["tmux", "send-keys", "-t", name, "Escape"], check=True)
        for _ in range(300):  # back on the main screen (Esc then q at once reads as alt+q)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", name],
                                    capture_output=True, text=True, check=True).stdout
            if panels(screen) is not None:
                break
            time.sleep(0.1)
        subprocess.run(["tmux", "send-keys", "-t", name, quit_key], check=True)
        for _ in range(300):
            if rc_file.exists() and rc_file.read_text().strip():
                break
            time.sleep(0.1)
        assert rc_file.read_text().strip() == "0", screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        for _ in range(300):  # SIGHUP ends the app the way q does; let it unwind
            if subprocess.run(["pgrep", "-f", "ksmtrace top --demo"],
                              capture_output=True).returncode:
                break
            time.sleep(0.1)
    assert knob_values() == before_knobs
    for _ in range(50):
        if count_programs() == before_progs and not workload_children():
            break
        time.sleep(0.1)
    assert count_programs() == before_progs
    assert workload_children() == []
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ Pilot
async def test_sysfs_only_view_shows_the_kernel_counters_and_says_what_is_missing(quiet_ksm):
    from ksmtrace.tui.app import KsmtraceApp

    spec = WorkloadSpec(processes=2, pages=1000, distinct=10)
    with Workload(spec, drive_ksmd=True) as w:
        w.wait_merged()
        with KsmKnobs() as k:
            k.set(run=0)  # still, so the screen and sysfs can be compared
            with _sysfs_feed(None) as feed:
                app = KsmtraceApp(feed, clock=False)
                async with app.run_test(size=(100, 30)) as pilot:
                    await _wait(pilot, lambda: len(feed.recent()) >= 2, "two samples")
                    await pilot.pause(0.5)
                    kern = sysfs.read_sysfs()
                    panel = app.screen.query_one("#stage-counting")
                    text = str(panel.query_one(".figures").render())
                    assert figure(text, "shared") == str(kern.pages_shared) == "10"
                    assert figure(text, "sharing") == str(kern.pages_sharing) == "1990"
                    banner = str(app.screen.query_one("#banner").render())
                    assert "No BPF (sysfs-only)" in banner and "not seen" in banner
                    merging = str(app.screen.query_one("#stage-merging .figures").render())
                    assert figure(merging, "new/s") == "-"  # not seen without BPF
                    status = str(app.screen.query_one("#status").render())
                    assert "sysfs-only" in status and "no BPF" in status
                    rows = {r.pid: r for r in app.feed.current().processes}
                    for pid in w.pids:
                        assert rows[pid].merging_pages == procfs.read_ksm_stat(
                            pid).ksm_merging_pages == 1000



def _sysfs_feed(pids):
    from ksmtrace.collector import observe
    from ksmtrace.feed import LiveFeed
    from ksmtrace.sources.counters import SysfsSource

    return LiveFeed(observe(SysfsSource(pids=pids)), interval=0.2)


async def _wait(pilot, cond, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.1)


async def test_page_map_shows_as_many_ksm_cells_as_the_kernel_counts(quiet_ksm):
    from ksmtrace.tui.app import KsmtraceApp
    from ksmtrace.tui.screens import PageMapScreen
    from ksmtrace.tui.widgets import PageGrid, ProcessTable

    spec = WorkloadSpec(processes=2, pages=2000, distinct=20)
    with Workload(spec, drive_ksmd=True) as w:
        w.wait_merged()
        with KsmKnobs() as k:
            k.set(run=0)  # hold the merged state still while we look
            pid = w.pids[1]
            with _sysfs_feed(list(w.pids)) as feed:
                app = KsmtraceApp(feed, clock=False)
                async with app.run_test(size=(120, 40)) as pilot:
                    table = app.screen.query_one("#processes", ProcessTable)
                    await _wait(pilot, lambda: table.row_count == 2, "the process rows")
                    row = next(i for i in range(table.row_count)
                               if int(table.get_row_at(i)[0]) == pid)
                    table.move_cursor(row=row)
                    await pilot.press("enter")
                    screen = app.screen
                    assert isinstance(screen, PageMapScreen) and screen.pid == pid
                    await _wait(pilot, lambda: screen.page_map is not None, "the page map")
                    cells = screen.query_one(PageGrid).rendered_cells()
                    stat = procfs.read_ksm_stat(pid)
                    ksm_cells = sum(cells.count(c) for c in "K23456789+")
                    assert ksm_cells == stat.ksm_merging_pages == 2000
                    # 20 contents in 4,000 pages: each KSM page has 200 mappers
                    assert set(re.sub(r"[^K2-9+]", "", cells)) == {"+"}
                    note = str(screen.query_one("#pagemap-note").render())
                    assert "KSM 2000" in note
                    await pilot.press("escape")
                    await pilot.pause()
                    assert feed.watched is None


async def test_knobs_screen_changes_a_knob_after_confirmation(quiet_ksm):
    from ksmtrace.tui.app import KsmtraceApp
    from ksmtrace.tui.screens import Confirm, KnobEdit, KnobsScreen

    before = sysfs.read_knob("pages_to_scan")
    knobs = KsmKnobs()
    try:
        with _sysfs_feed([]) as feed:
            app = KsmtraceApp(feed, knobs=knobs, clock=False)
            async with app.run_test(size=(100, 30)) as pilot:
                await _wait(pilot, lambda: feed.current() is not None, "a sample")
                await pilot.press("k")
                await pilot.pause()
                assert isinstance(app.screen, KnobsScreen)
                await pilot.press("down")  # run -> pages_to_scan
                for answer, expect in (("n", before), ("y", 1234)):
                    await pilot.press("enter")
                    await pilot.pause()
                    assert isinstance(app.screen, KnobEdit)
                    await pilot.press(*["backspace"] * 8, "1", "2", "3", "4", "enter")
                    await pilot.pause()
                    assert isinstance(app.screen, Confirm)
                    await pilot.press(answer)
                    await pilot.pause()
                    assert isinstance(app.screen, KnobsScreen)
                    assert sysfs.read_knob("pages_to_scan") == expect
                assert app.knob_changes == [f"pages_to_scan {before} -> 1234"]
                # the screen shows the kernel's new value at the next sample
                from textual.widgets import DataTable

                table = app.screen.query_one(DataTable)
                await _wait(pilot, lambda: str(table.get_row_at(1)[1]) == "1234",
                            "the new value on screen")
    finally:
        knobs.restore()
    assert sysfs.read_knob("pages_to_scan") == before
