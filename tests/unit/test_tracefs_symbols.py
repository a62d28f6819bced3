"""tracefs discovery and the kallsyms reader, on trees recorded from the host."""

import shutil
from pathlib import Path

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
