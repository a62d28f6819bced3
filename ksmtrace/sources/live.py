"""The live source: compiles bpf/ksmtrace.bpf.c with the flags the attach
plan asks for, attaches it, and delivers one Tick per interval (counter poll
+ in-kernel aggregates + raw events). A context manager: everything it
attached is detached on exit, exceptions and signals included.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import sys
import threading
import time
from collections.abc import Iterator

from ksmtrace.errors import Busy, KsmtraceError, NoBpf, NoHeaders, not_root
from ksmtrace.figures import COUNTER_SLOTS, HISTOGRAM_SLOTS, error_key
from ksmtrace.kernel import headers as headers_mod
from ksmtrace.kernel import sysfs, tracefs
from ksmtrace.kernel.capabilities import Facts, Plan
from ksmtrace.model import (
    BpfTotals,
    MmStats,
    ProbeStatus,
    ProgramCost,
    Tick,
)
from ksmtrace.probes import MAIN_SOURCE, Build, build
from ksmtrace.sources import counters
from ksmtrace.sources.bpfstats import BpfStats, program_name, read_fdinfo, read_program

RESOLVER_TP = b"mmap_lock:mmap_lock_start_locking"
RESOLVER_FN = b"tracepoint__mmap_lock__mmap_lock_start_locking"
RESOLVE_TRIES = 3  # ticks a pid is tried before its owner counts as unknowable


class LiveSource:
    kind = "live"

    def __init__(self, facts: Facts, plan: Plan, stream: bool = False,
                 root: str | os.PathLike = "/", pids: list[int] | None = None,
                 bpf_stats: bool = True):
        self.facts = facts
        self.plan = plan
        self.root = root
        self.pids = pids
        self.spec: Build = build(plan, facts, stream)
        self.probes: tuple[ProbeStatus, ...] = self.spec.probes
        self.cow_estimated = self.spec.cow_estimated
        self.notes: tuple[str, ...] = self.spec.notes
        self._bpf = None
        self._events = bytearray()
        self._perf_lost = 0
        self._seq = 0
        self._resolved: set[int] = set()
        self._resolve_tries: dict[int, int] = {}  # pid -> resolutions that missed
        self._owner_pids: set[int] = set()
        self._exited: dict[int, MmStats] = {}
        self._programs: dict[str, int] = {}  # program -> its fd (ours, bcc's)
        # kernel BPF run-time stats, on while we run (our own cost); off only
        # for bench/ksmd_overhead.py, which measures what they cost ksmd
        self.stats = BpfStats()
        self.bpf_stats = bpf_stats
        self.watch: set[int] = set()  # pids whose page map each tick carries

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> LiveSource:
        if os.geteuid() != 0:
            raise not_root("tracing KSM with BPF")
        tracefs.require_tracefs(self.root)
        headers_mod.use_headers(headers_mod.find_headers(self.root))
        try:
            from bcc import BPF  # the only import of bcc outside sources/trial.py
        except ImportError as e:
            raise NoBpf(f"bcc is not importable: {e}",
                        "apt-get install python3-bpfcc, and use a venv made with "
                        "--system-site-packages (scripts/setup.sh does both)") from e
        if not self.spec.parts:
            raise NoBpf("no KSM path can be traced on this kernel (plan: polling only)",
                        "use `--sysfs-only`, or see `ksmtrace doctor` for why")
        self._refuse_fentry_while_ksmd_spins()
        # stats on before loading: tracepoint programs attach as they load
        if self.bpf_stats:
            self.stats.open()
        try:
            self._bpf = BPF(src_file=str(MAIN_SOURCE).encode(),
                            cflags=list(self.spec.cflags))
        except Exception as e:
            self.stats.close()
            msg = str(e)
            if "kernel headers" in msg.lower():
                raise NoHeaders(msg, "apt-get install linux-headers-amd64") from e
            raise KsmtraceError(f"loading the BPF programs failed: {msg}",
                                "run `ksmtrace doctor` to see what this kernel allows; "
                                "`--ebpf` prints the program and flags") from e
        try:
            self._attach_kprobes()
            if self.spec.stream == 1:
                self._bpf[b"events"].open_ring_buffer(self._on_event)
            elif self.spec.stream == 2:
                self._bpf[b"events"].open_perf_buffer(self._on_event, page_cnt=256,
                                                     lost_cb=self._on_lost)
            if "COW_FN" in self.spec.parts:
                self._calibrate_page_base()
            self._programs = {program_name(k.decode()): f.fd
                              for k, f in self._bpf.funcs.items() if f.fd >= 0}
            if "RESOLVER" in self.spec.parts:
                # bcc attached it at load; it is attached only while resolving
                self._bpf.detach_tracepoint(tp=RESOLVER_TP)
        except BaseException:
            self.close()
            raise
        return self

    def _ksmd_spins(self) -> bool:
        """ksmd running with sleep_millisecs=0: it never sleeps voluntarily."""
        return (sysfs.read_knob("run", self.root) == 1
                and sysfs.read_knob("sleep_millisecs", self.root) == 0)

    def _refuse_fentry_while_ksmd_spins(self) -> None:
        """Attaching (and detaching) fentry/fexit programs waits for an RCU
        Tasks grace period: every task must sleep or enter user space once.
        ksmd at sleep_millisecs=0 does neither, so bcc would hang in the
        attach (the kernel logs "rcu_tasks detected stalls" on ksmd). Say so
        at once instead."""
        if self.spec.fentry and self._ksmd_spins():
            raise Busy("ksmd runs with sleep_millisecs=0, so it never sleeps, and attaching "
                       "fentry programs waits until every task has slept once: it would hang",
                       "set sleep_millisecs to 1 or more while ksmtrace starts and stops "
                       "(echo 1 > /sys/kernel/mm/ksm/sleep_millisecs), or use "
                       "`--attach kprobe`")

    def _attach_kprobes(self) -> None:
        statuses = {p.probe: p for p in self.probes}
        failed: dict[str, str] = {}
        # return probes first: an entry whose return probe is not attached
        # yet would leave a slot no exit clears (bpf/ksmtrace.bpf.c cow_forget)
        for k in sorted(self.spec.kprobes, key=lambda k: not k.ret):
            try:
                # bytes: bcc warns (DeprecationWarning) for every str it is given
                event, fn = k.function.encode(), k.program.encode()
                if k.ret:
                    self._bpf.attach_kretprobe(event=event, fn_name=fn, maxactive=64)
                else:
                    self._bpf.attach_kprobe(event=event, fn_name=fn)
            except Exception as e:
                for p in statuses.values():
                    if k.function in p.targets and p.method == "kprobe":
                        failed[p.probe] = f"{k.function}: {e}"
        if failed:
            self.probes = tuple(
                ProbeStatus(p.probe, p.stage, p.method, p.targets, False, p.estimated,
                            failed[p.probe]) if p.probe in failed else p
                for p in self.probes)

    def _calibrate_page_base(self) -> None:
        """Provoke one do_wp_page (a child writes a page shared by fork) so the
        programs learn where struct page 0 lives before any KSM COW."""
        buf = mmap.mmap(-1, mmap.PAGESIZE)
        buf[0] = 1
        pid = os.fork()
        if pid == 0:
            buf[0] = 2
            os._exit(0)
        os.waitpid(pid, 0)
        buf.close()

    def close(self) -> None:
        try:
            if self._bpf is not None:
                if self.spec.fentry and self._ksmd_spins():
                    # detaching waits like attaching does: say why, if it hangs
                    print("ksmtrace: detaching fentry programs waits until ksmd sleeps once; "
                          "it runs with sleep_millisecs=0 and may not: if this does not "
                          "return, echo 1 > /sys/kernel/mm/ksm/sleep_millisecs",
                          file=sys.stderr, flush=True)
                self._bpf.cleanup()
                self._bpf = None
                self._programs = {}
        finally:
            self.stats.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- events
    def _on_event(self, *args) -> None:
        # ring buffer: (ctx, data, size); perf buffer: (cpu, data, size)
        self._events += ctypes.string_at(args[1], args[2])

    def _on_lost(self, lost: int) -> None:
        self._perf_lost += lost

    def poll(self, timeout_s: float) -> None:
        ms = max(0, int(timeout_s * 1000))
        if self.spec.stream == 1:
            # the programs wake us at most every 10 ms (bpf/ksmtrace.bpf.c):
            # wait for a wake-up or the timeout, then take everything there,
            # woken for or not
            self._bpf.ring_buffer_poll(ms)
            self._bpf.ring_buffer_consume()
        elif self.spec.stream == 2:
            self._bpf.perf_buffer_poll(ms)
        else:
            time.sleep(timeout_s)

    # ----------------------------------------------------------------- maps
    def read_owners(self) -> tuple[dict[int, int], dict[int, str]]:
        """mm -> pid, and pid -> comm where the BPF side saw the comm."""
        owners: dict[int, int] = {}
        comms: dict[int, str] = {}
        for k, v in self._bpf[b"owners"].items():
            owners[int(k.value)] = int(v.pid)
            if v.comm:
                comms[int(v.pid)] = v.comm.decode("utf-8", "replace")
        return owners, comms

    def read_totals(self, owners: dict[int, int], comms: dict[int, str]) -> BpfTotals:
        b = self._bpf
        table = b[b"counters"]
        counters = {name: int(table.sum(ctypes.c_int(i)).value)
                    for i, name in enumerate(COUNTER_SLOTS)}
        hist: dict[str, dict[int, int]] = {h: {} for h in HISTOGRAM_SLOTS}
        for k, v in b[b"hist"].items():
            hist[HISTOGRAM_SLOTS[k.which]][int(k.slot)] = int(v.value)
        errors = {error_key(k.kind, k.err): int(v.value) for k, v in b[b"errors"].items()}
        mms = self._read_mm_stats()
        exited, self._exited = self._exited, {}
        return BpfTotals(counters, hist, errors, mms, exited, owners, self._perf_lost, comms,
                         self.program_costs())

    # ------------------------------------------------------------- own cost
    def program_costs(self) -> tuple[ProgramCost, ...]:
        """Each of our programs' kernel run time and run count since load
        (zero while BPF stats could not be enabled: `stats.error` says why)."""
        return tuple(read_program(name, fd) for name, fd in sorted(self._programs.items()))

    def program_ids(self) -> dict[str, int]:
        """Program name -> kernel program id (what bpftool shows)."""
        return {name: read_fdinfo(fd).get("prog_id", 0)
                for name, fd in sorted(self._programs.items())}

    # -------------------------------------------------- per-mm figures
    def _read_slot(self) -> tuple[int, int, tuple[int, int, int]]:
        """ksmd's merge slot (bpf/ksmtrace.h struct merge_slot), once it is
        not in the middle of a flush: (seq, mm, merges by kind)."""
        table = self._bpf[b"merge_slot"]
        for _ in range(100_000):  # a flush is a few hundred ns of ksmd
            v = table[ctypes.c_int(0)]
            if not v.seq % 2:
                return int(v.seq), int(v.mm), tuple(int(x) for x in v.merges)
        raise KsmtraceError("ksmd's merge slot stayed mid-flush; report this as a bug")

    def _read_mm_stats(self) -> dict[int, MmStats]:
        """Every mm's figures: mm_stats, plus the merges ksmd has not yet
        moved into it from its slot (bpf/ksmtrace.bpf.c MERGE_SLOT).

        Read so that no figure counts a merge twice or goes down between
        ticks: the slot, the whole table, the slot again. If a flush happened
        meanwhile, the first one moved the first read's mm, which the last
        tick may have counted from the slot; that entry and those of the mms
        the slot held since are then read again between two equal slot
        reads. (An mm that entered the slot after the first read and left it
        during the table read can miss those merges until the next tick, but
        never goes down.)"""
        table = self._bpf[b"mm_stats"]
        if not self.spec.merge_slot:
            return {int(k.value): _mm_stats(v) for k, v in table.items()}
        seq, first_mm, _ = self._read_slot()
        mms = {int(k.value): _mm_stats(v) for k, v in table.items()}
        seq2, mm, pending = self._read_slot()
        recheck = {first_mm}
        while seq2 != seq:
            recheck.add(mm)
            seq = seq2
            again = {m: table.get(table.Key(m)) for m in recheck if m}
            seq2, mm, pending = self._read_slot()
            if seq2 == seq:
                for m, v in again.items():
                    if v is None:
                        mms.pop(m, None)
                    else:
                        mms[m] = _mm_stats(v)
        if mm and any(pending):
            s = mms.get(mm, MmStats())
            mms[mm] = dataclasses.replace(s, merges=tuple(
                a + b for a, b in zip(s.merges, pending, strict=True)))
        return mms

    def _slot_mm(self) -> int:
        return self._read_slot()[1] if self.spec.merge_slot else 0

    def _drain_exited(self, owners: dict[int, int]) -> None:
        """mms whose owner has exited: read their final figures, then delete
        them (no update can follow once the process is gone, and once ksmd's
        merge slot no longer holds the mm: it is flushed at the latest at the
        end of the scan round)."""
        mm_table, owner_table = self._bpf[b"mm_stats"], self._bpf[b"owners"]
        held = self._slot_mm()
        for mm, pid in owners.items():
            if pid and mm != held and not os.path.exists(f"/proc/{pid}"):
                key = mm_table.Key(mm)
                try:
                    self._exited[mm] = _mm_stats(mm_table[key])
                    del mm_table[key]
                except KeyError:
                    pass
                try:
                    del owner_table[owner_table.Key(mm)]
                except KeyError:
                    pass

    def resolve_owners(self, pids: list[int]) -> None:
        """Learn mm -> pid for processes that registered before we attached:
        reading smaps_rollup takes the target mm's mmap lock in this thread,
        which the RESOLVER program sees (bpf/ksmtrace.bpf.c)."""
        if "RESOLVER" not in self.spec.parts:
            return
        known = self._owner_pids  # from the previous tick's read of the map
        todo = [pid for pid in pids
                if pid not in known and pid not in self._resolved and pid != os.getpid()]
        if not todo:
            return
        self._bpf.attach_tracepoint(tp=RESOLVER_TP, fn_name=RESOLVER_FN)
        try:
            self._resolve(todo)
        finally:
            self._bpf.detach_tracepoint(tp=RESOLVER_TP)
        # a pid counts as done once the map has its owner, or after a few
        # tries (it exited, or its lock was never taken through the traced
        # path). Until then its figures go to no process, and on
        # tracepoint-only kernels its write faults (the COW estimate's basis)
        # are not counted at all: one miss used to be final
        found = {int(o.pid) for o in self._bpf[b"owners"].values()}
        tries = {}
        for pid in todo:
            n = self._resolve_tries.get(pid, 0) + 1
            if pid in found or n >= RESOLVE_TRIES:
                self._resolved.add(pid)
            else:
                tries[pid] = n
        self._resolve_tries = tries

    def _resolve(self, pids: list[int]) -> None:
        table = self._bpf[b"resolve"]
        tid = threading.get_native_id()
        for pid in pids:
            req = table[ctypes.c_int(0)]
            req.tid, req.pid = tid, pid
            table[ctypes.c_int(0)] = req
            try:
                with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                    f.read()
            except OSError:
                pass  # exited meanwhile: expected
            finally:
                req.tid, req.pid = 0, 0
                table[ctypes.c_int(0)] = req

    # ---------------------------------------------------------------- ticks
    def tick(self) -> Tick:
        c = counters.sample(self.root, pids=self.pids)
        self.resolve_owners([p.pid for p in c.processes])
        if self.spec.stream:
            self.poll(0)  # drain what is already there
        owners, comms = self.read_owners()
        self._owner_pids = set(owners.values())
        self._drain_exited(owners)
        totals = self.read_totals(owners, comms)
        events, self._events = bytes(self._events), bytearray()
        self._seq += 1
        maps = counters.read_page_maps(self.watch, self.root) if self.watch else {}
        return Tick(self._seq, c, totals, events, maps)

    def ticks(self, interval: float, count: int = 0) -> Iterator[Tick]:
        """A tick at start, then one every `interval` seconds (count 0: forever);
        between ticks the event stream is drained as it arrives."""
        return counters.paced(self.tick, self.poll, interval, count)


def _mm_stats(v) -> MmStats:
    """A struct mm_stats value as read from the map."""
    return MmStats(tuple(v.merges), int(v.merge_failures), tuple(v.cow), int(v.wp_faults),
                   int(v.unshares), int(v.rmap_removed))
