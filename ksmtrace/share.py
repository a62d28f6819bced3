"""`ksmtrace share`: who shares KSM pages with whom, by workload or process.

Reads every KSM process's page map once (root), builds the sharing map
(ksmtrace/sharing.py) and prints it: each group's KSM pages, alone and with
others, the matrix of frames in common, the frames with the most mappers,
and the findings an operator acts on (cross-tenant sharing, the memory a
copy-on-write storm would need against MemAvailable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ksmtrace import argtypes
from ksmtrace.errors import KsmtraceError, not_root
from ksmtrace.grouping import workload_of
from ksmtrace.kernel.identity import Workload
from ksmtrace.kernel.procfs import PAGE_SIZE
from ksmtrace.sources.counters import SharingSample, sample_sharing

if TYPE_CHECKING:  # numpy: imported when a map is built, not by every command's parser
    from ksmtrace.sharing import SharingMap

EPILOG = """\
examples:
  sudo ksmtrace share                   which VMs, containers, services share KSM pages
  sudo ksmtrace share --by process      the same per process
  sudo ksmtrace share --json | jq '.pairs[:5]'

columns: KSM pages the group maps (page table entries), those whose frame only
the group maps (ALONE) and those whose frame other groups map too (SHARED),
KSM's own count (ksm_stat ksm_merging_pages: a forked child maps its parent's
KSM pages without counting them), and the memory the host would need if the
group wrote every KSM page it maps (IF WRITTEN)."""

TENANTS = ("vm", "container")  # kinds whose sharing is the side-channel precondition
MATRIX_MAX = 12  # groups drawn as a matrix; beyond, the top pairs are listed


DESCRIPTION = (
    "Read every KSM process's page map and show which workloads (or\n"
    "processes) map the same KSM page frames, and what a write storm would cost.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = argtypes.subcommand(sub, "share", "who shares KSM pages with whom (page maps; root)",
                            DESCRIPTION, EPILOG)
    p.add_argument("--by", choices=("workload", "process"), default="workload",
                   help="group by workload (VM, container, service; default) or process")
    p.add_argument("-j", "--json", action="store_true", help="one JSON object")
    p.add_argument("--top", type=argtypes.count, default=10, metavar="N",
                   help="frames with the most mappers to list (default 10)")
    p.set_defaults(func=run)


def _label(p, by: str) -> str:
    return workload_of(p).label if by == "workload" else f"{p.pid} {p.comm}"


def _group(s: SharingSample, by: str) -> tuple[list[str], list[Workload], list[tuple[int, Any]],
                                               dict[int, list]]:
    labels: list[str] = []
    kinds: list[Workload] = []
    index: dict[str, int] = {}
    members: dict[int, list] = {}
    parts = []
    for p in s.processes:
        if p.pid not in s.pfns:
            continue
        label = _label(p, by)
        if label not in index:
            index[label] = len(labels)
            labels.append(label)
            kinds.append(workload_of(p))
        g = index[label]
        members.setdefault(g, []).append(p)
        parts.append((g, s.pfns[p.pid]))
    return labels, kinds, parts, members


def summarise(s: SharingSample, by: str = "workload", top: int = 10) -> dict[str, Any]:
    from ksmtrace.sharing import build

    labels, workloads, parts, members = _group(s, by)
    m = build(labels, parts, top)
    mapped = int(m.pages.sum())
    merged = s.ksm.merged_pages
    groups = []
    for g, label in enumerate(labels):
        procs = members.get(g, [])
        groups.append({
            "group": label, "kind": workloads[g].kind,
            "processes": [p.pid for p in procs],
            "ksm_pages": int(m.pages[g]), "alone": int(m.alone[g]),
            "shared": int(m.with_others[g]), "duplicates": int(m.matrix[g, g]),
            "ksm_merging_pages": sum(p.stat.ksm_merging_pages or 0 for p in procs),
            "if_written_bytes": m.exposure([g]),
        })
    order = sorted(range(len(labels)), key=lambda g: (-int(m.pages[g]), labels[g]))
    pairs = [{"a": labels[a], "b": labels[b], "frames": n, "bytes": n * PAGE_SIZE}
             for a, b, n in m.pairs()]
    return {
        "by": by,
        "page_size": PAGE_SIZE,
        "processes": len(s.pfns),
        "unread": {str(pid): why for pid, why in sorted(s.unread.items())},
        "frames": m.frames,
        "ksm_pages_mapped": mapped,
        "sysfs_merged_pages": merged,  # pages_shared + pages_sharing
        "ksm_inferred": s.inferred,
        "mem_available": s.mem_available,
        "seconds": round(s.seconds, 3),
        "groups": [groups[g] for g in order],
        "matrix": {"groups": [labels[g] for g in order],
                   "frames": [[int(m.matrix[a, b]) for b in order] for a in order]},
        "pairs": pairs,
        "top_pages": [{"pfn": t.pfn, "mappers": t.mappers,
                       "owners": [{"group": labels[g], "pages": n} for g, n in t.owners]}
                      for t in m.top],
        "findings": findings(m, labels, workloads, s.mem_available),
    }


def findings(m: SharingMap, labels: list[str], workloads: list[Workload],
             mem_available: int | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    tenants = [(a, b, n) for a, b, n in m.pairs()
               if workloads[a].kind in TENANTS and workloads[b].kind in TENANTS]
    if tenants:
        n = sum(x[2] for x in tenants)
        a, b, k = tenants[0]
        out.append({
            "level": "warning", "what": "cross-tenant sharing",
            "text": f"{len(tenants)} pairs of VMs or containers share {n} KSM page frames "
                    f"(most: {labels[a]} and {labels[b]}, {k}); page sharing across "
                    "tenants is the precondition of KSM side channels",
            "fix": "if tenants must not share memory, turn KSM off for them "
                   "(QEMU -machine mem-merge=off, or prctl PR_SET_MEMORY_MERGE 0)",
            "frames": n})
    if m.pages.sum():
        worst = sorted(range(len(labels)), key=lambda g: -int(m.pages[g]))[:5]
        need = m.exposure(worst)
        item = {"level": "info", "what": "exposure", "groups": [labels[g] for g in worst],
                "bytes": need, "mem_available": mem_available,
                "text": f"if the top {len(worst)} groups wrote every KSM page they map, the "
                        f"host would need {need / 2**20:.1f} MiB more"}
        if mem_available is not None:
            item["text"] += f" (MemAvailable {mem_available / 2**20:.1f} MiB)"
            if need > mem_available:
                item["level"] = "warning"
                item["fix"] = ("a write storm would exhaust memory: keep overcommit below "
                               "what the host can back, or add swap")
        out.append(item)
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_share(r: dict[str, Any]) -> str:
    out = [f"{r['processes']} KSM processes read in {r['seconds']} s: {r['frames']} KSM frames, "
           f"{r['ksm_pages_mapped']} KSM pages mapped (sysfs pages_shared + pages_sharing: "
           f"{r['sysfs_merged_pages']})"]
    if r["ksm_inferred"]:
        out.append("  KSM pages inferred (anonymous, mapped twice or more): this kernel's "
                   "kpageflags marks every anonymous page KSM")
    for pid, why in r["unread"].items():
        out.append(f"  not read: {pid}: {why}")
    out.append(f"\n{r['by'].upper():32} {'PROCS':>5} {'KSM PAGES':>10} {'ALONE':>9} "
               f"{'SHARED':>9} {'DUPS':>8} {'KSM_STAT':>9} {'IF WRITTEN':>11}")
    for g in r["groups"]:
        out.append(f"{g['group'][:32]:32} {len(g['processes']):>5} {g['ksm_pages']:>10} "
                   f"{g['alone']:>9} {g['shared']:>9} {g['duplicates']:>8} "
                   f"{g['ksm_merging_pages']:>9} {_size(g['if_written_bytes']):>11}")
    if not r["groups"]:
        out.append("(no process maps a KSM page)")
    names, grid = r["matrix"]["groups"], r["matrix"]["frames"]
    if 1 < len(names) <= MATRIX_MAX:
        out.append("\nframes in common (diagonal: duplicate pages inside the group)")
        out.append(" " * 22 + "".join(f"{i:>9}" for i in range(len(names))))
        for i, (name, row) in enumerate(zip(names, grid, strict=True)):
            out.append(f"{i:>2} {name[:18]:18} " + "".join(f"{v:>9}" for v in row))
    elif r["pairs"]:
        out.append("\nmost frames in common")
        for p in r["pairs"][:MATRIX_MAX]:
            out.append(f"  {p['a']} <-> {p['b']}: {p['frames']} ({_size(p['bytes'])})")
    if r["top_pages"]:
        out.append("\nframes with the most mappers")
        for t in r["top_pages"]:
            owners = ", ".join(f"{o['group']} x{o['pages']}" for o in t["owners"][:4])
            more = f", +{len(t['owners']) - 4} more" if len(t["owners"]) > 4 else ""
            out.append(f"  pfn {t['pfn']:#x}: {t['mappers']} mappers: {owners}{more}")
    for f in r["findings"]:
        out.append(f"\n{f['level']}: {f['what']}: {f['text']}")
        if "fix" in f:
            out.append(f"  how to fix: {f['fix']}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise not_root("share (page maps and /proc/kpageflags)")
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            print(f"\rksmtrace share: reading page maps {done}/{total}", end="",
                  file=sys.stderr, flush=True)

    s = sample_sharing(progress=progress)
    if tty:
        print(file=sys.stderr)
    if not s.processes:
        raise KsmtraceError("no process uses KSM (none has mergeable memory)",
                            "start one: ksmtrace workload, or QEMU with -machine mem-merge=on")
    r = summarise(s, args.by, args.top)
    print(json.dumps(r, indent=2) if args.json else format_share(r))
    return 0


def child_main(top: int) -> int:
    """`python -m ksmtrace.share TOP`: the exporter's reader of the sharing
    map, run as a child so that the exporter itself never maps numpy. As JSON
    on stdout, what the exporter serves of the map by workload: the number of
    workloads, the TOP pairs, the findings, MemAvailable and the read's cost.
    The whole map (every pair, the matrix) grows with the square of the
    workloads, and the exporter would hold it. An error on stderr and exit 1."""
    try:
        r = summarise(sample_sharing(), "workload")
    except (KsmtraceError, OSError) as e:
        print(e.message if isinstance(e, KsmtraceError) else str(e), file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps({
        "groups": len(r["groups"]), "pairs": r["pairs"][:top], "findings": r["findings"],
        "mem_available": r["mem_available"], "seconds": r["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(int(sys.argv[1])))
