"""Per-process and global KSM figures from procfs: `/proc/<pid>/ksm_stat`,
`ksm_merging_pages`, `smaps_rollup`, `comm`, `cgroup`, and `/proc/vmstat`.

A process that exits between listing and reading is normal, not an error:
every per-pid reader returns `None` for it. So does a process we may not read
(`ksm_stat` is mode 0400, owned by the process's user): as non-root, other
users' processes are simply not visible here, and nothing is printed.

What ksm_stat prints (fs/proc/base.c, proc_pid_ksm_stat; versions from the
upstream history, approximate), in this order on 6.18:
  6.1    ksm_rmap_items
  ~6.10  + ksm_zero_pages (signed)
  ~6.4   + ksm_merging_pages, ksm_process_profit (signed, bytes)
  ~6.15  + "ksm_merge_any: yes|no", "ksm_mergeable: yes|no" (note the colon)
A kernel thread has no mm: its ksm_stat is empty (and smaps_rollup fails
with ESRCH).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

# ENOENT/ESRCH: the process exited; EACCES/EPERM: not ours to read. Both mean
# "no figure for this pid", never a crash in a sampling loop.
_GONE_OR_HIDDEN = {errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM, errno.ENOTDIR}

_INT_FIELDS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")
_BOOL_FIELDS = ("ksm_merge_any", "ksm_mergeable")


def _proc(root: str | os.PathLike) -> Path:
    return Path(root) / "proc"


def _read_bytes(path: Path, limit: int | None = None) -> bytes | None:
    """Whole file (or its first `limit` bytes), or None when the process has
    gone or is not readable by us."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _GONE_OR_HIDDEN:
            return None
        raise
    try:
        chunks = []
        left = limit if limit is not None else -1
        while left:
            chunk = os.read(fd, 65536 if left < 0 else min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk) if left > 0 else 0
        return b"".join(chunks)
    except OSError as e:
        # ESRCH on read: the task exited after open.
        if e.errno in _GONE_OR_HIDDEN:
            return None
        raise
    finally:
        os.close(fd)


def _read_text(path: Path) -> str | None:
    data = _read_bytes(path)
    return None if data is None else data.decode("utf-8", "replace")


@dataclass(frozen=True)
class KsmStat:
    """One reading of /proc/<pid>/ksm_stat. `None`: this kernel does not print
    the line (or the process is a kernel thread, which prints nothing)."""

    ksm_rmap_items: int | None = None
    ksm_zero_pages: int | None = None
    ksm_merging_pages: int | None = None
    ksm_process_profit: int | None = None  # bytes, signed: rmap_items cost memory
    ksm_merge_any: bool | None = None  # prctl(PR_SET_MEMORY_MERGE) on the whole mm
    ksm_mergeable: bool | None = None  # some VMA has VM_MERGEABLE
    # Lines this reader does not know (a newer kernel): kept, not dropped.
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def known_to_ksm(self) -> bool:
        """KSM has this process on its list or has scanned/merged its pages."""
        return bool(
            self.ksm_mergeable
            or self.ksm_merge_any
            or (self.ksm_rmap_items or 0) > 0
            or (self.ksm_merging_pages or 0) > 0
            or (self.ksm_zero_pages or 0) > 0
        )


def parse_ksm_stat(text: str) -> KsmStat:
    """Parse ksm_stat text: `key value` lines and (6.14+) `key: yes|no` lines."""
    values: dict[str, int | bool] = {}
    extra: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        key = key.rstrip(":")
        value = value.strip()
        if not key:
            continue
        if key in _INT_FIELDS:
            try:
                values[key] = int(value)
                continue
            except ValueError:
                pass
        elif key in _BOOL_FIELDS and value in ("yes", "no"):
            values[key] = value == "yes"
            continue
        extra[key] = value
    return KsmStat(**values, extra=extra)  # type: ignore[arg-type]


def read_ksm_stat(pid: int, root: str | os.PathLike = "/") -> KsmStat | None:
    """ksm_stat of `pid`; None if it has exited or is not readable by us.
    Where ksm_stat lacks ksm_merging_pages (5.19-6.3, e.g. Debian 12's 6.1),
    it is filled in from /proc/<pid>/ksm_merging_pages, the same mm counter."""
    text = _read_text(_proc(root) / str(pid) / "ksm_stat")
    if text is None:
        return None
    stat = parse_ksm_stat(text)
    if stat.ksm_merging_pages is None:
        merging = read_ksm_merging_pages(pid, root)
        if merging is not None:
            stat = replace(stat, ksm_merging_pages=merging)
    return stat


def read_ksm_merging_pages(pid: int, root: str | os.PathLike = "/") -> int | None:
    """/proc/<pid>/ksm_merging_pages (5.19+): pages of this process mapped to a
    KSM page. None if gone, unreadable, absent, or empty (kernel thread)."""
    text = _read_text(_proc(root) / str(pid) / "ksm_merging_pages")
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def read_vmstat(root: str | os.PathLike = "/") -> dict[str, int]:
    """Every counter of /proc/vmstat."""
    out: dict[str, int] = {}
    with open(_proc(root) / "vmstat") as f:
        for line in f:
            name, _, value = line.partition(" ")
            try:
                out[name] = int(value)
            except ValueError:
                continue
    return out


@dataclass(frozen=True)
class KsmVmstat:
    """KSM's global event counters in /proc/vmstat; None when not built in."""

    cow_ksm: int | None  # copy-on-write breaks of KSM pages (~6.4+)
    ksm_swpin_copy: int | None  # KSM pages copied on swap-in (needs CONFIG_SWAP)


def read_ksm_vmstat(root: str | os.PathLike = "/") -> KsmVmstat:
    v = read_vmstat(root)
    return KsmVmstat(cow_ksm=v.get("cow_ksm"), ksm_swpin_copy=v.get("ksm_swpin_copy"))


def read_mem_available(root: str | os.PathLike = "/") -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where it is missing."""
    text = _read_text(_proc(root) / "meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def read_smaps_rollup_ksm_bytes(pid: int, root: str | os.PathLike = "/") -> int | None:
    """The `KSM:` line of smaps_rollup (~6.7+), in bytes: resident KSM pages of
    this process (the shared zero page not included). None if the process is
    gone or unreadable, or the kernel has no such line."""
    text = _read_text(_proc(root) / str(pid) / "smaps_rollup")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("KSM:"):
            fields = line.split()
            unit = fields[2] if len(fields) > 2 else "kB"
            return int(fields[1]) * (1024 if unit == "kB" else 1)
    return None


def read_comm(pid: int, root: str | os.PathLike = "/") -> str | None:
    text = _read_text(_proc(root) / str(pid) / "comm")
    return None if text is None else text.rstrip("\n")


def parse_cgroup(text: str) -> str:
    """The cgroup v2 path from /proc/<pid>/cgroup text (the `0::` line);
    "/" when the process is in no v2 hierarchy (pure cgroup v1 hosts)."""
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            return path or "/"
    return "/"


CMDLINE_MAX = 1 << 16  # bytes: the workload resolver looks at no more


def read_cmdline(pid: int, root: str | os.PathLike = "/") -> bytes | None:
    """/proc/<pid>/cmdline as the kernel gives it (NUL-separated, possibly
    rewritten by the process), its first CMDLINE_MAX bytes; None once the
    process has exited."""
    return _read_bytes(_proc(root) / str(pid) / "cmdline", CMDLINE_MAX)


def read_cgroup(pid: int, root: str | os.PathLike = "/") -> str | None:
    text = _read_text(_proc(root) / str(pid) / "cgroup")
    return None if text is None else parse_cgroup(text)


def find_ksmd(root: str | os.PathLike = "/") -> int | None:
    """The pid of the ksmd kernel thread (a child of kthreadd, pid 2), or None
    on a kernel without KSM."""
    proc = _proc(root)
    for pid in list_pids(root):
        if read_comm(pid, root) == "ksmd":
            st = _read_text(proc / str(pid) / "stat")
            if st and st.rpartition(")")[2].split()[1] == "2":  # ppid
                return pid
    return None


def read_cpu_ticks(pid: int, root: str | os.PathLike = "/") -> int | None:
    """utime + stime of a process, in clock ticks (USER_HZ), from
    /proc/<pid>/stat; None when it is gone."""
    st = _read_text(_proc(root) / str(pid) / "stat")
    if not st:
        return None
    fields = st.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # here, not in pagemap: no numpy for it


def list_pids(root: str | os.PathLike = "/") -> list[int]:
    """Thread-group ids in /proc (threads are not listed there), sorted."""
    return sorted(int(name) for name in os.listdir(_proc(root)) if name.isdigit())


@dataclass(frozen=True)
class KsmProcess:
    pid: int
    comm: str
    cgroup: str
    stat: KsmStat


def ksm_processes(root: str | os.PathLike = "/") -> list[KsmProcess]:
    """Every process KSM knows: mergeable (madvise or prctl) or with rmap items,
    merged or zero pages. One ksm_stat read per pid, then comm and cgroup only
    for the few that qualify. Processes that exit mid-scan are skipped.

    On kernels whose ksm_stat lacks ksm_merging_pages (5.19-6.3) it is filled
    in from /proc/<pid>/ksm_merging_pages, the same mm counter.
    """
    proc = _proc(root)
    out: list[KsmProcess] = []
    for pid in list_pids(root):
        raw = _read_bytes(proc / str(pid) / "ksm_stat")
        if not raw:  # gone, unreadable, or a kernel thread (empty)
            continue
        # Cheap pre-filter: most processes print only zeros and "no".
        if b"yes" not in raw and not any(c in raw for c in b"123456789"):
            continue
        stat = parse_ksm_stat(raw.decode("ascii", "replace"))
        if stat.ksm_merging_pages is None:
            merging = read_ksm_merging_pages(pid, root)
            if merging is not None:
                stat = replace(stat, ksm_merging_pages=merging)
        if not stat.known_to_ksm:
            continue
        comm = read_comm(pid, root)
        cgroup = read_cgroup(pid, root)
        if comm is None or cgroup is None:
            continue  # exited between the reads
        out.append(KsmProcess(pid=pid, comm=comm, cgroup=cgroup, stat=stat))
    return out
