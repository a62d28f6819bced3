"""Counter polling: KSM sysfs, /proc/vmstat and per-process ksm_stat.

Needs no BPF and no root (ksm_stat of other users' processes needs root;
those processes are then missing, and the snapshot says so). It is also the
part of the live source that samples counters each interval.
"""

from __future__ import annotations

import os
import time

from ksmtrace.kernel import procfs, sysfs
from ksmtrace.model import CounterSample, ProcessSample


def sample(
    root: str | os.PathLike = "/", pids: list[int] | None = None, all_processes: bool = True
) -> CounterSample:
    """Read the counters once. `pids` limits the per-process part to those pids."""
    mono, wall = time.monotonic(), time.time()
    ksm = sysfs.read_sysfs(root)
    vm = procfs.read_ksm_vmstat(root)
    procs: list[ProcessSample] = []
    if pids is not None:
        for pid in pids:
            st = procfs.read_ksm_stat(pid, root)
            if st is None:
                continue  # exited mid-sample: expected
            procs.append(
                ProcessSample(
                    pid,
                    procfs.read_comm(pid, root) or "?",
                    procfs.read_cgroup(pid, root) or "/",
                    st,
                )
            )
    elif all_processes:
        procs = [ProcessSample(p.pid, p.comm, p.cgroup, p.stat) for p in procfs.ksm_processes(root)]
    return CounterSample(mono, wall, ksm, vm, tuple(procs))
