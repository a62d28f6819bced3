""""Why isn't it merging?": a diagnosis read from snapshots alone.

Pure logic over `Snapshot`s (no kernel access), so the TUI, `report` and the
tests share it and a recording diagnoses the same as live. Each finding says
what the kernel's figures show, and what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ksmtrace.kernel.procfs import CLK_TCK
from ksmtrace.model import PAGE_SIZE, Snapshot

# Severity, most serious first; views colour by it.
PROBLEM, WARN, INFO, OK = "problem", "warn", "info", "ok"
LEVELS = (PROBLEM, WARN, INFO, OK)


@dataclass(frozen=True)
class Finding:
    level: str
    key: str  # stable id: "ksm-off", "no-mergeable", ...
    title: str
    detail: str = ""
    fix: str = ""


def _mib(pages: int) -> str:
    return f"{pages * PAGE_SIZE / 2**20:.1f} MiB"


def ksmd_cores(snap: Snapshot) -> float | None:
    """Fraction of one CPU ksmd used over the interval (None: unknown)."""
    r = snap.rates.get("ksmd_cpu_ticks")
    return None if r is None else r / CLK_TCK


def diagnose(snap: Snapshot) -> list[Finding]:
    """Findings for one snapshot, most serious first."""
    k = snap.ksm
    r = snap.rates
    out: list[Finding] = []
    tracked = (k.pages_shared or 0) + (k.pages_sharing or 0) + (k.pages_unshared or 0) \
        + (k.pages_volatile or 0)

    if k.run == 0:
        out.append(Finding(
            PROBLEM, "ksm-off", "KSM is off: ksmd is stopped (run=0)",
            "nothing is scanned or merged; pages merged earlier stay merged",
            "set run=1 (knobs screen: k), or: echo 1 > /sys/kernel/mm/ksm/run"))
    elif k.run == 2:
        out.append(Finding(
            WARN, "unmerging", "KSM is unmerging everything (run=2)",
            "ksmd breaks every KSM page back into private copies and merges nothing",
            "set run=1 to merge again"))

    mergeable = [p for p in snap.processes if p.mergeable and p.alive]
    idle = k.run == 1 and snap.interval > 0 and not r.get("pages_scanned")
    if tracked == 0 and (not mergeable or idle):
        blind = snap.source == "sysfs-only" and any(
            "not root" in n for n in snap.notes)
        out.append(Finding(
            PROBLEM, "no-mergeable", "no process has mergeable memory",
            "KSM only scans areas marked MADV_MERGEABLE, or whole processes after "
            "prctl(PR_SET_MEMORY_MERGE)" + (
                " (other users' processes are not readable without root)" if blind else ""),
            "QEMU: -machine mem-merge=on; systemd: MemoryKSM=yes; "
            "code: madvise(addr, len, MADV_MERGEABLE)"))

    if k.run == 1 and tracked:
        vol = k.pages_volatile or 0
        if vol and vol * 2 >= tracked:
            out.append(Finding(
                WARN, "volatile", f"most scanned pages are volatile ({vol} of {tracked})",
                "their content changed between two scans, so KSM does not even try: "
                "the memory is written too often to share",
                "nothing to tune in KSM; merge read-mostly memory only"))

        scanned, skipped = r.get("pages_scanned"), r.get("pages_skipped")
        if k.smart_scan == 1 and scanned and skipped and skipped > scanned / 2:
            out.append(Finding(
                INFO, "smart-scan", f"smart scan skips {skipped:.0f} pages/s",
                "pages that did not merge in earlier rounds are skipped for a while "
                "(smart_scan=1): new duplicates among them are found later",
                "set smart_scan=0 to scan every page every round (costs ksmd CPU)"))

        if (k.stable_node_chains or 0) > 0:
            out.append(Finding(
                INFO, "max-page-sharing",
                f"{k.stable_node_chains} KSM pages reached max_page_sharing "
                f"({k.max_page_sharing})",
                f"extra copies of the same content are kept ({k.stable_node_dups or 0} "
                "duplicates in chains) to bound the cost of rmap walks",
                "raise max_page_sharing (needs run=2 first) to share more per page"))

        merges = r.get("merged_pages")
        if (k.pages_unshared or 0) > 0 and not k.pages_shared and not merges \
                and snap.totals.get("full_scans", 0) >= 2:
            out.append(Finding(
                INFO, "unique", f"{k.pages_unshared} pages scanned, none identical",
                "every mergeable page has unique content after two full scans: "
                "there is nothing to merge",
                ""))
        elif not k.pages_shared and snap.totals.get("full_scans", 0) < 2 and scanned:
            out.append(Finding(
                INFO, "first-rounds", "waiting for the second full scan",
                "KSM merges a page only when it meets identical content again on a "
                "later pass (unstable tree), so nothing merges during the first round",
                "raise pages_to_scan or lower sleep_millisecs to scan faster"))

    if k.advisor_mode and k.advisor_mode != "none":
        out.append(Finding(
            INFO, "advisor", f"the scan advisor is on ({k.advisor_mode})",
            f"it sets pages_to_scan itself (now {k.pages_to_scan}, between "
            f"{k.advisor_min_pages_to_scan} and {k.advisor_max_pages_to_scan}) to finish a "
            f"round in {k.advisor_target_scan_time} s, using at most "
            f"{k.advisor_max_cpu}% CPU",
            "set advisor_mode=none to set pages_to_scan by hand"))

    if k.general_profit is not None and k.general_profit < 0:
        out.append(Finding(
            WARN, "negative-profit", f"KSM costs more than it saves ({k.general_profit} bytes)",
            "the rmap items KSM keeps for unmerged pages outweigh the pages merged",
            "stop marking memory mergeable where it does not merge"))

    cores = ksmd_cores(snap)
    if cores is not None and k.run == 1:
        saved = k.saved_pages
        level = WARN if cores > 0.5 and not r.get("merged_pages") else INFO
        out.append(Finding(
            level, "ksmd-cost", f"ksmd uses {cores * 100:.0f}% of a CPU; {_mib(saved)} saved",
            "ksmd's CPU time (/proc/<ksmd>/stat) against the memory shared now"
            + (", and nothing new is merging" if level == WARN else ""),
            "lower pages_to_scan or raise sleep_millisecs to spend less" if level == WARN
            else ""))

    if not any(f.level in (PROBLEM, WARN) for f in out) and k.run == 1 and k.pages_shared:
        out.append(Finding(
            OK, "merging", f"KSM is merging: {_mib(k.saved_pages)} saved",
            f"{k.pages_shared} KSM pages shared by {k.pages_sharing} more mappings"))
    out.sort(key=lambda f: LEVELS.index(f.level))
    return out
