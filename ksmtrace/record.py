"""Recordings: a source's tick stream on disk, streamed, versioned, checked.

A recording holds exactly what the collector consumes: one record per tick
(the counter poll, the in-kernel aggregates and the raw events of that
interval), so replaying it feeds the collector the same ticks as the live run
and yields the same snapshots.

Format, version 3 (version 2 still reads). All integers little-endian.

    file     = preamble record*
    preamble = "KSMTRACE-REC\\n" (13 bytes)  version:u16
    record   = kind:u8  length:u32  crc:u32  head_crc:u32  payload[length]

    crc       zlib.crc32(payload)
    head_crc  zlib.crc32 of the 9 bytes kind, length, crc: a damaged length
              is reported as damage, not mistaken for a cut-off end

    kind 1  HEADER  first record, once. UTF-8 JSON object: "format" (3),
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
        "processes"  [[pid, comm, cgroup, {KsmStat field: value}, workload], ...]
                     workload = [kind, name, id, [[key, value], ...]] (the
                     VM, container, service or process: kernel/identity.py);
                     version 2 has no workload: it is named from the cgroup
        "bpf"        (BpfTotals; only when BPF ran) {
            "counters"   {BPF counter name: n}      (figures.COUNTERS)
            "hist"       {histogram: {log2(ns) slot: n}}  (figures.HISTOGRAMS)
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

The JSON parts follow one schema (ksmtrace/recschema.py), decoded strictly:
each field of the type and in the range written above (counters >= 0,
finite times, pids within PID_MAX_LIMIT, histogram slots 0-63, ...); the
tick and END objects have no other keys. Each event's kind is a known
`model.EventKind`. Tick numbers ("seq") increase from record to record and
"mono" never goes back; END counts the ticks and events before it.

Limits: a record's payload is at most MAX_RECORD (256 MiB); a JSON part
(the header, a tick's JSON, END) at most MAX_JSON (32 MiB). A length is
checked against these and against the file's size before anything is read,
and the reader holds one record at a time.

Streaming: the recorder writes each tick as one record and flushes it (with
SIGINT/SIGTERM held back meanwhile), so a recorder killed even by SIGKILL
leaves a file readable up to its last complete tick. A file that ends inside
a record lost only that record: it is dropped with a warning on stderr. A
file without END was not closed by its recorder; that is reported, and is not
an error.

Anything else that does not parse is a corrupt recording, `BadRecording`
(exit 9, one line) saying what is wrong and at which byte offset: bad magic,
unknown version, a head or payload CRC mismatch, an unknown record kind, a
length over the limits, records out of order (no header first, a second
header, data after END), JSON that does not decode or does not fit the
schema (the message names the field, as `$.ksm.pages_shared`), an event blob
that is not a whole number of events or has an event of an unknown kind,
ticks out of order, an END whose counts are not the file's. So is a file
that cannot be read (an I/O error) or is not a regular file (a FIFO, a
device: refused before any read, so a FIFO never blocks the reader).

A new version is needed for any change an older reader would misread;
readers refuse versions they do not know rather than guess.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, astuple
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from ksmtrace import __version__
from ksmtrace.errors import BadRecording, KsmtraceError
from ksmtrace.model import EVENT_SIZE, EventKind, MmStats, ProbeStatus, ProcessSample, Tick
from ksmtrace.outfile import open_output
from ksmtrace.signals import held

if TYPE_CHECKING:
    from ksmtrace import recschema

MAGIC = b"KSMTRACE-REC\n"
VERSION = 3
READS = (2, 3)  # versions this reader reads
_PREAMBLE = struct.Struct("<H")  # version, right after the magic
HEADER, TICK, END = 1, 2, 3
KIND_NAMES = {HEADER: "header", TICK: "tick", END: "end"}
_HEAD = struct.Struct("<BIII")  # kind, length, crc(payload), crc(first 9 bytes)
_HEAD_CRC_SPAN = 9
_U32 = struct.Struct("<I")
DATA_START = len(MAGIC) + _PREAMBLE.size  # offset of the first record
MAX_RECORD = 256 * 2**20  # largest payload read (a tick: its JSON and events)
MAX_JSON = 32 * 2**20  # largest JSON part: header, END, a tick's JSON
_DESCRIBES = {"header": "a recording header", "tick": "a tick", "end": "a recording's end"}
_KIND_AT = 52  # struct ksm_event's u16 kind (model.EVENT_STRUCT)
_EVENT_KINDS = bytes(sorted(EventKind))  # every kind fits in its low byte


# ---------------------------------------------------------------- encoding
def _process_to_json(p: ProcessSample) -> list[Any]:
    row: list[Any] = [p.pid, p.comm, p.cgroup, asdict(p.stat)]
    w = p.workload
    if w is not None:  # a row without one reads as one from version 2
        row.append([w.kind, w.name, w.id, [list(kv) for kv in w.detail]])
    return row


def tick_to_json(t: Tick) -> dict[str, Any]:
    """The structured part of a tick (everything but its events)."""
    c = t.counters
    d: dict[str, Any] = {
        "seq": t.seq,
        "mono": c.mono,
        "wall": c.wall,
        "ksm": asdict(c.ksm),
        "vmstat": asdict(c.vmstat),
        "processes": [_process_to_json(p) for p in c.processes],
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


def tick_from_json(d: dict[str, Any], events: bytes) -> Tick:
    """Inverse of `tick_to_json` (a written tick reads back equal); raises
    recschema.SchemaError (a ValueError) on a dict that is not a tick."""
    return _schema().tick_from_dict(d, events)


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
    return _schema().probe_from_dict(d)


# ------------------------------------------------------------------ writing
class Recorder:
    """Writes a recording. The header is written at once; each `write(tick)`
    is one record, flushed; `close()` writes END. A context manager."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = os.fspath(path)
        self.ticks = 0
        self.events = 0
        self._f: BinaryIO | None = open_output(self.path)  # private: holds kernel addresses
        head = {"format": VERSION, "ksmtrace": __version__, **header}
        with held():
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
        # never a record the reader refuses (sources bound a tick well below:
        # sources/live.MAX_PENDING); what is written so far stays readable
        jlen = _U32.unpack_from(data, _HEAD.size)[0]
        if len(data) - _HEAD.size > MAX_RECORD or jlen > MAX_JSON:
            raise KsmtraceError(
                f"a tick of {len(tick.events) // EVENT_SIZE:,} events and {jlen:,} bytes of "
                f"JSON is over a recording's limits ({MAX_RECORD >> 20} MiB, JSON "
                f"{MAX_JSON >> 20} MiB); it was not written",
                "record with a shorter interval; the recording up to it is complete")
        # counted in the same held block, so END's counts match the records
        with held():
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
        with held():
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
def _schema():
    """ksmtrace.recschema, imported when a recording is read: msgspec is
    needed for that, not to start the CLI (a bare Debian python3 runs the
    commands that need nothing else, as export says what it misses)."""
    try:
        from ksmtrace import recschema
    except ImportError as e:
        if e.name != "msgspec":
            raise
        raise KsmtraceError("reading a recording needs the Python package msgspec",
                            "install ksmtrace with pip (it depends on it), or "
                            "`pip install msgspec`") from None
    return recschema


class _Cut(Exception):
    """The file ends inside the record at `offset` (internal)."""

    def __init__(self, offset: int):
        self.offset = offset


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _unknown_kind(events: bytes) -> str:
    for i in range(len(events) // EVENT_SIZE):
        at = i * EVENT_SIZE + _KIND_AT
        k = int.from_bytes(events[at:at + 2], "little")
        if k not in EventKind._value2member_map_:
            return f"tick event {i} has unknown kind {k}"
    raise AssertionError("no unknown kind")


def _advisor_status(probes: tuple[ProbeStatus, ...], header: dict) -> tuple[ProbeStatus, ...]:
    """The advisor's probe status for recordings from before it had a probe
    of its own: its tracepoint was attached with the scan rounds' wherever
    the kernel had it."""
    names = [p.probe for p in probes]
    if "advisor" in names or "scan_rounds" not in names:
        return probes
    tps = (header.get("facts") or {}).get("tracepoints") or {}
    i = names.index("scan_rounds")
    scan = probes[i]
    if not (tps.get("ksm:ksm_advisor") and scan.attached and scan.method == "tracepoint"):
        return probes
    advisor = ProbeStatus("advisor", "searching", "tracepoint", ("ksm:ksm_advisor",), True,
                          False)
    return probes[: i + 1] + (advisor,) + probes[i + 1:]


class Recording:
    """A recording opened for reading: `header` at once, `ticks()` lazily.

    Read record by record with positional reads: memory stays at one record
    (at most MAX_RECORD bytes) whatever the file's size, several `ticks()`
    iterations may run at once, and a file that grows meanwhile (a recorder
    still writing) is read as far as it goes. (Not mmap: a file truncated
    under a mapping kills the reader with SIGBUS.) Each tick's events are one
    bytes object, decoded only if asked (`model.iter_events`). `truncated`
    says the file ended inside a record (dropped, with one warning to `warn`,
    `cut_warning()`); `end` is the END record's JSON, or None if the recorder
    did not close the file (known once `ticks()` has run to the end).
    """

    def __init__(self, path: str | os.PathLike, warn: IO[str] | None = sys.stderr):
        self.path = os.fspath(path)
        self.warn = warn
        self.truncated = False
        self.cut_at: int | None = None
        self.end: dict[str, Any] | None = None
        self._size = 0
        self._fd = -1
        self._rs = _schema()
        self._fd = self._open()
        try:
            self.version = self._preamble()
            self._read_header()
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------
    def _open(self) -> int:
        """Opened only if it is a regular file, without blocking (a FIFO
        would wait for a writer), O_NONBLOCK cleared after the check."""
        try:
            if not stat.S_ISREG(mode := os.stat(self.path).st_mode):
                raise BadRecording(f"{self.path} is {_file_type(mode)}, not a recording")
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError as e:
            raise BadRecording(f"no recording at {self.path}: no such file") from e
        except PermissionError as e:
            raise BadRecording(f"{self.path}: permission denied") from e
        except OSError as e:
            raise BadRecording(f"{self.path}: cannot open: {e.strerror}") from e
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):  # replaced between stat and open
                raise BadRecording(f"{self.path} is {_file_type(mode)}, not a recording")
            os.set_blocking(fd, True)
        except OSError as e:
            os.close(fd)
            raise BadRecording(f"{self.path}: cannot open: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read(self, offset: int, n: int) -> bytes:
        """Up to n bytes at offset (fewer only at the end of the file)."""
        chunks = []
        try:
            while n > 0:
                b = os.pread(self._fd, n, offset)
                if not b:
                    break
                chunks.append(b)
                offset += len(b)
                n -= len(b)
        except OSError as e:
            raise self._bad(f"cannot read it ({e.strerror})", offset) from e
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _fits(self, end: int) -> bool:
        """Whether the file (as it is now: it may be growing) reaches `end`."""
        if end > self._size:
            try:
                self._size = os.fstat(self._fd).st_size
            except OSError as e:
                raise self._bad(f"cannot read it ({e.strerror})", self._size) from e
        return end <= self._size

    def _preamble(self) -> int:
        pre = self._read(0, DATA_START)
        if pre[: len(MAGIC)] != MAGIC:
            raise BadRecording(f"{self.path} is not a ksmtrace recording (bad magic at byte "
                               "offset 0); record one with `ksmtrace record -o FILE`")
        if len(pre) < DATA_START:
            raise self._bad("file ends inside the preamble", len(MAGIC))
        (version,) = _PREAMBLE.unpack_from(pre, len(MAGIC))
        if version not in READS:
            raise BadRecording(
                f"{self.path}: recording format version {version} (byte offset {len(MAGIC)}) "
                f"is not supported: this ksmtrace {__version__} reads versions "
                f"{' and '.join(map(str, READS))}")
        return version

    def _read_header(self) -> None:
        try:
            head = self._head(DATA_START)
            if head is None or head[0] != HEADER:
                raise self._bad("no header record", DATA_START)
            payload = self._payload(DATA_START, head)
        except _Cut as e:
            raise self._bad("file ends inside the header record", e.offset) from None
        self._first_tick = DATA_START + _HEAD.size + len(payload)
        try:
            self.header, h = self._rs.header(payload, self.version)
        except self._rs.SchemaError as e:
            raise self._schema(e, "header", DATA_START) from None
        self._probes = _advisor_status(tuple(self._rs.probe(p) for p in h.probes),
                                       self.header)

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

    def _schema(self, e: recschema.SchemaError, what: str, offset: int) -> BadRecording:
        if e.kind == "undecodable":
            return self._bad(f"undecodable {what} record ({e})", offset)
        if e.kind == "not_object":
            return self._bad(f"{what} record is not a JSON object", offset)
        return self._bad(f"{what} record does not describe {_DESCRIBES[what]} ({e})", offset)

    def cut_warning(self) -> str | None:
        """The warning for a file that ends inside a record, or None."""
        if self.cut_at is None:
            return None
        return (f"ksmtrace: warning: {self.path} ends inside a record at byte offset "
                f"{self.cut_at} (the recorder was killed?): that record is dropped, the "
                "ticks before it are read")

    def _cut(self, offset: int) -> None:
        first = self.cut_at is None
        self.truncated, self.cut_at = True, offset
        if first and self.warn is not None:
            print(self.cut_warning(), file=self.warn)

    def _head(self, pos: int) -> tuple[int, int, int] | None:
        """(kind, length, crc) of the record at pos, its length checked against
        MAX_RECORD and the file's size before anything is read; None at the
        end of the file; _Cut if the file ends inside the record."""
        head = self._read(pos, _HEAD.size)
        if not head:
            return None
        if len(head) < _HEAD.size:
            raise _Cut(pos)
        kind, length, crc, head_crc = _HEAD.unpack(head)
        if zlib.crc32(head[:_HEAD_CRC_SPAN]) != head_crc:
            raise self._bad("record head checksum mismatch", pos)
        if kind not in KIND_NAMES:
            raise self._bad(f"unknown record kind {kind}", pos)
        limit = MAX_RECORD if kind == TICK else MAX_JSON
        if length > limit:
            raise self._bad(f"{KIND_NAMES[kind]} record of {length} bytes (the limit is "
                            f"{limit >> 20} MiB)", pos)
        if not self._fits(pos + _HEAD.size + length):
            raise _Cut(pos)
        return kind, length, crc

    def _payload(self, pos: int, head: tuple[int, int, int]) -> bytes:
        kind, length, crc = head
        payload = self._read(pos + _HEAD.size, length)
        if len(payload) < length:  # the file shrank meanwhile
            raise _Cut(pos)
        if zlib.crc32(payload) != crc:
            raise self._bad(f"{KIND_NAMES[kind]} record checksum mismatch", pos)
        return payload

    def _tick(self, pos: int, length: int, crc: int) -> Tick:
        """The tick record at pos, read in two parts (JSON, events) so that
        the record is never copied whole."""
        at = pos + _HEAD.size
        if length < _U32.size:
            self._payload(pos, (TICK, length, crc))
            raise self._bad("tick record too short", pos)
        jl = self._read(at, _U32.size)
        (jlen,) = _U32.unpack(jl)
        rest = length - _U32.size
        js = self._read(at + _U32.size, min(jlen, rest))
        events = self._read(at + _U32.size + jlen, rest - jlen) if jlen <= rest else b""
        if len(jl) + len(js) + len(events) < length:  # the file shrank meanwhile
            raise _Cut(pos)
        if zlib.crc32(events, zlib.crc32(js, zlib.crc32(jl))) != crc:
            raise self._bad("tick record checksum mismatch", pos)
        if jlen > rest:
            raise self._bad(f"tick JSON length {jlen} exceeds its record", pos)
        if jlen > MAX_JSON:
            raise self._bad(f"tick JSON of {jlen} bytes (the limit is {MAX_JSON >> 20} MiB)", pos)
        if len(events) % EVENT_SIZE:
            raise self._bad(f"tick events ({len(events)} bytes) are not a whole number of "
                            f"{EVENT_SIZE}-byte events", pos)
        if events[_KIND_AT::EVENT_SIZE].translate(None, _EVENT_KINDS) \
                or events[_KIND_AT + 1::EVENT_SIZE].strip(b"\0"):
            raise self._bad(_unknown_kind(events), pos)
        try:
            t = self._rs.tick_struct(js, self.version)
        except self._rs.SchemaError as e:
            raise self._schema(e, "tick", pos) from None
        return self._rs.tick_from_struct(t, events)

    def ticks(self) -> Iterator[Tick]:
        """The recorded ticks, in order (can be called again to re-read).
        Tick numbers must increase and times never go back; END must count
        the ticks and events read."""
        pos = self._first_tick
        seq = mono = None
        n_ticks = n_events = 0
        try:
            while True:
                head = self._head(pos)
                if head is None:
                    return
                kind, length, crc = head
                at, pos = pos, pos + _HEAD.size + length
                if kind == TICK:
                    t = self._tick(at, length, crc)
                    if seq is not None and t.seq <= seq:
                        raise self._bad(f"tick {t.seq} follows tick {seq} (tick numbers "
                                        "must increase)", at)
                    if mono is not None and t.counters.mono < mono:
                        raise self._bad(f"tick {t.seq} is {mono - t.counters.mono:.6f} s "
                                        f"older than tick {seq} before it", at)
                    seq, mono = t.seq, t.counters.mono
                    n_ticks += 1
                    n_events += len(t.events) // EVENT_SIZE
                    yield t
                elif kind == END:
                    try:
                        end = self._rs.end(self._payload(at, head))
                    except self._rs.SchemaError as e:
                        raise self._schema(e, "end", at) from None
                    if (end["ticks"], end["events"]) != (n_ticks, n_events):
                        raise self._bad(f"the end record counts {end['ticks']} ticks and "
                                        f"{end['events']} events, the recording holds "
                                        f"{n_ticks} and {n_events}", at)
                    if self._read(pos, 1):
                        raise self._bad("data after the end record", pos)
                    self.end = end
                    return
                else:
                    raise self._bad("a second header record", at)
        except _Cut as e:
            self._cut(e.offset)

    @property
    def probes(self) -> tuple[ProbeStatus, ...]:
        return self._probes
