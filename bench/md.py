"""Markdown pieces the phases' tables and budget rows are made of."""

from __future__ import annotations

import math
from collections.abc import Iterable

KB = 1024.0

Row = list[str]


def fmt(value: float | str | None, digits: int = 1) -> str:
    """A figure for a table cell: thousands separated, "-" for nothing (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def pct(value: float) -> str:
    """A CPU share as recorded: ``83.5%``."""
    return f"{value:g}%"


def table(head: Row, rows: Iterable[Row]) -> str:
    """A Markdown table, ending in a newline."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def verdict(ok: bool | None) -> str:
    """A budget's verdict cell; None is for a figure this run did not measure."""
    return {True: "**MET**", False: "**MISSED**", None: "NOT MEASURED"}[ok]


def ratio(value: float | None, floor: float | None) -> float | None:
    """``value`` as a multiple of ``floor``; None when either is missing or the floor is 0."""
    if value is None or floor is None or floor <= 0:
        return None
    return value / floor


def missed_by(measured: float | None, goal: float, *, most: bool = True) -> str:
    """How far ``measured`` is from ``goal`` when it misses it ("" when it meets it).

    ``most``: the goal is an upper bound (≤); otherwise a lower bound (≥).
    """
    if measured is None or (measured <= goal if most else measured >= goal):
        return ""
    if most:
        return f"; **missed: {measured / goal:,.2f}x the limit**"
    return f"; **missed: {goal / max(measured, 1e-9):,.2f}x short of the goal**"
