"""The capability module: what this kernel offers, and how each KSM stage is
observed because of it. It is the only place that decides attach methods.

`probe_host()` gathers facts (reading files, and *really* loading and
attaching tiny BPF programs in a subprocess, never guessing from versions).
`plan()` is a pure function from those facts to an attach plan, so it is
unit-tested with the facts of other kernels (6.1 without ksm tracepoints,
6.12 with everything).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ksmtrace.kernel import headers as headers_mod
from ksmtrace.kernel import symbols, sysfs, tracefs
from ksmtrace.spawn import python_argv

KSM_TRACEPOINTS = (
    "ksm_start_scan",
    "ksm_stop_scan",
    "ksm_enter",
    "ksm_exit",
    "ksm_merge_one_page",
    "ksm_merge_with_ksm_page",
    "ksm_remove_ksm_page",
    "ksm_remove_rmap_item",
    "ksm_advisor",
)
OTHER_TRACEPOINTS = ("exceptions:page_fault_user", "mmap_lock:mmap_lock_start_locking")

# Kernel functions on KSM's paths, in the order doctor shows them.
KSM_FUNCTIONS = (
    "do_wp_page",
    "wp_page_copy",
    "try_to_merge_one_page",
    "try_to_merge_with_ksm_page",
    "write_protect_page",
    "replace_page",
    "break_ksm",
    "ksm_scan_thread",
    "ksm_do_scan",
    "cmp_and_merge_page",
)

METHODS = ("fentry", "kprobe", "tracepoint", "polling")
STAGES = ("searching", "merging", "counting", "updating")


@dataclass(frozen=True)
class Trial:
    """The outcome of really loading and attaching a tiny program."""

    ok: bool | None  # None: not tried (not root, bcc missing, nothing to try on)
    detail: str
    kernel_said: tuple[str, ...] = ()


@dataclass(frozen=True)
class Facts:
    """Everything the plan depends on. Plain data: JSON in, JSON out."""

    kernel: str
    machine: str
    root: bool
    ksm: bool
    ksm_knobs: dict[str, int | str | None]
    tracefs: str | None
    tracefs_note: str
    tracepoints: dict[str, bool]  # "ksm:ksm_start_scan" -> present
    kallsyms: dict[str, bool]
    btf: bool
    btf_funcs: dict[str, bool]
    bcc: str | None  # version, or None when not importable
    headers: dict
    kprobe: Trial
    fentry: Trial
    tracepoint: Trial
    ringbuf: Trial
    layout: dict[str, int] = field(default_factory=dict)  # BTF offsets, see symbols

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Facts:
        d = dict(d)
        for k in ("kprobe", "fentry", "tracepoint", "ringbuf"):
            t = d[k]
            d[k] = Trial(t["ok"], t["detail"], tuple(t.get("kernel_said", ())))
        return cls(**d)


# --------------------------------------------------------------------------
# What we want to observe, and the ordered ways to observe it.


@dataclass(frozen=True)
class Candidate:
    method: str  # one of METHODS
    targets: tuple[str, ...]  # functions or "category:event" tracepoints or sysfs/procfs files
    exit_probe: bool = False  # fexit/kretprobe too: gives latency and return value
    estimated: bool = False  # a labelled substitute, not a direct observation
    needs: tuple[str, ...] = ()  # BTF layout facts the program reads ("x86_64": PTE format)


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    stage: str
    what: str
    candidates: tuple[Candidate, ...]
    # A KSM knob whose file only kernels with the observed feature have: the
    # probe is not part of the plan where it is missing (nothing to miss).
    feature: str | None = None


def _fn(*names: str, exit_probe: bool = False, needs: tuple[str, ...] = ()
        ) -> tuple[Candidate, Candidate]:
    return (
        Candidate("fentry", names, exit_probe, needs=needs),
        Candidate("kprobe", names, exit_probe, needs=needs),
    )


COW_NEEDS = ("x86_64", "vm_fault.vma", "vm_fault.flags", "vm_fault.page", "vm_fault.orig_pte",
             "vm_area_struct.vm_mm", "page.mapping", "page.@size", "FAULT_FLAG_UNSHARE")


PROBES: tuple[ProbeSpec, ...] = (
    ProbeSpec(
        "scan_batches",
        "searching",
        "each ksmd scan batch (ksm_do_scan: pages_to_scan pages per wake-up)",
        (*_fn("ksm_do_scan", exit_probe=True), Candidate("polling", ("sysfs:pages_scanned",))),
    ),
    ProbeSpec(
        "page_compares",
        "searching",
        "each page ksmd compares against the stable and unstable trees",
        (*_fn("cmp_and_merge_page"), Candidate("polling", ("sysfs:pages_scanned",))),
    ),
    ProbeSpec(
        "scan_rounds",
        "searching",
        "full scan rounds: seq, rmap entries, round duration",
        (
            Candidate("tracepoint", ("ksm:ksm_start_scan", "ksm:ksm_stop_scan")),
            Candidate("polling", ("sysfs:full_scans",)),
        ),
    ),
    ProbeSpec(
        "advisor",
        "searching",
        "the scan-time advisor's runs: scan time, pages_to_scan it chose, ksmd's CPU share",
        (Candidate("tracepoint", ("ksm:ksm_advisor",)),),
        feature="advisor_mode",
    ),
    ProbeSpec(
        "merges",
        "merging",
        "every merge attempt: kind (new KSM page, into a KSM page, zero page), result, "
        "process, pfn",
        (
            # try_to_merge_with_ksm_page tells a zero-page merge from the others
            *_fn("try_to_merge_one_page", "try_to_merge_with_ksm_page", exit_probe=True,
                 needs=("vm_area_struct.vm_mm", "page.@size")),
            Candidate("tracepoint", ("ksm:ksm_merge_with_ksm_page", "ksm:ksm_merge_one_page")),
            Candidate("polling", ("sysfs:pages_shared", "sysfs:pages_sharing")),
        ),
    ),
    ProbeSpec(
        "process_counts",
        "counting",
        "per-process mergeable/merging pages and profit",
        (Candidate("polling", ("procfs:<pid>/ksm_stat", "sysfs:pages_shared")),),
    ),
    ProbeSpec(
        "mm_owners",
        "counting",
        "which process each merged page belongs to (mm -> pid)",
        (
            Candidate("tracepoint", ("ksm:ksm_enter", "ksm:ksm_exit",
                                     "mmap_lock:mmap_lock_start_locking"),
                      needs=("task_struct.mm",)),
            Candidate("tracepoint", ("mmap_lock:mmap_lock_start_locking",),
                      needs=("task_struct.mm",)),
            Candidate("polling", ("procfs:<pid>/ksm_stat",)),
        ),
    ),
    ProbeSpec(
        "cow_breaks",
        "updating",
        "copy-on-write breaks of KSM pages, per process, write vs unshare",
        (
            *_fn("do_wp_page", exit_probe=True, needs=COW_NEEDS),
            Candidate(
                "tracepoint", ("exceptions:page_fault_user", "vmstat:cow_ksm"), estimated=True,
                needs=("task_struct.mm",),
            ),
            Candidate("polling", ("vmstat:cow_ksm",)),
        ),
    ),
    ProbeSpec(
        "unshares",
        "updating",
        "break_ksm: unmerge by MADV_UNMERGEABLE, run=2 or unshare faults",
        (*_fn("break_ksm", exit_probe=True),),
    ),
    ProbeSpec(
        "stable_removals",
        "updating",
        "stable-node and rmap-item removals",
        (
            Candidate("tracepoint", ("ksm:ksm_remove_ksm_page", "ksm:ksm_remove_rmap_item")),
            Candidate("polling", ("sysfs:pages_shared",)),
        ),
    ),
)


@dataclass(frozen=True)
class Miss:
    method: str
    targets: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Choice:
    probe: str
    stage: str
    what: str
    method: str | None  # None: nothing can observe it here
    targets: tuple[str, ...]
    exit_probe: bool
    estimated: bool
    reason: str
    missed: tuple[Miss, ...] = field(default_factory=tuple)

    @property
    def direct(self) -> bool:
        return self.method in ("fentry", "kprobe", "tracepoint") and not self.estimated


@dataclass(frozen=True)
class Plan:
    forced: str | None
    choices: tuple[Choice, ...]

    def by_stage(self) -> dict[str, list[Choice]]:
        out: dict[str, list[Choice]] = {s: [] for s in STAGES}
        for c in self.choices:
            out[c.stage].append(c)
        return out

    def get(self, probe: str) -> Choice:
        for c in self.choices:
            if c.probe == probe:
                return c
        raise KeyError(probe)

    def as_dict(self) -> dict:
        return asdict(self)


def _why_not(c: Candidate, f: Facts) -> str | None:
    """None when candidate `c` is viable on a kernel with facts `f`, else why not."""
    for need in c.needs:
        if need == "x86_64":
            if f.machine != "x86_64":
                return f"reads x86_64 page-table entries; this machine is {f.machine}"
        elif need not in f.layout:
            return f"BTF does not give {need} (struct layouts are never taken from headers)"
    if c.method != "polling" and not f.root:
        return "unknown without root (BPF loading, tracefs and the trials need it)"
    if c.method == "polling":
        if not f.ksm:
            return "no KSM sysfs"
        return None
    if c.method == "tracepoint":
        if f.tracepoint.ok is False:
            return f"tracepoints do not attach: {f.tracepoint.detail}"
        missing = [
            t
            for t in c.targets
            if ":" in t and t.split(":")[0] not in ("vmstat",) and not f.tracepoints.get(t, False)
        ]
        if missing:
            return "tracepoint " + ", ".join(missing) + " not in this kernel"
        if f.tracepoint.ok is None:
            return f"tracepoint attach not proven: {f.tracepoint.detail}"
        return None
    if c.method == "fentry":
        if not f.btf:
            return "no BTF (/sys/kernel/btf/vmlinux): fentry needs it"
        for fn in c.targets:
            if not f.btf_funcs.get(fn, False):
                inl = " (inlined)" if f.kallsyms and not f.kallsyms.get(fn, False) else ""
                return f"{fn} has no BTF FUNC record{inl}"
        if not f.fentry.ok:
            return "fentry is not usable on this kernel (see the fentry trial)"
        return None
    if c.method == "kprobe":
        if not f.kallsyms:  # not read: the kernel has no kprobes
            return f"kprobes are not usable on this kernel: {f.kprobe.detail}"
        for fn in c.targets:
            if not f.kallsyms.get(fn, False):
                return f"{fn} not in kallsyms (inlined or absent)"
        if not f.kprobe.ok:
            return "kprobes are not usable on this kernel (see the kprobe trial)"
        return None
    return f"unknown method {c.method}"


def plan(f: Facts, force: str | None = None) -> Plan:
    """Pick, per probe, the first viable candidate (fentry > kprobe > tracepoint > polling).

    `force` restricts every probe that method can observe to that method
    (plus counter polling as the honest fall-back), for proving one backend
    on a test kernel; other probes keep their automatic choice.
    """
    if force not in (None, "auto", "fentry", "kprobe", "tracepoint"):
        raise ValueError(f"unknown attach method {force!r}")
    force = None if force == "auto" else force
    choices = []
    for spec in PROBES:
        if spec.feature is not None and f.ksm_knobs.get(spec.feature) is None:
            continue  # this kernel does not have the feature at all
        missed: list[Miss] = []
        chosen: Candidate | None = None
        # A probe the forced method cannot observe at all (scan rounds with
        # --attach kprobe, mm owners with --attach fentry) keeps its
        # automatic choice: forcing proves one backend, it does not blind.
        forced = force if any(c.method == force for c in spec.candidates) else None
        for cand in spec.candidates:
            if forced and cand.method not in (forced, "polling"):
                missed.append(Miss(cand.method, cand.targets, f"--attach {force} forces {force}"))
                continue
            why = _why_not(cand, f)
            if why is None:
                chosen = cand
                break
            missed.append(Miss(cand.method, cand.targets, why))
        if chosen is None:
            choices.append(
                Choice(
                    spec.name,
                    spec.stage,
                    spec.what,
                    None,
                    (),
                    False,
                    False,
                    "no way to observe this on this kernel",
                    tuple(missed),
                )
            )
            continue
        if not missed:
            reason = f"{chosen.method}: the most direct way"
        else:
            reason = f"{chosen.method}, because " + "; ".join(
                f"{m.method} {'+'.join(m.targets)}: {m.why}" for m in missed
            )
        if chosen.estimated:
            reason += " [estimated: a labelled substitute, not a direct observation]"
        choices.append(
            Choice(
                spec.name,
                spec.stage,
                spec.what,
                chosen.method,
                chosen.targets,
                chosen.exit_probe,
                chosen.estimated,
                reason,
                tuple(missed),
            )
        )
    return Plan(force, tuple(choices))


# --------------------------------------------------------------------------
# Gathering the facts from the running host.


def bcc_version() -> str | None:
    """bcc's version, read from its version.py without importing bcc (only
    the source layer imports it: importing it here would load libbcc)."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("bcc")
        if spec is None or not spec.submodule_search_locations:
            return None
        for d in spec.submodule_search_locations:
            text = (Path(d) / "version.py").read_text()
            m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
            if m:
                return m.group(1)
    except (OSError, ImportError, ValueError):
        pass
    return None


def _cached_trials(specs: list[str], env: dict[str, str]) -> dict[str, Trial]:
    """_run_trials, remembered for this boot of this kernel (what a mechanism
    can do does not change while the kernel runs): the bcc child that proves
    them costs ~1 s, most of a warm start. `doctor` always tries again."""
    from ksmtrace import cache

    key = [str(bcc_version()), env.get("BCC_KERNEL_SOURCE", ""), *specs]
    return cache.per_boot("trials", key, dict[str, Trial], lambda: _run_trials(specs, env))


def _run_trials(specs: list[str], env: dict[str, str]) -> dict[str, Trial]:
    """Load+attach tiny programs in a subprocess (ksmtrace.sources.trial)."""
    r = subprocess.run(
        python_argv("ksmtrace.sources.trial", *specs),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out: dict[str, Trial] = {}
    for line in r.stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        said = tuple(d.get("kernel_said") or ())
        if d["ok"]:
            out[d["trial"]] = Trial(True, d.get("detail") or "ok", said)
        else:
            out[d["trial"]] = Trial(False, explain_failure(d["trial"], d.get("error"), said), said)
    for s in specs:
        out.setdefault(
            s, Trial(False, f"trial crashed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
        )
    return out


NO_KPROBES = ("the kernel has no kprobe PMU and no kprobe_events file: it was built "
              "without CONFIG_KPROBES")


def kprobes_possible(root: str | os.PathLike, tracefs_path: str | None) -> bool:
    """A kprobe PMU or a kprobe_events file: without both, no kprobe attaches."""
    return ((Path(root) / "sys/bus/event_source/devices/kprobe").exists()
            or (tracefs_path is not None and (Path(tracefs_path) / "kprobe_events").exists()))


def explain_failure(trial: str, error: str | None, said: tuple[str, ...]) -> str:
    """Turn bcc's generic message and the kernel's words into a cause a user can act on."""
    text = " ".join(said) + " " + (error or "")
    kind = trial.split(":", 1)[0]
    if (
        kind == "kprobe"
        and "kprobe_events" in text
        and not kprobes_possible("/", None)
    ):
        return NO_KPROBES
    if "Operation not permitted" in text:
        where = {"fentry": "a BPF tracing (fentry/fexit) program"}.get(kind, "the program")
        return (
            f"the kernel refused to load {where}: EPERM (Operation not permitted) "
            "even as root; lockdown, an LSM or the hypervisor forbids it"
        )
    if "Invalid argument" in text:
        return "the kernel rejected the program: EINVAL"
    if said:
        return said[-1]
    return error or "failed"


def probe_host(
    root: str | os.PathLike = "/", trials: bool = True, mount_tracefs: bool = True,
    fresh: bool = False,
) -> Facts:
    """Gather the facts. As root, mounts tracefs if needed and runs the load
    trials (their results kept for this boot, unless `fresh`)."""
    is_root = os.geteuid() == 0
    ksm = sysfs.ksm_present(root)
    knobs = {k: sysfs.read_knob(k, root) for k in sysfs.KNOBS} if ksm else {}
    tfs = tracefs.ensure_tracefs(root, mount=mount_tracefs and is_root)
    tps = {f"ksm:{e}": tracefs.tracepoint_exists(tfs.path, "ksm", e) for e in KSM_TRACEPOINTS}
    for t in OTHER_TRACEPOINTS:
        cat, ev = t.split(":")
        tps[t] = tracefs.tracepoint_exists(tfs.path, cat, ev)
    # kallsyms (5 MB made on each read) only matters to kprobes: not read where
    # the kernel has none, except when doctor asks for everything (`fresh`)
    kall = (symbols.kallsyms_names(root, set(KSM_FUNCTIONS))
            if fresh or kprobes_possible(root, tfs.path) else None)
    vmlinux = symbols.read_btf(root, set(KSM_FUNCTIONS), symbols.LAYOUT_FIELDS,
                               symbols.LAYOUT_ENUMS, cached=not fresh)
    btf = vmlinux.funcs
    bcc = bcc_version()
    hdr = headers_mod.find_headers(root, build=is_root)

    not_tried = Trial(None, "not tried")
    kp = fe = tp = rb = not_tried
    if not is_root:
        kp = fe = tp = rb = Trial(None, "needs root to load BPF programs (run doctor as root)")
    elif bcc is None:
        kp = fe = tp = rb = Trial(None, "bcc is not importable: apt-get install python3-bpfcc")
    elif hdr.path is None:
        kp = fe = tp = rb = Trial(
            None, "no kernel headers for bcc: apt-get install linux-headers-amd64"
        )
    elif trials:
        env = dict(os.environ)
        if hdr.origin != "running-kernel":
            env["BCC_KERNEL_SOURCE"] = hdr.path
        # Trial on a KSM function where one exists: proves the mechanism *and* the target.
        target = next((f for f in ("try_to_merge_one_page", "do_wp_page") if f in (kall or ())),
                      None)
        btarget = next(
            (f for f in ("try_to_merge_one_page", "do_wp_page") if btf and f in btf), None
        )
        specs = []
        if target:
            specs.append(f"kprobe:{target}")
        if btarget:
            specs.append(f"fentry:{btarget}")
        tp_target = next(
            (t for t in ("ksm:ksm_start_scan", "exceptions:page_fault_user") if tps.get(t)), None
        )
        if tp_target:
            specs.append(f"tracepoint:{tp_target}")
        specs.append("ringbuf")
        res = _run_trials(specs, env) if fresh else _cached_trials(specs, env)
        kp = res.get(f"kprobe:{target}", Trial(None, "no KSM function in kallsyms to try")
                     if kall is not None else Trial(False, NO_KPROBES))
        fe = res.get(f"fentry:{btarget}", Trial(None, "no KSM function in BTF to try"))
        tp = res.get(f"tracepoint:{tp_target}", Trial(None, "no tracepoint to try"))
        rb = res["ringbuf"]
    return Facts(
        kernel=platform.release(),
        machine=platform.machine(),
        root=is_root,
        ksm=ksm,
        ksm_knobs=knobs,
        tracefs=tfs.path,
        tracefs_note=tfs.note,
        tracepoints=tps,
        kallsyms={} if kall is None else {f: f in kall for f in KSM_FUNCTIONS},
        btf=btf is not None,
        btf_funcs={f: (btf is not None and f in btf) for f in KSM_FUNCTIONS},
        bcc=bcc,
        headers=hdr.as_dict(),
        kprobe=kp,
        fentry=fe,
        tracepoint=tp,
        ringbuf=rb,
        layout=vmlinux.layout,
    )


def bpf_usable(f: Facts) -> bool:
    return any(t.ok for t in (f.kprobe, f.fentry, f.tracepoint))
