"""Smoke run of the pure benchmarks through the harness: each runs (quick
sizes) and produces rows that keep the contract in bench/README.md. The
figures are not checked here; they live in bench/RESULTS.md."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
from bench import run as harness  # noqa: E402

PURE = ["collector", "replay", "export_scrape", "tui_frame"]


@pytest.mark.parametrize("name", PURE)
def test_pure_benchmark_runs_and_keeps_the_contract(name):
    if not (ROOT / "bench" / f"{name}.py").exists():
        rows, _, ok = harness.run_module(name, quick=True)
        assert ok and rows[0]["name"] == f"{name}: not available"
        return
    rows, seconds, ok = harness.run_module(name, quick=True)
    assert ok, rows
    assert rows and seconds > 0
    for r in rows:
        assert list(r) == list(harness.KEYS) or set(r) == set(harness.KEYS)
        assert math.isfinite(r["value"]) and r["value"] > 0, r
        if r["target"] is not None:
            assert isinstance(r["met"], bool)


def test_an_absent_module_is_a_not_available_row():
    rows, _, ok = harness.run_module("no_such_benchmark", quick=True)
    assert ok
    assert rows == [{"name": "no_such_benchmark: not available", "value": rows[0]["value"],
                     "unit": "", "target": None, "met": None,
                     "note": "bench/no_such_benchmark.py is not in this checkout"}]
    assert harness.fmt_value(rows[0]["value"]) == "-"


def test_a_row_breaking_the_contract_is_an_error_row(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text(
        "def run(quick):\n    return [{'name': 'x', 'value': 'fast', 'unit': 's'}]\n")
    monkeypatch.setattr(harness, "BENCH", tmp_path)
    rows, _, ok = harness.run_module("broken", quick=True)
    assert not ok and rows[0]["name"] == "broken: error" and rows[0]["met"] is False


def test_harness_prints_the_table_and_writes_results(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    assert harness.main(["--quick", "--only", "collector", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "collector, 100-event ticks" in printed and ">= 1,000,000 events/s" in printed
    text = out.read_text()
    for key in ("kernel:", "cpu:", "cores:", "load before:", "date:", "qemu guests running:"):
        assert key in text
    assert "collector CPU at 300k events/s" in text
