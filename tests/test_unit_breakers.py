"""The breaker state machine and its windows, without etcd: counts in, decisions out."""

from __future__ import annotations

from tether_server._breakers import (
    BreakerSpec,
    BreakerState,
    Event,
    Figures,
    Scope,
    Series,
    State,
    Totals,
    covers,
    step,
    subject_of,
    trip_reason,
)
from tether_server._tally import FleetTotals

SPEC = BreakerSpec(
    "email-errors", tenant="acme", window=60, min_calls=20, error_rate=0.15, cooldown=120, probes=3
)


def test_error_rate_trips_with_the_figures_in_the_reason() -> None:
    fig = Figures(60, Totals(effects=50, writes=50, failed=26))
    assert trip_reason(SPEC, fig) == "error rate 0.52 over 60s (26/50) > 0.15"
    st, event = step(SPEC, BreakerState(), fig, fig.current, now=1000)
    assert event is Event.TRIP and st.state is State.OPEN and st.since == 1000


def test_no_verdict_on_fewer_than_min_calls() -> None:
    fig = Figures(60, Totals(effects=19, writes=19, failed=19))
    assert trip_reason(SPEC, fig) == ""
    assert step(SPEC, BreakerState(), fig, fig.current, 0)[1] is Event.NONE


def test_reads_do_not_count_as_errors() -> None:
    fig = Figures(60, Totals(effects=40, writes=10, failed=1))
    assert trip_reason(SPEC, fig) == ""


def test_anomaly_and_volume_trip_on_their_own() -> None:
    anomalies = BreakerSpec("a", anomaly_rate=0.10, min_calls=10)
    fig = Figures(60, Totals(effects=20, writes=20, anomalies=3))
    assert trip_reason(anomalies, fig) == "anomaly rate 0.15 over 60s (3/20) > 0.1"
    volume = BreakerSpec("v", volume_factor=3.0, min_calls=10)
    assert trip_reason(volume, Figures(60, Totals(effects=40))) == ""  # no baseline yet
    tripped = trip_reason(volume, Figures(60, Totals(effects=40), baseline=10.0))
    assert tripped == "volume 40 effects over 60s is 4.0x the baseline 10.0 > 3x"
    assert trip_reason(volume, Figures(60, Totals(effects=25), baseline=10.0)) == ""


def test_cooldown_then_half_open_then_probes_close_it() -> None:
    opened = BreakerState(State.OPEN, since=1000, reason="x")
    quiet = Figures(60, Totals())
    base = Totals(effects=100, writes=80, failed=30)
    assert step(SPEC, opened, quiet, base, 1119)[1] is Event.NONE
    half, event = step(SPEC, opened, quiet, base, 1120)
    assert event is Event.HALF_OPEN and half.probe_base == base
    two_ok = base + Totals(effects=2, writes=2)
    assert step(SPEC, half, quiet, two_ok, 1121) == (half, Event.NONE)
    closed, event = step(SPEC, half, quiet, two_ok + Totals(effects=1, writes=1), 1122)
    assert event is Event.CLOSE and closed.state is State.CLOSED


def test_a_failing_probe_reopens() -> None:
    half = BreakerState(State.HALF_OPEN, since=0, probe_base=Totals(writes=5))
    st, event = step(SPEC, half, Figures(60, Totals()), Totals(writes=7, failed=1), 10)
    assert event is Event.REOPEN and st.state is State.OPEN and st.since == 10
    assert st.reason == "1 of 2 probe writes failed in HALF_OPEN"


def test_half_open_counts_probes_afresh_when_its_subject_was_forgotten() -> None:
    # HALF_OPEN began at totals that held the failures that tripped it; then every run of
    # the subject ended and was forgotten, so its totals start again from zero
    half = BreakerState(State.HALF_OPEN, since=0, probe_base=Totals(600, 500, 100, 0))
    st, event = step(SPEC, half, Figures(60, Totals()), Totals(), 10)
    assert event is Event.REBASE and st.state is State.HALF_OPEN and st.probe_base == Totals()
    three_ok = Totals(effects=3, writes=3)
    assert step(SPEC, st, Figures(60, three_ok), three_ok, 11)[1] is Event.CLOSE
    failing = Totals(effects=2, writes=2, failed=1)
    assert step(SPEC, st, Figures(60, failing), failing, 11)[1] is Event.REOPEN


def test_series_window_and_baseline() -> None:
    series = Series(window=10)
    total = Totals()
    for t in range(0, 61):  # one effect a second for a minute
        total += Totals(effects=1, writes=1)
        series.add(float(t), total)
    fig = series.figures(60.0)
    assert fig.current.effects == 10
    assert fig.baseline is not None and abs(fig.baseline - 10.0) < 1e-9
    for t in range(61, 66):  # then a burst: 20 a second
        total += Totals(effects=20, writes=20)
        series.add(float(t), total)
    fig = series.figures(65.0)
    assert fig.current.effects == 105 and fig.baseline == 10.0


def test_series_without_history_has_no_baseline() -> None:
    series = Series(window=60)
    series.add(0.0, Totals(effects=5))
    series.add(30.0, Totals(effects=50))
    assert series.figures(30.0) == Figures(60, Totals(effects=45))


def test_subjects_and_selectors() -> None:
    spec = BreakerSpec("b", tenant="acme", agent="mail", scope=Scope.AGENT)
    assert covers(spec, ("acme", "mail", "r1")) and not covers(spec, ("acme", "crm", "r1"))
    assert subject_of(spec.scope, ("acme", "mail", "r1")) == ("acme", "mail")
    assert subject_of(Scope.TENANT, ("acme", "mail", "r1")) == ("acme",)
    assert subject_of(SPEC.scope, ("acme", "mail", "r1")) == ("acme", "mail", "r1")


def test_a_closed_breaker_counts_afresh() -> None:
    series = Series(window=60)
    series.add(0.0, Totals(effects=10, writes=10, failed=5))
    series.add(10.0, Totals(effects=30, writes=30, failed=15))
    series.add(20.0, Totals(effects=32, writes=32, failed=15))
    assert series.figures(20.0).current.failed == 10  # since the first sample
    assert series.figures(20.0, not_before=10.0).current == Totals(effects=2, writes=2)


def test_fleet_totals_add_effects_and_take_the_largest_signals() -> None:
    fleet = FleetTotals()
    fleet.merge("c1", {"runs": {"acme/mail/r1": [4, 3, 1]}, "signals": {}})
    fleet.merge("c2", {"runs": {"acme/mail/r1": [2, 2, 2]}, "signals": {}})
    fleet.merge("c1", {"runs": {"acme/mail/r1": [5, 4, 1]}, "signals": {}})  # grew by one
    assert fleet.totals(("acme", "mail", "r1")) == Totals(7, 6, 3)
    fleet.merge("c1", {"runs": {"acme/mail/r1": [1, 1, 0]}, "signals": {}})  # c1 restarted
    assert fleet.totals(("acme",)) == Totals(8, 7, 3)
    moved = {"acme/mail/r1/i1": [2.5, 100, 2, 1]}
    fleet.merge("c1", {"runs": {}, "signals": moved})
    fleet.merge("c2", {"runs": {}, "signals": {"acme/mail/r1/i1": [3.0, 120, 3, 1]}})
    fleet.merge("c1", {"runs": {}, "signals": moved})  # the old coordinator's older totals
    assert fleet.spend(("acme", "mail")) == (3.0, 120, 3)
    assert fleet.totals(("acme", "mail", "r1")).anomalies == 1
    assert fleet.take_changed() == {("acme", "mail", "r1")} and fleet.take_changed() == set()
    assert fleet.members_of(("acme",)) == {("acme", "mail", "r1")}
