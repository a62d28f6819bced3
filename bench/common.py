"""Shared by the benchmarks: interleaved A/B repetitions and result rows.

Every figure is measured side by side in one run: the variants of a
comparison take turns within each repetition (the order rotates), and the
figure is the median over repetitions, so a noisy neighbour (QEMU guests,
other tests) hits every variant alike instead of one of them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDING = ROOT / "tests" / "fixtures" / "recordings" / "host-6.18-workload.ksmrec"


def interleaved(variants: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each variant once per repetition, rotating the order; return every
    measurement per variant."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(variants[n]())
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float], fmt: str = "{:.3g}") -> str:
    return f"n={len(xs)}, min {fmt.format(min(xs))}, max {fmt.format(max(xs))}"


def median_interval(xs: list[float], level: float = 0.9, draws: int = 5000) -> tuple[float, float]:
    """A bootstrap interval of the median of `xs` (resampled with a fixed
    seed, so a report is reproducible): how far the median itself can be
    trusted, which min and max do not say."""
    import random

    rng = random.Random(15)
    ms = sorted(median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    cut = int(draws * (1 - level) / 2)
    return ms[cut], ms[draws - 1 - cut]


def row(name: str, value: float, unit: str, target: str | None = None,
        met: bool | None = None, note: str = "") -> dict:
    return {"name": name, "value": float(value), "unit": unit, "target": target,
            "met": met, "note": note}
