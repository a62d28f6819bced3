"""Opening a source the way every command does: the shared options
(--sysfs-only, --attach, --strict, --ebpf, -p) and the choice between the
live BPF source and counter polling.
"""

from __future__ import annotations

import argparse
import os
import sys

from ksmtrace import argtypes
from ksmtrace.errors import KsmtraceError, NoProcess, UsageError, not_root
from ksmtrace.kernel import sysfs
from ksmtrace.model import ProbeStatus


class StrictMiss(KsmtraceError):
    pass


def add_source_options(p: argparse.ArgumentParser, stream_default: bool = False) -> None:
    g = p.add_argument_group("source")
    g.add_argument("-p", "--pid", type=argtypes.pid, action="append", metavar="PID",
                   help="only this process (repeatable)")
    g.add_argument("--sysfs-only", action="store_true",
                   help="no BPF: poll the kernel's counters only (works without root)")
    g.add_argument("--attach", choices=("auto", "fentry", "kprobe", "tracepoint"),
                   help="force one BPF backend (default: auto, or $KSMTRACE_ATTACH)")
    g.add_argument("--strict", action="store_true",
                   help="fail (exit 1) if any probe of the plan cannot be attached")
    g.add_argument("--bpf-stats", action="store_true", default=None,
                   help="measure ksmtrace's own BPF cost (kernel BPF statistics, on only "
                   "while ksmtrace runs); off by default: it costs ksmd about 5%% more CPU "
                   "(bench/RESULTS.md). `ksmtrace doctor` always measures it")
    g.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(stream=stream_default)


def _bpf_options(args: argparse.Namespace) -> list[str]:
    """The BPF-only options given on the command line (not from the environment)."""
    return [opt for opt, given in (("--attach", args.attach is not None),
                                   ("--strict", args.strict), ("--bpf-stats", args.bpf_stats),
                                   ("--ebpf", args.ebpf)) if given]


def refuse_source_options(args: argparse.Namespace, why: str) -> None:
    """Options that choose or filter a live source mean nothing with `why`
    (a replay): refused, not silently ignored."""
    given = _bpf_options(args) + ["--sysfs-only"] * args.sysfs_only + ["-p"] * bool(args.pid)
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} nothing "
                         f"with {why}", f"drop {', '.join(given)}")


def check_pids(pids: list[int] | None) -> None:
    for pid in pids or []:
        if not os.path.exists(f"/proc/{pid}"):
            raise NoProcess(f"no process {pid}", "check the pid with `ps` or `pgrep`")


def describe_probes(probes: tuple[ProbeStatus, ...]) -> list[str]:
    lines = []
    for p in probes:
        if p.attached:
            how = f"{p.method} {'+'.join(p.targets)}" + (" [estimated]" if p.estimated else "")
            lines.append(f"{p.stage}/{p.probe}: {how}")
        else:
            lines.append(f"{p.stage}/{p.probe}: MISSED ({p.error})")
    return lines


def open_source(args: argparse.Namespace, need_bpf: bool = False, quiet: bool = False):
    """The source the options ask for. Falls back to counter polling as
    non-root unless the command needs BPF (trace, record)."""
    from ksmtrace.sources.counters import SysfsSource

    bpf_only = _bpf_options(args)
    if args.sysfs_only and bpf_only:
        raise UsageError(f"{', '.join(bpf_only)} need{'s' * (len(bpf_only) == 1)} BPF, and "
                         "--sysfs-only uses none", f"drop {', '.join(bpf_only)} or --sysfs-only")
    if os.geteuid() != 0 and bpf_only:
        raise not_root(f"{', '.join(bpf_only)} (BPF)")
    check_pids(args.pid)
    sysfs.read_sysfs()  # a kernel without KSM fails here, clearly
    attach = args.attach or os.environ.get("KSMTRACE_ATTACH", "auto")
    bpf_stats = args.bpf_stats or os.environ.get("KSMTRACE_BPF_STATS") == "1"
    if args.sysfs_only:
        if need_bpf:
            raise KsmtraceError("this command needs BPF; --sysfs-only cannot trace events",
                                "drop --sysfs-only and run as root")
        return SysfsSource(pids=args.pid)
    if os.geteuid() != 0:
        if need_bpf:
            raise not_root("tracing KSM events")
        if not quiet:
            print("ksmtrace: not root, so no BPF: showing the kernel's counters only "
                  "(--sysfs-only); run as root to trace each stage", file=sys.stderr)
        return SysfsSource(pids=args.pid)

    from ksmtrace import probes
    from ksmtrace.kernel import capabilities as caps
    from ksmtrace.sources.live import LiveSource

    facts = caps.probe_host()
    _give_back_heap()
    plan = caps.plan(facts, None if attach == "auto" else attach)
    if args.ebpf:
        b = probes.build(plan, facts, args.stream)
        print(f"// cflags: {' '.join(b.cflags)}")
        for k in b.kprobes:
            print(f"// {'kretprobe' if k.ret else 'kprobe'}: {k.function} -> {k.program}")
        print(probes.MAIN_SOURCE.read_text())
        raise SystemExit(0)
    src = LiveSource(facts, plan, stream=args.stream, pids=args.pid,
                     bpf_stats=bpf_stats)
    return src


def enforce_strict(args: argparse.Namespace, probes: tuple[ProbeStatus, ...]) -> None:
    missed = [p for p in probes if not p.attached]
    if args.strict and missed:
        raise StrictMiss(
            "--strict: probes not attached: " + "; ".join(
                f"{p.probe} ({p.error})" for p in missed),
            "run `ksmtrace doctor` to see why; drop --strict to run with what attaches")


def _give_back_heap() -> None:
    """Probing parses vmlinux BTF and kallsyms (~30 MB of short-lived Python
    objects); glibc keeps the freed heap mapped for the life of the process.
    A long-running agent hands it back to the kernel once, here (other libcs
    have no malloc_trim, and nothing to do)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
