"""The TUI's widgets: stage panels, the status line, the diagnosis line and
the page grid. They draw snapshots; they never read the kernel."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Sparkline, Static

from ksmtrace.diagnose import Finding
from ksmtrace.kernel.pagemap import PAGE_SIZE, PageMap, PageState
from ksmtrace.model import Snapshot
from ksmtrace.tui import format as fmt

STAGE_TITLES = {
    "searching": "Searching",
    "merging": "Merging",
    "counting": "Counting",
    "updating": "Updating",
}


class StagePanel(Vertical):
    """One of KSM's four stages: live figures and a sparkline of its rate."""

    def __init__(self, stage: str, **kw):
        super().__init__(id=f"stage-{stage}", classes="stage", **kw)
        self.stage = stage
        self.border_title = STAGE_TITLES[stage]

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
        self.query_one(".figures", Static).update(text)
        series = fmt.spark_series(history, self.stage) or [0.0]
        self.query_one(Sparkline).data = series[-max(width, 2):]
        name = fmt.STAGE_SPARK[self.stage]
        self.border_subtitle = (name or "saved pages").replace("_", " ") + (
            "/s" if name else "")


class StatusLine(Static):
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


class WhyLine(Static):
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
SHARER_STYLE = Style(color="black", bgcolor="green", bold=True)


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

    def clear(self) -> None:
        self._rows = []
        self.counts = {}
        self.virtual_size = Size(0, 0)
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
