"""`make bench`: run every benchmark, print one table, write bench/RESULTS.md.

Each module bench/<name>.py has `run(quick: bool) -> list[dict]` (the
contract is in bench/README.md). A module that is absent gets a "not
available" row; one that fails gets an "error" row with its exception, and
the others still run. Exit status 1 if any module failed, 0 otherwise
(targets missed are figures, not failures: RESULTS.md explains them).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

# in the order they run: the kernel benchmark first, on a machine not yet
# warmed by the pure ones' allocations
MODULES = [
    ("ksmd_overhead", "ksmd overhead, lost events, BPF cost (200k-page merge)"),
    ("collector", "collector throughput and CPU"),
    ("replay", "recording parse rate"),
    ("export_scrape", "exporter scrape time, 1,000 processes"),
    ("tui_frame", "TUI frame time, 1,000 processes"),
    ("pagemap", "page map reader, 4 GiB process and QEMU guest (root)"),
    ("footprint", "agent start-up (cold/warm) and memory over 10 min of scrapes (root)"),
    ("churn", "per-mm tables under 10,000 churning KSM processes: agent and map memory (root)"),
]
KEYS = ("name", "value", "unit", "target", "met", "note")


def load(name: str):
    path = BENCH / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"bench.{name}", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def check_rows(name: str, rows: object) -> list[dict]:
    """The contract, enforced: a list of dicts with exactly these keys and types."""
    if not isinstance(rows, list) or not rows:
        raise TypeError(f"bench/{name}.py run() returned {type(rows).__name__}, not a list of rows")
    for r in rows:
        if not isinstance(r, dict) or set(r) != set(KEYS):
            raise TypeError(f"bench/{name}.py row {r!r} does not have the keys {KEYS}")
        if not isinstance(r["name"], str) or not isinstance(r["unit"], str) \
                or not isinstance(r["note"], str):
            raise TypeError(f"bench/{name}.py row {r['name']!r}: name/unit/note must be str")
        if not isinstance(r["value"], int | float):
            raise TypeError(f"bench/{name}.py row {r['name']!r}: value must be a number")
        if r["target"] is not None and not isinstance(r["target"], str):
            raise TypeError(f"bench/{name}.py row {r['name']!r}: target must be str or None")
        if r["met"] is not None and not isinstance(r["met"], bool):
            raise TypeError(f"bench/{name}.py row {r['name']!r}: met must be bool or None")
    return rows


def run_module(name: str, quick: bool) -> tuple[list[dict], float, bool]:
    """(rows, seconds, ok)."""
    t0 = time.monotonic()
    try:
        mod = load(name)
        if mod is None:
            return [{"name": f"{name}: not available", "value": float("nan"), "unit": "",
                     "target": None, "met": None,
                     "note": f"bench/{name}.py is not in this checkout"}], 0.0, True
        rows = check_rows(name, mod.run(quick))
        return rows, time.monotonic() - t0, True
    except Exception as e:
        traceback.print_exc()
        return [{"name": f"{name}: error", "value": float("nan"), "unit": "", "target": None,
                 "met": False, "note": f"{type(e).__name__}: {e}"}], time.monotonic() - t0, False


def fmt_value(v: float) -> str:
    if v != v:  # nan
        return "-"
    if abs(v) >= 10000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def verdict(r: dict) -> str:
    return {True: "met", False: "NOT met", None: ""}[r["met"]]


def table(rows: list[dict]) -> str:
    cells = [(r["name"], f"{fmt_value(r['value'])} {r['unit']}".strip(), r["target"] or "",
              verdict(r)) for r in rows]
    heads = ("benchmark", "value", "target", "")
    w = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(heads)).rstrip()]
    lines.append("  ".join("-" * x for x in w))
    for c in cells:
        lines.append("  ".join(c[i].ljust(w[i]) if i != 1 else c[i].rjust(w[i])
                               for i in range(4)).rstrip())
    return "\n".join(lines)


def sh(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = sh("pgrep", "-c", "qemu-system")
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "load before": Path("/proc/loadavg").read_text().strip(),
        "qemu guests running": qemu or "0",
        "python": platform.python_version(),
        "bpftrace": sh("bpftrace", "--version") or "absent",
        "commit": sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
    }


def results_md(m: dict[str, str], rows: list[dict], times: dict[str, float],
               quick: bool, explain: str) -> str:
    out = ["# ksmtrace benchmark results", "",
           f"Written by `make bench` ({'quick' if quick else 'full'} run). Every figure is a "
           "median of interleaved repetitions measured in this one run; see bench/README.md "
           "for what each measures.", "", "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in m.items()]
    out += ["", "## Figures", "", "```", table(rows), "```", "", "## Notes per figure", ""]
    out += [f"- **{r['name']}**: {r['note']}" for r in rows if r["note"]]
    out += ["", "Time per module: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())]
    if explain:
        out += ["", explain]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke)")
    p.add_argument("--only", action="append", help="run only this module (repeatable)")
    p.add_argument("-o", "--output", default=str(BENCH / "RESULTS.md"),
                   help="where to write the results (default bench/RESULTS.md)")
    args = p.parse_args(argv)
    from ksmtrace import signals

    signals.install()  # Ctrl-C and SIGTERM unwind: workloads end, knobs are put back
    m = machine()
    rows: list[dict] = []
    times: dict[str, float] = {}
    ok = True
    for name, what in MODULES:
        if args.only and name not in args.only:
            continue
        print(f"bench: {name}: {what} ...", file=sys.stderr, flush=True)
        r, t, good = run_module(name, args.quick)
        rows += r
        times[name] = t
        ok &= good
    m["load after"] = Path("/proc/loadavg").read_text().strip()
    print(table(rows))
    explain_file = BENCH / "ANALYSIS.md"
    explain = explain_file.read_text() if explain_file.exists() else ""
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)  # the figures were measured: keep them
    out.write_text(results_md(m, rows, times, args.quick, explain))
    print(f"\nbench: wrote {args.output}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
