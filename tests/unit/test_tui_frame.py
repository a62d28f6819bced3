"""A frame of `ksmtrace top` redraws only what changed: the process table
repaints the screen lines whose text or style changed, and the panels, the
diagnosis and the status line repaint without a layout. What is on screen
after each step must equal a full repaint.

The rows are the recording's three processes repeated to 200 pids, as
bench/tui_frame.py does with 1,000 (tests/fixtures/recordings/
host-6.18-workload.ksmrec, replayed).
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest

pytest.importorskip("textual")

from textual.widgets._header import HeaderTitle  # noqa: E402

from ksmtrace.collector import observe  # noqa: E402
from ksmtrace.feed import ReplayFeed  # noqa: E402
from ksmtrace.model import Snapshot  # noqa: E402
from ksmtrace.sources.replay import ReplaySource  # noqa: E402
from ksmtrace.tui import format as fmt  # noqa: E402
from ksmtrace.tui.app import KsmtraceApp  # noqa: E402
from ksmtrace.tui.widgets import ProcessTable, TitleHeader  # noqa: E402

RECORDING = Path(__file__).parent.parent / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"
MERGED = 5  # the first snapshot after the merge
ROWS = 200
SIZE = (100, 30)


def many_rows(snap: Snapshot, k: int) -> Snapshot:
    """`snap` with ROWS rows; from one k to the next, the figures of rows
    0, 4, 8, ... change. Rows 7, 77, ... have exited; at k = 3, rows 1, 5,
    9, ... exit too, with the figures they had (only their style changes)."""
    base = snap.processes
    rows = tuple(dataclasses.replace(
        base[i % len(base)], pid=100000 + i, alive=i % 70 != 7 and not (k == 3 and i % 4 == 1),
        merging_pages=(i * 37 + (k * 101 if i % 4 == 0 else 0)) % 5000,
        merges_rate=float((i + k) % 13 if i % 4 == 0 else i % 13))
        for i in range(ROWS))
    return dataclasses.replace(snap, processes=rows)


def make_app() -> KsmtraceApp:
    """The app on a replay whose snapshots MERGED + k (k = 0..3) have many rows."""
    feed = ReplayFeed(observe(ReplaySource(RECORDING, warn=None))).start()
    feed.wait_loaded()
    assert feed.error is None
    for k in range(4):
        feed.snapshots[MERGED + k] = many_rows(feed.snapshots[MERGED + k], k)
    feed.seek_to(MERGED)
    feed.paused = True
    return KsmtraceApp(feed, clock=False, refresh=3600)  # the tests drive the frames


def show(app: KsmtraceApp, k: int) -> None:
    """A frame, as the app draws one: snapshot MERGED + k and its history."""
    app.feed.seek_to(MERGED + k)
    app.refresh_view(force=True)


async def assert_as_full_repaint(pilot, table: ProcessTable) -> None:
    """The screen as the frames left it equals the screen after a full
    repaint of the table (every line drawn again from the rows)."""
    await pilot.pause()
    shown = pilot.app.export_screenshot()
    table.refresh()
    await pilot.pause()
    assert pilot.app.export_screenshot() == shown


def visible_pids(table: ProcessTable) -> list[int]:
    top = table.scroll_offset.y
    return [p.pid for p in table.rows[top:top + table.size.height - 1]]


async def test_partial_repaints_equal_full_repaints_through_every_change():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        main = app.screen
        table = main.query_one("#processes", ProcessTable)
        show(app, 0)
        await assert_as_full_repaint(pilot, table)

        main.sort_key, main.reverse = "pid", False  # an order the figures do not change
        main._redraw()
        await assert_as_full_repaint(pilot, table)  # scrolled to the selected process
        await pilot.press("home")
        await assert_as_full_repaint(pilot, table)
        for k in (1, 2, 3, 1):  # new figures on a quarter of the rows, exits
            show(app, k)
            await assert_as_full_repaint(pilot, table)
        table.workload_width += 3  # as a resize of the screen sets it
        await assert_as_full_repaint(pilot, table)
        assert visible_pids(table) == list(range(100000, 100000 + table.size.height - 1))

        await pilot.press("down", "down", "pagedown")  # the cursor and a scroll
        assert table.scroll_offset.y > 0
        await assert_as_full_repaint(pilot, table)
        show(app, 3)
        await assert_as_full_repaint(pilot, table)

        # sorted by a figure that changes: the selected process is followed
        pid = table.selected_pid()
        main.sort_key, main.reverse = "merging", True
        main._redraw()
        await assert_as_full_repaint(pilot, table)
        for k in (0, 3):
            show(app, k)
            await assert_as_full_repaint(pilot, table)
            assert table.selected_pid() == pid
            assert table.rows[table.cursor_row].pid == pid and pid in visible_pids(table)

        await pilot.press("slash", *"10001")  # filter: pids 10001x
        assert {p.pid for p in table.rows} == set(range(100010, 100020))
        await assert_as_full_repaint(pilot, table)  # the focus moved: a dim cursor
        show(app, 1)
        await assert_as_full_repaint(pilot, table)
        await pilot.press("escape")  # clears the filter, the table has the focus again
        await assert_as_full_repaint(pilot, table)
        assert len(table.rows) == ROWS

        for _ in range(3):  # by workload, by kind, back to one row per process
            await pilot.press("g")
            show(app, 2)
            await assert_as_full_repaint(pilot, table)
        assert main.group_by == "process"

        await pilot.resize_terminal(120, 40)
        await assert_as_full_repaint(pilot, table)
        show(app, 0)
        await assert_as_full_repaint(pilot, table)


async def test_new_rows_repaint_only_the_lines_that_changed():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        main = app.screen
        table = main.query_one("#processes", ProcessTable)
        main.sort_key, main.reverse = "pid", False
        show(app, 0)
        await pilot.pause()
        drawn: list[int] = []
        render_line = table.render_line

        def counting(y: int):
            drawn.append(y)
            return render_line(y)

        table.render_line = counting  # what Textual calls for each dirty line
        show(app, 0)  # the same rows: nothing to repaint
        await pilot.pause()
        assert drawn == []
        show(app, 1)
        await pilot.pause()
        top = table.scroll_offset.y
        changed = [y for y in range(1, table.size.height)
                   if (top + y - 1) % 4 == 0 and top + y - 1 < ROWS]
        assert sorted(set(drawn)) == changed  # every fourth row: its figures changed
        drawn.clear()
        await pilot.press("down")  # the cursor moved: every line
        assert sorted(set(drawn)) == list(range(table.size.height))


async def test_frames_ask_for_no_layout_and_repaint_only_what_changed():
    app = make_app()
    app.clock = True  # as `ksmtrace top` runs: the subtitle has the sample time
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        main = app.screen
        main.sort_key, main.reverse = "pid", False  # no scrolling
        show(app, 0)
        await pilot.pause()
        calls: list[str] = []
        refresh_layout, refresh = main._refresh_layout, main.refresh

        def counting_layout(*args, **kw):
            calls.append("layout")
            return refresh_layout(*args, **kw)

        def counting_refresh(*args, **kw):
            calls.append("repaint the screen")
            return refresh(*args, **kw)

        main._refresh_layout, main.refresh = counting_layout, counting_refresh
        title = main.query_one(TitleHeader).query_one(HeaderTitle)
        for k in (1, 2, 3, 0):  # new figures in the panels, the table, the sparklines
            show(app, k)
            await pilot.pause()
            assert fmt.sample_time(app.feed.current().wall) in main.sub_title
            assert str(title.render()).endswith(main.sub_title)
        assert calls == []


async def test_the_heap_is_frozen_while_the_app_runs():
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
