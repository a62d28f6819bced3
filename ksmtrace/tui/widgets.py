"""The TUI's widgets: stage panels, the status line, the diagnosis line and
the page grid. They draw snapshots; they never read the kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Header, Sparkline, Static
from textual.widgets._header import HeaderTitle  # what Header composes; not exported

from ksmtrace.diagnose import Finding
from ksmtrace.kernel.procfs import PAGE_SIZE
from ksmtrace.model import PageState, ProcessRow, Snapshot
from ksmtrace.tui import format as fmt

if TYPE_CHECKING:  # the reader (numpy) loads when a page map is first read
    from ksmtrace.kernel.pagemap import PageMap

STAGE_TITLES = {
    "searching": "Searching",
    "merging": "Merging",
    "counting": "Counting",
    "updating": "Updating",
}


class SnapshotScreen(Screen):
    """A screen the app redraws on every new snapshot."""

    def show(self, snap: Snapshot, history: list[Snapshot]) -> None:  # pragma: no cover
        pass


class StagePanel(Vertical):
    """One of KSM's four stages: live figures and a sparkline of its rate.
    A frame redraws only what changed, and never asks for a layout: the
    panel's size is set by the stylesheet, not by its figures."""

    def __init__(self, stage: str, **kw):
        super().__init__(id=f"stage-{stage}", classes="stage", **kw)
        self.stage = stage
        self.border_title = STAGE_TITLES[stage]
        name = fmt.STAGE_SPARK[stage]
        self.border_subtitle = (name or "saved pages").replace("_", " ") + ("/s" if name else "")
        self._last_text: str | None = None
        self._last_series: list[float] | None = None

    def compose(self) -> ComposeResult:
        yield Static(id=f"{self.stage}-figures", classes="figures")
        yield Sparkline([0.0], id=f"{self.stage}-spark", summary_function=max)

    def show(self, snap: Snapshot, history: list[Snapshot]) -> None:
        figures = fmt.STAGE_FIGURES[self.stage](snap)
        width = max(self.content_size.width, 16)
        text = Text(no_wrap=True, overflow="ellipsis")
        for i, f in enumerate(figures):
            pad = max(width - len(f.label) - len(f.value), 1)
            if i:
                text.append("\n")
            text.append(f.label, style="dim")
            text.append(" " * pad)
            text.append(f.value, style="bold")
        if text.plain != self._last_text:  # unchanged widgets are not redrawn
            self._last_text = text.plain
            self.query_one(".figures", Static).update(text, layout=False)
        series = (fmt.spark_series(history, self.stage) or [0.0])[-max(width, 2):]
        if series != self._last_series:
            self._last_series = series
            self.query_one(Sparkline).data = series


class _Title(HeaderTitle):
    """The header's title line. Its size is set by the header, so a new
    subtitle (each frame: the sample time) is repainted without a layout."""

    def update(self, content="", *, layout: bool = False) -> None:
        super().update(content, layout=layout)


class TitleHeader(Header):
    """Textual's Header, whose title changes without laying out the screen."""

    def compose(self) -> ComposeResult:
        for widget in super().compose():
            yield _Title() if type(widget) is HeaderTitle else widget


class Memo(Static):
    """A one-line Static that redraws only when its text changes. Its size
    is set by the stylesheet, so a new text is repainted without a layout."""

    _memo: str | None = None

    def update(self, content="", *, layout: bool = False) -> None:
        key = content.plain if isinstance(content, Text) else str(content)
        if key != self._memo:
            self._memo = key
            super().update(content, layout=layout)


class StatusLine(Memo):
    """Always visible: source, attach plan, missed probes, lost events,
    estimates, ksmtrace's own BPF cost."""

    def show(self, snap: Snapshot | None, feed_text: str) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f" {feed_text} ", style="reverse bold")
        if snap is None:
            t.append("  waiting for the first sample…")
            self.update(t)
            return
        methods = sorted({p.method for p in snap.probes if p.attached and p.method})
        if snap.source == "sysfs-only":
            t.append("  no BPF: kernel counters only", style="yellow")
        elif methods:
            t.append("  attach: " + "+".join(methods))
        missed = snap.missed_probes
        if missed:
            t.append(f"  missed: {len(missed)} ({', '.join(p.probe for p in missed)})",
                     style="yellow")
        if snap.traced:
            t.append("  lost: ")
            t.append(str(snap.lost_events), style="red bold" if snap.lost_events else "green")
        if snap.cow_estimated:
            t.append("  COW per process estimated", style="yellow")
        if snap.programs:
            ns = sum(p.run_time_ns for p in snap.programs)
            runs = sum(p.run_count for p in snap.programs)
            t.append(f"  bpf: {fmt.duration(ns)} in {fmt.num(runs)} runs")
        self.update(t)


LEVEL_STYLE = {"problem": "bold red", "warn": "yellow", "info": "cyan", "ok": "green"}
LEVEL_MARK = {"problem": "✖", "warn": "▲", "info": "●", "ok": "✔"}


def finding_text(f: Finding, detail: bool = False) -> Text:
    t = Text()
    t.append(f"{LEVEL_MARK[f.level]} ", style=LEVEL_STYLE[f.level])
    t.append(f.title, style=LEVEL_STYLE[f.level])
    if detail:
        if f.detail:
            t.append(f"\n    {f.detail}")
        if f.fix:
            t.append("\n    fix: ", style="dim")
            t.append(f.fix)
    return t


class WhyLine(Memo):
    """The two most serious findings of "why isn't it merging?" (w: all)."""

    def show(self, findings: list[Finding]) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append("why? ", style="bold")
        for i, f in enumerate(findings[:2]):
            if i:
                t.append("   ")
            t.append_text(finding_text(f))
        if not findings:
            t.append("no findings yet")
        self.update(t)


# ------------------------------------------------------------------ page grid
CELL = {
    PageState.KSM: ("K", Style(color="black", bgcolor="green")),
    PageState.ZERO: ("0", Style(color="black", bgcolor="blue")),
    PageState.PRESENT: ("·", Style(color="yellow")),
    PageState.ABSENT: (" ", Style(bgcolor="grey11")),
}


def ksm_glyph(mappers: int | None) -> str:
    """A KSM cell shows how many PTEs map the page: 2-9, then + for 10 or more."""
    if mappers is None or mappers < 2:
        return "K"
    return str(mappers) if mappers < 10 else "+"


class PageGrid(ScrollView):
    """Every page of a process's mergeable areas, one cell per page, rows of
    `per_row` pages with their address; scrolls through large areas."""

    per_row: reactive[int] = reactive(64)

    def __init__(self, **kw):
        super().__init__(**kw)
        self._rows: list[tuple[int, list[tuple[str, Style]]]] = []
        self.counts: dict[PageState, int] = {}

    def show(self, pm: PageMap) -> None:
        per_row = self.per_row
        rows: list[tuple[int, list[tuple[str, Style]]]] = []
        counts = {s: 0 for s in PageState}
        row: list[tuple[str, Style]] = []
        row_addr = next_addr = 0
        for page in pm:
            if not row or len(row) >= per_row or page.addr != next_addr:
                if row:
                    rows.append((row_addr, row))
                row, row_addr = [], page.addr
            counts[page.state] += 1
            glyph, style = CELL[page.state]
            if page.state is PageState.KSM:
                glyph = ksm_glyph(page.mappers)
            row.append((glyph, style))
            next_addr = page.addr + PAGE_SIZE
        if row:
            rows.append((row_addr, row))
        self._rows = rows
        self.counts = counts
        self.virtual_size = Size(14 + per_row, len(rows))
        self.refresh()

    def rendered_cells(self) -> str:
        """All cells as text, row by row (what the grid draws, for tests)."""
        return "\n".join("".join(g for g, _ in cells) for _, cells in self._rows)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        i = scroll_y + y
        width = self.scrollable_content_region.width
        if i >= len(self._rows):
            return Strip.blank(width, self.rich_style)
        addr, cells = self._rows[i]
        segs = [Segment(f"{addr:012x}  ", Style(color="bright_black"))]
        segs += [Segment(g, s) for g, s in cells]
        return Strip(segs).crop(scroll_x, scroll_x + width)

    def on_resize(self) -> None:
        width = max(self.scrollable_content_region.width - 14, 16)
        self.per_row = max(16, min(128, width // 16 * 16))


# -------------------------------------------------------------- process table
_UNDRAWN = object()  # the key of a line never drawn: it differs from every key


class ProcessTable(ScrollView, can_focus=True):
    """The process table, drawn line by line: only the visible rows are
    formatted, so a frame costs the same with 10 processes or 10,000.
    Up/down/PgUp/PgDn/Home/End move the cursor, Enter selects, a click on the
    header sorts by that column.

    New rows repaint only the screen lines whose text or style changed:
    `_drawn[y]` is the key (`_line_key`) line y had when last drawn, and every
    line whose key differs from it is marked dirty. Scrolling, resizing,
    focus and cursor moves repaint the whole table."""

    BINDINGS = [
        Binding("up", "cursor(-1)", "up", show=False),
        Binding("down", "cursor(1)", "down", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("home", "jump(0)", "first", show=False),
        Binding("end", "jump(-1)", "last", show=False),
        Binding("enter", "select", "page map", show=False),
    ]

    class Selected(Message):
        def __init__(self, pid: int):
            super().__init__()
            self.pid = pid

    class HeaderClicked(Message):
        def __init__(self, key: str):
            super().__init__()
            self.key = key

    HEADER = Style(bold=True, color="bright_white", bgcolor="dark_blue")
    CURSOR = Style(bold=True, color="black", bgcolor="cyan")
    CURSOR_DIM = Style(color="black", bgcolor="grey50")
    ZEBRA = Style(bgcolor="grey7")
    EXITED = Style(dim=True, italic=True)
    LABELS = tuple(c.label for c in fmt.COLUMNS)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.rows: list[ProcessRow] = []
        self.cursor_row = 0
        self.observed: frozenset[str] = frozenset()
        self._workload_width = 8
        self._widths = self._column_widths(8)
        self._drawn: dict[int, object] = {}

    # ---------------------------------------------------------------- data
    @property
    def row_count(self) -> int:
        return len(self.rows)

    @property
    def workload_width(self) -> int:
        return self._workload_width

    @workload_width.setter
    def workload_width(self, width: int) -> None:
        if width != self._workload_width:
            self._workload_width = width
            self._widths = self._column_widths(width)
            self.refresh()

    @staticmethod
    def _column_widths(workload_width: int) -> tuple[int, ...]:
        return tuple(workload_width if c.key == "workload" else c.width for c in fmt.COLUMNS)

    def set_rows(self, rows: list[ProcessRow], observed: frozenset[str]) -> None:
        pid = self.selected_pid()
        self.rows = rows
        self.observed = observed
        if pid is not None:
            self.cursor_row = next((i for i, p in enumerate(rows) if p.pid == pid),
                                   min(self.cursor_row, max(len(rows) - 1, 0)))
        self.virtual_size = Size(sum(w + 2 for w in self._widths), len(rows) + 1)
        self._follow()
        self._refresh_changed()

    def _refresh_changed(self) -> None:
        """Mark dirty every visible line whose key differs from the one drawn,
        in runs of consecutive lines."""
        width, height = self.size
        first = None
        for y in range(height + 1):
            changed = y < height and self._line_key(y) != self._drawn.get(y, _UNDRAWN)
            if changed and first is None:
                first = y
            elif not changed and first is not None:
                self.refresh(Region(0, first, width, y - first))
                first = None

    def get_row_at(self, i: int) -> tuple[str, ...]:
        return fmt.row_cells(self.rows[i], self.observed, self._workload_width)

    def selected_pid(self) -> int | None:
        if not self.rows:
            return None
        return self.rows[min(self.cursor_row, len(self.rows) - 1)].pid

    def move_cursor(self, row: int) -> None:
        self.cursor_row = max(0, min(row, len(self.rows) - 1))
        self._follow()
        self.refresh()

    def _visible_rows(self) -> int:
        return max(self.scrollable_content_region.height - 1, 1)

    def _follow(self) -> None:
        top = self.scroll_offset.y
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + self._visible_rows():
            self.scroll_to(y=self.cursor_row - self._visible_rows() + 1, animate=False)

    # ------------------------------------------------------------- actions
    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self.cursor_row + direction * self._visible_rows())

    def action_jump(self, where: int) -> None:
        self.move_cursor(len(self.rows) - 1 if where < 0 else 0)

    def action_select(self) -> None:
        pid = self.selected_pid()
        if pid is not None:
            self.post_message(self.Selected(pid))

    def on_click(self, event) -> None:
        if event.y == 0:
            x = event.x + self.scroll_offset.x
            for col, w in zip(fmt.COLUMNS, self._widths, strict=True):
                if x < w + 2:
                    self.post_message(self.HeaderClicked(col.key))
                    return
                x -= w + 2
            return
        row = self.scroll_offset.y + event.y - 1
        if 0 <= row < len(self.rows):
            if row == self.cursor_row and event.chain >= 2:
                self.action_select()
            self.move_cursor(row)

    # ------------------------------------------------------------- drawing
    def _line_key(self, y: int) -> tuple[tuple[str, ...], Style] | None:
        """What screen line y shows: its cells and style, None when blank."""
        if y == 0:
            return self.LABELS, self.HEADER
        i = self.scroll_offset.y + y - 1
        if i >= len(self.rows):
            return None
        if i == self.cursor_row:
            style = self.CURSOR if self.has_focus else self.CURSOR_DIM
        else:
            style = self.ZEBRA if i % 2 else Style()
        if not self.rows[i].alive:  # exited: kept with its last figures
            style = style + self.EXITED
        return self.get_row_at(i), style

    def render_line(self, y: int) -> Strip:
        key = self._drawn[y] = self._line_key(y)
        width = self.scrollable_content_region.width
        if key is None:
            return Strip.blank(width, self.rich_style)
        cells, style = key
        scroll_x = self.scroll_offset.x
        segs = [Segment(" " + text[:w].ljust(w) + " ", style)
                for text, w in zip(cells, self._widths, strict=True)]
        return Strip(segs).crop(scroll_x, scroll_x + width).extend_cell_length(width, style)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()
