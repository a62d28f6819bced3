"""tracefs discovery and the kallsyms reader, on trees recorded from the host."""

import os
import shutil
import tempfile
from pathlib import Path

import msgspec
import pytest

from ksmtrace.kernel import symbols, tracefs

FIX = Path(__file__).parent.parent / "fixtures"


def test_tracefs_found_and_tracepoints_listed(tmp_path):
    ev = tmp_path / "sys/kernel/tracing/events/ksm/ksm_start_scan"
    ev.mkdir(parents=True)
    (ev / "format").write_text("name: ksm_start_scan\n")
    (tmp_path / "sys/kernel/tracing/events/ksm/enable").write_text("0")
    path = tracefs.find_tracefs(tmp_path)
    assert path == str(tmp_path / "sys/kernel/tracing")
    assert tracefs.tracepoint_exists(path, "ksm", "ksm_start_scan")
    assert not tracefs.tracepoint_exists(path, "ksm", "ksm_stop_scan")
    assert tracefs.tracepoints_in(path, "ksm") == ["ksm_start_scan"]


def test_tracefs_missing_explains_how_to_mount(tmp_path):
    t = tracefs.ensure_tracefs(tmp_path, mount=False)
    assert t.path is None and "mount -t tracefs nodev" in t.note


def test_kallsyms_reader_finds_text_symbols_only(tmp_path):
    (tmp_path / "proc").mkdir()
    shutil.copy(FIX / "kallsyms/host-6.18.kallsyms", tmp_path / "proc/kallsyms")
    names = symbols.kallsyms_names(tmp_path)
    assert {"do_wp_page", "try_to_merge_one_page", "break_ksm", "ksm_scan_thread"} <= names
    assert "ksm_do_scan" not in names  # inlined on this kernel
    wanted = symbols.kallsyms_names(tmp_path, {"do_wp_page", "ksm_do_scan"})
    assert wanted == {"do_wp_page"}


def test_no_btf_is_none(tmp_path):
    assert symbols.btf_func_names(tmp_path) is None


@pytest.fixture
def btf_cache(monkeypatch):
    """A cache under /run (root-owned, not world-writable), as root, on a
    kernel with BTF."""
    if os.geteuid() != 0 or not symbols.btf_path().exists():
        pytest.skip("the cache is root's; needs /sys/kernel/btf/vmlinux")
    base = Path(tempfile.mkdtemp(prefix="ksmtrace-test-cache.", dir="/run"))
    monkeypatch.setenv("KSMTRACE_CACHE", str(base))
    yield base / "btf"
    shutil.rmtree(base)


def _read(cached: bool = True) -> symbols.Btf:
    return symbols.read_btf("/", {"do_wp_page", "break_ksm"}, symbols.LAYOUT_FIELDS,
                            symbols.LAYOUT_ENUMS, cached=cached)


def test_btf_facts_are_remembered_for_the_boot_and_tampering_reads_as_absent(btf_cache):
    walked = _read(cached=False)
    assert walked.funcs and set(walked.funcs) <= {"do_wp_page", "break_ksm"}
    assert walked.layout["page.@size"] > 0
    assert _read() == walked  # walked, then written
    (entry,) = btf_cache.iterdir()
    assert entry.stat().st_mode & 0o777 == 0o600
    assert _read() == walked  # read back
    for bad in (b"{", b'{"funcs": {"do_wp_page": "x"}, "layout": {}}', b"[]"):
        entry.write_bytes(bad)
        assert _read() == walked  # walked again, and replaced
        assert msgspec.json.decode(entry.read_bytes(), type=symbols.Btf) == walked
    entry.write_bytes(msgspec.json.encode(symbols.Btf({"do_wp_page": 1}, {})))
    os.chmod(entry, 0o644)  # readable by others: not trusted
    assert _read() == walked
    # another set of functions is another entry
    symbols.read_btf("/", {"do_wp_page"}, cached=True)
    assert len(list(btf_cache.iterdir())) == 2


def test_the_trials_round_trip_through_the_per_boot_cache(btf_cache):
    from ksmtrace import cache
    from ksmtrace.kernel.capabilities import Trial

    trials = {"ringbuf": Trial(True, "attached"),
              "kprobe:do_wp_page": Trial(False, "EPERM", ("said", "this"))}
    runs = []

    def run() -> dict[str, Trial]:
        runs.append(1)
        return trials

    key = ["0.26.0", "", *trials]
    assert cache.per_boot("trials", key, dict[str, Trial], run) == trials
    assert cache.per_boot("trials", key, dict[str, Trial], run) == trials  # read back, typed
    assert len(runs) == 1
    (entry,) = (btf_cache.parent / "trials").iterdir()
    entry.write_bytes(b'{"ringbuf": {"ok": "yes", "detail": "x", "kernel_said": []}}')
    assert cache.per_boot("trials", key, dict[str, Trial], run) == trials  # mistyped: run again
    assert len(runs) == 2
