"""`Workload`: runs a `WorkloadSpec` in real child processes, drives ksmd
(restoring every knob), and waits until the kernel shows the prediction."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from ksmtrace import signals
from ksmtrace.errors import NoKsm, no_ksm
from ksmtrace.kernel import procfs
from ksmtrace.kernel.procfs import PAGE_SIZE
from ksmtrace.kernel.sysfs import KsmKnobs, KsmSysfs, ksm_present, read_sysfs
from ksmtrace.workload.child import ChildHandle
from ksmtrace.workload.contents import new_nonce
from ksmtrace.workload.model import (
    DEFAULT_TIMEOUT,
    MAX_PAGES_TO_SCAN,
    PAGE_STATES,
    Expectation,
    MergeTimeout,
    Model,
    PageStateName,
    Progress,
    State,
    WorkloadError,
    WorkloadSpec,
    cow_plan,
    model,
    nothing_merged,
    restore_plan,
)
from ksmtrace.workload.reads import (
    Baseline,
    Measurement,
    ScanClock,
    other_ksm_users,
    read_cow_ksm,
    signed,
)


class Workload:
    """Run a `WorkloadSpec` in real child processes.

        with Workload(WorkloadSpec(processes=2, pages=2000, distinct=20)) as w:
            w.wait_merged()                  # raises MergeTimeout with what was reached
            written = w.cow(0.25)            # {pid: pages written}
            w.wait_expected()                # ksmd has noticed the broken pages
            w.unmerge(); w.wait_expected()

    `drive_ksmd=True` sets pages_to_scan (100000 unless given),
    sleep_millisecs=0, use_zero_pages (if the spec says) and run=1, and puts
    every knob back on exit (exception, Ctrl-C, SIGTERM included: from the
    main thread `KsmKnobs` turns those signals into exceptions). Children are
    ended on every exit path, and die by themselves if the thread that
    started them dies (PR_SET_PDEATHSIG): start a workload from the thread
    that will outlive it.

    Thread safety: phases (start, cow, restore, unmerge, stop) are serialised
    by a lock; `measure()`, `expected()`, `pids` and `phase` may be read from
    any thread, e.g. by a view while `demo_loop()` runs in a worker.
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        drive_ksmd: bool = True,
        pages_to_scan: int | None = None,
        root: str | os.PathLike = "/",
        progress: Progress | None = None,
        reply_timeout: float = 120.0,
    ):
        spec.validate()
        self.spec = spec
        self.drive_ksmd = drive_ksmd
        # large: ksmd walks every registered mm (a VM's RAM can be a million
        # pages); at sleep_millisecs=0 a big batch costs nothing once merged
        self.pages_to_scan = pages_to_scan or MAX_PAGES_TO_SCAN
        self.root = root
        self.progress = progress
        self.reply_timeout = reply_timeout
        self.baseline: Baseline | None = None
        self.max_page_sharing = 256
        self.use_zero_pages = False
        self.phase = "new"
        self.started_at: float | None = None  # monotonic time ksmd could start merging
        self._children: list[ChildHandle] = []
        self._knobs: KsmKnobs | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._state = State()
        self._nonce = new_nonce()

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._children]

    def regions(self) -> dict[int, tuple[int, int]]:
        """pid -> [start, end) of its region: the page map to read, which
        stays the same after unmerging (unlike its mergeable areas)."""
        size = self.spec.region_pages * PAGE_SIZE
        return {c.pid: (c.addr, c.addr + size) for c in self._children}

    def start(self) -> None:
        """Baseline, knobs, children filled and registered (in order), run=1."""
        with self._lock:
            if self.phase != "new":
                raise WorkloadError("a Workload can only be started once")
            self.phase = "starting"
            if not ksm_present(self.root):
                raise no_ksm(str(self.root))
            try:
                self._start()
            except BaseException:
                self.stop()
                raise

    def _start(self) -> None:
        spec = self.spec
        if self.drive_ksmd:
            self._knobs = KsmKnobs(self.root)
            self._knobs.__enter__()
            knobs: dict[str, int | str] = {
                "pages_to_scan": self.pages_to_scan,
                "sleep_millisecs": 0,
            }
            if spec.use_zero_pages is not None:
                knobs["use_zero_pages"] = int(spec.use_zero_pages)
            self._knobs.set(**knobs)
            # Pages of processes that exited while ksmd was stopped still
            # count until ksmd walks their mm again: a stale pages_shared would
            # vanish mid-workload and spoil the deltas. Let ksmd settle first,
            # then pause it so the children register (and get scanned) in order.
            self._knobs.set(run=1)
            self._wait_full_scans(2, timeout=30.0)
            self._knobs.set(run=0)
        self.baseline = Baseline(read_sysfs(self.root), read_cow_ksm(self.root))
        self.max_page_sharing = self.baseline.sysfs.max_page_sharing or 256
        self.use_zero_pages = bool(self.baseline.sysfs.use_zero_pages)
        if spec.use_zero_pages is not None and self.use_zero_pages != spec.use_zero_pages:
            raise WorkloadError(
                f"ksmd's use_zero_pages is {int(self.use_zero_pages)}, "
                f"the workload asks for {int(spec.use_zero_pages)}",
                "let the workload drive ksmd (--drive-ksmd), or set "
                "/sys/kernel/mm/ksm/use_zero_pages yourself",
            )
        self._state = State(written=(frozenset(),) * spec.processes)
        # Start every interpreter at once (the slow part), then fill and
        # register one after another: ksmd's scan order is registration order.
        for i in range(spec.processes):
            cfg = {
                "spec": asdict(spec),
                "index": i,
                "nonce": self._nonce.hex(),
                "parent": os.getpid(),
            }
            self._children.append(ChildHandle(i, cfg))
        for c in self._children:
            c.recv(self.reply_timeout)
        for n, c in enumerate(self._children):
            c.addr = c.call({"cmd": "setup"}, self.reply_timeout)["addr"]
            self._progress("fill", (n + 1) * spec.region_pages, spec.processes * spec.region_pages)
        if self.drive_ksmd and self._knobs is not None:
            self._knobs.set(run=1)
        self.started_at = time.monotonic()
        self.phase = "merging"

    def stop(self) -> None:
        """End every child; when driving ksmd, let it drop their pages, then
        restore the knobs. Safe to call twice and from any thread."""
        self._stopping.set()
        # Cleanup must not be cut short by a second Ctrl-C / SIGTERM: they are
        # held back until it is done, then delivered.
        with signals.held():
            try:
                with self._lock:
                    self._end_children()
            finally:
                try:
                    if self._knobs is not None:
                        knobs, self._knobs = self._knobs, None
                        knobs.__exit__(None, None, None)
                finally:
                    self.phase = "stopped"

    def _end_children(self) -> None:
        if not self._children:
            return
        children, self._children = self._children, []
        for c in children:  # in parallel: close all stdins first
            try:
                if c.proc.stdin is not None:
                    c.proc.stdin.close()
            except OSError:
                pass
        for c in children:
            c.end(grace=5.0)
        # Pages of exited processes leave the KSM counters only when ksmd
        # walks their mm (their rmap_items) again. Restoring run=0 before that
        # would leave stale pages_shared/sharing that vanish in the next run
        # and break everyone's deltas: wait for two full scans.
        if self._knobs is not None and self.baseline is not None:
            self._wait_full_scans(2, timeout=10.0)

    def _wait_full_scans(self, count: int, timeout: float) -> None:
        """Until ksmd has made `count` more full scans, or is idle."""
        try:
            s = read_sysfs(self.root)
        except NoKsm:
            return
        if s.run != 1 or s.full_scans is None:
            return
        clock = ScanClock(s)
        target = s.full_scans + count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = read_sysfs(self.root)
            clock.update(s)
            if (s.full_scans or 0) >= target or clock.idle():
                return
            time.sleep(0.01)

    # -- predictions and measurements -------------------------------------------
    def model(self) -> Model:
        st = self._state
        if st.unmerged:
            zeros = ((),) * self.spec.processes
            return Model(nothing_merged(self.spec.processes), zeros)
        return model(
            self.spec,
            max_page_sharing=self.max_page_sharing,
            use_zero_pages=self.use_zero_pages,
            written=st.written,
        )

    def expected(self) -> Expectation:
        """What the kernel should show now that ksmd has caught up with the
        phases run so far. Lock-free: a view may call it during a COW storm."""
        return self.model().expectation

    @property
    def expected_cow_ksm(self) -> int | None:
        """cow_ksm delta since start caused by this workload's writes and
        unmerge (assuming each phase began with the kernel caught up); None
        once pages write-protected by userfaultfd were unmerged: whether
        break_ksm copies them depends on the kernel (6.1 leaves them merged)."""
        st = self._state
        if st.unmerged and any(any(p) for n, p in st.states if n == "uffd_wp"):
            return None
        return st.cow_expected

    def measure(self, sysfs: KsmSysfs | None = None) -> Measurement:
        """Global deltas from the baseline and the children's ksm_stat now
        (or with `sysfs`, a reading just taken)."""
        if self.baseline is None:
            raise WorkloadError("the workload has not been started")
        b = self.baseline.sysfs
        s = read_sysfs(self.root) if sysfs is None else sysfs
        stats = [procfs.read_ksm_stat(pid, self.root) for pid in self.pids]
        return Measurement(
            pages_shared=(s.pages_shared or 0) - (b.pages_shared or 0),
            pages_sharing=(s.pages_sharing or 0) - (b.pages_sharing or 0),
            ksm_zero_pages=None if s.ksm_zero_pages is None
            else s.ksm_zero_pages - (b.ksm_zero_pages or 0),
            full_scans=(s.full_scans or 0) - (b.full_scans or 0),
            cow_ksm=read_cow_ksm(self.root) - self.baseline.cow_ksm,
            merging_pages=tuple(None if st is None else st.ksm_merging_pages for st in stats),
            zero_pages=tuple(None if st is None else st.ksm_zero_pages for st in stats),
            run=s.run,
        )

    def wait_merged(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        stop: threading.Event | None = None,
        *,
        exact_global: bool = True,
    ) -> Measurement:
        """Wait until the kernel shows `expected()` and keeps showing it
        across two full scans. Raises MergeTimeout saying what was reached."""
        return self.wait_expected(timeout, stop=stop, phase="merge", exact_global=exact_global)

    def wait_expected(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        stop: threading.Event | None = None,
        phase: str = "settle",
        exact_global: bool = True,
    ) -> Measurement:
        """Wait until every child's ksm_stat and (with `exact_global`) the
        global sysfs deltas equal `expected()`, stable across two full scans.
        Without `exact_global` only the children's own figures count: other
        KSM users (VMs) cannot disturb those, so a demo never stalls.
        `timeout` is how long the figures may stay unchanged: a loaded host
        slows ksmd down, and the deadline follows its work, not a guess."""
        exp = self.expected()
        if self.baseline is None:
            raise WorkloadError("the workload has not been started")
        deadline = time.monotonic() + timeout
        stable_from: int | None = None  # full_scans when the figures first matched
        figures: tuple | None = None
        total = sum(exp.merging_pages) + sum(exp.zero_pages)
        last_progress = 0.0
        clock: ScanClock | None = None
        while True:
            s = read_sysfs(self.root)
            clock = ScanClock(s) if clock is None else clock
            clock.update(s)
            m = self.measure(s)
            if m.run != 1:
                raise WorkloadError(
                    f"ksmd is not running (run={m.run}): nothing will be merged",
                    "use --drive-ksmd, or `echo 1 > /sys/kernel/mm/ksm/run`",
                )
            if m.matches(exp) if exact_global else m.matches_own(exp):
                if stable_from is None:
                    stable_from = m.full_scans
                if m.full_scans >= stable_from + 2 or clock.idle():
                    return m
            else:
                stable_from = None
            now = time.monotonic()
            if now - last_progress > 0.1:
                own = sum(x or 0 for x in m.merging_pages) + sum(x or 0 for x in m.zero_pages)
                self._progress(phase, own, total)
                last_progress = now
            if (stop is not None and stop.is_set()) or self._stopping.is_set():
                return m
            now_figures = (m.pages_shared, m.pages_sharing, m.ksm_zero_pages,
                           m.merging_pages, m.zero_pages)
            if now_figures != figures:
                figures, deadline = now_figures, now + timeout
            if now > deadline:
                raise self._timeout(phase, timeout, exp, m)
            time.sleep(0.01)

    def _timeout(self, phase: str, timeout: float, e: Expectation, m: Measurement) -> MergeTimeout:
        others = other_ksm_users(self.pids, self.root)
        hint = (
            "other processes use KSM and move the same global counters: "
            + "; ".join(map(str, others[:5]))
            + " -- exact deltas need them gone (QEMU: -machine mem-merge=off)"
            if others
            else "ksmd may be scanning too slowly: use --drive-ksmd or a longer --timeout"
        )
        return MergeTimeout(
            f"ksmd did not reach the predicted figures ({phase}; nothing changed for "
            f"{timeout:g} s): "
            f"pages_shared {m.pages_shared:+d} (expected {e.pages_shared:+d}), "
            f"pages_sharing {m.pages_sharing:+d} (expected {e.pages_sharing:+d}), "
            f"ksm_zero_pages {signed(m.ksm_zero_pages)} (expected {e.ksm_zero_pages:+d}), "
            f"ksm_merging_pages per child {list(m.merging_pages)} "
            f"(expected {list(e.merging_pages)}), after {m.full_scans} full scans",
            hint,
        )

    # -- phases -----------------------------------------------------------------
    def cow(
        self,
        fraction: float,
        rate: float | None = None,
        stop: threading.Event | None = None,
        *,
        pause_ksmd: bool = True,
        pids: Collection[int] | None = None,
        among: PageStateName | None = None,
    ) -> dict[int, int]:
        """Write unique bytes into `fraction` of each child's merged pages
        (KSM pages, not zero-page merges), at `rate` pages/s in total (None
        or 0: as fast as possible); with `pids`, only those children write
        (uneven per-process figures). Returns {pid: pages written}; each write
        to a merged page is one cow_ksm. ksmd notices at its next pass:
        `wait_expected()` then sees the broken pages gone.

        cow_ksm is counted in do_wp_page before the copy; measured on 6.18,
        with ksmd scanning meanwhile it sometimes counts a break twice
        (+1..+3 over 750 writes in 4 of 18 runs, 0 in 10 runs with ksmd
        paused, no page migration either way). So when the workload drives
        ksmd it pauses it (run=0) during the writes unless `pause_ksmd` is
        False (a live demo), which costs that exactness.

        With `among`, only pages put in that state by `set_state` are
        written (PROT_NONE ones through /proc/self/mem); otherwise pages in
        the uffd_wp state are never picked (a write would wait forever)."""
        with self._lock:
            self._check_running()
            st = self._state
            mapped = self.model().ksm_mapped
            if among is not None:
                if among == "uffd_wp":
                    raise WorkloadError("pages write-protected by userfaultfd cannot be written")
                mapped = tuple(
                    tuple(i for i in m if i in st.in_state(among, p)) for p, m in enumerate(mapped)
                )
            skip = tuple(w | st.in_state("uffd_wp", p) for p, w in enumerate(st.written))
            plan = cow_plan(mapped, fraction, skip, self.spec)
            if pids is not None:
                plan = [p if c.pid in pids else [] for c, p in zip(self._children, plan,
                                                                    strict=True)]
            st.generation += 1
            cmd = {"cmd": "write", "generation": st.generation}
            with self._ksmd_paused(pause_ksmd):
                done = self._paced("cow", plan, rate, stop, cmd)
            st.written = tuple(w | frozenset(plan[p][: done[p]]) for p, w in enumerate(st.written))
            st.cow_expected += sum(done)
            self.phase = "cow"
            return {c.pid: done[c.index] for c in self._children}

    def restore_contents(self, rate: float | None = None) -> int:
        """Put the original contents back into the written pages, so ksmd
        merges them again (all but one page of a content that would leave a
        copy without partner, see `restore_plan`). Returns pages rewritten."""
        with self._lock:
            self._check_running()
            st = self._state
            plan = restore_plan(
                self.spec,
                st.written,
                max_page_sharing=self.max_page_sharing,
                use_zero_pages=self.use_zero_pages,
            )
            done = self._paced("restore", plan, rate, None, {"cmd": "restore"})
            st.written = tuple(w - frozenset(plan[p][: done[p]]) for p, w in enumerate(st.written))
            self.phase = "merging"
            return sum(done)

    def set_state(
        self, state: PageStateName, fraction: float, *, pids: Collection[int] | None = None
    ) -> dict[int, list[int]]:
        """Put `fraction` of each child's merged pages (or only `pids`'
        children's) into `state` (see PAGE_STATES); returns {pid: pages}.
        protnone and uffd_wp pages stay merged; discarded pages are gone, as
        if written (without a cow_ksm), from ksmd's next pass on."""
        if state not in PAGE_STATES:
            raise WorkloadError(f"unknown page state {state!r}: one of {', '.join(PAGE_STATES)}")
        with self._lock:
            self._check_running()
            st = self._state
            busy = tuple(
                w.union(*(pages[p] for _, pages in st.states)) for p, w in enumerate(st.written)
            )
            plan = cow_plan(self.model().ksm_mapped, fraction, busy, self.spec)
            if pids is not None:
                plan = [p if c.pid in pids else [] for c, p in zip(self._children, plan,
                                                                    strict=True)]
            for c in self._children:
                if plan[c.index]:
                    c.call({"cmd": "state", "state": state, "pages": plan[c.index]},
                           self.reply_timeout)
            chosen = tuple(st.in_state(state, c.index) | frozenset(plan[c.index])
                           for c in self._children)
            st.states = tuple((n, v) for n, v in st.states if n != state) + ((state, chosen),)
            if state == "discard":
                st.written = tuple(w | frozenset(plan[p]) for p, w in enumerate(st.written))
            return {c.pid: plan[c.index] for c in self._children}

    def unmerge(self) -> None:
        """MADV_UNMERGEABLE (or PR_SET_MEMORY_MERGE 0 for prctl) in every
        child: the kernel breaks every merged page right away (one cow_ksm
        per page mapped to a KSM page, once ksmd had merged them all); the
        counters drop at once with prctl, at ksmd's next pass with madvise."""
        with self._lock:
            self._check_running()
            # Measured: unmerging breaks each page mapped to a KSM page through
            # the COW fault path, one cow_ksm each (zero-page merges: none).
            broken = sum(self.model().expectation.merging_pages)
            with self._ksmd_paused(True):  # same fault path as cow(): exact counts
                for c in self._children:
                    c.send({"cmd": "unmerge"})
                for c in self._children:
                    c.recv(self.reply_timeout)
            self._state.unmerged = True
            self._state.cow_expected += broken
            self.phase = "unmerged"

    @contextmanager
    def _ksmd_paused(self, pause: bool) -> Iterator[None]:
        """run=0 for the block when we drive ksmd. Writing `run` takes
        ksm_thread_mutex, which ksmd holds for a whole batch: once the write
        returns, ksmd is idle."""
        if not (pause and self._knobs is not None):
            yield
            return
        self._knobs.set(run=0)
        try:
            yield
        finally:
            if self._knobs is not None and not self._stopping.is_set():
                self._knobs.set(run=1)

    def _check_running(self) -> None:
        if not self._children or self._stopping.is_set():
            raise WorkloadError("the workload is not running")

    def _paced(
        self,
        phase: str,
        plan: list[list[int]],
        rate: float | None,
        stop: threading.Event | None,
        cmd: dict[str, Any],
    ) -> list[int]:
        """Send `plan` (pages per child) as commands, at `rate` pages/s in
        total, round-robin over the children; returns pages done per child."""
        total = sum(len(p) for p in plan)
        done = [0] * len(plan)
        if total == 0:
            return done
        batch = 2000  # bounded messages keep the children's allocations small
        t0 = time.monotonic()
        sent = 0
        while sent < total:
            if (stop is not None and stop.is_set()) or self._stopping.is_set():
                break
            if rate:
                due = min(total, max(1, int((time.monotonic() - t0) * rate) + 1))
                if due <= sent:
                    time.sleep(min(0.05, (sent + 1) / rate - (time.monotonic() - t0)))
                    continue
            else:
                due = total
            quota = min(due - sent, batch * len(plan))
            share = self._round_robin(plan, done, quota)
            busy = []
            for c in self._children:
                pages = plan[c.index][done[c.index] : done[c.index] + share[c.index]]
                if pages:
                    c.send({**cmd, "pages": pages})
                    busy.append((c, len(pages)))
            for c, n in busy:
                c.recv(self.reply_timeout)
                done[c.index] += n
                sent += n
            self._progress(phase, sent, total)
        return done

    @staticmethod
    def _round_robin(plan: list[list[int]], done: list[int], quota: int) -> list[int]:
        share = [0] * len(plan)
        left = [len(p) - d for p, d in zip(plan, done, strict=True)]
        while quota > 0 and any(left[i] > share[i] for i in range(len(plan))):
            for i in range(len(plan)):
                if quota and left[i] > share[i]:
                    share[i] += 1
                    quota -= 1
        return share

    def demo_loop(
        self,
        stop: threading.Event,
        *,
        cow_fraction: float = 0.3,
        cow_rate: float | None = 5000.0,
        pause: float = 2.0,
        timeout: float = DEFAULT_TIMEOUT,
        on_phase: Callable[[str, Measurement], None] | None = None,
    ) -> None:
        """Merge -> pause -> COW storm -> ksmd notices -> restore contents ->
        re-merge -> ... until `stop` is set. Meant for a worker thread (the
        one that started the workload) while a view reads `measure()`."""
        while not stop.is_set():
            for step in ("merge", "cow", "broken", "restore"):
                if stop.is_set() or self._stopping.is_set():
                    return
                if step == "merge":
                    m = self.wait_merged(timeout, stop, exact_global=False)
                elif step == "cow":
                    self.cow(cow_fraction, cow_rate, stop, pause_ksmd=False)
                    m = self.measure()
                elif step == "broken":
                    m = self.wait_expected(
                        timeout, stop=stop, phase="cow-noticed", exact_global=False
                    )
                else:
                    self.restore_contents(cow_rate)
                    m = self.measure()
                if on_phase is not None:
                    on_phase(step, m)
                if stop.wait(pause):
                    return

    def _progress(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)
