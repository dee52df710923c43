"""What a phase of the benchmark is: the contract between a phase, run.py and report.py.

A phase module declares one ``Phase`` (or a few, for variants): its settings (a dataclass
with a default and a quick variant, and the command-line flags that override fields of it),
how it runs (``run(bench, settings)`` returning a result dataclass), and what it adds to
RESULTS.md: budget rows for the top table, a section, and curves on the kill-latency plot.
``bench/phases/__init__.py`` lists the phases in the order they run and report.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from bench.harness import Bench
from bench.md import Row
from bench.record import load
from bench.stats import Summary

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from matplotlib.axes import Axes

S = TypeVar("S", bound="DataclassInstance")
R = TypeVar("R", bound="DataclassInstance")


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one field of a phase's settings.

    Phases that share a flag (``--workers``, ``--rounds``) list the same ``Flag``; run.py
    adds it once and applies it to each of them.
    """

    name: str  # "--sizes"
    field: str  # the settings field it sets
    parse: Callable[[str], Any]
    help: str
    switch: bool = False  # a flag without a value that sets True

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.switch:
            parser.add_argument(self.name, action="store_const", const=True, help=self.help)
        else:
            parser.add_argument(self.name, type=self.parse, help=self.help)


class Results:
    """A recorded run (results.json as loaded), read by phases through their own types."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.phases: dict[str, Any] = record.get("phases", {})

    def of(self, phase: Phase[Any, R]) -> R | None:
        """``phase``'s result in this run, or None if it did not run."""
        raw = self.phases.get(phase.name)
        return None if raw is None else load(phase.result, raw)

    def ran(self, *phases: Phase[Any, Any]) -> bool:
        return any(p.name in self.phases for p in phases)


def _nothing(_: Results) -> list[Any]:
    return []


def _no_plot(_: Results, __: Axes) -> None:
    return None


@dataclass(frozen=True)
class Phase(Generic[S, R]):
    """One phase: its settings, how it runs, and what it gives the report.

    Attributes:
        name: what ``--only`` calls it, and its key in results.json.
        about: one line for ``--help``.
        result: the dataclass ``run`` returns, as loaded back from results.json.
        run: measures, with the real parts ``bench`` starts.
        defaults: settings of a full run.
        quick: settings of ``--quick``.
        flags: flags that override fields of the settings.
        budgets: rows for the budget table (DESIGN.md's figures), from a whole run.
        section: Markdown parts for RESULTS.md, from a whole run ([] for none).
        plot: draws this phase's curves on the kill-latency plot.
    """

    name: str
    about: str
    result: type[R]
    run: Callable[[Bench, S], R]
    defaults: S
    quick: S
    flags: tuple[Flag, ...] = ()
    budgets: Callable[[Results], list[Row]] = _nothing
    section: Callable[[Results], list[str]] = _nothing
    plot: Callable[[Results, Axes], None] = _no_plot

    def settings(self, args: argparse.Namespace, *, quick: bool) -> S:
        """The settings for this run: defaults (or quick ones), then the flags given."""
        given = {f.field: getattr(args, f.dest) for f in self.flags}
        base = self.quick if quick else self.defaults
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def ints(raw: str) -> list[int]:
    return [int(x) for x in raw.split(",") if x.strip()]


def floats(raw: str) -> list[float]:
    return [float(x) for x in raw.split(",") if x.strip()]


WORKERS = Flag("--workers", "workers", int, "load-generator processes")
TLS = Flag(
    "--tls",
    "tls",
    bool,
    "mutual TLS between coordinators, SDK agents and admin clients (a development CA "
    "in the scratch dir); phases kill1, kill2, kill1long and steady",
    switch=True,
)


def draw_latency(ax: Axes, label: str, color: str, points: list[tuple[int, Summary]]) -> None:
    """Kill latency p50 and p99 by fleet size, one curve each, on the kill-latency plot."""
    held = [(n, s.p50, s.p99) for n, s in points if s.p50 is not None and s.p99 is not None]
    if not held:
        return
    xs = [n for n, _, _ in held]
    ax.plot(xs, [p50 for _, p50, _ in held], "o-", color=color, label=f"{label} p50")
    ax.plot(xs, [p99 for _, _, p99 in held], "s--", color=color, label=f"{label} p99")
