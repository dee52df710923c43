"""The evaluator's shortcuts decide as the full path does: a CLOSED breaker no window can
trip is not judged, and threshold rules are decided in Python instead of CEL. Pure."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from tether_server._breakers import (
    BreakerSpec,
    BreakerState,
    Event,
    Scope,
    Series,
    State,
    Totals,
    covers,
    may_trip,
    step,
    subject_of,
)
from tether_server._compare import compile_simple
from tether_server._evaluator import _due, _unclosed
from tether_server._flatten import Flat, flatten
from tether_server._policy import groups_of, parse
from tether_server._store import RunKey, breaker_key, breaker_of

SPEC = BreakerSpec("b", error_rate=0.5, min_calls=10)


def _full(spec: BreakerSpec, st: BreakerState, series: Series, now: float) -> Event:
    """What the breaker does when its window is computed and stepped, as without shortcut."""
    return step(spec, st, series.figures(now, st.since), series.latest(), now)[1]


def test_min_calls_boundary() -> None:
    assert not may_trip(SPEC, Totals(effects=9, writes=9, failed=9))
    assert may_trip(SPEC, Totals(effects=10, writes=10, failed=6))
    series = Series(60)
    series.add(0, Totals())
    series.add(10, Totals(effects=9, writes=9, failed=9))  # all failed, one call short
    assert not series.may_trip(SPEC)
    assert _full(SPEC, BreakerState(), series, 10) is Event.NONE
    series.add(11, Totals(effects=10, writes=10, failed=10))
    assert series.may_trip(SPEC)
    assert _full(SPEC, BreakerState(), series, 11) is Event.TRIP


def test_exactly_at_the_threshold_is_judged_and_does_not_trip() -> None:
    series = Series(60)
    series.add(0, Totals())
    series.add(10, Totals(effects=10, writes=10, failed=5))  # 0.5, not over 0.5
    assert series.may_trip(SPEC)  # a failure in the window: computed in full
    assert _full(SPEC, BreakerState(), series, 10) is Event.NONE
    series.add(11, Totals(effects=11, writes=11, failed=6))  # 6/11 > 0.5
    assert _full(SPEC, BreakerState(), series, 11) is Event.TRIP


def test_no_failure_since_the_earliest_sample_cannot_trip_an_error_rate() -> None:
    series = Series(60)
    series.add(0, Totals(effects=100, writes=100, failed=90))  # history before the series
    series.add(10, Totals(effects=200, writes=200, failed=90))
    assert not series.may_trip(SPEC)
    assert series.may_trip(BreakerSpec("v", volume_factor=2.0))  # volume still might
    assert _full(SPEC, BreakerState(), series, 10) is Event.NONE


def test_counts_that_fell_turn_the_shortcut_off() -> None:
    series = Series(60)
    series.add(0, Totals(effects=50, writes=50, failed=40))
    series.add(10, Totals(effects=60, writes=60, failed=0))  # not running totals
    assert series.may_trip(SPEC)


def test_half_open_is_never_skipped_by_the_closed_shortcut() -> None:
    """A quiet series (no failure) cannot trip a CLOSED breaker, yet in HALF_OPEN its
    probe writes close it: the evaluator takes the shortcut only when CLOSED."""
    series = Series(60)
    series.add(0, Totals(effects=10, writes=10))
    series.add(10, Totals(effects=40, writes=40))
    assert not series.may_trip(SPEC)
    half = BreakerState(State.HALF_OPEN, 5, "", Totals(effects=10, writes=10))
    assert _full(SPEC, half, series, 10) is Event.CLOSE


def _random_spec(rng: random.Random) -> BreakerSpec:
    return BreakerSpec(
        "b",
        window=rng.choice([5.0, 10.0, 30.0]),
        min_calls=rng.randint(1, 30),
        error_rate=rng.choice([None, 0.1, 0.5, 1.0]),
        anomaly_rate=rng.choice([None, 0.05, 0.5]),
        volume_factor=rng.choice([None, 1.5, 4.0]),
    )


def _random_series(rng: random.Random, window: float) -> tuple[Series, float]:
    series, now, totals = Series(window), 0.0, Totals()
    for _ in range(rng.randint(1, 40)):
        writes = rng.randint(0, 8)
        reads = rng.randint(0, 3)
        grew = Totals(
            writes + reads, writes, rng.randint(0, writes) * rng.randint(0, 1),
            rng.randint(0, 1) * rng.randint(0, 2),
        )  # fmt: skip
        now += rng.choice([0.25, 0.5, 2.0, 7.0])
        totals += grew
        series.add(now, totals)
    return series, now


def test_the_shortcut_never_skips_a_trip_on_random_series() -> None:
    rng = random.Random(11)
    skipped = tripped = 0
    for _ in range(4000):
        spec = _random_spec(rng)
        series, now = _random_series(rng, spec.window)
        since = rng.choice([0.0, now / 2])  # a breaker that closed counts from then
        event = _full(spec, BreakerState(State.CLOSED, since), series, now)
        tripped += event is Event.TRIP
        if not series.may_trip(spec):
            skipped += 1
            assert event is Event.NONE, (spec, series.latest())
    assert skipped > 200  # the shortcut is taken, and trips happen: the test can fail
    assert tripped > 100


SIMPLE = [
    "run.spend.usd > 100.0 || run.rates.error > 0.99",
    "run.spend.usd >= 2.5 && !(run.rates.anomaly < 0.25)",
    "(agent.spend.tokens > 1000 || tenant.effects.total == 7) && run.effects.failed != 0",
    "1.5 < run.spend.usd",
    "run.spend.usd > -1.0e1 && run.spend.calls <= 3",
]
NOT_SIMPLE = [
    "run.spend.usd > 100",  # a double against an int: CEL's own rules
    "run.spend.tokens > 10.0",
    "!run.spend.usd > 1.0",
    "run.spend.usd > 1.0 == true",
    "run.spend.usd + 1.0 > 2.0",
    "run.labels.team == 'red'",
    "run.spend.usd > 1.0 ? true : false",
    "run.spend.usd > 0x10",
    "run.spend.usd > 1.0 // a comment",
    "true || run.spend.usd > 1.0",
]
VALUES: list[Any] = [0.0, -0.0, 1.5, 2.5, 100.0, 100.5, math.inf, -math.inf, math.nan, 3, 0]
INTS: list[Any] = [0, 3, 7, 1000, 1001, 2**63, -1, 3.0, True]


def _inputs(rng: random.Random, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        floaty = name.endswith(("usd", "error", "anomaly"))
        out[name] = rng.choice(VALUES if floaty else INTS)
    return out


def test_simple_rules_compile_and_the_others_do_not() -> None:
    for when in SIMPLE:
        found = flatten(when)
        assert found is not None
        assert compile_simple([found]) is not None, when
    for when in NOT_SIMPLE:
        found = flatten(when)
        assert found is None or compile_simple([found]) is None, when


@pytest.mark.parametrize("whens", [SIMPLE, SIMPLE[:1], [*SIMPLE, NOT_SIMPLE[0]]])
def test_thresholds_in_python_decide_as_cel_does(whens: list[str]) -> None:
    rules = "\n".join(f"  - {{name: r{i}, when: {json.dumps(w)}}}" for i, w in enumerate(whens))
    (group,) = groups_of(parse(f"rules:\n{rules}\n").rules)
    assert group.flat_paths is not None
    alone = [Flat.compile(w) for w in whens]
    names = sorted(group.flat_paths)
    rng = random.Random(13)
    for _ in range(3000):
        inputs = _inputs(rng, names)
        expected = [f is not None and f.holds(inputs) for f in alone]  # CEL, rule by rule
        assert group.results(inputs, {}) == expected, inputs
        inputs.pop(rng.choice(names))  # a figure missing: CEL errs, holds not
        assert group.results(inputs, {}) == [f is not None and f.holds(inputs) for f in alone]


@pytest.mark.parametrize("scope", list(Scope))
def test_a_breaker_without_selector_is_due_where_covers_says(scope: Scope) -> None:
    runs = {RunKey(f"t{i % 2}", f"a{i % 5}", f"r{i}") for i in range(30)}
    spec = BreakerSpec("b", scope=scope, error_rate=0.5)
    key = breaker_key("b", ("t9", "a9", "r9")[: {"run": 3, "agent": 2, "tenant": 1}[scope]])
    states = {key: BreakerState(State.OPEN, 1.0), breaker_key("c", ("t0",)): BreakerState()}
    unclosed = _unclosed(spec, states)
    assert unclosed == {breaker_of(key)[1]}  # another breaker's, or a CLOSED one: not
    expected = {subject_of(scope, r) for r in runs if covers(spec, r)} | unclosed
    assert _due(spec, runs, unclosed, {}) == expected


def test_parentheses_too_deep_for_python_are_left_to_cel() -> None:
    from tether_server._compare import compile_simple

    paths = {"run__spend__usd": ("run", "spend", "usd")}

    def nested(depth: int) -> str:
        return "(" * depth + "run__spend__usd > 5.0" + ")" * depth

    shallow = compile_simple([(nested(20), paths)])
    assert shallow is not None
    assert shallow({"run__spend__usd": 7.0}) == [True]
    assert shallow({"run__spend__usd": 1.0}) == [False]
    assert compile_simple([(nested(120), paths)]) is None  # would not compile as Python
