"""`ksmtrace top` under Pilot, fed by a recording made on the real 6.18 host
(tests/fixtures/recordings/host-6.18-workload.ksmrec: three processes merge
2,160 pages incl. 300 zero pages, then write 120 of them, then exit).

Every key binding and screen is driven here; what the panels show is checked
against the recorded kernel figures of the snapshot on screen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("textual")

from textual.widgets import DataTable, Input, RichLog  # noqa: E402

from ksmtrace.collector import observe  # noqa: E402
from ksmtrace.diagnose import diagnose  # noqa: E402
from ksmtrace.feed import ReplayFeed  # noqa: E402
from ksmtrace.grouping import group_rows, workload_of  # noqa: E402
from ksmtrace.kernel.identity import Workload  # noqa: E402
from ksmtrace.sources.counters import sample_sharing  # noqa: E402
from ksmtrace.sources.replay import ReplaySource  # noqa: E402
from ksmtrace.tui import format as fmt  # noqa: E402
from ksmtrace.tui.app import KsmtraceApp, MainScreen  # noqa: E402
from ksmtrace.tui.screens import (  # noqa: E402
    DetailsScreen,
    EventLogScreen,
    HelpScreen,
    KnobsScreen,
    PageMapScreen,
    WhyScreen,
)
from ksmtrace.tui.sharing import SharingScreen, glyph_of_frames  # noqa: E402
from ksmtrace.tui.widgets import ProcessTable, StagePanel  # noqa: E402

RECORDING = Path(__file__).parent.parent / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"
MERGED = 5  # index of the first snapshot after the merge (pages_shared 8, sharing 1072)


def replay_feed(position: int = MERGED) -> ReplayFeed:
    feed = ReplayFeed(observe(ReplaySource(RECORDING, warn=None))).start()
    feed.wait_loaded()
    assert feed.error is None and feed.loaded
    feed.seek_to(position)
    feed.paused = True
    return feed


def app_on(position: int = MERGED) -> KsmtraceApp:
    return KsmtraceApp(replay_feed(position), clock=False, stream_off=False)


def panel_text(app: KsmtraceApp, stage: str) -> str:
    panel = app.screen.query_one(f"#stage-{stage}", StagePanel)
    return str(panel.query_one(".figures").render())


def figure(text: str, label: str) -> str:
    for line in text.splitlines():
        if line.startswith(label + " "):
            return line[len(label):].strip()
    raise AssertionError(f"no {label!r} in {text!r}")


# ----------------------------------------------------------------- the feed
def test_replay_feed_plays_pauses_seeks_and_changes_speed():
    feed = replay_feed(0)
    n = len(feed.snapshots)
    assert n == 25
    feed.paused = False
    feed.advance(100.0)
    feed.advance(100.0 + 60.0)  # a minute of play at 1x reaches the end
    assert feed.position == n - 1 and feed.at_end
    feed.seek_to(3)
    assert feed.current() is feed.snapshots[3]
    feed.toggle_pause()
    feed.advance(200.0)
    feed.advance(260.0)
    assert feed.position == 3  # paused: the clock stands
    assert feed.faster() == 2.0 and feed.faster(False) == 1.0
    feed.seek(-10)
    assert feed.position == 0
    assert [s.seq for s in feed.recent(3)] == [1]
    feed.seek_to(10)
    assert [s.seq for s in feed.recent(3)] == [9, 10, 11]


# ---------------------------------------------------------------- diagnosis
def test_diagnosis_of_recorded_phases():
    feed = replay_feed(0)
    snaps = feed.snapshots
    assert [f.key for f in diagnose(snaps[0])][:2] == ["ksm-off", "no-mergeable"]
    assert snaps[0].ksm.run == 0
    merged = snaps[MERGED]
    assert merged.ksm.pages_shared == 8 and merged.ksm.pages_sharing == 1072
    assert [f.key for f in diagnose(merged)] == ["merging"]
    # After the processes exited ksmd runs but has nothing to scan.
    assert diagnose(snaps[-1])[0].key == "no-mergeable"
    # The same snapshot with the kernel's figures changed as they would be:
    vol = dataclasses.replace(merged, ksm=dataclasses.replace(
        merged.ksm, pages_volatile=5000))
    assert "volatile" in [f.key for f in diagnose(vol)]
    chains = dataclasses.replace(merged, ksm=dataclasses.replace(
        merged.ksm, stable_node_chains=3, stable_node_dups=9))
    assert "max-page-sharing" in [f.key for f in diagnose(chains)]
    advisor = dataclasses.replace(merged, ksm=dataclasses.replace(
        merged.ksm, advisor_mode="scan-time"))
    assert "advisor" in [f.key for f in diagnose(advisor)]
    loss = dataclasses.replace(merged, ksm=dataclasses.replace(merged.ksm, general_profit=-4096))
    assert diagnose(loss)[0].key == "negative-profit"


def test_numbers_are_exact_below_ten_million():
    assert fmt.num(1072) == "1072"
    assert fmt.num(9_999_999) == "9999999"
    assert fmt.num(10_000_000) == "10.0M"
    assert fmt.num(2178.4) == "2.2k"
    assert fmt.num(None) == fmt.DASH
    assert fmt.size(-4096) == "-4.0KiB"
    assert fmt.percentile_ns({10: 1, 12: 3}, 0.5) == 2 ** 13


# ------------------------------------------------------------ main screen
async def test_main_screen_shows_the_recorded_figures():
    app = app_on()
    snap = app.feed.current()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        counting = panel_text(app, "counting")
        assert figure(counting, "shared") == str(snap.ksm.pages_shared) == "8"
        assert figure(counting, "sharing") == str(snap.ksm.pages_sharing) == "1072"
        assert figure(counting, "zero") == str(snap.ksm.ksm_zero_pages)
        merging = panel_text(app, "merging")
        assert figure(merging, "merged/s") == fmt.num(snap.rates["merged_pages"])
        assert figure(merging, "into/s") == fmt.num(snap.rates["merges_into_ksm_page"])
        assert figure(merging, "p50 lat") == "n/a"  # tracepoints: no merge exit probe
        updating = panel_text(app, "updating")
        assert figure(updating, "COW/s") == fmt.num(snap.rates["cow_ksm"])
        assert figure(updating, "writes/s") == "est."
        searching = panel_text(app, "searching")
        assert figure(searching, "scan/s") == fmt.num(snap.rates["pages_scanned"])
        table = app.screen.query_one("#processes", ProcessTable)
        assert table.row_count == len(snap.processes) == 3
        status = str(app.screen.query_one("#status").render())
        assert "replay 6/25 paused" in status and "tracepoint" in status
        assert "lost: 0" in status and "estimated" in status
        assert "merging" in str(app.screen.query_one("#why").render())


async def test_sort_reverse_and_filter_keys():
    app = app_on()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        main = app.screen
        assert isinstance(main, MainScreen)
        table = main.query_one("#processes", ProcessTable)

        def pids() -> list[int]:
            return [int(table.get_row_at(i)[0]) for i in range(table.row_count)]

        assert main.sort_key == "merging"
        for _ in range(len(fmt.SORT_KEYS) - fmt.SORT_KEYS.index("merging")):  # to pid
            await pilot.press("s")
        assert main.sort_key == "pid"
        assert pids() == sorted(pids())
        await pilot.press("r")
        assert pids() == sorted(pids(), reverse=True)
        target = pids()[1]
        await pilot.press("slash")
        box = main.query_one("#filter", Input)
        assert box.display and box.has_focus
        await pilot.press(*str(target))
        await pilot.pause()
        assert pids() == [target]
        await pilot.press("escape")
        await pilot.pause()
        assert len(pids()) == 3 and not box.display


def test_group_rows_sum_each_workload_and_kind():
    feed = replay_feed()
    rows = feed.current().processes
    assert len(rows) == 3
    vm = Workload("vm", "vm1", "", (("manager", "libvirt"),))
    tagged = (dataclasses.replace(rows[0], workload=vm), dataclasses.replace(rows[1], workload=vm),
              rows[2])
    assert group_rows(tagged, "process") == tagged
    by_wl = {workload_of(r).label: r for r in group_rows(tagged, "workload")}
    assert set(by_wl) == {"vm:vm1", f"proc:python[{rows[2].pid}]"}
    g = by_wl["vm:vm1"]
    assert g.comm == "2 procs" and g.pid in (rows[0].pid, rows[1].pid)
    for f in ("merging_pages", "zero_pages", "rmap_items", "profit_bytes", "merges",
              "cow_breaks"):
        assert getattr(g, f) == getattr(rows[0], f) + getattr(rows[1], f), f
    by_kind = {r.workload.kind: r for r in group_rows(tagged, "kind")}
    assert set(by_kind) == {"vm", "process"} and by_kind["vm"].workload.name == "1 workloads"
    # an exited process's ksm_stat is stale: groups sum the live ones only
    gone = (dataclasses.replace(tagged[0], alive=False), tagged[1])
    (g,) = group_rows(gone, "workload")
    assert g.merging_pages == rows[1].merging_pages and g.merges == rows[0].merges + rows[1].merges


async def test_group_key_cycles_process_workload_kind():
    app = app_on()
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        main = app.screen
        table = main.query_one("#processes", ProcessTable)
        assert main.group_by == "process" and table.row_count == 3
        await pilot.press("g")
        # the fixture's processes ran in the root cgroup: a workload each
        assert main.group_by == "workload" and table.row_count == 3
        await pilot.press("g")
        assert main.group_by == "kind" and table.row_count == 1
        assert table.get_row_at(0)[1] == "3 procs" and "by kind" in main.sub_title
        await pilot.press("g")
        assert main.group_by == "process" and table.row_count == 3


async def test_screens_open_and_close_with_their_keys():
    app = app_on()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        for key, screen in (("w", WhyScreen), ("e", EventLogScreen), ("k", KnobsScreen),
                            ("h", DetailsScreen),
                            ("question_mark", HelpScreen), ("f1", HelpScreen),
                            ("enter", PageMapScreen), ("m", PageMapScreen)):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, screen), key
            await pilot.press("escape")
            await pilot.pause()
            assert isinstance(app.screen, MainScreen), key
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "CommandPalette"
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


async def test_why_screen_lists_every_finding_with_its_fix():
    app = app_on(0)  # ksmd stopped, nothing mergeable yet
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("w")
        await pilot.pause()
        text = str(app.screen.query_one("#why-all").render())
        assert "KSM is off" in text and "echo 1 > /sys/kernel/mm/ksm/run" in text
        assert "no process has mergeable memory" in text and "MADV_MERGEABLE" in text


async def test_event_log_shows_recorded_events_and_pauses():
    app = app_on(4)  # the merge burst: 3,007 events in that interval
    snap = app.feed.snapshots[4]
    assert len(snap.events) > 200
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("e")
        await pilot.pause()
        log = app.screen.query_one(RichLog)
        assert len(log.lines) == 200  # the newest 200 of the interval
        from ksmtrace.model import EventKind

        last = snap.events[-1]
        assert EventKind(last.kind).name.lower() in log.lines[-1].text
        assert sum("merge " in line.text for line in log.lines) == sum(
            e.kind == EventKind.MERGE for e in snap.events[-200:]) > 0
        await pilot.press("space")
        assert app.screen.paused
        assert "PAUSED" in str(app.screen.query_one("#log-title").render())
        app.feed.seek(1)
        app.refresh_view(force=True)
        await pilot.pause()
        assert len(log.lines) == 200  # paused: nothing appended
        await pilot.press("c")
        await pilot.pause()
        assert len(log.lines) == 0


async def test_page_map_of_a_replay_says_recordings_have_none():
    app = app_on()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("enter")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, PageMapScreen)
        assert app.feed.watched == screen.pid
        assert "recordings hold no page maps" in str(
            screen.query_one("#pagemap-note").render())
        await pilot.press("escape")
        await pilot.pause()
        assert app.feed.watched is None


async def test_knobs_are_read_only_in_replay():
    app = app_on()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("k")
        await pilot.pause()
        table = app.screen.query_one(DataTable)
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == [
            "run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing"]
        snap = app.feed.current()
        assert str(table.get_row_at(1)[1]) == str(snap.ksm.pages_to_scan)
        assert str(table.get_row_at(1)[2]) == "100"  # the kernel's default
        assert "read-only" in str(app.screen.query_one("#knobs-note").render())
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, KnobsScreen)  # no editor opened


async def test_replay_keys_pause_speed_and_seek():
    app = app_on(10)
    feed = app.feed
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("space")
        assert not feed.paused
        await pilot.press("space")
        assert feed.paused
        await pilot.press("plus")
        assert feed.speed == 2.0
        await pilot.press("minus", "minus")
        assert feed.speed == 0.5
        await pilot.press("left_square_bracket")
        assert feed.position == 0
        await pilot.press("right_square_bracket")
        assert feed.position == 10
        await pilot.press("greater_than_sign")
        assert feed.position == 24
        await pilot.press("less_than_sign")
        assert feed.position == 0
        await pilot.pause()
        assert "replay 1/25 paused" in str(app.screen.query_one("#status").render())


# ---------------------------------------------------------------- snapshots
SIZE = (100, 30)


def test_snapshot_main(snap_compare):
    assert snap_compare(app_on(), terminal_size=SIZE)


def test_snapshot_main_80x24(snap_compare):
    assert snap_compare(app_on(), terminal_size=(80, 24))


def test_snapshot_why(snap_compare):
    assert snap_compare(app_on(0), terminal_size=SIZE, press=["w"])


def test_snapshot_events(snap_compare):
    assert snap_compare(app_on(4), terminal_size=SIZE, press=["e"])


def test_snapshot_help(snap_compare):
    assert snap_compare(app_on(), terminal_size=SIZE, press=["question_mark"])


def test_snapshot_histograms(snap_compare):
    assert snap_compare(app_on(24), terminal_size=SIZE, press=["h"])


async def test_histograms_screen_shows_the_recorded_scan_rounds():
    app = app_on(24)
    snap = app.feed.current()
    rounds = snap.hist["scan_round_seconds"]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("h")
        await pilot.pause()
        text = str(app.screen.query_one("#details").render())
        assert f"{sum(rounds.values())} samples" in text
        for slot, n in rounds.items():  # every bucket with its exact count
            assert f"{fmt.duration(2 ** slot):>7} - {fmt.duration(2 ** (slot + 1)):<7} {n:>9}" \
                in text
        assert "merge_latency_seconds" in text  # not measured on tracepoints, and said so


def test_snapshot_knobs(snap_compare):
    assert snap_compare(app_on(), terminal_size=SIZE, press=["k"])


@pytest.mark.parametrize("argv, words", [
    (["--interval", "0"], "--interval: must be more than 0 seconds"),
    (["--interval", "nan"], "--interval: 'nan' is not a finite number"),
    (["--speed", "-1"], "--speed: must be more than 0"),
    (["--speed", "inf"], "--speed: 'inf' is not a finite number"),
    (["--replay", "x.rec", "--demo"], "do not go together"),
    (["--replay", "x.rec", "-p", "1"], "-p does nothing with --replay"),
    ([], "needs a terminal"),  # stdin/stdout are not a terminal here
])
def test_top_usage_errors_exit_2_without_a_traceback(argv, words):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "ksmtrace", "top", *argv], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert words in p.stderr and ("how to fix" in p.stderr or "--help" in p.stderr)
    assert "Traceback" not in p.stderr and p.stderr.startswith("ksmtrace: ")


# ------------------------------------------------------------------ sharing
PAGEMAP_HOST = Path(__file__).parent.parent / "fixtures" / "host-6.18"


def sharing_app() -> KsmtraceApp:
    """The app with a feed whose sharing map comes from page maps recorded on
    the host (three processes mapping the same four KSM frames)."""
    app = app_on()
    app.feed.sharing = lambda progress=None, cancel=None: dataclasses.replace(
        sample_sharing(PAGEMAP_HOST, progress, cancel), seconds=0.0)  # a stable snapshot
    return app


async def open_sharing(pilot) -> None:
    await pilot.press("x")
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def test_sharing_screen_draws_each_frame_as_one_letter_everywhere():
    app = sharing_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await open_sharing(pilot)
        screen = app.screen
        assert isinstance(screen, SharingScreen)
        assert screen.report["frames"] == 4 and len(screen.chosen) == 3
        maps = [str(m.render()) for m in screen.query(".sharing-map")]
        assert len(maps) == 3
        # each process maps the same four frames: the same four letters
        letters = [set(m.split("\n", 1)[1]) - {"\n", " "} for m in maps]
        assert letters[0] == letters[1] == letters[2] == set("ABCD")
        heat = str(screen.query_one("#heat").render())
        assert "ksm-dup-0" in heat and "frames in common" in heat
        await pilot.press("1")  # drop the first workload from the side-by-side maps
        await pilot.pause()
        assert len(screen.chosen) == 2 and len(screen.query(".sharing-map")) == 2
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_sharing_screen_on_a_recording_says_why_there_is_none():
    app = app_on()
    async with app.run_test(size=(100, 30)) as pilot:
        await open_sharing(pilot)
        text = str(app.screen.query_one("#sharing-progress").render())
        assert "recordings hold no page maps" in text


def test_glyphs_put_frames_shared_by_more_workloads_first():
    a, b = np.array([7, 7, 9, 5]), np.array([9, 3])
    g = glyph_of_frames([a, b])
    assert g[9] == 0 and set(g) == {3, 5, 7, 9}


def test_snapshot_sharing(snap_compare):
    assert snap_compare(sharing_app(), terminal_size=(120, 40), run_before=open_sharing)


def test_the_first_frame_imports_no_other_screen_nor_numpy(loaded_by):
    """top's start-up pays for the main screen only: the other screens, the
    page map reader and numpy load when first opened (bench/footprint.py)."""
    assert loaded_by("import ksmtrace.top, ksmtrace.tui.app",
                     ("ksmtrace.tui.screens", "ksmtrace.tui.sharing",
                      "ksmtrace.kernel.pagemap", "numpy")) == []
