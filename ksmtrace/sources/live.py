"""The live source: compiles bpf/ksmtrace.bpf.c with the flags the attach
plan asks for (in a child, or from the cache: sources/bundle.py), loads and
attaches it itself (sources/loader.py: no bcc, so no LLVM in this process),
and delivers one Tick per interval (counter poll + in-kernel aggregates + raw
events). A context manager: everything it attached is detached on exit,
exceptions and signals included; SIGKILL closes the descriptors that hold it.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator

from ksmtrace.errors import Busy, KsmtraceError, NoBpf, not_root
from ksmtrace.figures import COUNTER_SLOTS, HISTOGRAM_SLOTS, error_key
from ksmtrace.kernel import headers as headers_mod
from ksmtrace.kernel import sysfs, tracefs
from ksmtrace.kernel.capabilities import Facts, Plan, bcc_version
from ksmtrace.model import (
    EVENT_SIZE,
    BpfTotals,
    MmStats,
    ProbeStatus,
    ProgramCost,
    Tick,
)
from ksmtrace.probes import MAIN_SOURCE, Build, build
from ksmtrace.sources import bundle, counters, loader
from ksmtrace.sources.bpfstats import BpfStats, program_name, read_fdinfo, read_program

RESOLVER_FN = "tracepoint__mmap_lock__mmap_lock_start_locking"
RESOLVE_TRIES = 3  # ticks a pid is tried before its owner counts as unknowable
MAX_PENDING = 64 << 20  # bytes of events (~930k) after which a tick comes early

# The maps' layouts, as bpf/ksmtrace.h declares them (checked against the
# compiled sizes at load: a header change without this one fails loudly).
KEY_U64 = struct.Struct("<Q")
KEY_U32 = struct.Struct("<I")
HIST_KEY = struct.Struct("<II")  # struct hist_key
ERR_KEY = struct.Struct("<Ii")  # struct err_key
MM_STATS = struct.Struct("<9Q")  # struct mm_stats
OWNER = struct.Struct("<I16s")  # struct owner
MERGE_SLOT = struct.Struct("<5Q")  # struct merge_slot
RESOLVE_REQ = struct.Struct("<II")  # struct resolve_req
U64 = struct.Struct("<Q")
LAYOUTS = {"mm_stats": (KEY_U64, MM_STATS), "owners": (KEY_U64, OWNER),
           "hist": (HIST_KEY, U64), "errors": (ERR_KEY, U64),
           "merge_slot": (KEY_U32, MERGE_SLOT), "resolve": (KEY_U32, RESOLVE_REQ),
           "counters": (KEY_U32, U64)}


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
        self._bpf: loader.Loaded | None = None
        self._ring: loader.RingBuffer | None = None
        self.cached: bool | None = None  # whether the compiled programs came from the cache
        self._events = bytearray()
        # events held for the next tick: at most this plus one ring buffer's
        # worth (a consume), whatever the interval; well under a recording's
        # largest readable tick (record.MAX_RECORD, with its JSON)
        self.max_pending = MAX_PENDING
        self._seq = 0
        self._resolved: set[int] = set()
        self._resolve_tries: dict[int, int] = {}  # pid -> resolutions that missed
        self._owner_pids: set[int] = set()
        self._exited: dict[int, MmStats] = {}
        self._programs: dict[str, int] = {}  # program -> its fd
        # kernel BPF run-time stats, on while we run (our own cost); off only
        # for bench/ksmd_overhead.py, which measures what they cost ksmd
        self.stats = BpfStats()
        self.bpf_stats = bpf_stats
        self.watch: set[int] = set()  # pids whose page map each tick carries

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> LiveSource:
        if os.geteuid() != 0:
            raise not_root("tracing KSM with BPF")
        tfs = tracefs.require_tracefs(self.root)
        if not self.spec.parts:
            raise NoBpf("no KSM path can be traced on this kernel (plan: polling only)",
                        "use `--sysfs-only`, or see `ksmtrace doctor` for why")
        headers = headers_mod.find_headers(self.root)
        headers_mod.use_headers(headers)  # says how to install them when there are none
        compiled, self.cached = bundle.compile_bundle(
            MAIN_SOURCE, self.spec.cflags,
            headers.path if headers.origin != "running-kernel" else None, bcc_version())
        _check_layouts(compiled)
        self._refuse_fentry_while_ksmd_spins()
        # stats on before attaching: tracepoint programs run as they attach
        if self.bpf_stats:
            self.stats.open()
        try:
            self._bpf = loader.load(compiled, tfs, self.root)
            self._bpf.attach_auto(skip=(RESOLVER_FN,))  # the resolver: only while resolving
            self._attach_kprobes()
            if self.spec.stream == 1:
                events = self._bpf.maps["events"]
                self._ring = loader.RingBuffer(events.fd, events.spec.max_entries, EVENT_SIZE)
            if "COW_FN" in self.spec.parts:
                self._calibrate_page_base()
            self._programs = {program_name(k): fd for k, fd in self._bpf.programs.items()}
        except BaseException as e:
            self.close()
            if isinstance(e, KsmtraceError):
                raise
            if isinstance(e, OSError):
                raise KsmtraceError(f"loading the BPF programs failed: {e}",
                                    "run `ksmtrace doctor` to see what this kernel allows; "
                                    "`--ebpf` prints the program and flags") from e
            raise
        return self

    def _ksmd_spins(self) -> bool:
        """ksmd running with sleep_millisecs=0: it never sleeps voluntarily."""
        return (sysfs.read_knob("run", self.root) == 1
                and sysfs.read_knob("sleep_millisecs", self.root) == 0)

    def _refuse_fentry_while_ksmd_spins(self) -> None:
        """Attaching (and detaching) fentry/fexit programs waits for an RCU
        Tasks grace period: every task must sleep or enter user space once.
        ksmd at sleep_millisecs=0 does neither, so the attach would hang
        (the kernel logs "rcu_tasks detected stalls" on ksmd). Say so
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
                self._bpf.attach_kprobe(k.program, k.function, k.ret)
            except (KsmtraceError, OSError) as e:
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
            if self._ring is not None:
                self._ring.close()
                self._ring = None
            if self._bpf is not None:
                if self._ksmd_spins():
                    # Detaching waits for an RCU Tasks (Trace) grace period:
                    # fentry always; a tracepoint's perf event too on recent
                    # kernels (perf_event_detach_bpf_prog, seen on 6.18). Say
                    # why, if it hangs.
                    print("ksmtrace: detaching BPF programs waits until ksmd sleeps once; "
                          "it runs with sleep_millisecs=0 and may not: if this does not "
                          "return, echo 1 > /sys/kernel/mm/ksm/sleep_millisecs",
                          file=sys.stderr, flush=True)
                self._bpf.close()
                self._bpf = None
                self._programs = {}
        finally:
            self.stats.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- events
    def poll(self, timeout_s: float) -> None:
        if self._ring is not None:
            # the programs wake us at most every 10 ms (bpf/ksmtrace.bpf.c):
            # wait for a wake-up or the timeout, then take everything there,
            # woken for or not
            self._ring.poll(max(0.0, timeout_s))
            self._ring.consume(self._events)
        else:
            time.sleep(timeout_s)

    # ----------------------------------------------------------------- maps
    def read_owners(self) -> tuple[dict[int, int], dict[int, str]]:
        """mm -> pid, and pid -> comm where the BPF side saw the comm."""
        owners: dict[int, int] = {}
        comms: dict[int, str] = {}
        for k, v in self._bpf.maps["owners"].items():
            pid, comm = OWNER.unpack(v)
            owners[KEY_U64.unpack(k)[0]] = pid
            comm = comm.split(b"\0", 1)[0]
            if comm:
                comms[pid] = comm.decode("utf-8", "replace")
        return owners, comms

    def read_totals(self, owners: dict[int, int], comms: dict[int, str]) -> BpfTotals:
        maps = self._bpf.maps
        counters_ = {name: maps["counters"].percpu_u64(i) for i, name in enumerate(COUNTER_SLOTS)}
        hist: dict[str, dict[int, int]] = {h: {} for h in HISTOGRAM_SLOTS}
        for k, v in maps["hist"].items():
            which, slot = HIST_KEY.unpack(k)
            if which < len(HISTOGRAM_SLOTS):
                hist[HISTOGRAM_SLOTS[which]][slot] = U64.unpack(v)[0]
        errors = {error_key(*ERR_KEY.unpack(k)): U64.unpack(v)[0]
                  for k, v in maps["errors"].items()}
        mms = self._read_mm_stats()
        exited, self._exited = self._exited, {}
        return BpfTotals(counters_, hist, errors, mms, exited, owners, 0, comms,
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
        table = self._bpf.maps["merge_slot"]
        for _ in range(100_000):  # a flush is a few hundred ns of ksmd
            seq, mm, *merges = MERGE_SLOT.unpack(table.index(0))
            if not seq % 2:
                return seq, mm, (merges[0], merges[1], merges[2])
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
        table = self._bpf.maps["mm_stats"]
        if not self.spec.merge_slot:
            return {KEY_U64.unpack(k)[0]: _mm_stats(v) for k, v in table.items()}
        seq, first_mm, _ = self._read_slot()
        mms = {KEY_U64.unpack(k)[0]: _mm_stats(v) for k, v in table.items()}
        seq2, mm, pending = self._read_slot()
        recheck = {first_mm}
        while seq2 != seq:
            recheck.add(mm)
            seq = seq2
            again = {m: table.get(KEY_U64.pack(m)) for m in recheck if m}
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
        mm_table, owner_table = self._bpf.maps["mm_stats"], self._bpf.maps["owners"]
        held = self._slot_mm()
        for mm, pid in owners.items():
            if pid and mm != held and not os.path.exists(f"/proc/{pid}"):
                key = KEY_U64.pack(mm)
                v = mm_table.get(key)
                if v is not None:
                    self._exited[mm] = _mm_stats(v)
                    mm_table.delete(key)
                owner_table.delete(key)

    def resolve_owners(self, pids: list[int]) -> None:
        """Learn mm -> pid for processes that registered before we attached:
        reading smaps_rollup takes the target mm's mmap lock in this thread,
        which the RESOLVER program sees (bpf/ksmtrace.bpf.c)."""
        if "RESOLVER" not in self.spec.parts:
            return
        # bounded under churn: only the pids still listed stay done (a pid
        # that comes back is a new process, whose owner is learnt afresh)
        self._resolved.intersection_update(pids)
        known = self._owner_pids  # from the previous tick's read of the map
        todo = [pid for pid in pids
                if pid not in known and pid not in self._resolved and pid != os.getpid()]
        if not todo:
            return
        self._bpf.attach(RESOLVER_FN)
        try:
            self._resolve(todo)
        finally:
            self._bpf.detach(RESOLVER_FN)
        # a pid counts as done once the map has its owner, or after a few
        # tries (it exited, or its lock was never taken through the traced
        # path). Until then its figures go to no process, and on
        # tracepoint-only kernels its write faults (the COW estimate's basis)
        # are not counted at all: one miss used to be final
        found = {OWNER.unpack(v)[0] for _, v in self._bpf.maps["owners"].items()}
        tries = {}
        for pid in todo:
            n = self._resolve_tries.get(pid, 0) + 1
            if pid in found or n >= RESOLVE_TRIES:
                self._resolved.add(pid)
            else:
                tries[pid] = n
        self._resolve_tries = tries

    def _resolve(self, pids: list[int]) -> None:
        table = self._bpf.maps["resolve"]
        tid = threading.get_native_id()
        zero = KEY_U32.pack(0)
        for pid in pids:
            table.set(zero, RESOLVE_REQ.pack(tid, pid))
            try:
                with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                    f.read()
            except OSError:
                pass  # exited meanwhile: expected
            finally:
                table.set(zero, RESOLVE_REQ.pack(0, 0))

    # ---------------------------------------------------------------- ticks
    def tick(self) -> Tick:
        c = counters.sample(self.root, pids=self.pids)
        self.resolve_owners([p.pid for p in c.processes])
        if self._ring is not None:
            self._ring.consume(self._events)  # what is already there
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
        between ticks the event stream is drained as it arrives, and a tick
        comes early once its events reach `max_pending` bytes."""
        return counters.paced(self.tick, self.poll, interval, count,
                              full=lambda: len(self._events) >= self.max_pending)


def _mm_stats(v: bytes) -> MmStats:
    """A struct mm_stats value as read from the map."""
    m = MM_STATS.unpack(v)
    return MmStats(m[0:3], m[3], m[4:6], m[6], m[7], m[8])


def _check_layouts(b: bundle.Bundle) -> None:
    sizes = {m.name: (m.key_size, m.value_size) for m in b.maps}
    for name, (key, value) in LAYOUTS.items():
        if name in sizes and sizes[name] != (key.size, value.size):
            raise KsmtraceError(
                f"map {name} is {sizes[name]} bytes (key, value) compiled, "
                f"{(key.size, value.size)} as sources/live.py reads it",
                "bpf/ksmtrace.h and sources/live.py disagree: report a bug")
