"""The churn benchmark's smoke run (bench/churn.py, 200 processes): it runs,
produces its rows, and leaves nothing behind. Figures are not checked here
beyond what must hold at any size: every page of every child merged and
traced once, the exporter's per-mm maps empty again once the children
exited, no churn process and no program left."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ksmtrace.collector import MAX_EXITED
from ksmtrace.kernel import sysfs

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parent.parent.parent


def test_churn_benchmark_runs_and_leaves_nothing(quiet_ksm, monkeypatch, count_programs,
                                                 programs_back_to):
    sys.path.insert(0, str(ROOT))
    try:
        from bench import churn, ksmd_overhead
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setattr(ksmd_overhead, "LOCK_HELD", True)  # the kernel tier holds it
    knobs = {k: sysfs.read_knob(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
    programs = count_programs()
    r = churn.measure(200, alive=100, step=100)
    assert r["statuses"] == {"0": 200}, r["statuses"]
    assert r["merges"] == 200 * churn.PAGES
    assert r["cow_ksm"] == 200  # one break each, and nothing else broke meanwhile
    assert set(r["maps"]) == set(churn.MAP_NAMES)
    assert [s["started"] for s in r["samples"]] == [0, 100, 200]
    assert r["end"]["entries"] == {"mm_stats": 0, "owners": 0}  # exited mms are deleted
    sizes = r["end"]["twin"]["sizes"]
    assert all(n <= MAX_EXITED + 100 + 2 for n in sizes.values()), sizes
    rows = churn.rows_from(r)
    for x in rows:
        assert set(x) == {"name", "value", "unit", "target", "met", "note"}
    names = [x["name"] for x in rows]
    assert "churn: processes per second" in names
    assert any(n.startswith("agent memory bounded") for n in names)
    assert "kernel map mm_stats: most entries during the churn" in names
    # left behind: nothing
    assert {k: sysfs.read_knob(k) for k in knobs} == knobs
    assert sysfs.read_sysfs().merged_pages == 0
    left = subprocess.run(["pgrep", "-x", churn.COMM.decode()], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
    assert programs_back_to(programs)
