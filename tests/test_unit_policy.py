"""The policy document and its CEL rules, without etcd: parsed, checked, evaluated."""

from __future__ import annotations

import pytest
from tether_server._breakers import Scope
from tether_server._errors import InvalidArgument
from tether_server._flatten import fields_of
from tether_server._policy import Action, parse

DOC = """
breakers:
  - name: email-errors
    selector: {tenant: acme, agent: email-campaign}
    scope: run
    window: 60s
    min_calls: 20
    error_rate: 0.15
    anomaly_rate: 0.10
    volume_factor: 3.0
    cooldown: 2m
    probes: 3
rules:
  - name: spend-cap
    selector: {tenant: acme}
    when: "run.spend.usd > 50.0"
    action: kill
    mode: soft
    grace: 10s
    dry_run: false
notify:
  - url: https://hooks.example/oncall
    events: [kill, resume, freeze, trip, policy]
    format: slack
"""


def test_the_issue_example_parses() -> None:
    policy = parse(DOC)
    (b,) = policy.breakers
    assert (b.name, b.tenant, b.agent, b.scope) == (
        "email-errors",
        "acme",
        "email-campaign",
        Scope.RUN,
    )
    assert (b.window, b.cooldown, b.min_calls, b.error_rate, b.probes) == (60, 120, 20, 0.15, 3)
    (r,) = policy.rules
    assert (r.name, r.action, r.hard, r.grace, r.dry_run) == (
        "spend-cap",
        Action.KILL,
        False,
        10,
        False,
    )
    assert r.decide({"run": {"spend": {"usd": 50.5}}})
    assert not r.decide({"run": {"spend": {"usd": 49.0}}})
    assert not r.decide({"run": {}})  # a missing figure fails the expression: it holds not
    (n,) = policy.notify
    assert n.format == "slack" and "trip" in n.events


def test_empty_policy_is_valid() -> None:
    assert parse("").breakers == ()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("rules: [{name: r, when: 'run.spend.usd >'}]", "rules[0].when does not compile"),
        ("rules: [{name: r, when: 'labels.x == 1'}]", "names 'labels'"),
        ("rules: [{name: r, when: 'true', action: explode}]", "kill, freeze, degrade or notify"),
        ("rules: [{name: r, when: 'true', action: freeze}]", "takes a capability"),
        ("breakers: [{name: b}]", "error_rate, anomaly_rate or volume_factor"),
        ("breakers: [{name: b, error_rate: 1.5}]", "a rate in (0, 1]"),
        ("breakers: [{name: b, error_rate: 0.1, window: soon}]", "a duration such as 60s"),
        ("breakers: [{name: b, error_rate: 0.1, scope: galaxy}]", "run, agent or tenant"),
        ("breakers: [{name: b, error_rate: 0.1, colour: red}]", "unknown field 'colour'"),
        ("breakers: [{name: b, error_rate: 0.1}, {name: b, error_rate: 0.2}]", "used twice"),
        ("notify: [{url: ftp://x}]", "http:// or https://"),
        ("notify: [{url: 'http://x', events: [coffee]}]", "'coffee' is not one of"),
        ("breakers: {name: b}", "breakers: expected list"),
        ("{", "not valid YAML"),
    ],
)
def test_bad_documents_are_refused_with_where(doc: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse(doc)


def test_a_rule_is_given_only_what_it_reads() -> None:
    (rule,) = parse(
        "rules: [{name: r, when: 'run.spend.usd > 1.0 && tenant.rates.error > 0.5'}]"
    ).rules
    assert rule.roots == {"run", "tenant"}
    assert fields_of("run.spend.usd > 1.0 && run.rates.error > 0.5") == {
        "run": frozenset({"spend", "rates"})
    }
    assert fields_of("size(run) > 2 || run.spend.usd > 1.0") == {"run": None}
    context = {
        "run": {"spend": {"usd": 2.0}, "rates": {"error": 0.0}, "effects": {}},
        "agent": {},
        "tenant": {"rates": {"error": 0.6}, "spend": {}},
    }
    assert rule.inputs(context) == {
        "run": {"spend": {"usd": 2.0}},
        "tenant": {"rates": {"error": 0.6}},
    }
    assert rule.decide(context)


def test_a_macro_that_binds_a_roots_name_is_not_flattened() -> None:
    from tether_server._flatten import Flat, flatten

    when = "run.checkpoint.items.exists(run, run.spend.usd > 10.0)"
    assert flatten(when) is None  # that `run` is the macro's own, not the context's
    assert Flat.compile("run.spend.usd > 1.0 // it's a comment") is not None


def test_a_rule_may_bind_its_own_loop_variable_but_not_nest_comprehensions() -> None:
    parse('rules: [{name: x, when: "run.checkpoint.items.exists(i, i > 10)", action: notify}]')
    nested = '"[1, 2].exists(a, [1, 2].exists(b, a == b))"'
    with pytest.raises(InvalidArgument, match="at most one"):
        parse(f"rules: [{{name: n, when: {nested}, action: notify}}]")
    long = '"' + " || ".join(["run.spend.usd > 1.0"] * 60) + '"'
    with pytest.raises(InvalidArgument, match="at most 1000"):
        parse(f"rules: [{{name: long, when: {long}, action: notify}}]")
