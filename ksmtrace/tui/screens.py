"""Screens other than the main one: page map, diagnosis, knobs, event log,
help. Each redraws from the newest snapshot the app hands it (`show`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Label, RichLog, Static

from ksmtrace.diagnose import diagnose
from ksmtrace.kernel.sysfs import KNOB_DEFAULTS
from ksmtrace.model import PageState, Snapshot
from ksmtrace.tui import format as fmt
from ksmtrace.tui.widgets import CELL, PageGrid, SnapshotScreen, StatusLine, finding_text

if TYPE_CHECKING:  # the reader (numpy) loads when a page map is first read
    from ksmtrace.kernel.pagemap import PageMap


# ------------------------------------------------------------------ page map
class PageMapScreen(SnapshotScreen):
    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "back"),
        Binding("pagedown", "page_down", "page down", show=False),
        Binding("pageup", "page_up", "page up", show=False),
    ]

    def __init__(self, pid: int, comm: str):
        super().__init__()
        self.pid = pid
        self.comm = comm
        self.page_map: PageMap | None = None
        self.reason: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="pagemap"):
            yield Static(id="pagemap-title")
            yield Static(self._legend(), id="pagemap-legend")
            yield PageGrid(id="pagegrid")
            yield Static(id="pagemap-note")
        yield StatusLine(id="status")
        yield Footer()

    @staticmethod
    def _legend() -> Text:
        t = Text()
        for state, label in ((PageState.KSM, "KSM page (digit: sharers, + for 10 or more)"),
                             (PageState.ZERO, "zero page"),
                             (PageState.PRESENT, "present, not merged"),
                             (PageState.ABSENT, "not present")):
            glyph, style = CELL[state]
            t.append(f" {glyph} ", style=style)
            t.append(f" {label}   ")
        return t

    def on_mount(self) -> None:
        self.query_one("#pagemap-title", Static).update(
            f"Page map of pid {self.pid} ({self.comm}): its mergeable areas, one cell per page")
        self.query_one("#pagemap-note", Static).update("waiting for the next sample…")

    def show(self, snap: Snapshot, history: list[Snapshot]) -> None:
        self.query_one(StatusLine).show(snap, self.app.feed.describe())
        got = snap.page_maps.get(self.pid)
        note = self.query_one("#pagemap-note", Static)
        grid = self.query_one(PageGrid)
        if snap.source == "replay":
            note.update("recordings hold no page maps: run `ksmtrace top` live to see them")
            return
        if got is None:
            return
        if isinstance(got, str):
            self.reason = got
            note.update(Text(f"cannot read the page map: {got}", style="yellow"))
            return
        self.page_map = got
        grid.show(got)
        c = grid.counts
        note.update(
            f"{len(got)} pages in {len(got.areas)} areas: KSM {c[PageState.KSM]}, "
            f"zero {c[PageState.ZERO]}, unmerged {c[PageState.PRESENT]}, "
            f"not present {c[PageState.ABSENT]}   (sample {time.strftime('%H:%M:%S')})"
            + ("\nKSM pages inferred (anonymous and mapped twice or more): this kernel's "
               "/proc/kpageflags marks every anonymous page KSM" if got.ksm_inferred else ""))

    def action_page_down(self) -> None:
        self.query_one(PageGrid).scroll_page_down()

    def action_page_up(self) -> None:
        self.query_one(PageGrid).scroll_page_up()


# ----------------------------------------------------------------- diagnosis
class WhyScreen(SnapshotScreen):
    BINDINGS = [Binding("escape,q,w", "app.pop_screen", "back")]

    def compose(self) -> ComposeResult:
        yield Static("Why isn't it merging?  (every finding, most serious first)",
                     classes="title")
        with VerticalScroll():
            yield Static(id="why-all")
        yield StatusLine(id="status")
        yield Footer()

    def show(self, snap: Snapshot, history: list[Snapshot]) -> None:
        self.query_one(StatusLine).show(snap, self.app.feed.describe())
        t = Text()
        for i, f in enumerate(diagnose(snap)):
            if i:
                t.append("\n\n")
            t.append_text(finding_text(f, detail=True))
        self.query_one("#why-all", Static).update(t)


# --------------------------------------------------------------------- knobs
KNOB_HELP = {
    "run": "0 stop ksmd, 1 run, 2 unmerge all",
    "pages_to_scan": "pages ksmd scans per wake-up",
    "sleep_millisecs": "ksmd sleep between batches (ms)",
    "use_zero_pages": "1: merge empty pages with the zero page",
    "max_page_sharing": "sharers per KSM page (change needs run=2 first)",
}
TUNABLE = tuple(KNOB_HELP)


class KnobsScreen(SnapshotScreen):
    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "back"),
        Binding("enter", "edit", "change"),
    ]

    def compose(self) -> ComposeResult:
        yield Static("KSM knobs (/sys/kernel/mm/ksm): select one and press Enter to change it",
                     classes="title")
        yield DataTable(id="knobs", cursor_type="row", zebra_stripes=True)
        yield Static(id="knobs-note")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one(DataTable)
        t.add_column("KNOB", key="knob", width=18)
        t.add_column("NOW", key="now", width=8)
        t.add_column("DEFAULT", key="default", width=8)
        t.add_column("MEANING", key="meaning")
        for name in TUNABLE:
            t.add_row(name, "-", str(KNOB_DEFAULTS[name]), KNOB_HELP[name], key=name)
        note = self.query_one("#knobs-note", Static)
        why = self.app.knobs_unavailable()
        note.update(Text(why, style="yellow") if why else
                    "changes are confirmed first" + (
                        "; the demo restores every knob on exit" if self.app.demo_mode else
                        "; they stay after ksmtrace exits (you are tuning the host)"))

    def show(self, snap: Snapshot, history: list[Snapshot]) -> None:
        self.query_one(StatusLine).show(snap, self.app.feed.describe())
        t = self.query_one(DataTable)
        if t.row_count < len(TUNABLE):  # shown before on_mount filled the table
            return
        for name in TUNABLE:
            t.update_cell(name, "now", str(getattr(snap.ksm, name)))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_edit()

    def action_edit(self) -> None:
        why = self.app.knobs_unavailable()
        if why:
            self.app.notify(why, severity="warning")
            return
        t = self.query_one(DataTable)
        if t.row_count == 0:
            return
        name = str(t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value)
        snap = self.app.feed.current()
        current = getattr(snap.ksm, name) if snap else None
        self.app.push_screen(KnobEdit(name, current), self._edited)

    def _edited(self, result: tuple[str, int] | None) -> None:
        if result is None:
            return
        name, value = result
        self.app.push_screen(Confirm(f"Set {name} to {value}?"),
                             lambda ok: self.app.set_knob(name, value) if ok else None)


class KnobEdit(ModalScreen[tuple[str, int] | None]):
    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, name: str, current: object):
        super().__init__()
        self.knob = name
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"{self.knob}: now {self.current}, default "
                        f"{KNOB_DEFAULTS[self.knob]}. {KNOB_HELP[self.knob]}")
            yield Input(str(self.current if self.current is not None else ""),
                        type="integer", id="knob-value")
            yield Label("Enter: next (you confirm after)   Esc: cancel", classes="dim")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        try:
            value = int(event.value)
        except ValueError:
            self.notify(f"{event.value!r} is not a whole number", severity="error")
            return
        if value < 0:
            self.notify("KSM knobs are not negative", severity="error")
            return
        self.dismiss((self.knob, value))

    def action_cancel(self) -> None:
        self.dismiss(None)


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "yes", "yes"), Binding("n,escape", "no", "no")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            yield Label("y: yes   n / Esc: no", classes="dim")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


# ---------------------------------------------------------------- histograms
HIST_TITLES = {
    "scan_round_seconds": "scan round duration (ksm_start_scan -> ksm_stop_scan)",
    "merge_latency_seconds": "merge latency (try_to_merge_one_page entry -> exit)",
    "cow_latency_seconds": "COW break latency (do_wp_page entry -> exit, KSM pages)",
    "unshare_latency_seconds": "unshare latency (FAULT_FLAG_UNSHARE faults on KSM pages)",
    "scan_batch_seconds": "ksmd batch duration (ksm_do_scan)",
}


def histogram_text(name: str, slots: dict[int, int], width: int = 40) -> Text:
    t = Text()
    t.append(HIST_TITLES.get(name, name), style="bold")
    total = sum(slots.values())
    if not total:
        t.append("\n  no samples")
        return t
    t.append(f"   {total} samples, p50 {fmt.duration(fmt.percentile_ns(slots, 0.5))}, "
             f"p99 {fmt.duration(fmt.percentile_ns(slots, 0.99))}")
    top = max(slots.values())
    for slot in range(min(slots), max(slots) + 1):
        n = slots.get(slot, 0)
        lo, hi = fmt.duration(2 ** slot), fmt.duration(2 ** (slot + 1))
        bar = "█" * max(1 if n else 0, round(n / top * width))
        t.append(f"\n  {lo:>7} - {hi:<7} {n:>9} ")
        t.append(bar, style="green")
    return t


class DetailsScreen(SnapshotScreen):
    """Latency histograms, merge failures by errno, ksmtrace's own BPF cost."""

    BINDINGS = [Binding("escape,q,h", "app.pop_screen", "back")]

    def compose(self) -> ComposeResult:
        yield Static("Histograms (log2 buckets, since start), merge failures, "
                     "ksmtrace's own cost", classes="title")
        with VerticalScroll():
            yield Static(id="details")
        yield StatusLine(id="status")
        yield Footer()

    def show(self, snap: Snapshot, history: list[Snapshot]) -> None:
        self.query_one(StatusLine).show(snap, self.app.feed.describe())
        t = Text()
        if not snap.traced:
            t.append("no BPF in this source (sysfs-only): no histograms, failures or "
                     "per-event figures\n\n", style="yellow")
        hists = [h for h in snap.hist if any(snap.hist[h].values())]
        for name in hists:
            t.append_text(histogram_text(name, snap.hist[name]))
            t.append("\n\n")
        missing = [n for n in HIST_TITLES if n not in hists]
        if snap.traced and missing:
            t.append("not measured here: " + ", ".join(missing)
                     + " (their probes did not attach or saw nothing; see the status line "
                     "and `ksmtrace doctor`)\n\n", style="dim")
        t.append("merge failures by kind:errno", style="bold")
        if snap.errors:
            for key, n in sorted(snap.errors.items(), key=lambda kv: -kv[1]):
                t.append(f"\n  {key:28} {n:>9}")
        else:
            t.append("\n  none" if snap.traced else "\n  -")
        t.append("\n\nksmtrace's BPF programs (kernel BPF statistics)", style="bold")
        if snap.programs:
            for p in sorted(snap.programs, key=lambda p: -p.run_time_ns):
                avg = p.run_time_ns / p.run_count if p.run_count else 0
                t.append(f"\n  {p.name:32} {fmt.duration(p.run_time_ns):>9} in "
                         f"{p.run_count:>10} runs, {fmt.duration(avg)} each")
        elif snap.source == "live":
            t.append("\n  not measured: start with --bpf-stats (the kernel's BPF statistics "
                     "cost ksmd about 5% more CPU while on), or see `ksmtrace doctor`")
        else:
            t.append("\n  not available from this source")
        self.query_one("#details", Static).update(t)


# ----------------------------------------------------------------- event log
def event_line(e) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"{e.ts_ns / 1e9:14.6f} ", style="dim")
    t.append(f"{e.stage:9} ", style="cyan")
    t.append(f"{e.name:16} ")
    t.append(f"{e.pid:>7} {e.comm:15} ")
    t.append(e.describe(), style="red" if e.err else "")
    return t


class EventLogScreen(SnapshotScreen):
    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "back"),
        Binding("space", "pause", "pause/resume"),
        Binding("c", "clear", "clear"),
    ]

    def __init__(self):
        super().__init__()
        self.paused = False
        self._last_seq = -1

    def compose(self) -> ComposeResult:
        yield Static(id="log-title", classes="title")
        yield RichLog(id="events", max_lines=5000, wrap=False)
        yield StatusLine(id="status")
        yield Footer()

    def _title(self, snap: Snapshot | None) -> None:
        state = "PAUSED" if self.paused else "following"
        why = ""
        if snap is not None and not snap.traced:
            why = " - no events without BPF (sysfs-only)"
        elif snap is not None and not snap.events and self.app.stream_off:
            why = " - the event stream is off (ksmtrace top --stream turns it on)"
        self.query_one("#log-title", Static).update(
            f"Event log ({state}; the newest events of each interval){why}")

    def on_mount(self) -> None:
        self._title(self.app.feed.current())

    def show(self, snap: Snapshot, history: list[Snapshot]) -> None:
        self.query_one(StatusLine).show(snap, self.app.feed.describe())
        self._title(snap)
        if self.paused or snap.seq == self._last_seq:
            return
        self._last_seq = snap.seq
        log = self.query_one(RichLog)
        for e in snap.events[-200:]:
            log.write(event_line(e))

    def action_pause(self) -> None:
        self.paused = not self.paused
        self._title(self.app.feed.current())

    def action_clear(self) -> None:
        self.query_one(RichLog).clear()


# ---------------------------------------------------------------------- help
HELP_KEYS = (
    ("main screen", ""),
    ("↑ ↓ / PgUp PgDn", "move in the process table"),
    ("enter, m", "page map of the selected process"),
    ("s / r", "sort by the next column / reverse the order"),
    ("g", "a row per process / per workload (VM, container, service) / per kind"),
    ("/", "filter by pid, comm, workload or cgroup (Esc clears)"),
    ("w", "why isn't it merging? (every finding)"),
    ("e", "event log (space pauses it)"),
    ("x", "sharing: who shares KSM pages with whom (live, root)"),
    ("h", "histograms, merge failures by errno, ksmtrace's own BPF cost"),
    ("k", "KSM knobs (root, live only)"),
    ("? / F1", "this help"),
    ("ctrl+p", "command palette"),
    ("q", "quit (probes detached, demo ended, knobs restored)"),
    ("replay only", ""),
    ("space", "pause / play"),
    ("+ / -", "faster / slower"),
    ("[ ]", "back / forward 10 samples"),
    ("< >", "first / last sample"),
)


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark,f1", "app.pop_screen", "close")]

    def compose(self) -> ComposeResult:
        t = Text()
        for key, what in HELP_KEYS:
            if not what:
                t.append(f"\n{key}\n", style="bold underline")
                continue
            t.append(f"  {key:18}", style="bold cyan")
            t.append(f"{what}\n")
        t.append("\nfigures\n", style="bold underline")
        for stage, figures in (("searching", fmt.searching), ("merging", fmt.merging),
                               ("counting", fmt.counting), ("updating", fmt.updating)):
            t.append(f"  {stage}\n", style="bold")
            for f in figures(_EMPTY):
                t.append(f"    {f.label:12}", style="cyan")
                t.append(f"{f.hint}\n")
        t.append("\n'-' means the source cannot see it (e.g. sysfs-only); '~' marks an "
                 "estimate.\n", style="dim")
        with VerticalScroll(classes="dialog help"):
            yield Static("ksmtrace top: help  (Esc closes)", classes="title")
            yield Static(t)


def _empty_snapshot() -> Snapshot:
    from ksmtrace.kernel.procfs import KsmVmstat
    from ksmtrace.kernel.sysfs import KsmSysfs

    return Snapshot(seq=0, wall=0.0, interval=0.0, source="-", ksm=KsmSysfs(),
                    vmstat=KsmVmstat(None, None))


_EMPTY = _empty_snapshot()

__all__ = ["PageMapScreen", "WhyScreen", "KnobsScreen", "EventLogScreen", "HelpScreen",
           "DetailsScreen",
           "Confirm", "KnobEdit"]
