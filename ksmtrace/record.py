"""Recordings: a source's tick stream on disk, streamed, versioned, checked.

A recording holds exactly what the collector consumes: one record per tick
(the counter poll, the in-kernel aggregates and the raw events of that
interval), so replaying it feeds the collector the same ticks as the live run
and yields the same snapshots.

Format, version 2. All integers little-endian.

    file     = preamble record*
    preamble = "KSMTRACE-REC\\n" (13 bytes)  version:u16
    record   = kind:u8  length:u32  crc:u32  head_crc:u32  payload[length]

    crc       zlib.crc32(payload)
    head_crc  zlib.crc32 of the 9 bytes kind, length, crc: a damaged length
              is reported as damage, not mistaken for a cut-off end

    kind 1  HEADER  first record, once. UTF-8 JSON object: "format" (2),
                    "ksmtrace" (version), "kernel" (uname -r), "host",
                    "started" (ISO 8601), "started_unix", "interval" (s),
                    "source" ("live"), "pids" (-p, or null),
                    "probes" (ProbeStatus objects),
                    "cow_estimated", "notes", "facts" and "plan" (the
                    capability facts and attach plan, as `doctor --json`)
    kind 2  TICK    one per tick:  json_length:u32  json[json_length]  events
                    json   = the tick without its events (below)
                    events = packed `struct ksm_event`, 72 bytes each
                             (bpf/ksmtrace.h, model.EVENT_STRUCT), kept as
                             the kernel wrote them and decoded lazily
    kind 3  END     last record, written when the recorder stops in order.
                    JSON: "ticks", "events", "ended" (ISO 8601)

    tick json (a model.Tick without its events; absent parts are absent keys):
        "seq"        tick number, from 1
        "mono"       time.monotonic() of the counter poll (CLOCK_MONOTONIC, s:
                     the clock of the events' ts_ns)
        "wall"       time.time() of the poll
        "ksm"        {KsmSysfs field: value}, "extra": {unknown sysfs file: text}
        "vmstat"     {"cow_ksm", "ksm_swpin_copy"}
        "processes"  [[pid, comm, cgroup, {KsmStat field: value}], ...]
        "bpf"        (BpfTotals; only when BPF ran) {
            "counters"   {BPF counter name: n}      (model.BPF_COUNTERS)
            "hist"       {histogram: {log2(ns) slot: n}}  (model.HISTOGRAMS)
            "errors"     {"<merge kind>:<-errno>": n}
            "mms", "exited"  {mm: [[merges new, into, zero], merge_failures,
                                   [cow writes, unshares], wp_faults,
                                   unshares, rmap_removed]}   (MmStats order)
            "owners"     {mm: pid}
            "comms"      {pid: comm}
            "perf_lost"  n
            "programs"   [[name, run_time_ns, run_count], ...]  ksmtrace's own
                         BPF cost (model.ProgramCost); absent in recordings
                         made before it was added, read as none }
    JSON object keys that are integers (mm, pid, slot) are decimal strings;
    reading turns them back into ints, lists back into tuples, so every tick
    reads back equal (==) to the tick that was written.

Streaming: the recorder writes each tick as one record and flushes it (with
SIGINT/SIGTERM held back meanwhile), so a recorder killed even by SIGKILL
leaves a file readable up to its last complete tick. A file that ends inside
a record lost only that record: it is dropped with a warning on stderr. A
file without END was not closed by its recorder; that is reported, and is not
an error.

Anything else that does not parse is a corrupt recording, `BadRecording`
(exit 9, one line) saying what is wrong and at which byte offset: bad magic,
unknown version, a head or payload CRC mismatch, an unknown record kind,
records out of order (no header first, a second header, data after END),
JSON that does not decode or does not describe a tick, an event blob that is
not a whole number of events.

A new version is needed for any change a version-2 reader would misread;
readers refuse other versions rather than guess.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple
from typing import IO, Any, BinaryIO

from ksmtrace import __version__
from ksmtrace.errors import BadRecording
from ksmtrace.kernel.procfs import KsmStat, KsmVmstat
from ksmtrace.kernel.sysfs import KsmSysfs
from ksmtrace.model import (
    EVENT_SIZE,
    BpfTotals,
    CounterSample,
    MmStats,
    ProbeStatus,
    ProcessSample,
    ProgramCost,
    Tick,
)
from ksmtrace.outfile import open_output

MAGIC = b"KSMTRACE-REC\n"
VERSION = 2
_PREAMBLE = struct.Struct("<H")  # version, right after the magic
HEADER, TICK, END = 1, 2, 3
KIND_NAMES = {HEADER: "header", TICK: "tick", END: "end"}
_HEAD = struct.Struct("<BIII")  # kind, length, crc(payload), crc(first 9 bytes)
_HEAD_CRC_SPAN = 9
_U32 = struct.Struct("<I")
DATA_START = len(MAGIC) + _PREAMBLE.size  # offset of the first record


# ---------------------------------------------------------------- encoding
def tick_to_json(t: Tick) -> dict[str, Any]:
    """The structured part of a tick (everything but its events)."""
    c = t.counters
    d: dict[str, Any] = {
        "seq": t.seq,
        "mono": c.mono,
        "wall": c.wall,
        "ksm": asdict(c.ksm),
        "vmstat": asdict(c.vmstat),
        "processes": [[p.pid, p.comm, p.cgroup, asdict(p.stat)] for p in c.processes],
    }
    if c.ksmd_cpu_ticks is not None:
        d["ksmd_cpu_ticks"] = c.ksmd_cpu_ticks
    b = t.bpf
    if b is not None:
        d["bpf"] = {
            "counters": b.counters,
            "hist": {h: {str(slot): n for slot, n in s.items()} for h, s in b.hist.items()},
            "errors": b.errors,
            "mms": {str(mm): _mm_to_json(s) for mm, s in b.mms.items()},
            "exited": {str(mm): _mm_to_json(s) for mm, s in b.exited.items()},
            "owners": {str(mm): pid for mm, pid in b.owners.items()},
            "perf_lost": b.perf_lost,
            "comms": {str(pid): comm for pid, comm in b.comms.items()},
        }
        if b.programs:
            d["bpf"]["programs"] = [[p.name, p.run_time_ns, p.run_count] for p in b.programs]
    return d


def _mm_to_json(s: MmStats) -> list[Any]:
    return [list(v) if isinstance(v, tuple) else v for v in astuple(s)]


def _mm_from_json(v: list[Any]) -> MmStats:
    merges, failures, cow, wp_faults, unshares, rmap_removed = v
    return MmStats(tuple(merges), failures, tuple(cow), wp_faults, unshares, rmap_removed)


def tick_from_json(d: dict[str, Any], events: bytes) -> Tick:
    """Inverse of `tick_to_json`; raises KeyError/TypeError/ValueError on a
    JSON object that is not a tick."""
    procs = tuple(ProcessSample(pid, comm, cgroup, KsmStat(**st))
                  for pid, comm, cgroup, st in d["processes"])
    c = CounterSample(d["mono"], d["wall"], KsmSysfs(**d["ksm"]), KsmVmstat(**d["vmstat"]),
                      procs, d.get("ksmd_cpu_ticks"))
    bpf = None
    b = d.get("bpf")
    if b is not None:
        bpf = BpfTotals(
            counters=dict(b["counters"]),
            hist={h: {int(slot): n for slot, n in s.items()} for h, s in b["hist"].items()},
            errors=dict(b["errors"]),
            mms={int(mm): _mm_from_json(v) for mm, v in b["mms"].items()},
            exited={int(mm): _mm_from_json(v) for mm, v in b["exited"].items()},
            owners={int(mm): pid for mm, pid in b["owners"].items()},
            perf_lost=b["perf_lost"],
            comms={int(pid): comm for pid, comm in b["comms"].items()},
            programs=tuple(ProgramCost(str(name), int(ns), int(n))
                           for name, ns, n in b.get("programs", ())),
        )
    return Tick(d["seq"], c, bpf, events)


def encode_record(kind: int, payload: bytes) -> bytes:
    head = struct.pack("<BII", kind, len(payload), zlib.crc32(payload))
    return head + _U32.pack(zlib.crc32(head)) + payload


def encode_tick(t: Tick) -> bytes:
    """A whole TICK record: head, JSON part, events."""
    js = json.dumps(tick_to_json(t), separators=(",", ":")).encode()
    return encode_record(TICK, _U32.pack(len(js)) + js + t.events)


def probe_to_json(p: ProbeStatus) -> dict[str, Any]:
    return asdict(p)


def probe_from_json(d: dict[str, Any]) -> ProbeStatus:
    return ProbeStatus(d["probe"], d["stage"], d["method"], tuple(d["targets"]),
                       d["attached"], d["estimated"], d.get("error"))


# ------------------------------------------------------------------ writing
@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for the block (main thread only), so Ctrl-C
    never cuts a record in half; the handler runs right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # The mask is read before it is changed, and changed inside the try: a
    # Ctrl-C that arrived just before the block raises at the first bytecode
    # after a call, and had it been raised between blocking and `try`, the
    # signals would have stayed blocked for good and Ctrl-C done nothing
    # (seen in tests/unit/test_record.py under load).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Recorder:
    """Writes a recording. The header is written at once; each `write(tick)`
    is one record, flushed; `close()` writes END. A context manager."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = os.fspath(path)
        self.ticks = 0
        self.events = 0
        self._f: BinaryIO | None = open_output(self.path)  # private: holds kernel addresses
        head = {"format": VERSION, "ksmtrace": __version__, **header}
        with signals_held():
            self._put(MAGIC + _PREAMBLE.pack(VERSION)
                      + encode_record(HEADER, json.dumps(head, default=str).encode()))

    def _put(self, data: bytes) -> None:
        """Write and flush; call with signals held."""
        if self._f is None:
            raise ValueError(f"recording {self.path} is closed")
        self._f.write(data)
        self._f.flush()

    def write(self, tick: Tick) -> None:
        data = encode_tick(tick)
        # counted in the same held block, so END's counts match the records
        with signals_held():
            self._put(data)
            self.ticks += 1
            self.events += len(tick.events) // EVENT_SIZE

    @property
    def bytes(self) -> int:
        return self._f.tell() if self._f is not None else os.path.getsize(self.path)

    def close(self) -> None:
        if self._f is None:
            return
        end = {"ticks": self.ticks, "events": self.events,
               "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with signals_held():
            try:
                self._put(encode_record(END, json.dumps(end).encode()))
            finally:
                f, self._f = self._f, None
                f.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ reading
class Recording:
    """A recording opened for reading: `header` at once, `ticks()` lazily.

    Read record by record with positional reads: memory stays at one tick
    whatever the file's size, several `ticks()` iterations may run at once,
    and a file that grows meanwhile (a recorder still writing) is read as far
    as it goes. (Not mmap: a file truncated under a mapping kills the reader
    with SIGBUS.) Each tick's events are one bytes object, decoded only if
    asked (`model.iter_events`). `truncated` says the file ended inside a
    record (dropped, with one warning to `warn`); `end` is the END record's
    JSON, or None if the recorder did not close the file (known once
    `ticks()` has run to the end).
    """

    def __init__(self, path: str | os.PathLike, warn: IO[str] | None = sys.stderr):
        self.path = os.fspath(path)
        self.warn = warn
        self.truncated = False
        self.end: dict[str, Any] | None = None
        self._fd = self._open()
        try:
            self.version = self._preamble()
            kind, payload, at, self._first_tick = self._next(DATA_START)
            if kind != HEADER or payload is None:
                raise self._bad("no header record", DATA_START)
            self.header: dict[str, Any] = self._json(payload, at, "header")
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------
    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as e:
            raise BadRecording(f"no recording at {self.path}: no such file") from e
        except PermissionError as e:
            raise BadRecording(f"{self.path}: permission denied") from e
        except OSError as e:
            raise BadRecording(f"{self.path}: cannot open: {e.strerror}") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            what = "a directory" if os.path.isdir(self.path) else "not a regular file"
            raise BadRecording(f"{self.path} is {what}, not a recording")
        return fd

    def _read(self, offset: int, n: int) -> bytes:
        """Up to n bytes at offset (fewer only at the end of the file)."""
        chunks = []
        while n > 0:
            b = os.pread(self._fd, n, offset)
            if not b:
                break
            chunks.append(b)
            offset += len(b)
            n -= len(b)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _preamble(self) -> int:
        pre = self._read(0, DATA_START)
        if pre[: len(MAGIC)] != MAGIC:
            raise BadRecording(f"{self.path} is not a ksmtrace recording (bad magic at byte "
                               "offset 0); record one with `ksmtrace record -o FILE`")
        if len(pre) < DATA_START:
            raise self._bad("file ends inside the preamble", len(MAGIC))
        (version,) = _PREAMBLE.unpack_from(pre, len(MAGIC))
        if version != VERSION:
            raise BadRecording(
                f"{self.path}: recording format version {version} (byte offset {len(MAGIC)}) "
                f"is not supported: this ksmtrace {__version__} reads version {VERSION}")
        return version

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- records --------------------------------------------------------------
    def _bad(self, what: str, offset: int) -> BadRecording:
        return BadRecording(f"{self.path}: corrupt recording: {what} at byte offset {offset}")

    def _cut(self, offset: int) -> None:
        if not self.truncated and self.warn is not None:
            print(f"ksmtrace: warning: {self.path} ends inside a record at byte offset "
                  f"{offset} (the recorder was killed?): that record is dropped, the "
                  "ticks before it are read", file=self.warn)
        self.truncated = True

    def _next(self, pos: int) -> tuple[int | None, bytes | None, int, int]:
        """(kind, payload, pos, next pos); kind None at the end of the file,
        clean or cut off inside a record."""
        head = self._read(pos, _HEAD.size)
        if not head:
            return None, None, pos, pos
        if len(head) < _HEAD.size:
            self._cut(pos)
            return None, None, pos, pos
        kind, length, crc, head_crc = _HEAD.unpack(head)
        if zlib.crc32(head[:_HEAD_CRC_SPAN]) != head_crc:
            raise self._bad("record head checksum mismatch", pos)
        if kind not in KIND_NAMES:
            raise self._bad(f"unknown record kind {kind}", pos)
        payload = self._read(pos + _HEAD.size, length)
        if len(payload) < length:
            self._cut(pos)
            return None, None, pos, pos
        if zlib.crc32(payload) != crc:
            raise self._bad(f"{KIND_NAMES[kind]} record checksum mismatch", pos)
        return kind, payload, pos, pos + _HEAD.size + length

    def _json(self, payload: bytes, offset: int, what: str) -> Any:
        try:
            d = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as e:
            raise self._bad(f"undecodable {what} record ({e})", offset) from e
        if not isinstance(d, dict):
            raise self._bad(f"{what} record is not a JSON object", offset)
        return d

    def _tick(self, payload: bytes, offset: int) -> Tick:
        if len(payload) < _U32.size:
            raise self._bad("tick record too short", offset)
        (jlen,) = _U32.unpack_from(payload)
        js_end = _U32.size + jlen
        if js_end > len(payload):
            raise self._bad(f"tick JSON length {jlen} exceeds its record", offset)
        events = payload[js_end:]
        if len(events) % EVENT_SIZE:
            raise self._bad(f"tick events ({len(events)} bytes) are not a whole number of "
                            f"{EVENT_SIZE}-byte events", offset)
        d = self._json(payload[_U32.size:js_end], offset, "tick")
        try:
            return tick_from_json(d, events)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise self._bad(f"tick record does not describe a tick ({e!r})", offset) from e

    def ticks(self) -> Iterator[Tick]:
        """The recorded ticks, in order (can be called again to re-read)."""
        pos = self._first_tick
        while True:
            kind, payload, at, pos = self._next(pos)
            if kind is None or payload is None:
                return
            if kind == TICK:
                yield self._tick(payload, at)
            elif kind == END:
                self.end = self._json(payload, at, "end")
                if self._read(pos, 1):
                    raise self._bad("data after the end record", pos)
                return
            else:
                raise self._bad("a second header record", at)

    @property
    def probes(self) -> tuple[ProbeStatus, ...]:
        try:
            return tuple(probe_from_json(p) for p in self.header.get("probes", ()))
        except (KeyError, TypeError) as e:
            raise self._bad(f"header has malformed probe statuses ({e!r})", DATA_START) from e
