"""A workload child: owns its region, obeys one JSON command per line on
stdin; and `ChildHandle`, the parent's side of that protocol."""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ksmtrace.kernel.procfs import PAGE_SIZE
from ksmtrace.spawn import python_argv, reap
from ksmtrace.workload.contents import cow_marker, page_content
from ksmtrace.workload.model import PAGE_STATES, WorkloadError, WorkloadSpec

PR_SET_PDEATHSIG = 1
PR_SET_MEMORY_MERGE = 67  # 6.4+: every present and future VMA of the mm is mergeable


# ---------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------


# userfaultfd (x86_64 syscall number; ioctls from linux/userfaultfd.h)
PROT_NONE = 0
NR_USERFAULTFD = 323
UFFD_API = 0xAA
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_WRITEPROTECT = 0xC018AA06  # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
UFFDIO_REGISTER_MODE_WP = 1 << 1


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.syscall.restype = ctypes.c_long
    return libc


def _runs(pages: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of consecutive pages."""
    it = iter(sorted(pages))
    start = prev = next(it, None)
    if start is None:
        return
    for p in it:
        if p != prev + 1:
            yield start, prev - start + 1
            start = p
        prev = p
    yield start, prev - start + 1


def _prctl(libc: ctypes.CDLL, option: int, arg: int) -> None:
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}, {arg}): {os.strerror(e)}")


class _Child:
    """The child side: owns the region, obeys one JSON command per line."""

    def __init__(self, cfg: dict[str, Any]):
        self.spec = WorkloadSpec(**cfg["spec"])
        self.index: int = cfg["index"]
        self.nonce = bytes.fromhex(cfg["nonce"])
        self.libc = _libc()
        self.region: mmap.mmap | None = None
        self.addr = 0
        self.protnone: set[int] = set()
        self._mem: int | None = None  # /proc/self/mem, for writes to PROT_NONE pages
        self._uffd: int | None = None

    def setup(self) -> None:
        spec = self.spec
        size = spec.region_pages * PAGE_SIZE
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # THP pages are not merged page by page (and Debian defaults THP to
        # always): force 4 KiB pages before the first touch.
        m.madvise(mmap.MADV_NOHUGEPAGE)
        buf = ctypes.c_char.from_buffer(m)
        self.addr = ctypes.addressof(buf)
        del buf  # an exported buffer would pin the mmap
        self.region = m
        if spec.register == "prctl":
            # After the mmap, so the region is mergeable from the prctl on and
            # `_unregister_others` leaves it so. Before it, the mm would have
            # no mergeable VMA between the two calls, and ksmd drops such an
            # mm from KSM, clearing MMF_VM_MERGE_ANY: nothing mapped later
            # would be mergeable.
            try:
                _prctl(self.libc, PR_SET_MEMORY_MERGE, 1)
            except OSError as e:
                raise RuntimeError(f"PR_SET_MEMORY_MERGE (Linux 6.4+) failed: {e}") from e
            self._unregister_others()
        # Page by page, so each content is a short-lived 4 KiB object: no big
        # buffers (malloc'd by mmap) holding copies of our contents.
        for i in range(spec.region_pages):
            m[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page_content(spec, self.nonce, self.index, i)
        if spec.register == "madvise":
            m.madvise(mmap.MADV_MERGEABLE)
        self._unregister_others()

    def _unregister_others(self) -> None:
        """prctl makes every VMA mergeable, the interpreter's heap and stacks
        too: pages there (zeroed, or stale copies of our contents) would merge
        and spoil the exact figures. Only the region stays mergeable. Done
        after every command, since new mappings inherit the flag."""
        if self.spec.register != "prctl":
            return
        with open("/proc/self/maps") as f:
            ranges = [line.split(None, 1)[0].split("-") for line in f]
        for lo, hi in ranges:
            start, end = int(lo, 16), int(hi, 16)
            if self.region is not None and start == self.addr:
                continue
            # EINVAL for [vsyscall] and friends: nothing to unregister there.
            self.libc.madvise(start, end - start, mmap.MADV_UNMERGEABLE)

    def _put(self, page: int, data: bytes) -> None:
        """Write at the start of `page`: a store, or for a PROT_NONE page a
        FOLL_FORCE write through /proc/self/mem (as a debugger's would be),
        which takes the same copy-on-write fault."""
        assert self.region is not None
        if page in self.protnone:
            if self._mem is None:
                self._mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
            if os.pwrite(self._mem, data, self.addr + page * PAGE_SIZE) != len(data):
                raise OSError(f"short write to PROT_NONE page {page} via /proc/self/mem")
        else:
            self.region[page * PAGE_SIZE : page * PAGE_SIZE + len(data)] = data

    def write(self, pages: list[int], generation: int) -> int:
        pid = os.getpid()
        for i in pages:
            self._put(i, cow_marker(pid, i, generation))
        return len(pages)

    def restore(self, pages: list[int]) -> int:
        for i in pages:
            self._put(i, page_content(self.spec, self.nonce, self.index, i))
        return len(pages)

    def set_state(self, state: str, pages: list[int]) -> int:
        assert self.region is not None
        for start, n in _runs(pages):
            if state == "protnone":
                if self.libc.mprotect(self.addr + start * PAGE_SIZE, n * PAGE_SIZE, PROT_NONE) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"mprotect(PROT_NONE): {os.strerror(e)}")
            elif state == "uffd_wp":
                uffd = self._uffd_wp_registered()
                # struct uffdio_writeprotect { range { start, len }, mode = MODE_WP }
                arg = bytearray(struct.pack("QQQ", self.addr + start * PAGE_SIZE, n * PAGE_SIZE, 1))
                fcntl.ioctl(uffd, UFFDIO_WRITEPROTECT, arg)
            elif state == "discard":
                self.region.madvise(mmap.MADV_DONTNEED, start * PAGE_SIZE, n * PAGE_SIZE)
            else:
                raise ValueError(f"unknown page state {state!r}: one of {', '.join(PAGE_STATES)}")
        if state == "protnone":
            self.protnone.update(pages)
        return len(pages)

    def _uffd_wp_registered(self) -> int:
        """A userfaultfd with the whole region registered for write-protect
        faults (no handler: nothing may write a protected page)."""
        if self._uffd is not None:
            return self._uffd
        assert self.region is not None
        fd = self.libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"userfaultfd: {os.strerror(e)} (CONFIG_USERFAULTFD?)")
        try:
            api = bytearray(struct.pack("QQQ", UFFD_API, UFFD_FEATURE_PAGEFAULT_FLAG_WP, 0))
            fcntl.ioctl(fd, UFFDIO_API, api)
            if not struct.unpack("QQQ", api)[1] & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
                raise OSError("this kernel's userfaultfd cannot write-protect anonymous pages")
            mode = UFFDIO_REGISTER_MODE_WP
            reg = bytearray(struct.pack("QQQQ", self.addr, len(self.region), mode, 0))
            fcntl.ioctl(fd, UFFDIO_REGISTER, reg)
        except BaseException:
            os.close(fd)
            raise
        self._uffd = fd
        return fd

    def unmerge(self) -> None:
        assert self.region is not None
        if self.spec.register == "prctl":
            _prctl(self.libc, PR_SET_MEMORY_MERGE, 0)  # unmerges and clears every VMA
        else:
            self.region.madvise(mmap.MADV_UNMERGEABLE)

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg["cmd"]
        if cmd == "setup":
            self.setup()
            return {"ok": cmd, "addr": self.addr}
        if cmd == "write":
            n = self.write(msg["pages"], msg["generation"])
        elif cmd == "restore":
            n = self.restore(msg["pages"])
        elif cmd == "unmerge":
            self.unmerge()
            n = 0
        elif cmd == "state":
            n = self.set_state(msg["state"], msg["pages"])
        else:
            raise ValueError(f"unknown command {cmd!r}")
        self._unregister_others()
        return {"ok": cmd, "n": n}


def child_main(arg: str) -> int:
    cfg = json.loads(arg)
    libc = _libc()
    # Die with the parent (a SIGKILLed parent runs no cleanup). The signal is
    # tied to the parent *thread* that started us; if it is already gone we
    # were reparented before the prctl took effect.
    _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent"]:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    child = _Child(cfg)
    reply({"ok": "hello", "pid": os.getpid()})
    for line in sys.stdin.buffer:
        msg = json.loads(line)
        if msg.get("cmd") == "exit":
            break
        try:
            reply(child.handle(msg))
        except Exception as e:  # reported to the parent, which raises it
            reply({"error": f"{type(e).__name__}: {e}"})
    return 0



class ChildHandle:
    """Parent side of one child: a Popen and a line protocol with timeouts."""

    def __init__(self, index: int, cfg: dict[str, Any]):
        self.index = index
        self.proc = subprocess.Popen(
            python_argv("ksmtrace.workload", "--child", json.dumps(cfg)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self.pid = self.proc.pid
        self.addr = 0  # the region's start in the child, once set up
        self._buf = b""

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None

    def recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkloadError(f"workload child {self.pid} did not answer in {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self._died()
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise WorkloadError(f"workload child {self.pid}: {msg['error']}")
        return msg

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(msg)
        return self.recv(timeout)

    def _died(self) -> WorkloadError:
        rc = self.proc.poll()
        return WorkloadError(
            f"workload child {self.pid} exited unexpectedly"
            + (f" (exit status {rc})" if rc is not None else "")
        )

    def end(self, grace: float) -> None:
        """Ask it to exit (closing stdin is enough), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            reap(self.proc, grace, sig=None)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
