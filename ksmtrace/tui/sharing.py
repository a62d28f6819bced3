"""The sharing screen: who shares KSM pages with whom.

A heat map of the frames each pair of workloads has in common, and up to four
chosen workloads' KSM pages side by side, each distinct KSM page frame drawn
as the same letter in the same colour wherever it appears: an 'A' in vm1 and
an 'A' in vm3 are one page of memory.

The map is read off the UI thread (a worker calls the feed, which calls the
source layer), with progress; leaving the screen cancels it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Static

from ksmtrace.errors import KsmtraceError
from ksmtrace.share import summarise
from ksmtrace.sources.counters import SharingCancelled
from ksmtrace.tui.widgets import SnapshotScreen

GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
COLOURS = ("red", "green", "yellow", "blue", "magenta", "cyan", "bright_red", "bright_green",
           "bright_yellow", "bright_blue", "bright_magenta", "bright_cyan")
OTHER = "·"  # a frame beyond the glyphs
HEAT = ("grey23", "dark_orange3", "orange1", "red1", "bold white on red")
MAX_CHOSEN = 4
MATRIX_MAX = 9  # groups in the heat map, chosen with keys 1-9


def glyph_of_frames(columns: list[np.ndarray]) -> dict[int, int]:
    """frame -> glyph index for the chosen workloads' pages: frames that more
    of them map come first (then by how often they are mapped, then by pfn),
    so the letters show shared pages first."""
    if not columns:
        return {}
    frames, count = np.unique(np.concatenate(columns), return_counts=True)
    spread = np.zeros(len(frames), np.int64)
    for col in columns:
        spread += np.isin(frames, col)
    order = np.lexsort((frames, -count, -spread))[: len(GLYPHS)]
    return {int(frames[i]): n for n, i in enumerate(order)}


def page_text(pfns: np.ndarray, glyphs: dict[int, int], width: int, rows: int) -> Text:
    """A workload's KSM pages in address order, one cell each."""
    t = Text(no_wrap=True)
    shown = pfns[: width * rows].tolist()
    for i, pfn in enumerate(shown):
        if i and i % width == 0:
            t.append("\n")
        g = glyphs.get(pfn)
        if g is None:
            t.append(OTHER, style="grey42")
        else:
            t.append(GLYPHS[g], style=f"bold {COLOURS[g % len(COLOURS)]}")
    if len(pfns) > len(shown):
        t.append(f"\n… {len(pfns) - len(shown)} more", style="dim")
    return t


def heat_text(r: dict[str, Any]) -> Text:
    names = r["matrix"]["groups"][:MATRIX_MAX]
    grid = [row[:MATRIX_MAX] for row in r["matrix"]["frames"][:MATRIX_MAX]]
    t = Text(no_wrap=True)
    if not names:
        return t.append("no process maps a KSM page", style="dim")
    top = max((v for row in grid for v in row), default=0) or 1
    t.append(" " * 28 + "".join(f"{i + 1:>8}" for i in range(len(names))) + "\n", style="dim")
    for i, (name, row) in enumerate(zip(names, grid, strict=True)):
        t.append(f"{i + 1:>2} {name[:24]:24} ", style="bold")
        for v in row:
            level = 0 if not v else 1 + min(3, int(4 * np.log1p(v) / np.log1p(top)))
            t.append(f"{v:>7} ", style=HEAT[min(level, len(HEAT) - 1)])
        t.append("\n")
    t.append("frames in common; the diagonal: duplicate pages inside the workload", style="dim")
    return t


class SharingScreen(SnapshotScreen):
    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "back"),
        Binding("r", "reload", "read again"),
        *(Binding(str(i), f"toggle({i})", f"workload {i}", show=False)
          for i in range(1, MATRIX_MAX + 1)),
    ]

    def __init__(self):
        super().__init__()
        self.report: dict[str, Any] | None = None
        self.pfns: dict[str, np.ndarray] = {}  # group -> its KSM pages' frames
        self.chosen: list[str] = []
        self._cancel = threading.Event()

    def compose(self) -> ComposeResult:
        with Vertical(id="sharing"):
            yield Static("Who shares with whom: KSM page frames in common, by workload",
                         classes="title")
            yield Static("reading the page maps…", id="sharing-progress")
            yield Static(id="heat")
            yield Static(id="sharing-note")
            yield Horizontal(id="maps")
        yield Footer()

    def on_mount(self) -> None:
        self.read()

    def on_unmount(self) -> None:
        self._cancel.set()

    # ------------------------------------------------------------- reading
    @work(thread=True, exclusive=True, group="sharing")
    def read(self) -> None:
        self._cancel.clear()

        def progress(done: int, total: int) -> None:
            self.app.call_from_thread(self._progress, f"reading page maps {done}/{total}…")

        try:
            sample = self.app.feed.sharing(progress, self._cancel)
        except SharingCancelled:
            return
        except (KsmtraceError, OSError) as e:
            why = e.message if isinstance(e, KsmtraceError) else str(e)
            hint = getattr(e, "hint", None)
            self.app.call_from_thread(self._progress, f"no sharing map: {why}"
                                      + (f" ({hint})" if hint else ""))
            return
        report = summarise(sample, "workload")
        pfns: dict[str, list[np.ndarray]] = {}
        for g in report["groups"]:
            pfns[g["group"]] = [sample.pfns[p] for p in g["processes"] if p in sample.pfns]
        merged = {k: np.concatenate(v) if v else np.empty(0, np.int64)
                  for k, v in pfns.items()}
        self.app.call_from_thread(self._loaded, report, merged)

    def _progress(self, text: str) -> None:
        self.query_one("#sharing-progress", Static).update(text)

    def _loaded(self, report: dict[str, Any], pfns: dict[str, np.ndarray]) -> None:
        self.report, self.pfns = report, pfns
        shared = [g["group"] for g in report["groups"] if g["shared"]]
        self.chosen = (shared or [g["group"] for g in report["groups"]])[:MAX_CHOSEN]
        self._progress(f"{report['processes']} KSM processes, {report['frames']} KSM frames, "
                       f"{report['ksm_pages_mapped']} KSM pages mapped; read in "
                       f"{report['seconds']} s (r reads again)")
        self.redraw()

    # ------------------------------------------------------------- drawing
    def redraw(self) -> None:
        r = self.report
        if r is None:
            return
        self.query_one("#heat", Static).update(heat_text(r))
        findings = [f"{f['level']}: {f['text']}" for f in r["findings"]]
        self.query_one("#sharing-note", Static).update(Text(
            "\n".join(findings) + "\nkeys 1-9 choose up to four workloads; each distinct "
            "KSM frame is the same letter wherever it appears", style="dim"))
        box = self.query_one("#maps", Horizontal)
        box.remove_children()
        columns = [self.pfns.get(n, np.empty(0, np.int64)) for n in self.chosen]
        glyphs = glyph_of_frames(columns)
        width = max(8, (self.size.width or 100) // max(len(self.chosen), 1) - 4)
        rows = max(4, (self.size.height or 30) - 22)
        for name, col in zip(self.chosen, columns, strict=True):
            t = Text(f"{name}: {len(col)} KSM pages\n", style="bold")
            t.append_text(page_text(col, glyphs, width, rows))
            box.mount(Static(t, classes="sharing-map"))

    def action_toggle(self, i: int) -> None:
        if self.report is None or i > len(self.report["matrix"]["groups"]):
            return
        name = self.report["matrix"]["groups"][i - 1]
        if name in self.chosen:
            self.chosen.remove(name)
        else:
            self.chosen = (self.chosen + [name])[-MAX_CHOSEN:]
        self.redraw()

    def action_reload(self) -> None:
        self._progress("reading the page maps…")
        self.read()

    def show(self, snap, history) -> None:
        pass  # the map is read on request: it is too slow for every snapshot

