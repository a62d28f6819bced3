"""The agent's own loader on the real kernel: programs compiled once in a
child (or taken from the cache), loaded and attached without bcc, so the
process never maps LLVM; every path detaches, kprobe_events included."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import tracefs
from ksmtrace.sources import loader
from ksmtrace.sources.live import LiveSource
from ksmtrace.spawn import reap

pytestmark = [pytest.mark.kernel, pytest.mark.vm, pytest.mark.traced]


@pytest.fixture
def fresh_cache(monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="ksmtrace-test-cache.", dir="/run"))
    monkeypatch.setenv("KSMTRACE_CACHE", str(base))
    yield base / "bpf"
    shutil.rmtree(base)


def kprobe_entries() -> set[str]:
    path = Path(tracefs.find_tracefs() or "/sys/kernel/tracing") / "kprobe_events"
    try:
        return {ln for ln in path.read_text().splitlines() if "ksmtrace_" in ln}
    except OSError:
        return set()


def test_compiled_once_then_loaded_from_the_cache(facts, fresh_cache, count_programs,
                                                  programs_back_to):
    """The first start compiles (cold), the second loads the cached bundle
    (warm); both attach the same programs, and closing leaves nothing."""
    plan = caps.plan(facts, os.environ.get("KSMTRACE_ATTACH"))
    before, entries = count_programs(), kprobe_entries()
    runs = []
    for _ in range(2):
        with LiveSource(facts, plan, stream=True) as src:
            # every probe the plan attaches is attached (a failed kretprobe
            # would only show as missing figures)
            failed = [(p.probe, p.error) for p in src.probes
                      if p.method not in (None, "polling") and not p.attached]
            assert failed == []
            runs.append((src.cached, sorted(src.program_ids()), src.tick().bpf is not None))
            assert count_programs() > before
        assert programs_back_to(before)
        assert kprobe_entries() == entries
    assert [r[0] for r in runs] == [False, True]
    assert runs[0][1:] == runs[1][1:] and runs[0][2]
    (entry,) = fresh_cache.iterdir()
    assert entry.suffix == ".bundle" and entry.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_the_agent_maps_no_llvm_and_leaves_nothing_when_killed(sig, count_programs,
                                                              programs_back_to):
    before, entries = count_programs(), kprobe_entries()
    p = subprocess.Popen([sys.executable, "-m", "ksmtrace", "stat", "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        while line and not line.startswith("    time"):  # attached once it prints this
            line = p.stdout.readline()
        assert line, p.stderr.read()
        assert count_programs() > before
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        assert "libLLVM" not in maps and "libbcc" not in maps and "libclang" not in maps
    finally:
        status = reap(p, 60, sig)  # SIGKILLed if a signal does not end it
    # Ctrl-C and SIGTERM end it as the shell would report them: 128 + signal
    assert status == (-sig if sig == signal.SIGKILL else 128 + sig)
    assert "Traceback" not in p.stderr.read()
    assert programs_back_to(before)
    left = kprobe_entries() - entries
    if sig != signal.SIGKILL:
        assert left == set()
    else:  # a SIGKILLed kprobe run leaves its kretprobe entries: doctor's to clean
        tfs = tracefs.find_tracefs()
        mine = {e for e in loader.stale_kprobes(tfs) if e.startswith(f"ksmtrace_{p.pid}_")}
        assert {ln.split()[0].split("/")[1] for ln in left} == mine
        assert set(loader.remove_stale(tfs)) >= mine
        assert kprobe_entries() - entries == set()
