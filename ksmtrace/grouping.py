"""Process rows grouped by workload: the VM, container or service they
belong to (kernel/identity.py), or by kind of workload. Pure: every view
that groups (top, stat, report, export) groups the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from ksmtrace.kernel.identity import Workload, identify
from ksmtrace.model import ProcessRow

GROUPS = ("process", "workload", "kind")  # what one row stands for


def workload_of(p: ProcessRow) -> Workload:
    return p.workload or identify((), p.cgroup, p.comm, p.pid)


def _total(values) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def group_rows(rows: tuple[ProcessRow, ...], by: str = "process", last_known: bool = False
               ) -> tuple[ProcessRow, ...]:
    """One row per process, per workload or per kind of workload. A group's
    row sums its processes (ksm_stat figures of live ones only: an exited
    process's are stale; with `last_known`, every process's last ones, as a
    report of a whole recording wants) and carries its largest process's
    pid, so the page map opens on that one; COMM says how many processes it
    has."""
    if by == "process":
        return rows
    groups: dict[object, list[ProcessRow]] = {}
    for r in rows:
        w = workload_of(r)
        groups.setdefault(w if by == "workload" else w.kind, []).append(r)
    out = []
    for key, rs in groups.items():
        live = rs if last_known else [r for r in rs if r.alive]
        lead = max(rs, key=lambda r: (r.alive, r.merging_pages or 0, r.merges, -r.pid))
        if isinstance(key, Workload):
            w = key
        else:
            w = Workload(key, f"{len({workload_of(r) for r in rs})} workloads")
        out.append(ProcessRow(
            pid=lead.pid,
            comm=lead.comm if len(rs) == 1 else f"{len(rs)} procs",
            cgroup=lead.cgroup,
            mergeable=any(r.mergeable for r in live),
            merging_pages=_total(r.merging_pages for r in live),
            zero_pages=_total(r.zero_pages for r in live),
            rmap_items=_total(r.rmap_items for r in live),
            profit_bytes=_total(r.profit_bytes for r in live),
            merges=sum(r.merges for r in rs),
            merges_rate=sum(r.merges_rate for r in rs),
            cow_breaks=sum(r.cow_breaks for r in rs),
            cow_rate=sum(r.cow_rate for r in rs),
            cow_estimated=lead.cow_estimated,
            alive=any(r.alive for r in rs),
            workload=w,
        ))
    return tuple(out)


def by_workload(rows: Iterable[ProcessRow]) -> dict[Workload, list[ProcessRow]]:
    """Rows per workload, in first-seen order."""
    out: dict[Workload, list[ProcessRow]] = {}
    for r in rows:
        out.setdefault(workload_of(r), []).append(r)
    return out
