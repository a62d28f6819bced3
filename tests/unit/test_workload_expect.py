"""The workload's predictions (pure logic): what the kernel must show for a
shape, checked against figures measured on 6.18 (see workload.expect())."""

from __future__ import annotations

import argparse
import math

import pytest

from ksmtrace import workload as w
from ksmtrace.workload import Expectation, Measurement, WorkloadError, WorkloadSpec, expect
from ksmtrace.workload import model as wm
from ksmtrace.workload.child import _runs


def spec(n: int, m: int, d: int, **kw) -> WorkloadSpec:
    return WorkloadSpec(processes=n, pages=m, distinct=d, **kw)


# -- merging ------------------------------------------------------------------


def test_distinct_contents_merge_across_processes():
    e = expect(spec(2, 1000, 10))
    assert (e.pages_shared, e.pages_sharing, e.ksm_zero_pages) == (10, 1990, 0)
    assert e.merging_pages == (1000, 1000)
    assert e.unmerged == (0, 0)
    assert e.merged_pages == 2000


def test_one_page_pair_counts_in_both_processes():
    # Measured: 2 x 1 page of one content -> shared 1, sharing 1, and
    # ksm_merging_pages 1 in each process (the page the KSM page was made
    # from counts too).
    e = expect(spec(2, 1, 1))
    assert (e.pages_shared, e.pages_sharing) == (1, 1)
    assert e.merging_pages == (1, 1)


def test_chain_of_ksm_pages_beyond_max_page_sharing():
    # Measured: 2 x 600 copies of one content -> 5 KSM pages (256 x 4 + 176).
    e = expect(spec(2, 600, 1))
    assert (e.pages_shared, e.pages_sharing) == (5, 1195)
    assert e.merging_pages == (600, 600)


def test_leftover_copy_without_partner_stays_unmerged_in_last_process():
    # Measured: 3 x 171 = 513 = 2 x 256 + 1 -> shared 2, sharing 510, and the
    # last process in scan order keeps its last copy unmerged.
    e = expect(spec(3, 171, 1))
    assert (e.pages_shared, e.pages_sharing) == (2, 510)
    assert e.merging_pages == (171, 171, 170)
    assert e.unmerged == (0, 0, 1)


@pytest.mark.parametrize("copies", [2, 255, 256, 257, 258, 511, 512, 513, 1000])
def test_chain_rule_for_any_number_of_copies(copies):
    e = expect(spec(1, copies, 1))
    full, rem = divmod(copies, 256)
    shared = full + (rem >= 2)
    merged = copies - (rem == 1)
    assert (e.pages_shared, e.pages_sharing) == (shared, merged - shared)
    assert e.pages_shared == math.ceil(copies / 256) - (rem == 1)


def test_small_max_page_sharing():
    e = expect(spec(1, 5, 1), max_page_sharing=2)  # [2, 2] + leftover
    assert (e.pages_shared, e.pages_sharing) == (2, 2)
    assert e.unmerged == (1,)
    with pytest.raises(WorkloadError):
        expect(spec(1, 5, 1), max_page_sharing=1)


def test_single_copies_never_merge():
    e = expect(spec(1, 50, 50))
    assert (e.pages_shared, e.pages_sharing) == (0, 0)
    assert e.merging_pages == (0,)
    assert e.unmerged == (50,)


def test_more_contents_than_pages():
    e = expect(spec(2, 3, 10))  # contents 0..2, two copies each
    assert (e.pages_shared, e.pages_sharing) == (3, 3)
    assert e.merging_pages == (3, 3)


def test_uneven_content_counts():
    # 7 pages over 3 contents: 3, 2, 2 copies per process.
    e = expect(spec(2, 7, 3))
    assert (e.pages_shared, e.pages_sharing) == (3, 11)


def test_unique_pages_never_merge():
    e = expect(spec(3, 100, 10, unique_pages=40))
    assert (e.pages_shared, e.pages_sharing) == (10, 290)
    assert e.merging_pages == (100, 100, 100)
    assert e.unmerged == (40, 40, 40)


# -- zero pages ---------------------------------------------------------------


def test_zero_pages_with_use_zero_pages_go_to_the_zero_page():
    e = expect(spec(2, 100, 10, zero_pages=300), use_zero_pages=True)
    assert (e.pages_shared, e.pages_sharing, e.ksm_zero_pages) == (10, 190, 600)
    assert e.merging_pages == (100, 100)  # measured: zero-page merges not included
    assert e.zero_pages == (300, 300)
    assert e.unmerged == (0, 0)


def test_zero_pages_without_use_zero_pages_are_one_more_content():
    e = expect(spec(2, 100, 10, zero_pages=300), use_zero_pages=False)
    # 600 zero copies: a chain of 3 KSM pages (256, 256, 88).
    assert (e.pages_shared, e.pages_sharing, e.ksm_zero_pages) == (13, 787, 0)
    assert e.merging_pages == (400, 400)
    assert e.zero_pages == (0, 0)


def test_zero_pages_only():
    e = expect(spec(1, 0, 1, zero_pages=10), use_zero_pages=True)
    assert e == Expectation(0, 0, 10, (0,), (10,), (0,))


# -- after copy-on-write --------------------------------------------------------


def test_written_page_leaves_a_ksm_page_with_one_mapper():
    e = expect(spec(2, 1, 1), written=[{0}])
    assert (e.pages_shared, e.pages_sharing) == (1, 0)
    assert e.merging_pages == (0, 1)
    assert e.unmerged == (0, 0)  # written pages are counted apart


def test_writing_every_copy_removes_the_ksm_page():
    e = expect(spec(2, 1, 1), written=[{0}, {0}])
    assert (e.pages_shared, e.pages_sharing) == (0, 0)


def test_write_makes_room_for_the_leftover():
    # Measured: 3 x 171 with 17 writes per process -> 154 merged each: the
    # leftover of process 2 joined the dup the writes made room in.
    written = [set(range(0, 170, 10))] * 3
    e = expect(spec(3, 171, 1), written=written)
    assert e.merging_pages == (154, 154, 154)
    assert e.merged_pages == 3 * 154
    assert e.pages_shared == 2


def test_written_zero_pages_leave_the_zero_page():
    e = expect(spec(1, 0, 1, zero_pages=10), use_zero_pages=True, written=[{0, 1, 2}])
    assert e.ksm_zero_pages == 7


# -- COW plans ------------------------------------------------------------------


def test_cow_plan_spreads_writes_and_rounds_half_up():
    assert w.cow_plan([list(range(10))], 0.5) == [[0, 2, 4, 6, 8]]
    assert w.cow_plan([[7]], 0.5) == [[7]]
    assert w.cow_plan([[1, 2, 3]], 0.0) == [[]]
    assert w.cow_plan([[1, 2, 3], []], 1.0) == [[1, 2, 3], []]
    with pytest.raises(WorkloadError):
        w.cow_plan([[1]], 1.5)


def test_cow_plan_takes_the_same_share_of_every_content():
    s = spec(2, 3000, 30, zero_pages=100)
    m = wm.model(s)
    plan = w.cow_plan(m.ksm_mapped, 0.3, spec=s)
    for pages in plan:
        assert len(pages) == 930
        per_content = [sum(1 for i in pages if i < 3000 and i % 30 == k) for k in range(30)]
        assert per_content == [30] * 30
        assert sum(1 for i in pages if i >= 3000) == 30
    e = expect(s, written=plan)
    assert (e.pages_shared, e.pages_sharing) == (31, 4340 - 31)


def test_cow_plan_skips_pages_already_written():
    assert w.cow_plan([[1, 2, 3, 4]], 1.0, already=[{1, 2}]) == [[3, 4]]


def test_cow_targets_are_ksm_mapped_pages_only():
    m = wm.model(spec(3, 171, 1, unique_pages=5, zero_pages=5), use_zero_pages=True)
    assert [len(x) for x in m.ksm_mapped] == [171, 171, 170]  # no leftover, unique, zero
    assert all(p < 171 for pages in m.ksm_mapped for p in pages)
    m = wm.model(spec(2, 10, 5, zero_pages=3), use_zero_pages=False)
    assert m.ksm_mapped[0] == tuple(range(13))  # zero content is a KSM page here


def test_restore_keeps_one_page_where_a_copy_would_be_left_without_partner():
    s = spec(3, 171, 1)
    written = [{0, 10}, {0}, {0, 160}]
    assert w.restore_plan(s, written) == [[0, 10], [0], [0]]  # (2, 160) stays written
    e = expect(s, written=[set(), set(), {160}])
    assert e.merging_pages == (171, 171, 170) and (e.pages_shared, e.pages_sharing) == (2, 510)
    # No such content: everything goes back.
    assert w.restore_plan(spec(2, 600, 1), [{1, 2}, {3}]) == [[1, 2], [3]]
    # Zero pages are a content only without use_zero_pages.
    z = spec(1, 0, 1, zero_pages=257)
    assert w.restore_plan(z, [{5, 9}]) == [[5]]
    assert w.restore_plan(z, [{5, 9}], use_zero_pages=True) == [[5, 9]]


# -- spec, contents, measurements, CLI ------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(processes=0),
        dict(pages=-1),
        dict(pages=0, zero_pages=0, unique_pages=0),
        dict(distinct=0),
        dict(register="mmap"),
    ],
)
def test_spec_validation(bad):
    with pytest.raises(WorkloadError):
        WorkloadSpec(**bad).validate()


def test_layout_and_contents():
    s = spec(2, 4, 2, unique_pages=2, zero_pages=1)
    nonce = w.new_nonce()
    pages = [w.page_content(s, nonce, 0, i) for i in range(s.region_pages)]
    assert all(len(p) == w.PAGE_SIZE for p in pages)
    assert pages[0] == pages[2] != pages[1] == pages[3]
    assert pages[4] != pages[5] and pages[4] not in pages[:4]
    assert w.page_content(s, nonce, 1, 4) != pages[4]  # unique per process
    assert pages[6] == bytes(w.PAGE_SIZE)
    assert all(any(p) for p in pages[:6])
    assert w.dup_content(nonce, 0) != w.dup_content(w.new_nonce(), 0)  # runs never merge
    marker = w.cow_marker(1, 2, 3)
    assert len(marker) == 32 and marker != w.cow_marker(1, 2, 4)
    assert not w.dup_content(nonce, 0).startswith(marker[:8])


def test_measurement_matching():
    e = Expectation(1, 2, 3, (4, 5), (0, 0), (0, 0))
    m = Measurement(1, 2, 3, 10, 0, (4, 5), (0, 0), 1)
    assert m.matches(e) and m.matches_global(e) and m.matches_own(e)
    assert not Measurement(1, 2, 3, 10, 0, (4, None), (0, 0), 1).matches(e)
    other = Measurement(9, 2, 3, 10, 0, (4, 5), (0, 0), 1)
    assert other.matches_own(e) and not other.matches(e)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    w.add_cli(p.add_subparsers())
    return p.parse_args(["workload", *argv])


def test_cli_defaults_and_flags():
    a = parse()
    assert (a.processes, a.pages, a.distinct, a.register) == (2, 1000, 10, "madvise")
    assert a.drive_ksmd and a.hold == 0 and a.use_zero_pages is None and a.func is w.run_cli
    a = parse("-n", "3", "-p", "600", "-d", "1", "-z", "5", "--register", "prctl",
              "--no-drive-ksmd", "--use-zero-pages", "1", "--cow-fraction", "0.5",
              "--cow-rate", "100", "--unmerge", "--hold", "--json")  # fmt: skip
    assert (a.processes, a.pages, a.distinct, a.zero_pages) == (3, 600, 1, 5)
    assert a.register == "prctl" and not a.drive_ksmd and a.use_zero_pages == 1
    assert a.unmerge and a.json and math.isinf(a.hold)
    assert parse("--hold", "2.5").hold == 2.5


def test_cli_page_states():
    assert parse().state == []
    a = parse("--state", "protnone", "--state", "uffd_wp:0.25", "--state", "discard:1")
    assert a.state == [("protnone", 0.5), ("uffd_wp", 0.25), ("discard", 1.0)]


@pytest.mark.parametrize("argv", [["-n", "0"], ["-p", "-1"], ["--register", "ksm"],
                                  ["--state", "mlocked"], ["--state", "protnone:x"],
                                  ["--state", "discard:1.5"], ["--state", "discard:nan"]])
def test_cli_rejects_bad_values(argv):
    with pytest.raises(SystemExit):
        parse(*argv)


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    assert "examples:" in out and "--cow-fraction" in out


@pytest.mark.parametrize(
    ("pages", "runs"),
    [
        ([], []),
        ([5], [(5, 1)]),
        ([3, 1, 2, 7, 8, 10], [(1, 3), (7, 2), (10, 1)]),
    ],
)
def test_page_runs_cover_each_page_once(pages, runs):
    """set_state issues one mprotect/ioctl/madvise per run of pages."""
    assert list(_runs(pages)) == runs
