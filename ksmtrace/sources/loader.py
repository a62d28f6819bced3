"""A compiled bundle (sources/bundle.py) made live in this process, without
bcc: its maps created, its programs pointed at them, loaded and attached.

bcc's naming says how each program attaches, as bcc's own autoload reads it:
`tracepoint__<category>__<event>`, `raw_tracepoint__<event>`,
`kfunc__<function>` (fentry) and `kretfunc__<function>` (fexit); the others
(`kp_*`, `kr_*`) are kprobes the build lists (probes.Kprobe).

Everything is a file descriptor of this process: `close()`, or the process
ending in any way, detaches and frees it all. The one exception is a legacy
kretprobe's kprobe_events entry, removed by `close()`, and by `doctor` if
the process was killed first.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import select
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ksmtrace.errors import KsmtraceError
from ksmtrace.kernel import symbols
from ksmtrace.sources import bpfsys
from ksmtrace.sources.bundle import Bundle, MapSpec, relocate

KRETPROBE_MAXACTIVE = 64  # do_wp_page can sleep: more instances than CPUs in flight
_BATCH = 4096  # entries per BPF_MAP_LOOKUP_BATCH call


class Map:
    """One BPF map: keys and values as bytes."""

    def __init__(self, spec: MapSpec, fd: int, ncpus: int):
        self.spec, self.fd = spec, fd
        percpu = spec.type == bpfsys.MAP_PERCPU_ARRAY
        # a per-CPU value is one 8-byte-aligned slot per possible CPU
        self.value_size = ((spec.value_size + 7) // 8 * 8) * ncpus if percpu else spec.value_size
        self.ncpus = ncpus if percpu else 1
        self._key = ctypes.create_string_buffer(max(spec.key_size, 1))
        self._value = ctypes.create_string_buffer(max(self.value_size, 1))
        self._batch_ok = spec.type in (bpfsys.MAP_HASH, bpfsys.MAP_LRU_HASH)

    def get(self, key: bytes) -> bytes | None:
        self._key.raw = key
        if not bpfsys.lookup(self.fd, self._key, self._value):
            return None
        return self._value.raw[: self.value_size]

    def set(self, key: bytes, value: bytes) -> None:
        self._key.raw = key
        self._value.raw = value
        bpfsys.update(self.fd, self._key, self._value)

    def delete(self, key: bytes) -> bool:
        self._key.raw = key
        return bpfsys.delete(self.fd, self._key)

    def index(self, i: int) -> bytes:
        """An array map's value at `i` (zeros if unreadable)."""
        return self.get(struct.pack("<I", i)) or bytes(self.value_size)

    def percpu_u64(self, i: int) -> int:
        """The sum over CPUs of a per-CPU array's u64 at `i`."""
        v = self.index(i)
        return sum(struct.unpack_from(f"<{self.ncpus}Q", v))

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value): in batches where the kernel can (5.6+), else
        key by key. A map that changes meanwhile may show an entry twice or
        not at all, as with any walk of a live map."""
        if self._batch_ok:
            try:
                return list(self._items_batched())
            except bpfsys.BpfError as e:
                if e.errno not in (22, 95, 524):  # EINVAL, EOPNOTSUPP, ENOTSUPP
                    raise
                self._batch_ok = False
        return list(self._items_walked())

    def _items_batched(self) -> Iterator[tuple[bytes, bytes]]:
        ks, vs = self.spec.key_size, self.value_size
        keys = ctypes.create_string_buffer(ks * _BATCH)
        values = ctypes.create_string_buffer(vs * _BATCH)
        token = ctypes.create_string_buffer(max(ks, 8))
        first, done = True, False
        while not done:
            n, done = bpfsys.lookup_batch(self.fd, keys, values, _BATCH, token, first)
            first = False
            kraw, vraw = keys.raw, values.raw
            for i in range(n):
                yield kraw[i * ks : (i + 1) * ks], vraw[i * vs : (i + 1) * vs]

    def _items_walked(self) -> Iterator[tuple[bytes, bytes]]:
        cur = ctypes.create_string_buffer(max(self.spec.key_size, 1))
        nxt = ctypes.create_string_buffer(max(self.spec.key_size, 1))
        prev = None
        while bpfsys.next_key(self.fd, prev, nxt):
            cur.raw = nxt.raw
            prev = cur
            if bpfsys.lookup(self.fd, cur, self._value):
                yield cur.raw[: self.spec.key_size], self._value.raw[: self.value_size]


@dataclass
class Loaded:
    bundle: Bundle
    tracefs: str
    maps: dict[str, Map] = field(default_factory=dict)
    programs: dict[str, int] = field(default_factory=dict)  # bcc name -> program fd
    links: dict[str, int] = field(default_factory=dict)  # what -> perf event / link fd
    legacy: list[str] = field(default_factory=list)  # our kprobe_events entries

    def close(self) -> None:
        # Each link's close can wait in the kernel for an RCU Tasks grace
        # period (an fentry trampoline's update; a tracepoint's perf event
        # on 6.18): closed on threads of their own, the waits overlap and
        # one grace period serves them all, instead of one after another.
        links = list(self.links.values())
        parallel = len(links) > 1
        if parallel:
            try:
                with ThreadPoolExecutor(len(links), "ksmtrace-detach") as pool:
                    list(pool.map(_close_quietly, links))
            except RuntimeError:  # refused before any ran: the interpreter is exiting
                parallel = False
        if not parallel:  # never twice: a closed fd's number may be another's by now
            for fd in links:
                _close_quietly(fd)
        for fd in self.programs.values():
            _close_quietly(fd)
        self.links.clear()
        self.programs.clear()
        for event in self.legacy:  # after their perf events are closed
            bpfsys.remove_legacy(self.tracefs, event)
        self.legacy.clear()
        for m in self.maps.values():
            _close_quietly(m.fd)
        self.maps.clear()

    # ------------------------------------------------------------ attaching
    def attach_auto(self, skip: tuple[str, ...] = ()) -> None:
        """Attaches what bcc would attach by name (tracepoints, raw
        tracepoints, fentry/fexit), except the programs in `skip`."""
        for name in self.programs:
            if name not in skip and _kind(name)[0] != "kprobe":
                self.attach(name)

    def attach(self, name: str) -> None:
        kind, target = _kind(name)
        fd = self.programs[name]
        if kind == "tracepoint":
            cat, _, event = target.partition(":")
            self.links[name] = bpfsys.attach_tracepoint(fd, self.tracefs, cat, event)
        elif kind == "raw":
            self.links[name] = bpfsys.raw_tracepoint_open(fd, target)
        elif kind in ("fentry", "fexit"):
            self.links[name] = bpfsys.raw_tracepoint_open(fd, None)
        else:
            raise KsmtraceError(f"{name} is a kprobe: attach it with attach_kprobe",
                                "report a bug")

    def detach(self, name: str) -> None:
        fd = self.links.pop(name, None)
        if fd is not None:
            os.close(fd)

    def attach_kprobe(self, program: str, function: str, ret: bool) -> None:
        fd = self.programs[program]
        key = f"{program}@{function}"
        if not ret:
            self.links[key] = bpfsys.attach_kprobe(fd, function)
            return
        event, tid = bpfsys.legacy_kretprobe(self.tracefs, function, KRETPROBE_MAXACTIVE)
        self.legacy.append(event)
        self.links[key] = bpfsys.attach_legacy(fd, tid, f"kretprobe on {function}")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _kind(name: str) -> tuple[str, str]:
    """How bcc's naming says a program attaches, and to what."""
    if name.startswith("tracepoint__"):
        cat, _, event = name[len("tracepoint__"):].partition("__")
        return "tracepoint", f"{cat}:{event}"
    if name.startswith("raw_tracepoint__"):
        return "raw", name[len("raw_tracepoint__"):]
    for prefix, kind in (("kfunc__", "fentry"), ("kretfunc__", "fexit")):
        if name.startswith(prefix):
            # bcc 0.27 and later name the object too: kfunc__vmlinux__<function>
            return kind, name[len(prefix):].removeprefix("vmlinux__")
    return "kprobe", name


# Shortenings that make every program's kernel name (15 characters at most:
# what bpftool, bpftop and /proc/<pid>/fdinfo show) unique and readable.
_SHORTER = (("try_to_", ""), ("remove_", "rm_"), ("_with_ksm_page", "_with"), ("_ksm_page", "_ksm"),
            ("_one_page", "_one"),
            ("_item", ""), ("_locking", ""))
_KIND_PREFIX = {"tracepoint": "", "raw": "", "fentry": "f_", "fexit": "x_", "kprobe": ""}


def kernel_name(name: str) -> str:
    """The kernel's name for the program bcc calls `name`: the event or the
    function, shortened, fentry f_ and fexit x_ (ksm_start_scan, ksm_merge_one,
    f_do_wp_page, x_do_wp_page, kp_cow)."""
    kind, target = _kind(name)
    short = target.partition(":")[2] if kind == "tracepoint" else target
    for a, b in _SHORTER:
        short = short.replace(a, b)
    return (_KIND_PREFIX[kind] + short)[:15]


def kernel_names(names: list[str]) -> dict[str, str]:
    out = {n: kernel_name(n) for n in names}
    if len(set(out.values())) != len(out):
        raise KsmtraceError(f"two BPF programs would share a kernel name: {sorted(out.values())}",
                            "report a bug (sources/loader.py _SHORTER)")
    return out


_PROG_TYPES = {"tracepoint": bpfsys.PROG_TRACEPOINT, "raw": bpfsys.PROG_RAW_TRACEPOINT,
               "fentry": bpfsys.PROG_TRACING, "fexit": bpfsys.PROG_TRACING,
               "kprobe": bpfsys.PROG_KPROBE}


def load(bundle: Bundle, tracefs: str, btf_root: str = "/") -> Loaded:
    """Creates the bundle's maps and loads its programs (nothing attached)."""
    out = Loaded(bundle, tracefs)
    try:
        ncpus = bpfsys.possible_cpus()
        fds: dict[int, int] = {}
        for spec in bundle.maps:
            fd = bpfsys.map_create(spec.type, spec.key_size, spec.value_size, spec.max_entries,
                                   spec.flags, spec.name)
            out.maps[spec.name] = Map(spec, fd, ncpus)
            fds[spec.fd] = fd
        btf: dict[str, int] | None = None
        names = kernel_names([p.name for p in bundle.programs])
        for p in bundle.programs:
            kind, target = _kind(p.name)
            attach_type = btf_id = 0
            if kind in ("fentry", "fexit"):
                btf = btf if btf is not None else symbols.btf_func_ids(
                    btf_root, {_kind(q.name)[1] for q in bundle.programs})
                if target not in btf:
                    raise KsmtraceError(f"no BTF record for {target}: fentry cannot attach",
                                        "use `--attach kprobe`; `ksmtrace doctor` explains")
                attach_type = bpfsys.TRACE_FENTRY if kind == "fentry" else bpfsys.TRACE_FEXIT
                btf_id = btf[target]
            out.programs[p.name] = bpfsys.prog_load(
                _PROG_TYPES[kind], relocate(p.insns, fds), names[p.name], bundle.license,
                bundle.kern_version, attach_type, btf_id)
    except BaseException:
        out.close()
        raise
    return out


class RingBuffer:
    """A BPF ring buffer map read in this process: the consumer position
    page mapped read-write, the producer page and the data (mapped twice
    in a row by the kernel, so a record never wraps) read-only. Records are
    8-byte aligned, each after an 8-byte header: length, busy bit 31,
    discard bit 30. The consumer position is written after the records are
    copied, so the kernel never reuses space still being read."""

    BUSY, DISCARD = 1 << 31, 1 << 30
    RELEASE_EVERY = 64  # records read one by one between two consumer-position updates

    def __init__(self, fd: int, size: int, record_size: int | None = None):
        """`record_size`: the size every record has (ksmtrace's events), if
        one does: runs of such records are then copied in bulk."""
        page = mmap.PAGESIZE
        cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            cons.close()
            raise
        self._over(cons, prod, size, record_size)
        self._poll = select.epoll()
        self._poll.register(fd, select.EPOLLIN)

    def _over(self, cons: mmap.mmap, prod: mmap.mmap, size: int, record_size: int | None
              ) -> None:
        """Reads the ring laid out in `cons` (the consumer position) and
        `prod` (the producer position's page, then the data twice)."""
        self.size, self.mask = size, size - 1
        self._cons, self._prod, self._page = cons, prod, mmap.PAGESIZE
        self._data = memoryview(prod)
        # positions are read and written as native u64s, one load or store
        # each, as the kernel reads and writes them; written through struct
        # ("<Q"), the kernel found the ring full with the reader far behind
        self._cpos = memoryview(cons).cast("Q")
        self._ppos = self._data.cast("Q")
        self._len = self._data.cast("I")  # header length words (at 8-byte offsets)
        self._record = record_size if record_size and record_size % 8 == 0 else None

    def poll(self, timeout_s: float) -> None:
        """Waits for a wake-up, at most `timeout_s`."""
        self._poll.poll(timeout_s)

    def consume(self, out: bytearray) -> int:
        """Appends to `out` the records written so far, and those written
        while these are read, up to one buffer's worth (the caller's ticks go
        on under any stream); returns how many. Space goes back to the kernel
        as it is read, so a burst longer than the buffer keeps flowing."""
        cons = start = self._cpos[0]
        n = 0
        while (cons - start < self.size
               and cons < (prod := self._ppos[0])):
            got, cons = self._bulk(cons, prod, out) if self._record else (0, cons)
            if not got:
                got, cons = self._one_by_one(cons, prod, out)
            n += got
            self._cpos[0] = cons
            if not got:
                break  # a record being written: the next call takes it
        return n

    def _bulk(self, cons: int, prod: int, out: bytearray) -> tuple[int, int]:
        """The leading run of committed records of the fixed size, copied
        without their headers by strided copies of 8-byte words."""
        words = self._record // 8
        stride = words + 1  # the 8-byte header, then the record
        at = self._page + (cons & self.mask)
        count = (prod - cons) // (stride * 8)
        if not count:
            return 0, cons
        header = struct.pack("<Q", self._record)[:4]  # length; busy and discard bits clear
        # every view is released on every path (an interrupt included): an
        # unreleased one would keep the mmap from closing, or `out` from growing
        with self._data[at : at + count * stride * 8] as region:
            for b in range(4):  # each byte of every header's length word, compared at C speed
                if region[b :: stride * 8].tobytes() != header[b : b + 1] * count:
                    return 0, cons
            old = len(out)
            out.extend(bytes(count * self._record))
            with region.cast("Q") as src, memoryview(out) as whole, whole[old:] as tail, \
                    tail.cast("Q") as dst:
                for k in range(words):
                    dst[k::words] = src[k + 1 :: stride]
        return count, cons + count * stride * 8

    def _one_by_one(self, cons: int, prod: int, out: bytearray) -> tuple[int, int]:
        data, base, n = self._prod, self._page, 0
        while cons < prod and n < self.RELEASE_EVERY:
            at = base + (cons & self.mask)
            length = self._len[at >> 2]
            if length & self.BUSY:
                break
            size = length & ~(self.BUSY | self.DISCARD)
            if not length & self.DISCARD:
                out += data[at + 8 : at + 8 + size]
            n += 1
            cons += (size + 8 + 7) // 8 * 8
        return n, cons

    def close(self) -> None:
        self._poll.close()
        for view in (self._len, self._ppos, self._cpos, self._data):
            view.release()
        self._prod.close()
        self._cons.close()


def stale_kprobes(tracefs: str | None) -> list[str]:
    """kprobe_events entries a ksmtrace process made and did not remove
    (it was killed): named ksmtrace_<pid>_<function>, pid no longer alive."""
    if not tracefs:
        return []
    try:
        text = (Path(tracefs) / "kprobe_events").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        m = re.match(r"[pr]\d*:kprobes/(ksmtrace_(\d+)_\w+)\s", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            out.append(m.group(1))
    return out


def remove_stale(tracefs: str | None) -> list[str]:
    """Removes `stale_kprobes`; returns what it removed."""
    gone = stale_kprobes(tracefs)
    for event in gone:
        bpfsys.remove_legacy(tracefs or "", event)
    return gone
