"""doctor on the real host kernel, each verdict checked against an independent
witness: tracefs listings, the kernel config, bpftool's BTF dump, bpftrace."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import symbols, tracefs

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def report() -> dict:
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "doctor", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def kernel_config() -> str:
    if Path("/proc/config.gz").exists():
        return gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    return Path(f"/boot/config-{os.uname().release}").read_text()  # Debian kernels


def test_tracepoints_match_tracefs(report):
    path = tracefs.require_tracefs()
    listed = set(tracefs.tracepoints_in(path, "ksm"))
    reported = {k.split(":")[1] for k, v in report["facts"]["tracepoints"].items()
                if k.startswith("ksm:") and v}
    assert reported == listed & set(caps.KSM_TRACEPOINTS)
    assert report["facts"]["tracepoint"]["ok"] is True


def test_kprobe_verdict_matches_kernel_config(report):
    kp = report["facts"]["kprobe"]
    has_kprobes = "CONFIG_KPROBES=y" in kernel_config()
    assert kp["ok"] is has_kprobes
    if not has_kprobes:
        assert "CONFIG_KPROBES" in kp["detail"]
        assert kp["kernel_said"], "the kernel's own words must be kept"


def test_fentry_verdict_matches_bpftrace(report):
    """bpftrace is an independent loader: it must agree on whether fentry loads."""
    fe = report["facts"]["fentry"]
    r = subprocess.run(
        ["bpftrace", "-e", "kfunc:do_wp_page { exit(); } interval:s:1 { exit(); }"],
        capture_output=True, text=True, timeout=300,
    )
    assert fe["ok"] is (r.returncode == 0), (fe, r.stderr)
    if not fe["ok"]:
        assert "EPERM" in fe["detail"] or fe["kernel_said"]


def test_btf_functions_match_bpftool(report):
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True, check=True).stdout
    bpftool_funcs = {line.split("'")[1] for line in out.splitlines()
                     if line.startswith("[") and "] FUNC '" in line}
    assert symbols.btf_func_names() == bpftool_funcs
    for fn, present in report["facts"]["btf_funcs"].items():
        assert present is (fn in bpftool_funcs), fn


def test_plan_is_consistent_with_mechanisms(report):
    facts = caps.Facts.from_dict(report["facts"])
    p = caps.plan(facts)
    direct_cow = facts.kprobe.ok or facts.fentry.ok
    assert p.get("cow_breaks").estimated is (not direct_cow)
    if facts.tracepoints["ksm:ksm_start_scan"]:
        assert p.get("scan_rounds").method == "tracepoint"
    assert report["exit_code"] == 0


def test_headers_are_never_written_under_lib_modules(report):
    h = report["facts"]["headers"]
    assert h["path"]
    if h["origin"] != "running-kernel":
        assert not h["path"].startswith("/lib/modules/")
    if h["origin"] == "merged-distro":
        assert not Path(f"/lib/modules/{os.uname().release}").exists()


def test_non_root_reports_partially_with_exit_3(as_nobody):
    argv, env, cwd = as_nobody
    r = subprocess.run([*argv, "doctor"], capture_output=True, text=True, timeout=300,
                       env=env, cwd=cwd)
    assert r.returncode == 3, r.stderr
    assert "as root, doctor would also check" in r.stdout
    assert "Traceback" not in r.stderr


def test_doctor_mounts_tracefs_when_it_is_not_mounted():
    """The CI host boots without tracefs mounted: doctor must mount it and say so."""
    target = "/sys/kernel/tracing"
    if tracefs.find_tracefs() == target:
        # lazy: detaches now even if a file in it is open somewhere
        subprocess.run(["umount", "-l", target], check=True)
    assert tracefs.find_tracefs() is None
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "doctor"], capture_output=True,
                       text=True, timeout=600)
    assert tracefs.find_tracefs() == target
    assert r.returncode == 0, r.stderr
    assert f"tracefs was not mounted; mounted it at {target}" in r.stderr
    assert "ksm:ksm_start_scan              present" in r.stdout
