"""The commands' error paths and options on the real host: clear one-line
errors, distinct exit codes, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ksmtrace.errors import Exit
from ksmtrace.kernel import capabilities as caps

pytestmark = pytest.mark.kernel


def ksmtrace(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "ksmtrace", *args], capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_missing_pid_exits_10():
    r = ksmtrace("stat", "-p", "4194303", "0.1", "1")
    assert r.returncode == Exit.NO_PROCESS
    assert "no process 4194303" in r.stderr


def test_ebpf_prints_source_and_flags():
    r = ksmtrace("stat", "--ebpf")
    assert r.returncode == 0
    assert r.stdout.startswith("// cflags: ")
    # merges are traced on the raw tracepoint since 1477ca5 (no trace record per merge)
    assert "RAW_TRACEPOINT_PROBE(ksm_merge_with_ksm_page)" in r.stdout


def test_strict_fails_when_the_plan_misses_a_probe():
    plan = caps.plan(caps.probe_host())
    missed = [c.probe for c in plan.choices if c.method is None]
    r = ksmtrace("stat", "--strict", "0.1", "1")
    if missed:
        assert r.returncode == Exit.FAILURE
        assert "--strict" in r.stderr and missed[0] in r.stderr
    else:
        assert r.returncode == 0


def test_forcing_an_unusable_backend_is_reported_and_strict_fails():
    facts = caps.probe_host()
    for backend, trial in (("kprobe", facts.kprobe), ("fentry", facts.fentry)):
        if trial.ok:
            continue
        r = ksmtrace("stat", "--attach", backend, "0.1", "1")
        assert r.returncode == 0, r.stderr
        assert "merging/merges: polling" in r.stdout
        r = ksmtrace("stat", "--attach", backend, "--strict", "0.1", "1")
        assert r.returncode == Exit.FAILURE
        assert "--strict" in r.stderr and "how to fix" in r.stderr


def test_trace_needs_bpf_not_sysfs_only():
    r = ksmtrace("trace", "--sysfs-only")
    assert r.returncode == Exit.FAILURE
    assert "needs BPF" in r.stderr
