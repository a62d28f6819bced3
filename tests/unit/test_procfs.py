"""procfs readers on the trees recorded from 6.18 (see tests/fixtures/README.md)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from ksmtrace.kernel import procfs
from ksmtrace.kernel.procfs import KsmStat, parse_cgroup, parse_ksm_stat

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HOST = FIXTURES / "host-6.18"
OLD = FIXTURES / "host-6.1"
MANIFEST = json.loads((HOST / "MANIFEST.json").read_text())
ROLES: dict[str, int] = MANIFEST["roles"]
DUPS = [ROLES[f"dup-{i}"] for i in range(3)]
KSM_ROLES = ("dup-0", "dup-1", "dup-2", "unique", "mergeany")


def test_ksm_stat_6_18_format():
    text = (HOST / f"proc/{DUPS[0]}/ksm_stat").read_text()
    # The exact 6.18 layout: four `key value` lines, then two `key: yes|no`.
    assert [ln.split(" ")[0] for ln in text.splitlines()] == [
        "ksm_rmap_items",
        "ksm_zero_pages",
        "ksm_merging_pages",
        "ksm_process_profit",
        "ksm_merge_any:",
        "ksm_mergeable:",
    ]
    s = procfs.read_ksm_stat(DUPS[0], HOST)
    assert s == parse_ksm_stat(text)
    assert s.ksm_mergeable is True and s.ksm_merge_any is False
    assert s.ksm_zero_pages == MANIFEST["dup_area_layout_pages"]["zero"]
    assert s.ksm_merging_pages == MANIFEST["dup_area_layout_pages"]["duplicate"] - 1  # the COW
    assert s.extra == {}


def test_process_profit_is_signed_and_what_the_kernel_computes():
    page = MANIFEST["page_size"]
    for role in KSM_ROLES:
        s = procfs.read_ksm_stat(ROLES[role], HOST)
        # mm/ksm.c ksm_process_profit(): (merging + zero) pages saved minus
        # one struct ksm_rmap_item (64 bytes on x86-64) per rmap item.
        assert s.ksm_process_profit == (
            (s.ksm_merging_pages + s.ksm_zero_pages) * page - s.ksm_rmap_items * 64
        ), role
    unique = procfs.read_ksm_stat(ROLES["unique"], HOST)
    assert unique.ksm_rmap_items == MANIFEST["unique_child_pages"]
    assert unique.ksm_process_profit < 0


def test_merge_any_process():
    s = procfs.read_ksm_stat(ROLES["mergeany"], HOST)
    assert s.ksm_merge_any is True and s.ksm_mergeable is True


def test_idle_and_kernel_thread():
    idle = procfs.read_ksm_stat(ROLES["idle"], HOST)
    assert idle.ksm_mergeable is False and idle.ksm_rmap_items == 0
    assert not idle.known_to_ksm
    # A kernel thread has no mm: the kernel prints nothing.
    assert procfs.read_ksm_stat(2, HOST) == KsmStat()
    assert procfs.read_ksm_merging_pages(2, HOST) is None
    assert procfs.read_smaps_rollup_ksm_bytes(2, HOST) is None
    assert procfs.read_comm(2, HOST) == "kthreadd"


def test_ksm_stat_6_1_format():
    s = procfs.read_ksm_stat(DUPS[0], OLD)
    assert s.ksm_rmap_items == procfs.read_ksm_stat(DUPS[0], HOST).ksm_rmap_items
    assert s.ksm_zero_pages is s.ksm_process_profit is None
    assert s.ksm_merge_any is None and s.ksm_mergeable is None
    # The separate file exists since 5.19; read_ksm_stat fills the gap from it.
    assert procfs.read_ksm_merging_pages(DUPS[0], OLD) == 63
    assert s.ksm_merging_pages == 63
    assert parse_ksm_stat((OLD / "proc" / str(DUPS[0]) / "ksm_stat").read_text()) \
        .ksm_merging_pages is None


def test_parse_unknown_lines_are_kept():
    s = parse_ksm_stat(
        "ksm_rmap_items 5\nksm_new_counter 9\nksm_new_flag: yes\nksm_mergeable: maybe\n"
    )
    assert s.ksm_rmap_items == 5 and s.ksm_mergeable is None
    assert s.extra == {"ksm_new_counter": "9", "ksm_new_flag": "yes", "ksm_mergeable": "maybe"}
    assert parse_ksm_stat("ksm_process_profit -4096\n").ksm_process_profit == -4096


def test_gone_process_is_none():
    pid = 999_999_999
    assert procfs.read_ksm_stat(pid, HOST) is None
    assert procfs.read_ksm_merging_pages(pid, HOST) is None
    assert procfs.read_smaps_rollup_ksm_bytes(pid, HOST) is None
    assert procfs.read_comm(pid, HOST) is None
    assert procfs.read_cgroup(pid, HOST) is None


@pytest.mark.parametrize(
    "where, err",
    [("open", errno.EACCES), ("open", errno.EPERM), ("read", errno.ESRCH)],
)
def test_unreadable_or_exiting_is_none(monkeypatch, where, err):
    def fail(*a, **kw):
        raise OSError(err, "simulated")

    monkeypatch.setattr(procfs.os, where, fail)
    assert procfs.read_ksm_stat(DUPS[0], HOST) is None


def test_other_errors_are_raised(monkeypatch):
    def fail(*a, **kw):
        raise OSError(errno.EIO, "simulated")

    monkeypatch.setattr(procfs.os, "read", fail)
    with pytest.raises(OSError):
        procfs.read_ksm_stat(DUPS[0], HOST)


def test_merging_pages_file_matches_ksm_stat():
    for role in KSM_ROLES:
        pid = ROLES[role]
        assert procfs.read_ksm_merging_pages(pid, HOST) == (
            procfs.read_ksm_stat(pid, HOST).ksm_merging_pages
        )


def test_vmstat():
    v = procfs.read_vmstat(HOST)
    assert len(v) > 100 and all(isinstance(x, int) for x in v.values())
    k = procfs.read_ksm_vmstat(HOST)
    assert k.cow_ksm == MANIFEST["cow_ksm_at_recording"]
    assert k.cow_ksm == MANIFEST["cow_ksm_before_cow"] + 1  # the one COW write
    assert k.ksm_swpin_copy == v["ksm_swpin_copy"]
    old = procfs.read_ksm_vmstat(OLD)
    assert old.cow_ksm is None and old.ksm_swpin_copy == k.ksm_swpin_copy


def test_smaps_rollup_ksm_bytes():
    page = MANIFEST["page_size"]
    for role in KSM_ROLES:
        pid = ROLES[role]
        # KSM: counts KSM pages only, not zero-page merges.
        assert procfs.read_smaps_rollup_ksm_bytes(pid, HOST) == (
            procfs.read_ksm_stat(pid, HOST).ksm_merging_pages * page
        )
    assert procfs.read_smaps_rollup_ksm_bytes(DUPS[0], OLD) is None  # no KSM: line


def test_comm_and_cgroup():
    assert procfs.read_comm(DUPS[1], HOST) == "ksm-dup-1"
    assert procfs.read_comm(ROLES["idle"], HOST) == "sleep"
    # Recorded on a hybrid v1+v2 host: the v2 line is "0::/".
    assert "0::/\n" in (HOST / f"proc/{DUPS[0]}/cgroup").read_text()
    assert procfs.read_cgroup(DUPS[0], HOST) == "/"


def test_parse_cgroup():
    assert parse_cgroup("0::/system.slice/libvirtd.service\n") == "/system.slice/libvirtd.service"
    assert parse_cgroup("4:memory:/a\n0::/user.slice/x.scope\n") == "/user.slice/x.scope"
    assert parse_cgroup("4:memory:/a\n1:cpu:/\n") == "/"  # cgroup v1 only
    assert parse_cgroup("") == "/"


def test_list_pids():
    pids = procfs.list_pids(HOST)
    assert pids == sorted(pids)
    assert set(pids) == set(ROLES.values())


def test_ksm_processes():
    found = {p.pid: p for p in procfs.ksm_processes(HOST)}
    assert set(found) == {ROLES[r] for r in KSM_ROLES}
    dup = found[DUPS[2]]
    assert dup.comm == "ksm-dup-2" and dup.cgroup == "/"
    assert dup.stat == procfs.read_ksm_stat(DUPS[2], HOST)


def test_ksm_processes_6_1_fills_merging_pages():
    found = {p.pid: p for p in procfs.ksm_processes(OLD)}
    assert set(found) == {ROLES[r] for r in KSM_ROLES}
    for pid, p in found.items():
        assert p.stat.ksm_merging_pages == procfs.read_ksm_merging_pages(pid, OLD)
        assert p.stat.ksm_mergeable is None


def test_ksm_processes_skips_processes_that_vanish(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(HOST / "proc", root / "proc")
    (root / f"proc/{DUPS[0]}/comm").unlink()  # exited between ksm_stat and comm
    shutil.rmtree(root / f"proc/{DUPS[1]}")  # exited before the scan reached it
    found = {p.pid for p in procfs.ksm_processes(root)}
    assert found == {ROLES[r] for r in KSM_ROLES} - {DUPS[0], DUPS[1]}


def test_ksm_processes_scales(tmp_path):
    # Thousands of non-KSM processes (copies of the recorded idle process)
    # cost one small read each and are not reported.
    import time

    root = tmp_path / "root"
    shutil.copytree(HOST / "proc", root / "proc")
    idle = root / f"proc/{ROLES['idle']}"
    for pid in range(100_000, 103_000):
        d = root / f"proc/{pid}"
        d.mkdir()
        shutil.copy(idle / "ksm_stat", d / "ksm_stat")
    t = time.perf_counter()
    found = procfs.ksm_processes(root)
    elapsed = time.perf_counter() - t
    assert len(found) == len(KSM_ROLES)
    assert elapsed < 2.0  # ~30 ms here; generous for slow CI disks
