"""KSM sysfs reader and knob writer, on sysfs trees recorded from 6.18 (and the
6.1-format tree derived from it)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import time
from pathlib import Path

import pytest

from ksmtrace import signals
from ksmtrace.errors import KsmtraceError, NoKsm
from ksmtrace.kernel import sysfs
from ksmtrace.kernel.sysfs import KsmKnobs, read_knob, read_sysfs
from ksmtrace.signals import Terminated

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HOST = FIXTURES / "host-6.18"
ADVISOR = FIXTURES / "host-6.18-advisor"
OLD = FIXTURES / "host-6.1"


def raw(root: Path, name: str) -> str:
    return (root / sysfs.KSM_DIR / name).read_text().strip()


def test_every_recorded_file_is_read():
    s = read_sysfs(HOST)
    assert s.extra == {}
    for name in os.listdir(HOST / sysfs.KSM_DIR):
        if name == "advisor_mode":
            continue
        assert getattr(s, name) == int(raw(HOST, name)), name
    assert s.run == 1  # recorded while ksmd ran
    assert sysfs.RUN_STATES[s.run] == "running"


def test_signed_counters_keep_their_sign():
    s = read_sysfs(HOST)
    # Recorded with 32768 unique mergeable pages: rmap_items cost more than
    # merging saved, so the kernel's own general_profit is negative.
    assert raw(HOST, "general_profit").startswith("-")
    assert s.general_profit is not None and s.general_profit < 0
    assert s.ksm_zero_pages is not None and s.ksm_zero_pages > 0


def test_derived_figures():
    s = read_sysfs(HOST)
    assert s.merged_pages == s.pages_shared + s.pages_sharing
    assert s.saved_pages == s.pages_sharing + s.ksm_zero_pages
    assert s.sharing_ratio == pytest.approx(s.pages_sharing / s.pages_shared)
    d = s.as_dict()
    assert d["general_profit"] == s.general_profit and d["advisor_mode"] == "none"


def test_advisor_mode_is_the_bracketed_word():
    assert raw(HOST, "advisor_mode") == "[none] scan-time"
    assert read_sysfs(HOST).advisor_mode == "none"
    assert raw(ADVISOR, "advisor_mode") == "none [scan-time]"
    assert read_sysfs(ADVISOR).advisor_mode == "scan-time"
    assert read_knob("advisor_mode", ADVISOR) == "scan-time"


def test_6_1_tree_missing_files_are_none():
    s = read_sysfs(OLD)
    for name in (
        "general_profit",
        "ksm_zero_pages",
        "smart_scan",
        "pages_scanned",
        "pages_skipped",
        "advisor_mode",
        "advisor_max_cpu",
    ):
        assert getattr(s, name) is None, name
    assert s.pages_sharing == read_sysfs(HOST).pages_sharing
    assert s.saved_pages == s.pages_sharing  # no zero-page term without the file
    assert read_knob("smart_scan", OLD) is None
    assert s.extra == {}


def test_unknown_and_unparsable_files_go_to_extra(tmp_path):
    root = copy_tree(HOST, tmp_path)
    (root / sysfs.KSM_DIR / "some_future_counter").write_text("7\n")
    (root / sysfs.KSM_DIR / "pages_to_scan").write_text("garbage\n")
    s = read_sysfs(root)
    assert s.extra == {"some_future_counter": "7", "pages_to_scan": "garbage"}
    assert s.pages_to_scan is None


def test_no_ksm_dir(tmp_path):
    with pytest.raises(NoKsm):
        read_sysfs(tmp_path)
    with pytest.raises(NoKsm):
        KsmKnobs(tmp_path).set(run=1)


# -- KsmKnobs on a copy of the recorded directory ---------------------------


def copy_tree(src: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(src / sysfs.KSM_DIR, root / sysfs.KSM_DIR)
    return root


def knob_files(root: Path) -> dict[str, str]:
    d = root / sysfs.KSM_DIR
    return {name: (d / name).read_text() for name in sorted(os.listdir(d))}


@pytest.fixture
def knob_root(tmp_path: Path) -> Path:
    return copy_tree(HOST, tmp_path)


def test_knobs_restored_after_success(knob_root):
    before = knob_files(knob_root)
    with KsmKnobs(knob_root) as k:
        k.set(pages_to_scan=5, sleep_millisecs=1, advisor_mode="scan-time")
        k.set(run=0)
        assert read_knob("pages_to_scan", knob_root) == 5
        assert raw(knob_root, "advisor_mode") == "scan-time"
    assert k.restore_errors == []
    after = knob_files(knob_root)
    # advisor_mode is written back as the bare word, the kernel's input form.
    assert after.pop("advisor_mode") == "none\n"
    before.pop("advisor_mode")
    assert after == before


def test_knobs_restored_after_exception(knob_root):
    before = knob_files(knob_root)
    with pytest.raises(RuntimeError):
        with KsmKnobs(knob_root) as k:
            k.set(pages_to_scan=5, use_zero_pages=0)
            raise RuntimeError("boom")
    assert knob_files(knob_root) == before


def test_knobs_restored_after_sigterm(knob_root):
    before = knob_files(knob_root)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as exc, signals.installed():
        with KsmKnobs(knob_root) as k:
            k.set(pages_to_scan=5, sleep_millisecs=1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises long before this ends
    assert exc.value.code == 128 + signal.SIGTERM
    assert knob_files(knob_root) == before
    assert signal.getsignal(signal.SIGTERM) is handler


def test_run_is_restored_last(knob_root, monkeypatch):
    written: list[str] = []
    real_write = pathlib.Path.write_text

    def spy(self, data, *a, **kw):
        written.append(self.name)
        return real_write(self, data, *a, **kw)

    with KsmKnobs(knob_root) as k:
        k.set(run=0)  # recorded value is 1: a real change
        k.set(sleep_millisecs=5, pages_to_scan=7)
        monkeypatch.setattr(pathlib.Path, "write_text", spy)
    monkeypatch.undo()
    assert written[-1] == "run"
    assert sorted(written) == ["pages_to_scan", "run", "sleep_millisecs"]
    assert read_knob("run", knob_root) == 1


def test_restore_only_writes_what_changed(knob_root, monkeypatch):
    with KsmKnobs(knob_root) as k:
        k.set(pages_to_scan=5)
        k.set(pages_to_scan=int(raw(HOST, "pages_to_scan")))  # back by hand
        monkeypatch.setattr(
            pathlib.Path, "write_text", lambda *a, **kw: pytest.fail("nothing to restore")
        )
    monkeypatch.undo()


def test_unknown_knob_on_older_kernel(tmp_path):
    root = copy_tree(OLD, tmp_path)
    with pytest.raises(KsmtraceError, match="smart_scan"):
        with KsmKnobs(root) as k:
            k.set(smart_scan=0)
    assert not (root / sysfs.KSM_DIR / "smart_scan").exists()


def test_restore_failure_is_reported(knob_root, capsys):
    with KsmKnobs(knob_root) as k:
        k.set(sleep_millisecs=1)
        path = knob_root / sysfs.KSM_DIR / "sleep_millisecs"
        path.unlink()
        path.mkdir()  # now neither readable nor writable as a file
    assert len(k.restore_errors) == 1 and k.restore_errors[0].startswith("sleep_millisecs=")
    assert "could not restore KSM knobs" in capsys.readouterr().err
