"""Summaries of samples: percentiles by linear interpolation, and a least-squares slope."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.record import OMIT


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted samples, interpolated."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class Summary:
    """n, min, p50, p90, p99, max and mean of some samples; with none, only ``n`` (0)."""

    n: int = 0
    min: float | None = field(default=None, metadata=OMIT)
    p50: float | None = field(default=None, metadata=OMIT)
    p90: float | None = field(default=None, metadata=OMIT)
    p99: float | None = field(default=None, metadata=OMIT)
    max: float | None = field(default=None, metadata=OMIT)
    mean: float | None = field(default=None, metadata=OMIT)


def summary(samples: Sequence[float], digits: int = 2) -> Summary:
    """The ``Summary`` of ``samples``, each figure rounded to ``digits``."""
    if not samples:
        return Summary()
    ordered = sorted(samples)
    return Summary(
        n=len(ordered),
        min=round(ordered[0], digits),
        p50=round(percentile(ordered, 50), digits),
        p90=round(percentile(ordered, 90), digits),
        p99=round(percentile(ordered, 99), digits),
        max=round(ordered[-1], digits),
        mean=round(sum(ordered) / len(ordered), digits),
    )


def slope(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares fit y = a + b*x over ``points``; returns (b, a)."""
    n = len(points)
    if n < 2:
        return math.nan, math.nan
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return math.nan, my
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return b, my - b * mx
