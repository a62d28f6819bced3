"""Kernel tier: `ksmtrace share` on real QEMU guests whose RAM the host
merges (`-machine mem-merge=on`).

Three guests boot the cached test image (tests/vm/) under TCG to an idle
Python as PID 1. Two are named on the command line (`-name guest=NAME`), the
third only by the libvirt-style scope cgroup it runs in
(machine.slice/machine-qemu\\x2d3\\x2dweb3.scope). Once ksmd has merged
what they have in common, the guests are paused (QMP `stop`, so their
memory holds still) and ksmd is stopped: then each VM's KSM pages must equal
its QEMU process's ksm_merging_pages, all of them pages_shared +
pages_sharing, and the matrix must be symmetric.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_share_kernel import cgroup2_root

from ksmtrace.kernel import procfs, sysfs
from ksmtrace.share import format_share, summarise
from ksmtrace.sources.counters import sample_sharing

# Needs the image tests/vm/run.py builds: scripts/test runs it after that tier.
pytestmark = [pytest.mark.kernel, pytest.mark.host_guests, pytest.mark.timeout(900)]

IMAGE = Path("/var/cache/ksmtrace-vm/images/trixie")
SCOPE = "machine.slice/machine-qemu\\x2d3\\x2dweb3.scope"
TOP = "ksmtrace-test-qemu"


def qmp(sock: Path, *commands: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for c in ("qmp_capabilities", *commands):
            f.write(json.dumps({"execute": c}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    assert "return" in reply, reply
                    break


@contextmanager
def guest(tmp: Path, n: int, name: str | None, cgroup: Path | None) -> Iterator[int]:
    """A QEMU/TCG guest of the test image, up to an idle Python as PID 1;
    yields its pid. Killed on every path."""
    console, monitor = tmp / f"vm{n}.console", tmp / f"vm{n}.qmp"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "768",
            "-machine", "mem-merge=on", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(IMAGE / "vmlinuz"), "-initrd", str(IMAGE / "initrd.gz"),
            "-append", "console=ttyS0 quiet loglevel=1 panic=-1 init=/usr/bin/python3",
            "-drive", f"file={IMAGE / 'rootfs.ext4'},if=virtio,format=raw,snapshot=on",
            "-serial", f"unix:{console},server=on,wait=off",
            "-qmp", f"unix:{monitor},server=on,wait=off"]
    if name:
        argv += ["-name", f"guest={name},debug-threads=on"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(p.pid))
        for _ in range(600):
            if console.exists():
                break
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(console))
            s.settimeout(1)
            seen = b""
            deadline = time.monotonic() + 400  # TCG, three guests on two cores
            while b">>> " not in seen:
                assert time.monotonic() < deadline, seen[-500:]
                assert p.poll() is None, p.stderr.read()
                try:
                    seen += s.recv(4096)
                except TimeoutError:
                    pass
        yield p.pid
    finally:
        p.kill()
        p.wait(timeout=30)


@pytest.mark.usefixtures("quiet_ksm")
def test_share_names_and_accounts_for_real_qemu_guests():
    if not (IMAGE / "rootfs.ext4").exists() or not shutil.which("qemu-system-x86_64"):
        pytest.skip("no cached test image (tests/vm/run.py builds it) or no QEMU")
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    tmp = Path(tempfile.mkdtemp(prefix="ksmtrace-qemu-"))
    scope = root / TOP / SCOPE
    made = [d for d in reversed([scope, *scope.parents]) if d.is_relative_to(root / TOP)]
    try:
        for d in made:
            d.mkdir(exist_ok=True)
        with ExitStack() as stack, sysfs.KsmKnobs() as k:
            pids = [stack.enter_context(guest(tmp, 1, "vm1", None)),
                    stack.enter_context(guest(tmp, 2, "vm2", None)),
                    stack.enter_context(guest(tmp, 3, None, scope))]
            for n in (1, 2, 3):
                qmp(tmp / f"vm{n}.qmp", "stop")  # their memory holds still from here
            k.set(pages_to_scan=20000, sleep_millisecs=0, run=1)
            # merged and settled: two full scans in a row without a change
            last, steady = None, 0
            for _ in range(6000):
                before = sysfs.read_sysfs().full_scans
                while sysfs.read_sysfs().full_scans == before:
                    time.sleep(0.02)
                now = sysfs.read_sysfs()
                figures = (now.pages_shared, now.pages_sharing)
                steady = steady + 1 if figures == last else 0
                last = figures
                if steady >= 2:
                    break
            k.set(run=0)
            r = summarise(sample_sharing(), "workload")
            ks = sysfs.read_sysfs()
            stat = {pid: procfs.read_ksm_stat(pid).ksm_merging_pages for pid in pids}
        print(format_share(r))  # shown with -s: the figures of this run
        groups = {g["group"]: g for g in r["groups"]}
        assert set(groups) == {"vm:vm1", "vm:vm2", "vm:web3"}, groups.keys()
        for g, pid in zip(("vm:vm1", "vm:vm2", "vm:web3"), pids, strict=True):
            assert groups[g]["processes"] == [pid]
            assert groups[g]["ksm_pages"] == groups[g]["ksm_merging_pages"] == stat[pid] > 0
        assert r["ksm_pages_mapped"] == ks.pages_shared + ks.pages_sharing
        assert r["frames"] == ks.pages_shared
        grid = np.array(r["matrix"]["frames"])
        assert (grid == grid.T).all() and grid[~np.eye(3, dtype=bool)].min() > 0
        assert r["findings"][0]["what"] == "cross-tenant sharing"
    finally:
        for d in reversed(made):
            if d.exists():
                d.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not (root / TOP).exists()
    assert os.path.exists(IMAGE / "rootfs.ext4")  # snapshot=on: the image is untouched
