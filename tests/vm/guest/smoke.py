#!/usr/bin/env python3
"""Guest sanity check, independent of ksmtrace: can bcc attach kprobes,
fentry/fexit and the ksm tracepoints on this kernel, and do they fire while a
small KSM workload merges pages and then breaks them by copy-on-write?

Run by tests/vm/guest/runner.sh when the host asks for `--smoke`. Prints one
`SMOKE ...` line per probe and writes a JSON report; exits 1 when a required
probe did not attach or never fired, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import time

from bcc import BPF

KSM = "/sys/kernel/mm/ksm"
TRACEFS_KSM = "/sys/kernel/tracing/events/ksm"
# The two functions ksmtrace's kprobe and fentry paths rely on (see KERNEL-NOTES.md).
REQUIRED_FUNCS = ("try_to_merge_one_page", "do_wp_page")
# Looked at too, for the report only.
EXTRA_FUNCS = ("try_to_merge_with_ksm_page", "write_protect_page", "break_ksm", "wp_page_copy")
COUNTER = """
BPF_ARRAY(cnt, u64, 64);
static __always_inline void inc(int i)
{
    u64 *v = cnt.lookup(&i);
    if (v)
        __sync_fetch_and_add(v, 1);
}
"""


def ksm_read(name: str) -> int:
    with open(f"{KSM}/{name}") as f:
        return int(f.read().split()[0])


def ksm_write(name: str, value: int | str) -> None:
    with open(f"{KSM}/{name}", "w") as f:
        f.write(str(value))


def vmstat(name: str) -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    return -1


class Probes:
    """Every probe we try, by label ("kprobe:do_wp_page"), with its attach result and counter."""

    def __init__(self) -> None:
        self.attached: dict[str, str] = {}  # label -> "ok" or the error
        self._counters: dict[str, tuple[BPF, int]] = {}

    def _ok(self, label: str, bpf: BPF, index: int) -> None:
        self.attached[label] = "ok"
        self._counters[label] = (bpf, index)

    def _fail(self, label: str, err: Exception) -> None:
        self.attached[label] = " ".join(str(err).split())[-200:] or type(err).__name__

    def kprobes(self, funcs: tuple[str, ...]) -> None:
        src = "#include <uapi/linux/ptrace.h>\n" + COUNTER
        for i in range(len(funcs)):
            src += f"int kp_{i}(struct pt_regs *ctx) {{ inc({2 * i}); return 0; }}\n"
            src += f"int kr_{i}(struct pt_regs *ctx) {{ inc({2 * i + 1}); return 0; }}\n"
        bpf = BPF(text=src)
        for i, fn in enumerate(funcs):
            for kind, prog, index in (
                ("kprobe", f"kp_{i}", 2 * i),
                ("kretprobe", f"kr_{i}", 2 * i + 1),
            ):
                try:
                    if kind == "kprobe":
                        bpf.attach_kprobe(event=fn, fn_name=prog)
                    else:
                        bpf.attach_kretprobe(event=fn, fn_name=prog, maxactive=64)
                    self._ok(f"{kind}:{fn}", bpf, index)
                except Exception as e:  # noqa: BLE001 - bcc raises plain Exception
                    self._fail(f"{kind}:{fn}", e)

    def fentry(self, funcs: tuple[str, ...]) -> None:
        if not BPF.support_kfunc():
            for fn in funcs:
                for kind in ("fentry", "fexit"):
                    self.attached[f"{kind}:{fn}"] = "bcc: no kfunc support"
            return
        for fn in funcs:  # one object per function: a missing one must not sink the others
            src = COUNTER + (
                f"KFUNC_PROBE({fn}) {{ inc(0); return 0; }}\n"
                f"KRETFUNC_PROBE({fn}) {{ inc(1); return 0; }}\n"
            )
            try:
                bpf = BPF(text=src)
                self._ok(f"fentry:{fn}", bpf, 0)
                self._ok(f"fexit:{fn}", bpf, 1)
            except Exception as e:  # noqa: BLE001
                self._fail(f"fentry:{fn}", e)
                self._fail(f"fexit:{fn}", e)

    def tracepoints(self) -> list[str]:
        if not os.path.isdir(TRACEFS_KSM):
            return []
        names = sorted(e for e in os.listdir(TRACEFS_KSM) if os.path.isdir(f"{TRACEFS_KSM}/{e}"))
        src = COUNTER + "".join(
            f"TRACEPOINT_PROBE(ksm, {tp}) {{ inc({i}); return 0; }}\n" for i, tp in enumerate(names)
        )
        try:
            bpf = BPF(text=src)
            for i, tp in enumerate(names):
                self._ok(f"tracepoint:ksm:{tp}", bpf, i)
        except Exception as e:  # noqa: BLE001
            for tp in names:
                self._fail(f"tracepoint:ksm:{tp}", e)
        return names

    def counts(self) -> dict[str, int]:
        return {
            label: int(bpf["cnt"][bpf["cnt"].Key(index)].value)
            for label, (bpf, index) in self._counters.items()
        }


def workload(megabytes: int, timeout: float) -> dict[str, float | int]:
    """Duplicate pages in a child process: merge them, then write unique bytes
    into half of them (copy-on-write breaks of KSM pages)."""
    page = mmap.PAGESIZE
    pages = megabytes * 1024 * 1024 // page
    knobs = ("run", "pages_to_scan", "sleep_millisecs")
    saved = {k: ksm_read(k) for k in knobs}
    cow0 = vmstat("cow_ksm")
    t0 = time.monotonic()
    ksm_write("pages_to_scan", 5000)
    ksm_write("sleep_millisecs", 10)
    ksm_write("run", 1)
    try:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns
            rc = 1
            try:
                os.close(rfd)
                m = mmap.mmap(-1, pages * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                m.madvise(mmap.MADV_NOHUGEPAGE)  # Debian kernels default to THP=always
                patterns = [bytes([1 + i % 4]) * page for i in range(4)]  # 4 distinct contents
                for p in range(pages):
                    m[p * page : (p + 1) * page] = patterns[p % 4]
                m.madvise(mmap.MADV_MERGEABLE)
                deadline = time.monotonic() + timeout
                while ksm_read("pages_sharing") < pages * 0.9 and time.monotonic() < deadline:
                    time.sleep(0.2)
                merged = {
                    "pages_sharing": ksm_read("pages_sharing"),
                    "pages_shared": ksm_read("pages_shared"),
                    "merge_seconds": round(time.monotonic() - t0, 2),
                }
                os.write(wfd, json.dumps(merged).encode())
                for p in range(0, pages, 2):  # unique bytes: a broken page stays broken
                    m[p * page : p * page + 8] = (p + 1).to_bytes(8, "little")
                rc = 0
            finally:
                os._exit(rc)
        os.close(wfd)
        with os.fdopen(rfd) as r:
            merged = json.loads(r.read() or "{}")
        _, status = os.waitpid(pid, 0)
        return {
            **merged,
            "pages": pages,
            "child_exit": os.waitstatus_to_exitcode(status),
            "seconds": round(time.monotonic() - t0, 2),
            "full_scans": ksm_read("full_scans"),
            "cow_ksm_delta": vmstat("cow_ksm") - cow0 if cow0 >= 0 else -1,
        }
    finally:
        ksm_write("run", 2)  # unmerge what is left, then put every knob back
        for k in ("pages_to_scan", "sleep_millisecs", "run"):
            ksm_write(k, saved[k])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--mb", type=int, default=int(os.environ.get("SMOKE_MB", "16")))
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()

    t0 = time.monotonic()
    probes = Probes()
    probes.kprobes(REQUIRED_FUNCS + EXTRA_FUNCS)
    probes.fentry(REQUIRED_FUNCS + EXTRA_FUNCS)
    tracepoints = probes.tracepoints()
    t_attach = time.monotonic() - t0
    work = workload(args.mb, args.timeout)
    counts = probes.counts()

    required = [f"{kind}:{fn}" for fn in REQUIRED_FUNCS for kind in ("kprobe", "fentry")]
    if tracepoints:
        required.append("tracepoint:ksm:ksm_merge_with_ksm_page")
    problems = [
        f"{label}: {probes.attached.get(label, 'not tried')}"
        if probes.attached.get(label) != "ok"
        else f"{label}: attached but never fired"
        for label in required
        if probes.attached.get(label) != "ok" or counts.get(label, 0) == 0
    ]
    if work["child_exit"] != 0:
        problems.append(f"workload exited {work['child_exit']}")
    if work["cow_ksm_delta"] == 0:
        problems.append("no copy-on-write break of a KSM page (cow_ksm did not move)")

    for label in sorted(probes.attached):
        state = probes.attached[label]
        print(
            f"SMOKE {label:45s} {'ok' if state == 'ok' else 'FAIL'} "
            f"{counts.get(label, '') if state == 'ok' else state}",
            flush=True,
        )
    print(f"SMOKE workload {work}")
    verdict = "OK" if not problems else "PROBLEMS: " + "; ".join(problems)
    print(f"SMOKE attach took {t_attach:.1f}s; {verdict}")
    report = {
        "kernel": platform.release(),
        "bpf_support_kfunc": bool(BPF.support_kfunc()),
        "tracepoints": tracepoints,
        "attached": probes.attached,
        "counts": counts,
        "required": required,
        "workload": work,
        "attach_seconds": round(t_attach, 2),
        "problems": problems,
        "ok": not problems,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
