"""The bpf(2) and perf_event_open(2) calls the agent makes itself, through
ctypes: creating maps, loading programs, attaching them, and reading maps.
No bcc and no libbpf: the agent never maps LLVM (bcc compiles in a
short-lived child, sources/bundle.py).

Every object is a file descriptor owned by this process. Closing it
detaches or frees it, so every exit, SIGKILL included, leaves nothing
attached, except a legacy kretprobe's kprobe_events entry (see
`legacy_kretprobe`), which is named after our pid for `doctor` to find.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from pathlib import Path

from ksmtrace.errors import KsmtraceError

_SYSCALLS = {  # (bpf, perf_event_open)
    "x86_64": (321, 298), "aarch64": (280, 241), "riscv64": (280, 241),
    "s390x": (351, 331), "ppc64le": (361, 319),
}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# enum bpf_cmd
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, RAW_TRACEPOINT_OPEN, MAP_LOOKUP_BATCH = 5, 17, 24
# enum bpf_prog_type / bpf_attach_type
PROG_KPROBE, PROG_TRACEPOINT, PROG_RAW_TRACEPOINT, PROG_TRACING = 2, 5, 17, 26
TRACE_FENTRY, TRACE_FEXIT = 24, 25
# enum bpf_map_type
MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_RINGBUF = 1, 2, 6, 9, 27
MAP_TYPES = frozenset({MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_RINGBUF})
# perf
PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
PERF_ATTR_SIZE = 128
LOG_SIZE = 1 << 20  # verifier log on a failed load


class BpfError(KsmtraceError):
    """A bpf() or perf_event_open() call failed; `errno` is the reason."""

    def __init__(self, what: str, err: int, hint: str = "", log: str = ""):
        super().__init__(f"{what}: {os.strerror(err)}" + (f"\n{log}" if log else ""),
                         hint or "run `ksmtrace doctor` to see what this kernel allows")
        self.errno = err


def _numbers() -> tuple[int, int]:
    nrs = _SYSCALLS.get(platform.machine())
    if nrs is None:
        raise KsmtraceError(f"no bpf syscall number known for {platform.machine()}",
                            "use `--sysfs-only` on this architecture")
    return nrs


def bpf(cmd: int, attr: ctypes.Structure | ctypes.Array) -> tuple[int, int]:
    """bpf(cmd, attr): (result, errno); the result is negative on failure."""
    r = _libc.syscall(_numbers()[0], cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return int(r), (ctypes.get_errno() if r < 0 else 0)


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    r, err = bpf(cmd, attr)
    if r < 0:
        raise BpfError(what, err)
    return r


def _found(cmd: int, attr: ctypes.Structure, what: str) -> bool:
    """A map command that may find nothing: False on ENOENT."""
    r, err = bpf(cmd, attr)
    if r < 0 and err != errno.ENOENT:
        raise BpfError(what, err)
    return r >= 0


class _MapCreate(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


class _Elem(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _Batch(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ProgLoad(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
                ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32)]


class _RawTpOpen(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32)]


def obj_name(name: str) -> bytes:
    """A kernel object name: at most 15 characters of [A-Za-z0-9_.]."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_.") else "_"
                   for c in name)[:15].encode()


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int, name: str) -> int:
    attr = _MapCreate(map_type, key_size, value_size, max_entries, flags, 0, 0,
                      obj_name(name))
    return _bpf(MAP_CREATE, attr, f"creating BPF map {name}")


def _addr(buf: ctypes.Array | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def lookup(fd: int, key: ctypes.Array, value: ctypes.Array) -> bool:
    """Fills `value`; False when the key is not there."""
    return _found(MAP_LOOKUP_ELEM, _Elem(fd, 0, _addr(key), _addr(value), 0),
                  "reading a BPF map")


def update(fd: int, key: ctypes.Array, value: ctypes.Array) -> None:
    _bpf(MAP_UPDATE_ELEM, _Elem(fd, 0, _addr(key), _addr(value), 0), "writing a BPF map")


def delete(fd: int, key: ctypes.Array) -> bool:
    return _found(MAP_DELETE_ELEM, _Elem(fd, 0, _addr(key), 0, 0), "deleting from a BPF map")


def next_key(fd: int, key: ctypes.Array | None, out: ctypes.Array) -> bool:
    """The key after `key` (the first with None) into `out`; False at the end."""
    return _found(MAP_GET_NEXT_KEY, _Elem(fd, 0, _addr(key), _addr(out), 0),
                  "walking a BPF map")


def lookup_batch(fd: int, keys: ctypes.Array, values: ctypes.Array, count: int,
                 token: ctypes.Array, first: bool) -> tuple[int, bool]:
    """One BPF_MAP_LOOKUP_BATCH (hash maps, 5.6+): (entries read into
    `keys`/`values`, whether the map is done). `token` carries the position
    from call to call."""
    attr = _Batch(0 if first else _addr(token), _addr(token), _addr(keys), _addr(values),
                  count, fd, 0, 0)
    more = _found(MAP_LOOKUP_BATCH, attr, "reading a BPF map in batches")
    return attr.count, not more  # ENOENT: this batch is the last (count may be > 0)


def prog_load(prog_type: int, insns: bytes, name: str, license_: bytes, kern_version: int,
              attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """Loads a program; on refusal, raises BpfError with the verifier's log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license_)
    attr = _ProgLoad(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
                     license=ctypes.addressof(lic), kern_version=kern_version,
                     prog_name=obj_name(name), expected_attach_type=attach_type,
                     attach_btf_id=attach_btf_id)
    r, err = bpf(PROG_LOAD, attr)
    if r >= 0:
        return r
    log = ctypes.create_string_buffer(LOG_SIZE)
    attr.log_level, attr.log_size, attr.log_buf = 1, LOG_SIZE, ctypes.addressof(log)
    r, _ = bpf(PROG_LOAD, attr)
    if r >= 0:  # loaded with the log on: keep it
        return r
    text = log.value.decode(errors="replace").strip().splitlines()
    raise BpfError(f"the kernel refused BPF program {name}", err,
                   log="\n".join(text[-20:]))


def raw_tracepoint_open(prog_fd: int, name: str | None) -> int:
    """Attaches a raw tracepoint program to `name`, or a tracing (fentry or
    fexit) program to the function it was loaded for (name None)."""
    tp = ctypes.create_string_buffer(name.encode()) if name else None
    attr = _RawTpOpen(_addr(tp), prog_fd)
    return _bpf(RAW_TRACEPOINT_OPEN, attr, f"attaching to {name or 'a kernel function'}")


def _perf_event_open(attr: bytes, what: str) -> int:
    buf = ctypes.create_string_buffer(attr, PERF_ATTR_SIZE)
    r = _libc.syscall(_numbers()[1], buf, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if r < 0:
        raise BpfError(what, ctypes.get_errno())
    return int(r)


def _perf_attr(type_: int, config: int, config1: int = 0) -> bytes:
    attr = bytearray(PERF_ATTR_SIZE)
    struct.pack_into("<IIQQQ", attr, 0, type_, PERF_ATTR_SIZE, config, 1, PERF_SAMPLE_RAW)
    struct.pack_into("<I", attr, 48, 1)  # wakeup_events
    struct.pack_into("<Q", attr, 56, config1)
    return bytes(attr)


def attach_perf_event(prog_fd: int, event_fd: int, what: str) -> int:
    """Runs `prog_fd` on a perf event; returns the event's fd (close: detach)."""
    import fcntl

    try:
        fcntl.ioctl(event_fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(event_fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as e:
        os.close(event_fd)
        raise BpfError(what, e.errno or 0) from e
    return event_fd


def tracepoint_id(tracefs: str, category: str, event: str) -> int:
    path = Path(tracefs) / "events" / category / event / "id"
    try:
        return int(path.read_text())
    except (OSError, ValueError) as e:
        raise KsmtraceError(f"tracepoint {category}:{event} has no readable id ({path})",
                            "run `ksmtrace doctor`") from e


def attach_tracepoint(prog_fd: int, tracefs: str, category: str, event: str) -> int:
    tid = tracepoint_id(tracefs, category, event)
    fd = _perf_event_open(_perf_attr(PERF_TYPE_TRACEPOINT, tid),
                          f"opening tracepoint {category}:{event}")
    return attach_perf_event(prog_fd, fd, f"attaching to tracepoint {category}:{event}")


KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")


def attach_kprobe(prog_fd: int, function: str) -> int:
    """An entry kprobe through the kprobe PMU (no kprobe_events entry)."""
    pmu = int((KPROBE_PMU / "type").read_text())
    name = ctypes.create_string_buffer(function.encode())
    fd = _perf_event_open(_perf_attr(pmu, 0, ctypes.addressof(name)), f"kprobe on {function}")
    return attach_perf_event(prog_fd, fd, f"attaching a kprobe to {function}")


def legacy_kretprobe(tracefs: str, function: str, maxactive: int) -> tuple[str, int]:
    """A kretprobe with `maxactive` instances (the PMU cannot set it): a
    kprobe_events entry named ksmtrace_<pid>_<function>. Returns (its name,
    its tracepoint id); remove it with `remove_legacy`."""
    event = f"ksmtrace_{os.getpid()}_{function}"
    _kprobe_events(tracefs, f"r{maxactive}:kprobes/{event} {function}\n")
    return event, tracepoint_id(tracefs, "kprobes", event)


def _kprobe_events(tracefs: str, line: str) -> None:
    """One command to kprobe_events: appended, never truncated (O_TRUNC would
    remove every probe on the system), and without the seek to the end that
    Python's "a" mode makes, which tracefs refuses."""
    fd = os.open(Path(tracefs) / "kprobe_events", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def attach_legacy(prog_fd: int, tid: int, what: str) -> int:
    fd = _perf_event_open(_perf_attr(PERF_TYPE_TRACEPOINT, tid), what)
    return attach_perf_event(prog_fd, fd, what)


def remove_legacy(tracefs: str, event: str) -> None:
    try:
        _kprobe_events(tracefs, f"-:kprobes/{event}\n")
    except OSError:
        pass  # already gone


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """Per-CPU map values hold one slot per possible CPU ("0-3,8-11")."""
    n = 0
    for part in Path(path).read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n
