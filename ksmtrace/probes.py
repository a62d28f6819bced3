"""From an attach plan to what the loader must do: the -D flags that switch
on parts of bpf/ksmtrace.bpf.c, and the kprobes to attach by hand.

Pure: no bcc, no kernel. The plan itself comes from the capability module;
this only translates its choices, so `--ebpf` can print exactly what will be
compiled and tests can check the translation on recorded facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ksmtrace.kernel.capabilities import Choice, Facts, Plan
from ksmtrace.model import ProbeStatus

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
MAIN_SOURCE = BPF_DIR / "ksmtrace.bpf.c"

STREAM_NONE, STREAM_RINGBUF = 0, 1  # bpf/ksmtrace.bpf.c STREAM

# BTF layout fact -> the -D name bpf/ksmtrace.bpf.c reads it under
LAYOUT_FLAGS = {
    "task_struct.mm": "OFF_TASK_MM",
    "vm_area_struct.vm_mm": "OFF_VMA_MM",
    "vm_fault.vma": "OFF_VMF_VMA",
    "vm_fault.flags": "OFF_VMF_FLAGS",
    "vm_fault.page": "OFF_VMF_PAGE",
    "vm_fault.orig_pte": "OFF_VMF_ORIG_PTE",
    "page.mapping": "OFF_PAGE_MAPPING",
    "page.@size": "STRUCT_PAGE_SIZE",
    "FAULT_FLAG_UNSHARE": "FAULT_FLAG_UNSHARE",
}

_FN_METHOD = {"fentry": 1, "kprobe": 2}


@dataclass(frozen=True)
class Kprobe:
    function: str
    program: str
    ret: bool  # kretprobe


@dataclass(frozen=True)
class Build:
    cflags: tuple[str, ...]
    kprobes: tuple[Kprobe, ...]
    stream: int
    probes: tuple[ProbeStatus, ...]  # what the plan wants, before attaching
    cow_estimated: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fentry(self) -> bool:
        """Whether fentry/fexit programs are part of it (`-D<PART>=1`)."""
        return any(f.startswith("-D") and f.endswith(f"_FN={_FN_METHOD['fentry']}")
                   for f in self.cflags)

    @property
    def merge_slot(self) -> bool:
        """Whether ksmd's merges gather in `merge_slot` before mm_stats."""
        return "MERGE_SLOT" in self.parts

    @property
    def parts(self) -> tuple[str, ...]:
        """The program parts switched on (SCAN_TP, MERGE_FN, ...)."""
        return tuple(f[2:].split("=")[0] for f in self.cflags
                     if f.startswith("-D") and f[2:].split("=")[0] in PARTS)


PARTS = ("SCAN_TP", "SCAN_FN", "CMP_FN", "ADVISOR_TP", "MERGE_TP", "MERGE_FN", "MERGE_SLOT",
         "MM_TP", "RESOLVER", "REMOVE_TP", "COW_EST", "COW_FN", "UNSHARE_FN")


def _status(c: Choice, attached: bool, error: str | None = None) -> ProbeStatus:
    return ProbeStatus(c.probe, c.stage, c.method, c.targets, attached, c.estimated, error)


def build(plan: Plan, facts: Facts, stream: bool) -> Build:
    flags: list[str] = [f"-I{BPF_DIR}", "-Wno-unused-function", "-Wno-macro-redefined"]
    kprobes: list[Kprobe] = []
    notes: list[str] = []
    statuses: list[ProbeStatus] = []

    def fn_flag(name: str, c: Choice, pairs: list[tuple[str, str]]) -> None:
        flags.append(f"-D{name}={_FN_METHOD[c.method]}")
        if c.method == "kprobe":
            for fn, prog in pairs:
                kprobes.append(Kprobe(fn, f"kp_{prog}", False))
                kprobes.append(Kprobe(fn, f"kr_{prog}", True))

    for c in plan.choices:
        statuses.append(_status(c, c.method is not None,
                                None if c.method else "no way to observe this here"))
        if c.method is None or c.method == "polling":
            continue
        if c.probe == "scan_rounds":
            flags.append("-DSCAN_TP")
        elif c.probe == "advisor":
            flags.append("-DADVISOR_TP")
        elif c.probe == "merges":
            if c.method == "tracepoint":
                flags.append("-DMERGE_TP")
            else:
                fn_flag("MERGE_FN", c, [("try_to_merge_one_page", "merge_one"),
                                        ("try_to_merge_with_ksm_page", "with_ksm")])
        elif c.probe == "mm_owners":
            if "ksm:ksm_enter" in c.targets:
                flags.append("-DMM_TP")
            flags.append("-DRESOLVER")
        elif c.probe == "cow_breaks":
            if c.method == "tracepoint":
                flags.append("-DCOW_EST")
            else:
                fn_flag("COW_FN", c, [("do_wp_page", "cow")])
        elif c.probe == "unshares":
            fn_flag("UNSHARE_FN", c, [("break_ksm", "unshare")])
        elif c.probe == "stable_removals":
            flags.append("-DREMOVE_TP")
        elif c.probe == "scan_batches":
            fn_flag("SCAN_FN", c, [("ksm_do_scan", "scan_batch")])
        elif c.probe == "page_compares":
            flags.append(f"-DCMP_FN={_FN_METHOD[c.method]}")
            if c.method == "kprobe":
                kprobes.append(Kprobe("cmp_and_merge_page", "kp_page_compare", False))
    # ksmd's merges gather in one slot, flushed at scan-round ends (see
    # bpf/ksmtrace.bpf.c): only where both are traced
    if {"scan_rounds", "merges"} <= {c.probe for c in plan.choices
                                     if c.method not in (None, "polling")}:
        flags.append("-DMERGE_SLOT")
    for key, name in LAYOUT_FLAGS.items():
        if key in facts.layout:
            flags.append(f"-D{name}={facts.layout[key]}")
    mode = STREAM_NONE
    if stream:
        if facts.ringbuf.ok:
            mode = STREAM_RINGBUF
        else:
            notes.append("no event stream: it needs the BPF ring buffer (Linux 5.8 and "
                         "later); the counters and histograms are complete without it")
    flags.append(f"-DSTREAM={mode}")
    cow = plan.get("cow_breaks")
    return Build(tuple(flags), tuple(kprobes), mode, tuple(statuses),
                 cow_estimated=bool(cow.estimated), notes=tuple(notes))
