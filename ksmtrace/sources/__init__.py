"""Event sources: the only layer that imports bcc.

live (BPF programs from bpf/), sysfs-only (counter polling, no root needed)
and replay (a recording). `trial` proves BPF mechanisms for the capability
module by really loading and attaching tiny programs. Every source offers
the `Source` interface; `collector.observe()` opens any of them together
with its collector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ksmtrace.model import ProbeStatus, Tick


class Source(Protocol):
    """What a view needs from a source: what it is, what it can see, and its
    ticks. Entered as a context manager (probes attached, files opened) and
    left on every path."""

    kind: str  # "live", "sysfs-only", "replay"
    probes: tuple[ProbeStatus, ...]  # how each figure is observed
    notes: tuple[str, ...]  # what this source cannot see, and why
    cow_estimated: bool  # per-process COW split from cow_ksm by write faults

    def ticks(self, interval: float, count: int = 0) -> Iterator[Tick]: ...

    def __enter__(self) -> Source: ...

    def __exit__(self, *exc: object) -> None: ...
