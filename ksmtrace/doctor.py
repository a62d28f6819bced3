"""`ksmtrace doctor`: render the capability module's facts and attach plan.

All decisions are taken in ksmtrace.kernel.capabilities; this module only
words them for a person (text) or a program (--json), and maps the result
to an exit code: not root, no KSM and no BPF each have their own.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from ksmtrace import argtypes
from ksmtrace.errors import Exit
from ksmtrace.kernel import capabilities as caps
from ksmtrace.kernel import sysfs

ROOT_ADDS = (
    "loading BPF programs (the kprobe/fentry/tracepoint/ring-buffer trials and all tracing)",
    "tracefs (mode 0700) and so which tracepoints exist",
    "mounting tracefs when it is not mounted",
    "page maps (pfns in /proc/<pid>/pagemap, /proc/kpageflags, /proc/kpagecount)",
    "/proc/<pid>/ksm_stat of other users' processes",
)

EPILOG = """\
examples:
  sudo ksmtrace doctor              what this kernel lets ksmtrace see, and why
  sudo ksmtrace doctor --json | jq .plan.choices[].method
  ksmtrace doctor                   as non-root: what can be seen, and what root adds

exit codes: 0 ok, 3 not root, 4 no KSM, 5 no usable BPF mechanism
"""


DESCRIPTION = (
    "Check the kernel (KSM, tracepoints, functions, BTF, headers) and prove "
    "each BPF mechanism by loading and attaching a tiny program; then derive how each "
    "KSM stage will be observed, with the reason for each choice.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = argtypes.subcommand(
        sub, "doctor", "report what this kernel lets ksmtrace observe, and the attach plan",
        DESCRIPTION, EPILOG)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--cost-seconds", type=argtypes.duration, default=COST_SECONDS, metavar="S",
                   help="attach the default programs for S seconds and show what they cost "
                   f"the kernel (BPF stats; default {COST_SECONDS:g}, 0 skips it)")
    p.add_argument("--clean", action="store_true",
                   help="remove what a killed ksmtrace left behind (kprobe_events entries) "
                   "and the compiled-program cache")
    p.add_argument(
        "--attach",
        choices=("auto", "fentry", "kprobe", "tracepoint"),
        default="auto",
        help="show the plan with this backend forced",
    )
    p.set_defaults(func=run)


COST_SECONDS = 1.0


def measure_cost(facts: caps.Facts, plan: caps.Plan, seconds: float) -> dict:
    """ksmtrace's own BPF cost, measured: the default programs of this plan
    attached for `seconds` with the kernel's BPF stats on, each program's
    runs and run time as the kernel counts them. Real, so it depends on what
    the machine does meanwhile (ksm:* programs run only while ksmd works)."""
    import time

    from ksmtrace.errors import KsmtraceError
    from ksmtrace.sources.live import LiveSource

    out: dict = {"seconds": seconds, "stats": None, "programs": [], "error": None,
                 "ksm_run": facts.ksm_knobs.get("run")}
    try:
        with LiveSource(facts, plan) as src:
            out["stats"] = src.stats.how or f"unavailable: {src.stats.error}"
            t0 = time.monotonic()
            time.sleep(seconds)
            costs = src.program_costs()
            out["seconds"] = round(time.monotonic() - t0, 3)
    except (KsmtraceError, OSError) as e:
        out["error"] = str(e)
        return out
    out["programs"] = [{"name": p.name, "runs": p.run_count, "run_time_ns": p.run_time_ns,
                        "ns_per_run": round(p.run_time_ns / p.run_count) if p.run_count else None}
                       for p in costs]
    return out


def render_cost(cost: dict) -> str:
    out = [f"ksmtrace's own BPF cost (default programs attached {cost['seconds']:g} s, "
           "kernel BPF stats)"]
    if cost["error"]:
        out.append(f"  not measured: {cost['error']}")
        return "\n".join(out)
    if not str(cost["stats"]).startswith(("fd", "sysctl")):
        out.append(f"  BPF stats {cost['stats']}: run times read as 0")
    out.append(f"  {'program':38}{'runs':>10}{'ns/run':>9}{'run time':>12}")
    total = 0
    for p in cost["programs"]:
        total += p["run_time_ns"]
        per = "-" if p["ns_per_run"] is None else str(p["ns_per_run"])
        out.append(f"  {p['name']:38}{p['runs']:>10,}{per:>9}{p['run_time_ns'] / 1e6:>10.3f}ms")
    share = 100 * total / 1e9 / cost["seconds"] if cost["seconds"] else 0.0
    out.append(f"  total {total / 1e6:.3f} ms of CPU in {cost['seconds']:g} s ({share:.3f} % "
               "of one CPU)" + ("; ksmd is stopped (run=0): the ksm:* programs ran only if "
                                "KSM did something" if cost.get("ksm_run") == 0 else ""))
    return "\n".join(out)


def exit_code(f: caps.Facts) -> Exit:
    if not f.ksm:
        return Exit.NO_KSM
    if not f.root:
        return Exit.NOT_ROOT
    if not caps.bpf_usable(f):
        return Exit.NO_BPF
    return Exit.OK


def run(args: argparse.Namespace) -> int:
    if not args.json:
        print(
            "ksmtrace doctor: probing the kernel (loads tiny BPF programs as root)...",
            file=sys.stderr,
            flush=True,
        )
    facts = caps.probe_host(fresh=True)  # doctor proves the mechanisms again
    plan = caps.plan(facts, None if args.attach == "auto" else args.attach)
    code = exit_code(facts)
    seconds = getattr(args, "cost_seconds", COST_SECONDS)
    left = leftovers(facts, clean=getattr(args, "clean", False))
    cost = measure_cost(facts, plan, seconds) if code == Exit.OK and seconds > 0 else None
    if args.json:
        json.dump(
            {
                "facts": facts.as_dict(),
                "plan": plan.as_dict(),
                "leftovers": left,
                "cost": cost,
                "exit_code": int(code),
                "status": code.name.lower(),
            },
            sys.stdout,
            indent=2,
            default=str,
        )
        print()
    else:
        print(render(facts, plan, code, cost))
        if text := render_leftovers(left):
            print(text)
    return int(code)


def leftovers(facts: caps.Facts, clean: bool) -> dict:
    """kprobe_events entries of killed ksmtrace processes (a SIGKILL leaves
    a legacy kretprobe's entry; everything else is a file descriptor the
    kernel closed), and the compiled-program cache; removed with `clean`."""
    if not facts.root:
        return {"stale_kprobes": [], "removed": [], "cache": None}
    from ksmtrace.cache import secure_dir
    from ksmtrace.sources import bundle, loader

    stale = loader.stale_kprobes(facts.tracefs)
    removed = loader.remove_stale(facts.tracefs) if clean else []
    cache = bundle.cache_dir()
    if clean and secure_dir(cache, create=False):
        for f in cache.glob("*.bundle"):
            f.unlink(missing_ok=True)
    n = len(list(cache.glob("*.bundle"))) if cache.is_dir() else 0
    return {"stale_kprobes": stale, "removed": removed,
            "cache": {"path": str(cache), "bundles": n, "cleaned": clean}}


def render_leftovers(left: dict) -> str:
    out = []
    for e in left["stale_kprobes"]:
        gone = e in left["removed"]
        out.append(f"left behind by a killed ksmtrace: kprobe_events entry {e}"
                   + (" (removed)" if gone else "; `sudo ksmtrace doctor --clean` removes it"))
    c = left["cache"]
    if c is not None:
        out.append(f"compiled programs cache: {c['path']} ({c['bundles']} bundle(s)"
                   + (", cleaned)" if c["cleaned"] else ")"))
    return "\n".join(out)


def _yes(b: bool | None) -> str:
    return {True: "yes", False: "no", None: "?"}[b]


def _trial(t: caps.Trial) -> str:
    if t.ok:
        return f"usable ({t.detail})"
    if t.ok is None:
        return f"not tried: {t.detail}"
    s = f"NOT usable: {t.detail}"
    if t.kernel_said:
        s += f"\n{'':16}kernel said: {t.kernel_said[-1]}"
    return s


def render(f: caps.Facts, plan: caps.Plan, code: Exit, cost: dict | None = None) -> str:
    out: list[str] = []
    w = out.append
    w(f"{'kernel':14}{f.kernel} ({f.machine})")
    w(f"{'privileges':14}{'root' if f.root else 'not root: the report below is partial'}")
    if f.ksm:
        k = f.ksm_knobs
        state = sysfs.RUN_STATES.get(k.get("run"), str(k.get("run")))  # type: ignore[arg-type]
        w(f"{'KSM':14}present, run={k.get('run')} ({state})")
        knobs = [f"{n}={k[n]}" for n in sysfs.KNOBS if n != "run" and k.get(n) is not None]
        for line in textwrap.wrap("  ".join(knobs), 64):
            w(f"{'':14}{line}")
    else:
        w(f"{'KSM':14}ABSENT: /sys/kernel/mm/ksm missing (kernel built without CONFIG_KSM)")
    w(f"{'tracefs':14}{f.tracefs or 'not available'} ({f.tracefs_note})")
    w(f"{'BTF':14}{'/sys/kernel/btf/vmlinux' if f.btf else 'absent (fentry needs it)'}")
    h = f.headers
    if h.get("path"):
        w(f"{'headers':14}{h['path']} [{h['origin']}]")
        for line in textwrap.wrap(h["note"], 64):
            w(f"{'':14}{line}")
    else:
        w(f"{'headers':14}NONE: {h.get('note')}; apt-get install linux-headers-amd64")
    w(f"{'bcc':14}{f.bcc or 'not importable: apt-get install python3-bpfcc'}")

    w("")
    w("tracepoints")
    if f.tracefs:
        for name, present in f.tracepoints.items():
            w(f"  {name:32}{'present' if present else 'absent'}")
    else:
        w("  unknown: tracefs unavailable" + ("" if f.root else " (only root can read it)"))

    w("")
    w(f"  {'kernel function':30}{'kallsyms':10}{'BTF':6}")
    for fn in caps.KSM_FUNCTIONS:
        note = ""
        if not f.kallsyms[fn] and not f.btf_funcs[fn]:
            note = "  inlined or absent: cannot be probed"
            if fn == "ksm_do_scan":
                note = "  inlined into ksm_scan_thread (as on most distro kernels)"
        w(f"  {fn:30}{_yes(f.kallsyms[fn]):10}{_yes(f.btf_funcs[fn]):6}{note}")
    if not f.kallsyms["ksm_do_scan"]:
        w(
            "  the scan path is observed through ksm:ksm_start_scan/ksm_stop_scan and "
            "sysfs pages_scanned"
        )

    w("")
    w("BPF mechanisms (proved by loading and attaching a tiny program)")
    for name, t in (
        ("tracepoint", f.tracepoint),
        ("kprobe", f.kprobe),
        ("fentry", f.fentry),
        ("ring buffer", f.ringbuf),
    ):
        w(f"  {name:14}{_trial(t)}")
    if f.ringbuf.ok is False:
        w(f"  {'':14}no event stream (trace, --events): counters and histograms only")

    w("")
    w("attach plan" + (f" (--attach {plan.forced})" if plan.forced else ""))
    for stage, choices in plan.by_stage().items():
        w(f"  {stage}")
        for c in choices:
            how = f"{c.method} {' + '.join(c.targets)}" if c.method else "NOT OBSERVABLE"
            if c.exit_probe and c.method in ("fentry", "kprobe"):
                how += " (with exit probe: latency, result)"
            if c.estimated:
                how += "  [estimated]"
            w(f"    {c.probe:20}{how}")
            for m in c.missed:
                w(f"    {'':20}  not {m.method}: {m.why}")

    if cost is not None:
        w("")
        w(render_cost(cost))

    if not f.root:
        w("")
        w("as root, doctor would also check:")
        for item in ROOT_ADDS:
            w(f"  - {item}")
    w("")
    verdict = {
        Exit.OK: "ok: ksmtrace can trace KSM on this kernel",
        Exit.NOT_ROOT: "partial: not root (exit 3); run `sudo ksmtrace doctor` for the full "
        "report, or use `ksmtrace stat --sysfs-only` unprivileged",
        Exit.NO_KSM: "no KSM (exit 4): boot a kernel with CONFIG_KSM=y",
        Exit.NO_BPF: "no usable BPF mechanism (exit 5): only counter polling "
        "(`ksmtrace stat --sysfs-only`) is possible here",
    }[code]
    w(verdict)
    return "\n".join(out)
