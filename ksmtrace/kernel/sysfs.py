"""KSM's sysfs directory: a typed snapshot of every file, and a knob writer
that always puts back what it changed.

Files differ between kernels (`ksm_zero_pages`, `general_profit`, `smart_scan`
and `advisor_*` are 6.x additions); a missing file is `None`, never an error.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ksmtrace.errors import Busy, KsmtraceError, no_ksm, not_root

KSM_DIR = "sys/kernel/mm/ksm"

# Read-only counters. general_profit and ksm_zero_pages are signed in the
# kernel (atomic_long_t / long) and can be negative.
COUNTERS = (
    "full_scans",
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
)

# Writable knobs with the kernel's defaults (mm/ksm.c), in the order they are
# restored: `run` goes last so ksmd never runs with half-restored settings.
# `advisor_mode` goes first: while the advisor is on the kernel refuses
# pages_to_scan writes (EINVAL), and switching it to "none" resets
# pages_to_scan to 100, which must then be put back.
KNOB_DEFAULTS: dict[str, int | str] = {
    "advisor_mode": "none",
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
    "use_zero_pages": 0,
    "max_page_sharing": 256,
    "merge_across_nodes": 1,
    "stable_node_chains_prune_millisecs": 2000,
    "smart_scan": 1,
    "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500,
    "advisor_max_pages_to_scan": 30000,
    "advisor_target_scan_time": 200,
    "run": 0,
}
KNOBS = tuple(KNOB_DEFAULTS)

RUN_STATES = {0: "stopped", 1: "running", 2: "unmerging"}


def ksm_dir(root: str | os.PathLike = "/") -> Path:
    return Path(root) / KSM_DIR


def ksm_present(root: str | os.PathLike = "/") -> bool:
    return (ksm_dir(root) / "run").exists()


def _parse(name: str, text: str) -> int | str:
    text = text.strip()
    if name == "advisor_mode":
        # "[none] scan-time": the bracketed word is the selected mode.
        for word in text.split():
            if word.startswith("["):
                return word.strip("[]")
        return text
    return int(text)


@dataclass(frozen=True)
class KsmSysfs:
    """One reading of /sys/kernel/mm/ksm. `None` marks a file this kernel lacks."""

    full_scans: int | None = None
    pages_scanned: int | None = None
    pages_shared: int | None = None
    pages_sharing: int | None = None
    pages_unshared: int | None = None
    pages_volatile: int | None = None
    pages_skipped: int | None = None
    stable_node_chains: int | None = None
    stable_node_dups: int | None = None
    ksm_zero_pages: int | None = None
    general_profit: int | None = None
    pages_to_scan: int | None = None
    sleep_millisecs: int | None = None
    use_zero_pages: int | None = None
    max_page_sharing: int | None = None
    merge_across_nodes: int | None = None
    stable_node_chains_prune_millisecs: int | None = None
    smart_scan: int | None = None
    advisor_mode: str | None = None
    advisor_max_cpu: int | None = None
    advisor_min_pages_to_scan: int | None = None
    advisor_max_pages_to_scan: int | None = None
    advisor_target_scan_time: int | None = None
    run: int | None = None
    # Files this reader does not know yet (a newer kernel): kept, not dropped.
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def merged_pages(self) -> int:
        """Pages whose PTE points at a KSM page: pages_shared + pages_sharing."""
        return (self.pages_shared or 0) + (self.pages_sharing or 0)

    @property
    def saved_pages(self) -> int:
        """Pages freed by merging (node_exporter's meaning): pages_sharing,
        plus zero-page merges when use_zero_pages put them aside."""
        return (self.pages_sharing or 0) + max(self.ksm_zero_pages or 0, 0)

    @property
    def sharing_ratio(self) -> float | None:
        """pages_sharing / pages_shared: how many mappers each KSM page saves."""
        if not self.pages_shared:
            return None
        return (self.pages_sharing or 0) / self.pages_shared

    def as_dict(self) -> dict[str, int | str | None]:
        d: dict[str, int | str | None] = {k: getattr(self, k) for k in COUNTERS + KNOBS}
        d.update(self.extra)
        return d


def read_sysfs(root: str | os.PathLike = "/") -> KsmSysfs:
    """Read every file of the KSM sysfs directory (readable without root)."""
    d = ksm_dir(root)
    if not (d / "run").exists():
        raise no_ksm(str(root))
    values: dict[str, int | str] = {}
    extra: dict[str, str] = {}
    known = set(COUNTERS) | set(KNOBS)
    for entry in sorted(os.listdir(d)):
        try:
            text = (d / entry).read_text()
        except OSError:
            continue  # write-only or vanished: not a figure
        if entry in known:
            try:
                values[entry] = _parse(entry, text)
            except ValueError:
                extra[entry] = text.strip()
        else:
            extra[entry] = text.strip()
    return KsmSysfs(**values, extra=extra)


def read_knob(name: str, root: str | os.PathLike = "/") -> int | str | None:
    try:
        return _parse(name, (ksm_dir(root) / name).read_text())
    except FileNotFoundError:
        return None


class KsmKnobs:
    """Context manager that writes KSM knobs and restores every one it changed.

    Restores on normal exit and on exceptions, Ctrl-C and SIGTERM included
    once the program has installed `ksmtrace.signals` (the CLI does).
    Restore order puts `run` last. A knob the kernel refuses to put back
    (EBUSY for max_page_sharing/merge_across_nodes while pages are shared)
    is reported on stderr and kept in `restore_errors`, never silently
    dropped.

        with KsmKnobs() as knobs:
            knobs.set(pages_to_scan=10000, sleep_millisecs=0)
            knobs.set(run=1)
    """

    def __init__(self, root: str | os.PathLike = "/"):
        self.root = Path(root)
        self.saved: dict[str, int | str] = {}
        self.restore_errors: list[str] = []

    # -- writing ---------------------------------------------------------
    def set(self, **knobs: int | str) -> None:
        d = ksm_dir(self.root)
        if not (d / "run").exists():
            raise no_ksm(str(self.root))
        for name, value in knobs.items():
            path = d / name
            if not path.exists():
                raise KsmtraceError(
                    f"this kernel has no KSM knob {name!r} ({path} missing)",
                    "the knob was added in a later kernel; leave it at its default",
                )
            self._save(name)
            if name == "advisor_mode":
                self._save("pages_to_scan")  # the advisor rewrites it
            self._write(path, name, value)

    def _save(self, name: str) -> None:
        if name not in self.saved:
            current = read_knob(name, self.root)
            if current is not None:
                self.saved[name] = current

    def _write(self, path: Path, name: str, value: int | str) -> None:
        try:
            path.write_text(f"{value}\n")
        except PermissionError as e:
            raise not_root(f"writing the KSM knob {name}") from e
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise Busy(
                    f"the kernel refused {name}={value}: KSM pages are in use (EBUSY)",
                    f"{name} can only change while nothing is merged: "
                    f"stop the merging processes, or `echo 2 > {path.parent}/run` to unmerge",
                ) from e
            if e.errno == errno.EINVAL:
                raise KsmtraceError(
                    f"the kernel refused {name}={value} (EINVAL)",
                    f"see the valid range of {name} in Documentation/admin-guide/mm/ksm.rst",
                ) from e
            raise

    def restore(self) -> None:
        d = ksm_dir(self.root)
        order = [k for k in KNOBS if k in self.saved] + [
            k for k in self.saved if k not in KNOB_DEFAULTS
        ]
        # `run` last, whatever the order of the calls was.
        order.sort(key=lambda k: k == "run")
        for name in order:
            value = self.saved[name]
            try:
                if read_knob(name, self.root) != value:
                    (d / name).write_text(f"{value}\n")
            except OSError as e:
                self.restore_errors.append(f"{name}={value}: {e.strerror or e}")
        self.saved.clear()

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> KsmKnobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
        if self.restore_errors:
            import sys

            print(
                "ksmtrace: could not restore KSM knobs: " + "; ".join(self.restore_errors),
                file=sys.stderr,
            )


@contextmanager
def knobs(root: str | os.PathLike = "/", **values: int | str) -> Iterator[KsmKnobs]:
    """`with knobs(run=1, pages_to_scan=5000): ...` shorthand."""
    with KsmKnobs(root) as k:
        k.set(**values)
        yield k
