"""Recordings: the live source's tick stream, on disk, streamed.

Format (version 1), all integers little-endian:

    b"KSMTRACE-REC\\n"                           13-byte magic
    record*                                      until end of file

    record = type:u8  length:u32  crc32:u32  payload[length]

    type 1  HEADER  JSON: format version, ksmtrace version, kernel, host,
                    start time, source kind, probe statuses, cow_estimated,
                    notes, and the capability facts and attach plan
    type 2  EVENTS  raw `struct ksm_event` records (bpf/ksmtrace.h, 72 bytes
                    each) of the tick that follows
    type 3  TICK    JSON: one Tick without its events (counter poll, BPF
                    aggregates); closes the tick

The CRC is zlib.crc32 of the payload. Each tick is flushed as it is written,
so a recorder killed with SIGKILL leaves a file readable up to its last
complete TICK; a truncated tail is dropped with a warning. Anything else
that does not parse (bad magic, unknown version or type, CRC mismatch,
undecodable JSON) is a corrupt recording: `BadRecording` (exit 9) naming the
byte offset. Events stay binary and are decoded lazily (replay target:
millions of events per second).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, BinaryIO

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
    Tick,
)

MAGIC = b"KSMTRACE-REC\n"
VERSION = 1
T_HEADER, T_EVENTS, T_TICK = 1, 2, 3
_REC = struct.Struct("<BII")


# ---------------------------------------------------------------- encoding
def tick_to_json(t: Tick) -> dict[str, Any]:
    c = t.counters
    d: dict[str, Any] = {
        "seq": t.seq,
        "mono": c.mono,
        "wall": c.wall,
        "ksm": {k: v for k, v in asdict(c.ksm).items()},
        "vmstat": asdict(c.vmstat),
        "processes": [[p.pid, p.comm, p.cgroup, asdict(p.stat)] for p in c.processes],
    }
    if t.bpf is not None:
        b = t.bpf
        d["bpf"] = {
            "counters": b.counters,
            "hist": {h: {str(k): v for k, v in s.items()} for h, s in b.hist.items()},
            "errors": b.errors,
            "mms": {str(mm): _mm(s) for mm, s in b.mms.items()},
            "exited": {str(mm): _mm(s) for mm, s in b.exited.items()},
            "owners": {str(mm): pid for mm, pid in b.owners.items()},
            "perf_lost": b.perf_lost,
            "comms": {str(pid): c for pid, c in b.comms.items()},
        }
    return d


def _mm(s: MmStats) -> list:
    return [list(s.merges), s.merge_failures, list(s.cow), s.wp_faults, s.unshares,
            s.rmap_removed]


def _mm_back(v: list) -> MmStats:
    return MmStats(tuple(v[0]), v[1], tuple(v[2]), v[3], v[4], v[5])


def tick_from_json(d: dict[str, Any], events: bytes) -> Tick:
    ksm = dict(d["ksm"])
    procs = tuple(ProcessSample(pid, comm, cg, KsmStat(**st))
                  for pid, comm, cg, st in d["processes"])
    c = CounterSample(d["mono"], d["wall"], KsmSysfs(**ksm), KsmVmstat(**d["vmstat"]), procs)
    bpf = None
    if "bpf" in d:
        b = d["bpf"]
        bpf = BpfTotals(
            counters=b["counters"],
            hist={h: {int(k): v for k, v in s.items()} for h, s in b["hist"].items()},
            errors=b["errors"],
            mms={int(mm): _mm_back(v) for mm, v in b["mms"].items()},
            exited={int(mm): _mm_back(v) for mm, v in b["exited"].items()},
            owners={int(mm): pid for mm, pid in b["owners"].items()},
            perf_lost=b["perf_lost"],
            comms={int(pid): c for pid, c in b.get("comms", {}).items()},
        )
    return Tick(d["seq"], c, bpf, events)


# ------------------------------------------------------------------ writing
class Recorder:
    """Writes a recording; every `write()` ends with a flush."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = path
        self.f: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.f.write(MAGIC)
        self.ticks = 0
        self.events = 0
        self._record(T_HEADER, json.dumps({"format": VERSION, "ksmtrace": __version__,
                                           **header}, default=str).encode())
        self.f.flush()

    def _record(self, kind: int, payload: bytes) -> None:
        self.f.write(_REC.pack(kind, len(payload), zlib.crc32(payload)))
        self.f.write(payload)

    def write(self, tick: Tick) -> None:
        if tick.events:
            self._record(T_EVENTS, tick.events)
            self.events += len(tick.events) // EVENT_SIZE
        self._record(T_TICK, json.dumps(tick_to_json(tick), separators=(",", ":")).encode())
        self.f.flush()
        self.ticks += 1

    @property
    def bytes(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_json(p: ProbeStatus) -> dict[str, Any]:
    return asdict(p)


def probe_back(d: dict[str, Any]) -> ProbeStatus:
    return ProbeStatus(d["probe"], d["stage"], d["method"], tuple(d["targets"]), d["attached"],
                       d["estimated"], d.get("error"))


# ------------------------------------------------------------------ reading
class Recording:
    """An open recording: `header`, then `ticks()` in order."""

    def __init__(self, path: str | os.PathLike, warn=sys.stderr):
        self.path = str(path)
        self.warn = warn
        self.truncated = False
        try:
            with open(path, "rb") as f:
                self.data = memoryview(f.read())
        except FileNotFoundError as e:
            raise BadRecording(f"no recording at {path}", "check the path") from e
        except IsADirectoryError as e:
            raise BadRecording(f"{path} is a directory, not a recording", None) from e
        if bytes(self.data[: len(MAGIC)]) != MAGIC:
            raise BadRecording(f"{path} is not a ksmtrace recording (bad magic at offset 0)",
                               "record one with `ksmtrace record -o FILE`")
        kind, payload, self._pos = self._next(len(MAGIC))
        if kind != T_HEADER or payload is None:
            raise BadRecording(f"{path}: no header record at offset {len(MAGIC)}",
                               "the file is damaged; record it again")
        self.header = self._json(payload, len(MAGIC))
        if self.header.get("format") != VERSION:
            raise BadRecording(
                f"{path}: recording format {self.header.get('format')!r} is not supported "
                f"(this ksmtrace reads format {VERSION})",
                "replay it with the ksmtrace version that recorded it")

    def _json(self, payload: memoryview, offset: int) -> dict[str, Any]:
        try:
            return json.loads(bytes(payload))
        except ValueError as e:
            raise BadRecording(f"{self.path}: undecodable record at offset {offset}: {e}",
                               "the file is damaged; record it again") from e

    def _next(self, pos: int) -> tuple[int | None, memoryview | None, int]:
        """(type, payload, next position); (None, None, pos) at a clean or truncated end."""
        n = len(self.data)
        if pos == n:
            return None, None, pos
        if pos + _REC.size > n:
            self._truncated(pos)
            return None, None, n
        kind, length, crc = _REC.unpack_from(self.data, pos)
        start, end = pos + _REC.size, pos + _REC.size + length
        if kind not in (T_HEADER, T_EVENTS, T_TICK):
            raise BadRecording(f"{self.path}: unknown record type {kind} at offset {pos}",
                               "the file is damaged; record it again")
        if end > n:
            self._truncated(pos)
            return None, None, n
        payload = self.data[start:end]
        if zlib.crc32(payload) != crc:
            raise BadRecording(f"{self.path}: checksum mismatch in the record at offset {pos}",
                               "the file is damaged; record it again")
        return kind, payload, end

    def _truncated(self, pos: int) -> None:
        self.truncated = True
        if self.warn is not None:
            print(f"ksmtrace: {self.path} ends in an incomplete record at offset {pos} "
                  "(the recorder was killed?); reading what precedes it", file=self.warn)

    def ticks(self) -> Iterator[Tick]:
        pos = self._pos
        events = b""
        while True:
            at = pos
            kind, payload, pos = self._next(pos)
            if kind is None or payload is None:
                return
            if kind == T_EVENTS:
                if len(payload) % EVENT_SIZE:
                    raise BadRecording(f"{self.path}: event record at offset {at} is not a "
                                       f"multiple of {EVENT_SIZE} bytes", None)
                events = bytes(payload)
            elif kind == T_TICK:
                d = self._json(payload, at)
                try:
                    yield tick_from_json(d, events)
                except (KeyError, TypeError, ValueError) as e:
                    raise BadRecording(f"{self.path}: malformed tick at offset {at}: {e}",
                                       "the file is damaged; record it again") from e
                events = b""
            else:
                raise BadRecording(f"{self.path}: a second header at offset {at}", None)

    @property
    def probes(self) -> tuple[ProbeStatus, ...]:
        return tuple(probe_back(p) for p in self.header.get("probes", []))
