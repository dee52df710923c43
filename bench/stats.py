"""Summaries of samples: percentiles by linear interpolation, and a least-squares slope."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted samples, interpolated."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(samples: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """n, min, p50, p90, p99, max and mean of ``samples`` (empty: n=0 and no figures)."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    out: dict[str, Any] = {"n": len(ordered)}
    for name, value in (
        ("min", ordered[0]),
        ("p50", percentile(ordered, 50)),
        ("p90", percentile(ordered, 90)),
        ("p99", percentile(ordered, 99)),
        ("max", ordered[-1]),
        ("mean", sum(ordered) / len(ordered)),
    ):
        out[name] = round(value, digits)
    return out


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
