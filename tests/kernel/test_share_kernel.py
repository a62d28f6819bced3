"""Kernel tier: the sharing map on real merged pages of processes placed in
real cgroup v2 directories named as libvirt, Docker and systemd name theirs.

Five workload processes with the same contents merge into the same KSM
frames. Two go into a libvirt-style VM scope, one into a Docker scope, one
into a Kubernetes pod's containerd scope, one into a systemd service:
`ksmtrace share` must name each workload, count each one's KSM pages as its
processes' ksm_stat does, account for every page of pages_shared +
pages_sharing, keep the matrix symmetric, and move written pages out of the
shared figure exactly as cow_ksm grows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_export_kernel import exporter, prometheus, wait_for

from ksmtrace.kernel import procfs, sysfs
from ksmtrace.kernel.pagemap import PAGE_SIZE
from ksmtrace.share import summarise
from ksmtrace.sources.counters import sample_sharing
from ksmtrace.workload import Workload, WorkloadSpec

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(300)]

TOP = "ksmtrace-test-share"  # every cgroup this test makes is below it
DOCKER_ID = "5c0ffee" + "0123456789abcdef" * 3 + "012345678"  # 64 hex
POD_UID = "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9"
CRI_ID = "c0de" * 16
PLACES = {  # cgroup below TOP -> the label `share` must give
    "machine.slice/machine-qemu\\x2d7\\x2dguest\\x2dweb.scope": "vm:guest-web",
    f"system.slice/docker-{DOCKER_ID}.scope": f"ctr:{DOCKER_ID[:12]}",
    "system.slice/ksmtrace\\x2dshare.service": "svc:ksmtrace-share",
    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
    f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{CRI_ID}.scope": f"ctr:{CRI_ID[:12]}",
}


def cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split(" ")[4])
    return None


@contextmanager
def cgroups() -> Iterator[dict[str, Path]]:
    """The test's cgroup directories; on exit every process in them goes
    back to the root cgroup and every directory is removed."""
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    made: list[Path] = []
    try:
        dirs = {}
        for rel in PLACES:
            d = root / TOP / rel
            for p in reversed([d, *d.parents]):
                if p.is_relative_to(root / TOP) and not p.exists():
                    p.mkdir()
                    made.append(p)
            dirs[rel] = d
        yield dirs
    finally:
        for d in reversed(made):
            for pid in (d / "cgroup.procs").read_text().split():
                try:
                    (root / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # exited meanwhile
            d.rmdir()


def place(d: Path, pid: int) -> None:
    (d / "cgroup.procs").write_text(str(pid))


@pytest.mark.usefixtures("quiet_ksm")
def test_share_names_workloads_and_accounts_for_every_ksm_page(tmp_path):
    # 600 pages of 60 contents per process: 50 mappings a frame, below
    # max_page_sharing (256), so each content is one frame for all five
    spec = WorkloadSpec(processes=5, pages=600, distinct=60)
    with cgroups() as dirs, Workload(spec, drive_ksmd=True) as w:
        a, b, c, d, e = w.pids
        rels = list(PLACES)
        place(dirs[rels[0]], a)
        place(dirs[rels[0]], b)
        place(dirs[rels[1]], c)
        place(dirs[rels[2]], d)
        place(dirs[rels[3]], e)
        w.wait_merged()
        k = sysfs.read_sysfs()
        r = summarise(sample_sharing(), "workload")
        assert not r["unread"]
        groups = {g["group"]: g for g in r["groups"]}
        assert set(groups) == set(PLACES.values())
        vm = groups["vm:guest-web"]
        assert sorted(vm["processes"]) == sorted([a, b])
        stat = {pid: procfs.read_ksm_stat(pid).ksm_merging_pages for pid in w.pids}
        assert all(n == 600 for n in stat.values()), stat
        for g in r["groups"]:
            # the page map agrees with KSM's own count, workload by workload
            assert g["ksm_pages"] == g["ksm_merging_pages"] == \
                sum(stat[p] for p in g["processes"]), g
            assert g["shared"] == g["ksm_pages"] and g["alone"] == 0
        # every page KSM counts is in the map, and nothing else
        assert r["ksm_pages_mapped"] == k.pages_shared + k.pages_sharing == 3000
        assert r["frames"] == k.pages_shared == 60
        grid = np.array(r["matrix"]["frames"])
        assert (grid == grid.T).all()
        names = r["matrix"]["groups"]
        i = {n: names.index(n) for n in names}
        # every frame is in every workload; the VM maps each one 20 times
        assert grid[i["vm:guest-web"], i["vm:guest-web"]] == 1200 - 60
        off = grid[~np.eye(len(names), dtype=bool)]
        assert (off == 60).all()
        pod = groups[PLACES[rels[3]]]
        assert pod["kind"] == "container" and pod["processes"] == [e]
        assert [f["what"] for f in r["findings"]][:1] == ["cross-tenant sharing"]

        # the exporter serves the same map to a real Prometheus, on its own interval
        with exporter("--sysfs-only", "--interval", "0.5", "--sharing-interval", "1") \
                as (port, _), prometheus(tmp_path, f"127.0.0.1:{port}") as prom:
            vm, ctr = PLACES[rels[0]], PLACES[rels[1]]
            sel = f'ksmtrace_sharing_bytes{{a="{vm}",b="{ctr}"}}'
            wait_for("the sharing map in Prometheus", lambda: prom.query(sel), 60)
            assert prom.value(sel) == 60 * PAGE_SIZE
            # the VM and the two containers are tenants: three pairs of 60 frames
            assert prom.value("ksmtrace_sharing_cross_tenant_frames") == 180
            assert prom.value("ksmtrace_sharing_read_seconds") > 0
            # the exposure finding, as the command computes it
            exposure = next(f for f in r["findings"] if f["what"] == "exposure")
            assert prom.value("ksmtrace_sharing_exposure_bytes") == exposure["bytes"]

        # the container writes 30 of its pages: they leave the shared figure
        # exactly as cow_ksm grows
        cow0 = procfs.read_ksm_vmstat().cow_ksm
        written = w.cow(0.05, pids=[c])
        assert written[c] == sum(written.values()) == 30
        w.wait_expected()  # ksmd's next pass takes them out of ksm_stat
        r2 = summarise(sample_sharing(), "workload")
        g2 = {g["group"]: g for g in r2["groups"]}
        ctr = PLACES[rels[1]]
        assert procfs.read_ksm_vmstat().cow_ksm - cow0 == 30
        assert g2[ctr]["shared"] == groups[ctr]["shared"] - 30
        assert g2[ctr]["ksm_pages"] == procfs.read_ksm_stat(c).ksm_merging_pages == 570
        grid2 = np.array(r2["matrix"]["frames"])
        assert (grid2 == grid2.T).all()
    assert not (cgroup2_root() / TOP).exists()


# A parent maps 400 pages of 4 contents, MADV_MERGEABLE, prints its pid; on
# a line "fork" it forks a child that keeps the mapping (printing its pid);
# both end when stdin closes.
FORKER = r"""
import mmap, os, sys
ps = mmap.PAGESIZE
token = sys.argv[1].encode()
m = mmap.mmap(-1, 400 * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
for i in range(400):
    m[i * ps:(i + 1) * ps] = (token + b"%d:" % (i % 4)).ljust(ps, b".")
m.madvise(mmap.MADV_MERGEABLE)
print(os.getpid(), flush=True)
sys.stdin.readline()
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(w)
    os.read(r, 1)  # until the parent exits
    os._exit(0)
os.close(r)
print(child, flush=True)
sys.stdin.read()
"""


@pytest.mark.usefixtures("quiet_ksm")
def test_a_forked_child_maps_its_parents_ksm_pages_without_counting_them():
    """The kernel's fork selftest: a child maps its parent's KSM pages, but
    ksm_merging_pages counts KSM's rmap items, which stay the parent's. The
    map counts page table entries, so it shows the child's 400 KSM pages
    next to its ksm_stat of 0, and the pages mapped exceed pages_shared +
    pages_sharing by exactly the child's."""
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", FORKER, os.urandom(8).hex()],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        parent = int(p.stdout.readline())
        with sysfs.KsmKnobs() as k:
            k.set(pages_to_scan=1000, sleep_millisecs=0, run=1)
            for _ in range(3000):
                st = procfs.read_ksm_stat(parent)
                if st is not None and st.ksm_merging_pages == 400:
                    break
                time.sleep(0.01)
            k.set(run=0)
            assert procfs.read_ksm_stat(parent).ksm_merging_pages == 400
            p.stdin.write("fork\n")
            p.stdin.flush()
            child = int(p.stdout.readline())
            r = summarise(sample_sharing(), "process")
            ks = sysfs.read_sysfs()
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    rows = {int(g["group"].split()[0]): g for g in r["groups"]}
    assert rows[parent]["ksm_pages"] == rows[parent]["ksm_merging_pages"] == 400
    assert rows[child]["ksm_pages"] == 400 and rows[child]["ksm_merging_pages"] == 0
    assert ks.pages_shared + ks.pages_sharing == 400
    assert r["ksm_pages_mapped"] == 800 and r["frames"] == 4
    # parent and child share all four frames
    assert r["pairs"] == [{"a": r["pairs"][0]["a"], "b": r["pairs"][0]["b"], "frames": 4,
                           "bytes": 4 * PAGE_SIZE}]


def test_the_exporters_reader_hands_back_only_what_is_served(quiet_ksm):
    """The exporter's child (`python -m ksmtrace.share TOP`) hands back the
    TOP pairs of the whole map, not every pair: with N workloads the whole
    map has N(N-1)/2 pairs, and the exporter would hold them all."""
    import json
    import subprocess

    from ksmtrace.spawn import python_argv

    with Workload(WorkloadSpec(processes=4, pages=200, distinct=4)) as w:
        w.wait_merged()
        with sysfs.KsmKnobs() as k:
            k.set(run=0)
            whole = summarise(sample_sharing(), "workload")
            out = subprocess.run(python_argv("ksmtrace.share", "2"), capture_output=True,
                                 check=True, timeout=120).stdout
    served = json.loads(out)
    assert len(whole["groups"]) == served["groups"] == 4
    assert len(whole["pairs"]) == 6
    assert served["pairs"] == whole["pairs"][:2]
    def facts(r):  # MemAvailable moves between the two readings; the pages do not
        return [(f["what"], f.get("frames"), f.get("bytes"), f.get("groups"))
                for f in r["findings"]]
    assert facts(served) == facts(whole) != []
    assert set(served) == {"groups", "pairs", "findings", "mem_available", "seconds"}


def test_share_needs_root_and_says_so(as_nobody):
    import subprocess

    argv, env, cwd = as_nobody
    r = subprocess.run([*argv, "share"], capture_output=True, text=True, timeout=120,
                       env=env, cwd=cwd)
    assert r.returncode == 3, r.stderr
    assert "share (page maps and /proc/kpageflags) needs root" in r.stderr
    assert "how to fix:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.usefixtures("quiet_ksm")
def test_share_without_a_ksm_process_exits_1_with_a_hint():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ksmtrace", "share"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "no process uses KSM" in r.stderr, r.stderr
    assert "how to fix:" in r.stderr and "Traceback" not in r.stderr
