"""ksmtrace's own BPF cost: the kernel's run-time statistics of our programs.

The kernel counts run time and runs per BPF program only while BPF stats are
enabled (a global switch, off by default because it costs two clock reads per
run). `BpfStats` turns them on for as long as it is open, the way that
cannot outlive us: bpf(BPF_ENABLE_STATS) returns a file descriptor, and stats
stay on while any such descriptor is open, so a crash, SIGKILL included,
turns them off again. Kernels before 5.8 lack that command; there it sets
the sysctl kernel.bpf_stats_enabled and puts the old value back on close and
at interpreter exit.

`read_program(fd)` reads one program's figures from /proc/self/fdinfo, the
same numbers `bpftool prog show` prints (run_time_ns, run_cnt).
"""

from __future__ import annotations

import atexit
import ctypes
import os

from ksmtrace.model import ProgramCost

BPF_ENABLE_STATS = 32  # enum bpf_cmd
BPF_STATS_RUN_TIME = 0
SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


def enable_stats_fd() -> tuple[int, str | None]:
    """(fd, None) with stats on while fd is open, or (-1, why not)."""
    from ksmtrace.errors import KsmtraceError
    from ksmtrace.sources.bpfsys import bpf

    attr = (ctypes.c_uint32 * 30)()  # union bpf_attr, zeroed: enable_stats.type = RUN_TIME
    attr[0] = BPF_STATS_RUN_TIME
    try:
        fd, err = bpf(BPF_ENABLE_STATS, attr)
    except KsmtraceError as e:  # no bpf syscall number for this architecture
        return -1, e.message
    if fd < 0:
        return -1, f"bpf(BPF_ENABLE_STATS): {os.strerror(err)}"
    return fd, None


class BpfStats:
    """Kernel BPF run-time statistics, on while open. `how` says which way
    ("fd", "sysctl", or None when neither worked; `error` says why)."""

    def __init__(self, sysctl: str = SYSCTL):
        self.sysctl = sysctl
        self.fd = -1
        self.how: str | None = None
        self.error: str | None = None
        self._restore: str | None = None

    def open(self) -> BpfStats:
        self.fd, why = enable_stats_fd()
        if self.fd >= 0:
            self.how = "fd"
            return self
        try:  # kernels < 5.8: the global sysctl, restored on every exit path we control
            with open(self.sysctl) as f:
                old = f.read().strip()
            if old != "1":
                with open(self.sysctl, "w") as f:
                    f.write("1")
                self._restore = old
                atexit.register(self.close)
            self.how = "sysctl"
        except OSError as e:
            self.error = f"{why}; {self.sysctl}: {e.strerror}"
        return self

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._restore is not None:
            old, self._restore = self._restore, None
            try:
                with open(self.sysctl, "w") as f:
                    f.write(old)
            except OSError:
                pass
            atexit.unregister(self.close)

    def __enter__(self) -> BpfStats:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_fdinfo(fd: int, pid: str = "self") -> dict[str, int]:
    """The numeric fields of /proc/<pid>/fdinfo/<fd> of a BPF program."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            try:
                out[key.strip()] = int(value.strip())
            except ValueError:
                pass
    return out


def program_name(bcc_name: str) -> str:
    """bcc's function name, said the way a person looks for it:
    tracepoint__ksm__ksm_enter -> ksm:ksm_enter, raw_tracepoint__ksm_exit ->
    raw:ksm_exit; others as they are."""
    if bcc_name.startswith("raw_tracepoint__"):
        return "raw:" + bcc_name[len("raw_tracepoint__"):]
    if bcc_name.startswith("tracepoint__"):
        cat, _, event = bcc_name[len("tracepoint__"):].partition("__")
        return f"{cat}:{event}"
    return bcc_name


def read_program(name: str, fd: int) -> ProgramCost:
    info = read_fdinfo(fd)
    return ProgramCost(name, info.get("run_time_ns", 0), info.get("run_cnt", 0))
