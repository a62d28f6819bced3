"""doctor's own-cost section, worded from a measured run (the measuring
itself is a kernel test: tests/kernel/test_bench_kernel.py)."""

from ksmtrace import doctor


def test_cost_section_lists_each_program_with_runs_and_time_per_run():
    cost = {"seconds": 1.0, "stats": "fd", "error": None, "ksm_run": 1, "programs": [
        {"name": "ksm:ksm_merge_with_ksm_page", "runs": 250000, "run_time_ns": 20000000,
         "ns_per_run": 80},
        {"name": "ksm:ksm_advisor", "runs": 0, "run_time_ns": 0, "ns_per_run": None}]}
    text = doctor.render_cost(cost)
    assert "ksm:ksm_merge_with_ksm_page" in text and "250,000" in text and " 80" in text
    assert "20.000ms" in text
    assert "total 20.000 ms of CPU in 1 s (2.000 % of one CPU)" in text
    assert "run=0" not in text


def test_cost_section_says_why_it_is_missing():
    text = doctor.render_cost({"seconds": 1.0, "stats": None, "programs": [],
                               "error": "no kernel headers", "ksm_run": 0})
    assert "not measured: no kernel headers" in text
    idle = doctor.render_cost({"seconds": 1.0, "stats": "fd", "programs": [], "error": None,
                               "ksm_run": 0})
    assert "ksmd is stopped (run=0)" in idle
