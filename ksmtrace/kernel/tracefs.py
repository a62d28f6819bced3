"""Find tracefs, and mount it when the kernel has it but nobody mounted it.

Tracepoint formats, tracepoint attachment and kprobe_events all live there.
Some hosts (this project's CI host among them) boot without it mounted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ksmtrace.errors import NoTracefs

CANDIDATES = ("sys/kernel/tracing", "sys/kernel/debug/tracing")


@dataclass(frozen=True)
class Tracefs:
    path: str | None
    mounted_now: bool
    note: str


def find_tracefs(root: str | os.PathLike = "/") -> str | None:
    for rel in CANDIDATES:
        p = Path(root) / rel
        try:
            if (p / "events").is_dir():
                return str(p)
        except PermissionError:
            continue  # mode 0700: only root may look
    return None


def ensure_tracefs(
    root: str | os.PathLike = "/", mount: bool = True, quiet: bool = False
) -> Tracefs:
    """Return where tracefs is; as root, mount it at /sys/kernel/tracing if needed."""
    found = find_tracefs(root)
    if found:
        return Tracefs(found, False, "already mounted")
    target = Path(root) / CANDIDATES[0]
    how = f"mount -t tracefs nodev {target}"
    if os.geteuid() != 0:
        return Tracefs(None, False, "tracefs can only be read by root")
    if not mount or not target.is_dir():
        return Tracefs(None, False, f"tracefs is not mounted; as root: {how}")
    r = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(target)], capture_output=True, text=True
    )
    if r.returncode != 0 or not (target / "events").is_dir():
        return Tracefs(None, False, f"`{how}` failed: {r.stderr.strip() or r.returncode}")
    if not quiet:
        print(f"ksmtrace: tracefs was not mounted; mounted it at {target}", file=sys.stderr)
    return Tracefs(str(target), True, f"was not mounted; ksmtrace mounted it at {target}")


def require_tracefs(root: str | os.PathLike = "/") -> str:
    t = ensure_tracefs(root)
    if t.path is None:
        raise NoTracefs(
            "tracefs is not available: " + t.note,
            "the kernel needs CONFIG_TRACING; as root: mount -t tracefs nodev /sys/kernel/tracing",
        )
    return t.path


def tracepoint_exists(tracefs: str | None, category: str, event: str) -> bool:
    try:
        return tracefs is not None and (
            Path(tracefs) / "events" / category / event / "format").exists()
    except PermissionError:
        return False


def tracepoints_in(tracefs: str | None, category: str) -> list[str]:
    if tracefs is None:
        return []
    d = Path(tracefs) / "events" / category
    if not d.is_dir():
        return []
    return sorted(e.name for e in d.iterdir() if (e / "format").exists())
