"""The sharing map on page maps recorded from the real host (the fixture of
tests/unit/test_pagemap.py: three processes, 64 pages of 4 contents each,
merged by ksmd; dup-0 then wrote one of its pages)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ksmtrace.collector import observe
from ksmtrace.export.collector import make_registry, scrape
from ksmtrace.export.metrics import sharing_families
from ksmtrace.kernel.pagemap import PAGE_SIZE, read_page_map
from ksmtrace.share import format_share, summarise
from ksmtrace.sharing import build, ksm_pfns
from ksmtrace.sources.counters import sample_sharing
from ksmtrace.sources.replay import ReplaySource

HOST = Path(__file__).resolve().parent.parent / "fixtures" / "host-6.18"
MANIFEST = json.loads((HOST / "MANIFEST.json").read_text())
DUPS = [MANIFEST["roles"][f"dup-{i}"] for i in range(3)]
CONTENTS = MANIFEST["dup_area_layout_pages"]["duplicate_contents"]

pytestmark = pytest.mark.skipif(
    PAGE_SIZE != MANIFEST["page_size"], reason="fixtures recorded with another page size"
)


@pytest.fixture(scope="module")
def pfns() -> list[np.ndarray]:
    return [ksm_pfns(read_page_map(pid, root=HOST)) for pid in DUPS]


def test_one_group_per_process(pfns):
    m = build(["dup-0", "dup-1", "dup-2"], list(enumerate(pfns)))
    pages = [len(p) for p in pfns]
    assert pages == [63, 64, 64]  # dup-0 copied one page on write
    assert m.pages.tolist() == pages and m.frames == CONTENTS
    # every frame is mapped by all three: nothing alone, everything shared
    assert m.alone.tolist() == [0, 0, 0] and m.with_others.tolist() == pages
    assert (m.matrix == m.matrix.T).all()
    assert m.matrix[~np.eye(3, dtype=bool)].tolist() == [CONTENTS] * 6
    # the diagonal: each process's own duplicates (pages beyond one per frame)
    assert np.diag(m.matrix).tolist() == [p - CONTENTS for p in pages]
    assert m.pairs()[0][2] == CONTENTS and len(m.pairs()) == 3
    # the frames' mappers: 48 each, one fewer where dup-0 wrote
    assert sorted(t.mappers for t in m.top) == [47] + [48] * (CONTENTS - 1)
    assert sum(t.mappers for t in m.top) == sum(pages)
    # writing everything: a copy per page; no frame is freed while others map it
    assert m.exposure([0]) == 63 * PAGE_SIZE
    assert m.exposure([0, 1, 2]) == (sum(pages) - CONTENTS) * PAGE_SIZE


def test_groups_of_several_processes(pfns):
    m = build(["vm", "ctr"], [(0, pfns[0]), (0, pfns[1]), (1, pfns[2])])
    assert m.pages.tolist() == [127, 64]
    assert m.matrix.tolist() == [[127 - CONTENTS, CONTENTS], [CONTENTS, 64 - CONTENTS]]
    assert m.top[0].owners[0][0] == 0  # the VM maps most of each frame
    # the VM alone would free nothing: the container still maps every frame
    assert m.exposure([0]) == 127 * PAGE_SIZE


def test_no_ksm_pages():
    m = build(["a"], [(0, np.empty(0, np.int64))])
    assert m.frames == 0 and m.pages.tolist() == [0] and m.top == () and m.pairs() == []
    assert m.exposure([0]) == 0
    m = build([], [])
    assert m.frames == 0 and m.matrix.shape == (0, 0)


def test_share_summary_of_the_recorded_host():
    s = sample_sharing(HOST)
    r = summarise(s, "process")
    # the fixture kept the page maps of the three duplicate processes only
    assert sorted(int(p) for p in r["unread"]) == sorted(set(s.unread))
    assert r["frames"] == CONTENTS and r["ksm_pages_mapped"] == 63 + 64 + 64
    for g in r["groups"]:
        assert g["ksm_pages"] == g["ksm_merging_pages"] == g["alone"] + g["shared"]
    grid = np.array(r["matrix"]["frames"])
    assert (grid == grid.T).all()
    assert [f["what"] for f in r["findings"]] == ["exposure"]  # no VM or container here
    text = format_share(r)
    assert "frames in common" in text and "IF WRITTEN" in text
    assert json.loads(json.dumps(r)) == r


def test_sharing_families_of_the_recorded_host():
    r = summarise(sample_sharing(HOST), "workload")
    fams = sharing_families(r, top=2, wall=1.5e9)
    reg, col = make_registry()
    col.set_sharing(fams)
    rec = HOST.parent / "recordings" / "host-6.18-workload.ksmrec"
    with observe(ReplaySource(rec, warn=None)) as obs:
        col.publish(next(obs.snapshots()))
    # the top 2 of the 3 pairs, each 4 frames in common
    assert [(p["a"], p["b"]) for p in r["pairs"]][:2] == \
        [(s.labels["a"], s.labels["b"]) for s in fams[0].samples]
    assert [s.value for s in fams[0].samples] == [CONTENTS * PAGE_SIZE] * 2
    get = reg.get_sample_value
    assert get("ksmtrace_sharing_cross_tenant_frames") == 0  # processes, not tenants
    assert get("ksmtrace_sharing_exposure_bytes") == r["findings"][-1]["bytes"]
    assert get("ksmtrace_sharing_mem_available_bytes") == r["mem_available"]
    assert get("ksmtrace_sharing_timestamp_seconds") == 1.5e9
    assert b"ksmtrace_sharing_bytes{" in scrape(reg)
