"""Circuit breakers as a pure state machine: given counts and the time, a decision.

Nothing here reads etcd or a clock. The evaluator (``_evaluator``) samples the fleet's
running totals into a ``Series`` per subject, asks ``step`` what a breaker does now, and
acts at the edge: a trip writes a degraded-mode halt, HALF_OPEN lifts it so that probes
go through, a failed probe writes it again.

    CLOSED --(a rate over its threshold, on at least min_calls effects)--> OPEN
    OPEN --(cooldown elapsed)--> HALF_OPEN
    HALF_OPEN --(probes writes all landed)--> CLOSED
    HALF_OPEN --(a probe failed)--> OPEN
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

BASELINE_WINDOWS = 5  # the volume baseline: effects per window over this many windows before


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Scope(enum.StrEnum):
    """What one trip degrades: the run it happened in, its whole agent, or its tenant."""

    RUN = "run"
    AGENT = "agent"
    TENANT = "tenant"


class Totals(NamedTuple):
    """Running totals of one subject; windows are differences of two of them. A tuple:
    made, compared and summed many times a round, which a dataclass makes slower."""

    effects: int = 0  # finished effects, reads and writes
    writes: int = 0  # finished write effects
    failed: int = 0  # write effects that failed
    anomalies: int = 0  # flagged by the agent, in effects or out

    def __add__(self, other: Totals) -> Totals:  # type: ignore[override]
        return Totals(
            self.effects + other.effects,
            self.writes + other.writes,
            self.failed + other.failed,
            self.anomalies + other.anomalies,
        )

    def __sub__(self, other: Totals) -> Totals:
        return Totals(
            self.effects - other.effects,
            self.writes - other.writes,
            self.failed - other.failed,
            self.anomalies - other.anomalies,
        )


ZERO = Totals()


Labels = tuple[tuple[str, str], ...]  # a selector's labels, sorted: every one must match
NO_LABELS: Mapping[str, str] = {}


class Selected(Protocol):
    """A selector as a kill takes it (a breaker's, a rule's): empty matches any."""

    @property
    def tenant(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def labels(self) -> Labels: ...


def covers(sel: Selected, run: Sequence[str], labels: Mapping[str, str] = NO_LABELS) -> bool:
    """Whether ``sel`` selects the run ``(tenant, agent, run_id)`` carrying ``labels``."""
    tenant, agent, run_id = run
    return (
        sel.tenant in ("", tenant)
        and sel.agent in ("", agent)
        and sel.run_id in ("", run_id)
        and (not sel.labels or all(labels.get(k) == v for k, v in sel.labels))
    )


_DEPTH = {Scope.TENANT: 1, Scope.AGENT: 2, Scope.RUN: 3}


def subject_of(scope: Scope, run: Sequence[str]) -> tuple[str, ...]:
    """What one trip degrades (or one rule acts on) for the run ``(tenant, agent, run_id)``:
    the run itself, its agent or its tenant."""
    return tuple(run[: _DEPTH[scope]])


@dataclass(frozen=True, slots=True)
class BreakerSpec:
    """One breaker of the policy, validated (see ``_policy``)."""

    name: str
    tenant: str = ""  # the selector, as a kill takes it: empty matches any
    agent: str = ""
    run_id: str = ""
    labels: Labels = ()  # only runs registered with every one of these labels
    scope: Scope = Scope.RUN
    window: float = 60.0
    min_calls: int = 20
    error_rate: float | None = None
    anomaly_rate: float | None = None
    volume_factor: float | None = None
    cooldown: float = 120.0
    probes: int = 3


@dataclass(frozen=True, slots=True)
class Figures:
    """What a breaker decides on: the current window, and the volume baseline."""

    window: float
    current: Totals
    baseline: float | None = None  # effects per window before it; None: not known yet

    def as_dict(self) -> dict[str, float | int | None]:
        c = self.current
        return {
            "window_s": self.window,
            "effects": c.effects,
            "writes": c.writes,
            "failed": c.failed,
            "anomalies": c.anomalies,
            "baseline": self.baseline,
        }


def trip_reason(spec: BreakerSpec, fig: Figures, over: str = "") -> str:
    """Why ``spec`` trips on ``fig``, with the figures; "" when it does not. ``over`` says
    what the figures cover (by default, the window)."""
    c = fig.current
    if c.effects < spec.min_calls:
        return ""  # no verdict on fewer calls
    w = over or f"{fig.window:g}s"
    if spec.error_rate is not None and c.writes:
        rate = c.failed / c.writes
        if rate > spec.error_rate:
            return f"error rate {rate:.2f} over {w} ({c.failed}/{c.writes}) > {spec.error_rate:g}"
    if spec.anomaly_rate is not None:
        rate = c.anomalies / c.effects
        if rate > spec.anomaly_rate:
            return (
                f"anomaly rate {rate:.2f} over {w} ({c.anomalies}/{c.effects}) "
                f"> {spec.anomaly_rate:g}"
            )
    if spec.volume_factor is not None and fig.baseline is not None:
        base = max(fig.baseline, 1.0)
        if c.effects > spec.volume_factor * base:
            return (
                f"volume {c.effects} effects over {w} is {c.effects / base:.1f}x "
                f"the baseline {fig.baseline:.1f} > {spec.volume_factor:g}x"
            )
    return ""


def may_trip(spec: BreakerSpec, most: Totals) -> bool:
    """Whether ``spec`` could trip on a window whose counts are each at most ``most``:
    False means ``trip_reason`` gives no reason on any such window, so a CLOSED breaker
    need not compute it. A rate in (0, 1] is crossed only with a failure (an anomaly) in
    the window, and a volume only with more than ``volume_factor`` effects."""
    if most.effects < spec.min_calls:
        return False  # no verdict on fewer calls
    e, a, v = spec.error_rate, spec.anomaly_rate, spec.volume_factor
    return (
        (e is not None and (most.failed > 0 or e < 0))
        or (a is not None and (most.anomalies > 0 or a < 0))
        or (v is not None and most.effects > v)
    )


@dataclass(frozen=True, slots=True)
class BreakerState:
    """Where one breaker stands for one subject. Stored in etcd, so it outlives evaluators."""

    state: State = State.CLOSED
    since: float = 0.0  # wall time of the last transition
    reason: str = ""  # the figures of the last trip
    probe_base: Totals = field(default_factory=Totals)  # totals when HALF_OPEN began


class Event(enum.StrEnum):
    NONE = ""
    TRIP = "trip"
    HALF_OPEN = "half_open"
    CLOSE = "close"
    REOPEN = "reopen"
    REBASE = "rebase"  # HALF_OPEN counts its probes from new totals: stored, nothing to do


def step(
    spec: BreakerSpec, st: BreakerState, fig: Figures, totals: Totals, now: float
) -> tuple[BreakerState, Event]:
    """The breaker's next state, and what the edge must do about it.

    ``totals`` are the subject's running totals now: probes are counted from them.
    """
    if st.state is State.CLOSED:
        reason = trip_reason(spec, fig)
        if not reason:
            return st, Event.NONE
        return BreakerState(State.OPEN, now, reason), Event.TRIP
    if st.state is State.OPEN:
        if now - st.since < spec.cooldown:
            return st, Event.NONE
        return replace(st, state=State.HALF_OPEN, since=now, probe_base=totals), Event.HALF_OPEN
    if not _at_least(totals, st.probe_base):
        # the subject's counts started again (its runs ended and were forgotten): the
        # probes count from here, not as negative figures against the old base
        return replace(st, probe_base=totals), Event.REBASE
    probes = totals - st.probe_base
    if probes.failed:
        reason = f"{probes.failed} of {probes.writes} probe writes failed in HALF_OPEN"
        return BreakerState(State.OPEN, now, reason), Event.REOPEN
    if probes.writes >= spec.probes:
        return BreakerState(State.CLOSED, now), Event.CLOSE
    return st, Event.NONE


class Series:
    """A subject's running totals over time, as a step function: a sample only when they
    changed. Enough history for the window and the volume baseline is kept."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._times: list[float] = []
        self._values: list[Totals] = []
        self._last: tuple[float, float, Figures] | None = None  # figures() asked last
        self._grows = True  # every count only grew: a window is at most latest - earliest

    def add(self, now: float, totals: Totals) -> None:
        values, times = self._values, self._times
        if values:
            last = values[-1]
            if last is totals or last == totals:
                return  # unchanged: the step goes on
            if self._grows:
                self._grows = _at_least(totals, last)
        self._last = None
        times.append(now)
        values.append(totals)
        horizon = now - self.window * (BASELINE_WINDOWS + 1) - 1
        if len(times) > 1 and times[1] <= horizon:  # keep the value at the horizon
            old = bisect.bisect_right(times, horizon) - 1
            del times[:old]
            del values[:old]

    def may_trip(self, spec: BreakerSpec) -> bool:
        """False when no window of this series can trip a CLOSED ``spec`` (see
        ``may_trip``): the window's figures need not be computed."""
        values = self._values
        if not values or not self._grows:
            return True
        first, last = values[0], values[-1]
        effects = last.effects - first.effects
        if effects < spec.min_calls:
            return False  # the rest is may_trip(spec, last - first), without making it
        e, a, v = spec.error_rate, spec.anomaly_rate, spec.volume_factor
        return (
            (e is not None and (last.failed > first.failed or e < 0))
            or (a is not None and (last.anomalies > first.anomalies or a < 0))
            or (v is not None and effects > v)
        )

    def stayed(self, count: int) -> bool:
        """Whether the count at index ``count`` of the totals (``Totals._fields``) never
        moved in the history kept, so that it is 0 in any window of it."""
        values = self._values
        return not values or (self._grows and values[-1][count] == values[0][count])

    def latest(self) -> Totals:
        return self._values[-1] if self._values else ZERO

    def _at(self, when: float) -> Totals:
        """The totals at ``when``; the earliest known when ``when`` is before them."""
        return self._values[max(bisect.bisect_right(self._times, when) - 1, 0)]

    def current(self, now: float) -> Totals:
        """The counts of the window up to ``now`` (``figures(now).current``, without the
        baseline)."""
        last = self._last
        if last is not None and last[0] == now and last[1] == 0.0:
            return last[2].current
        if not self._values:
            return ZERO
        return self._values[-1] - self._at(max(now - self.window, 0.0))

    def figures(self, now: float, not_before: float = 0.0) -> Figures:
        """The window up to ``now``, starting no earlier than ``not_before`` (a breaker that
        closed counts afresh from then)."""
        last = self._last
        if last is not None and last[0] == now and last[1] == not_before:
            return last[2]  # asked again this round (a breaker and a rule share a window)
        found = self._figures(now, not_before)
        self._last = (now, not_before, found)
        return found

    def _figures(self, now: float, not_before: float) -> Figures:
        if not self._values:
            return Figures(self.window, ZERO)
        start_t = max(now - self.window, not_before)
        start = self._at(start_t)
        current = self.latest() - start
        history = max(self._times[0], now - self.window * (BASELINE_WINDOWS + 1))
        span = start_t - history
        if span < self.window:  # less than one whole window of history before this one
            return Figures(self.window, current)
        baseline = (start - self._at(history)).effects * self.window / span
        return Figures(self.window, current, baseline)


def _at_least(a: Totals, b: Totals) -> bool:
    """Whether each count of ``a`` is at least the same count of ``b``."""
    return (
        a.effects >= b.effects
        and a.writes >= b.writes
        and a.failed >= b.failed
        and a.anomalies >= b.anomalies
    )
