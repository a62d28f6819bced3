"""`ksmtrace top`: the live Textual observatory.

The app reads snapshots from a feed (live, sysfs-only or replay) and draws
them; it never touches bcc or /sys. Two things go the other way, both through
objects handed in by the command: which process's page map the source should
read (`feed.watch`), and knob changes (a `KsmKnobs` from the kernel layer).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.reactive import Reactive
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from ksmtrace.diagnose import diagnose
from ksmtrace.errors import KsmtraceError
from ksmtrace.grouping import GROUPS
from ksmtrace.model import ProcessRow, Snapshot
from ksmtrace.tui import format as fmt
from ksmtrace.tui.widgets import (
    ProcessTable,
    SnapshotScreen,
    StagePanel,
    StatusLine,
    TitleHeader,
    WhyLine,
)

REFRESH = 0.25  # seconds between checks for a new snapshot


def screens():
    """The other screens' module, imported when one is first opened: not
    in the first frame's start-up time."""
    from ksmtrace.tui import screens

    return screens


class MainScreen(SnapshotScreen):
    BINDINGS = [
        Binding("m", "page_map", "page map"),
        Binding("s", "sort", "sort"),
        Binding("g", "group", "group"),
        Binding("r", "reverse", "reverse", show=False),
        Binding("slash", "filter", "filter", show=False),
        Binding("escape", "clear_filter", "clear filter", show=False),
        Binding("w", "why", "why?"),
        Binding("e", "events", "events"),
        Binding("x", "sharing", "sharing"),
        Binding("h", "details", "histograms", show=False),  # listed in help (80 columns)
        Binding("k", "knobs", "knobs"),
        Binding("question_mark,f1", "help", "help"),
        Binding("q", "app.quit", "quit"),
        # replay
        Binding("space", "pause", "pause", show=False),
        Binding("plus,equals_sign", "speed(1)", "faster", show=False),
        Binding("minus", "speed(-1)", "slower", show=False),
        Binding("left_square_bracket", "seek(-10)", "back", show=False),
        Binding("right_square_bracket", "seek(10)", "forward", show=False),
        Binding("less_than_sign", "seek_to(0)", "start", show=False),
        Binding("greater_than_sign", "seek_to(-1)", "end", show=False),
    ]

    # Shown by the header, whose title line repaints itself: a new subtitle
    # (each frame: the sample time) does not repaint the whole screen.
    sub_title: Reactive[str | None] = Reactive(None, compute=False, repaint=False)

    sort_key = "merging"
    reverse = True
    filter_text = ""
    group_by = "process"

    def compose(self) -> ComposeResult:
        yield TitleHeader(show_clock=self.app.clock)
        yield Static(id="banner")
        with Horizontal(id="stages"):
            for stage in ("searching", "merging", "counting", "updating"):
                yield StagePanel(stage)
        yield WhyLine(id="why")
        yield Input(placeholder="filter: pid, comm, workload or cgroup (Esc clears)", id="filter")
        yield ProcessTable(id="processes")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#processes", ProcessTable)
        self.query_one("#filter", Input).display = False
        self.query_one("#banner", Static).display = False
        self._rows: list[ProcessRow] = []
        self._observed: frozenset[str] = frozenset()
        table.focus()
        # the newest snapshot (the feed started before the app) in the first frame
        self.app.refresh_view(force=True)

    def on_resize(self, event) -> None:
        # Taller terminals give the stage panels more lines (all their figures).
        self.query_one("#stages").styles.height = 12 if event.size.height > 34 else 9
        table = self.query_one("#processes", ProcessTable)
        table.workload_width = max(8, event.size.width - fmt.FIXED_WIDTH - 2)
        self._redraw()

    # ------------------------------------------------------------- drawing
    def show(self, snap: Snapshot, history: list[Snapshot]) -> None:
        banner = self.query_one("#banner", Static)
        if snap.source == "sysfs-only" and not banner.display:
            banner.update("No BPF (sysfs-only): " + "; ".join(snap.notes[1:] or snap.notes)
                          + ". Run as root to trace each stage.")
            banner.display = True
        for panel in self.query(StagePanel):
            panel.show(snap, history)
        self.query_one(WhyLine).show(diagnose(snap))
        self.query_one(StatusLine).show(snap, self.app.feed.describe())
        self._observed = fmt.observed_columns(snap)
        self._fill(snap.processes)
        self.sub_title = self._subtitle(snap)

    def _subtitle(self, snap: Snapshot) -> str:
        n = sum(p.alive for p in snap.processes)
        gone = len(snap.processes) - n
        # the moment the shown figures were read (the recording's time in a
        # replay); left out when the clock is off, so that snapshot tests
        # do not depend on the time zone
        at = f" @ {fmt.sample_time(snap.wall)}" if self.app.clock else ""
        return (f"{snap.source}{at} · {n} process{'es' if n != 1 else ''}"
                + (f" (+{gone} exited, dimmed)" if gone else "")
                + (f" · by {self.group_by}" if self.group_by != "process" else "")
                + f" · sort {self.sort_key}"
                f"{' ↓' if self.reverse else ' ↑'}"
                + (f" · filter '{self.filter_text}'" if self.filter_text else ""))

    def _fill(self, rows: tuple[ProcessRow, ...]) -> None:
        self._rows = fmt.select_rows(rows, self.sort_key, self.reverse, self.filter_text,
                                     self.group_by)
        self.query_one("#processes", ProcessTable).set_rows(self._rows, self._observed)

    def selected_pid(self) -> int | None:
        return self.query_one("#processes", ProcessTable).selected_pid()

    def _redraw(self) -> None:
        snap = self.app.feed.current()
        if snap is not None:
            self._fill(snap.processes)
            self.sub_title = self._subtitle(snap)

    # ------------------------------------------------------------- actions
    def action_sort(self) -> None:
        keys = fmt.SORT_KEYS
        self.sort_key = keys[(keys.index(self.sort_key) + 1) % len(keys)]
        self.reverse = self.sort_key not in fmt.TEXT_KEYS
        self._redraw()
        self.notify(f"sorted by {self.sort_key}", timeout=1.5)

    def action_group(self) -> None:
        """One row per process, per workload (VM, container, service), per kind."""
        groups = GROUPS
        self.group_by = groups[(groups.index(self.group_by) + 1) % len(groups)]
        self._redraw()
        self.notify(f"one row per {self.group_by}", timeout=1.5)

    def action_reverse(self) -> None:
        self.reverse = not self.reverse
        self._redraw()

    def on_process_table_header_clicked(self, event: ProcessTable.HeaderClicked) -> None:
        key = event.key
        if key == self.sort_key:
            self.reverse = not self.reverse
        else:
            self.sort_key = key
            self.reverse = key not in fmt.TEXT_KEYS
        self._redraw()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value
            self._redraw()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.query_one("#processes", ProcessTable).focus()
            if not event.value:
                event.input.display = False

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        self.filter_text = ""
        self.query_one("#processes", ProcessTable).focus()
        self._redraw()

    def on_process_table_selected(self, event: ProcessTable.Selected) -> None:
        self.action_page_map()

    def action_page_map(self) -> None:
        pid = self.selected_pid()
        if pid is None:
            self.notify("no process selected: the table is empty", severity="warning")
            return
        comm = next((p.comm for p in self._rows if p.pid == pid), "?")
        self.app.open_page_map(pid, comm)

    def action_why(self) -> None:
        self.app.push_screen(screens().WhyScreen())

    def action_events(self) -> None:
        self.app.push_screen(screens().EventLogScreen())

    def action_sharing(self) -> None:
        """Who shares KSM pages with whom (reads every KSM process's page map)."""
        from ksmtrace.tui.sharing import SharingScreen  # numpy: imported when first asked

        self.app.push_screen(SharingScreen())

    def action_details(self) -> None:
        self.app.push_screen(screens().DetailsScreen())

    def action_knobs(self) -> None:
        self.app.push_screen(screens().KnobsScreen())

    def action_help(self) -> None:
        self.app.push_screen(screens().HelpScreen())

    # -------------------------------------------------------------- replay
    def _replay(self):
        feed = self.app.feed
        if not feed.seekable:
            self.notify("pause, speed and seek work when replaying a recording "
                        "(ksmtrace top --replay FILE)", timeout=3)
            return None
        return feed

    def action_pause(self) -> None:
        if feed := self._replay():
            feed.toggle_pause()
            self.app.refresh_view(force=True)

    def action_speed(self, direction: int) -> None:
        if feed := self._replay():
            feed.faster(direction > 0)
            self.app.refresh_view(force=True)

    def action_seek(self, delta: int) -> None:
        if feed := self._replay():
            feed.seek(delta)
            self.app.refresh_view(force=True)

    def action_seek_to(self, index: int) -> None:
        if feed := self._replay():
            feed.seek_to(len(feed.snapshots) - 1 if index < 0 else index)
            self.app.refresh_view(force=True)


class KsmtraceApp(App):
    """`feed`: a LiveFeed or ReplayFeed (started by the caller).
    `knobs`: a kernel.sysfs.KsmKnobs to change knobs with, or None."""

    CSS_PATH = "ksmtrace.tcss"
    TITLE = "ksmtrace top"
    BINDINGS = [Binding("ctrl+c", "quit", "quit", show=False, priority=True)]

    def __init__(self, feed, knobs=None, demo_mode: bool = False, stream_off: bool = True,
                 refresh: float = REFRESH, clock: bool = True):
        super().__init__()
        self.clock = clock  # off for snapshot tests: the screen must not depend on time
        self.feed = feed
        self.knobs = knobs
        self.demo_mode = demo_mode
        self.stream_off = stream_off
        self.refresh_every = refresh
        self.knob_changes: list[str] = []
        self.failure: BaseException | None = None
        self._shown: tuple[int, int] | None = None

    def get_default_screen(self) -> Screen:
        return MainScreen()

    def on_mount(self) -> None:
        self.set_interval(self.refresh_every, self.refresh_view)
        self.call_after_refresh(self.refresh_view, True)
        self.call_after_refresh(self._freeze_heap)

    def _freeze_heap(self) -> None:
        """Most of what exists once the first frame is drawn (modules,
        Textual, the DOM and stylesheet, the source) lives as long as the
        app, so the cyclic collector's full collections skip it: walking it
        would stall a frame for tens of milliseconds. Reference counting
        still frees frozen objects; cycles among them wait for on_unmount."""
        gc.freeze()

    def on_unmount(self) -> None:
        gc.unfreeze()

    # ------------------------------------------------------------ snapshots
    def refresh_view(self, force: bool = False) -> None:
        feed = self.feed
        if getattr(feed, "error", None) is not None:
            self.failure = feed.error
            self.exit(return_code=1)
            return
        if feed.seekable:
            feed.advance()
        snap = feed.current()
        screen = self.screen
        if snap is None:
            if isinstance(screen, MainScreen):
                screen.query_one(StatusLine).show(None, feed.describe())
            return
        key = (id(screen), snap.seq)
        if key == self._shown and not force:
            return
        self._shown = key
        if isinstance(screen, SnapshotScreen):
            try:
                screen.show(snap, feed.recent())
            except NoMatches:  # the screen is still being composed
                self._shown = None

    def on_screen_resume(self) -> None:
        self.refresh_view(force=True)

    def push_screen(self, screen, *args, **kw):
        result = super().push_screen(screen, *args, **kw)
        self.call_after_refresh(self.refresh_view, True)
        return result

    def pop_screen(self):
        result = super().pop_screen()
        if not isinstance(self.screen, screens().PageMapScreen):
            self.feed.watch(None)
        self.call_after_refresh(self.refresh_view, True)
        return result

    def open_page_map(self, pid: int, comm: str) -> None:
        self.feed.watch(pid)
        self.push_screen(screens().PageMapScreen(pid, comm))

    # ---------------------------------------------------------------- knobs
    def knobs_unavailable(self) -> str | None:
        if self.feed.kind == "replay":
            return "replaying a recording: the knobs shown are the recorded ones (read-only)"
        if self.knobs is None:
            return "changing knobs needs root (run ksmtrace top as root)"
        return None

    def set_knob(self, name: str, value: int) -> None:
        snap = self.feed.current()
        before = getattr(snap.ksm, name) if snap else None
        try:
            self.knobs.set(**{name: value})
        except KsmtraceError as e:
            self.notify(f"{e.message}\n{e.hint}", severity="error", timeout=8)
            return
        self.knob_changes.append(f"{name} {before} -> {value}")
        self.notify(f"{name} = {value}", timeout=3)

    # -------------------------------------------------------------- palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        main = self.screen_stack[0] if self.screen_stack else None
        if isinstance(main, MainScreen):
            yield SystemCommand("Why isn't it merging?", "every finding of the diagnosis",
                                main.action_why)
            yield SystemCommand("Event log", "the newest traced events", main.action_events)
            yield SystemCommand("Histograms", "latency histograms, failures, own BPF cost",
                                main.action_details)
            yield SystemCommand("Knobs", "change run, pages_to_scan, ...", main.action_knobs)
            yield SystemCommand("Page map", "pages of the selected process",
                                main.action_page_map)
            yield SystemCommand("Sort processes", "by the next column", main.action_sort)
            yield SystemCommand("Group processes", "by workload, by kind, or none",
                                main.action_group)
            yield SystemCommand("Filter processes", "by pid, comm or cgroup",
                                main.action_filter)
            yield SystemCommand("Help", "keys and what each figure means", main.action_help)
            if self.feed.seekable:
                yield SystemCommand("Pause / play", "replay", main.action_pause)

