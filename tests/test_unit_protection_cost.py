"""What makes decisions cheap must not change them: flat CEL, the tally's partial encoding
and forgetting, the merge's shortcuts. Pure, without etcd."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from tether.v1 import agent_pb2, types_pb2
from tether_server._breakers import Series, Totals
from tether_server._flatten import Flat, flatten
from tether_server._policy import groups_of, parse
from tether_server._rules import Decisions
from tether_server._store import InstanceKey, RunKey
from tether_server._tally import FORGET_AFTER, SHARDS, FleetTotals, Tally, shard_of

EXPRESSIONS = [
    "run.spend.usd > 5.0",
    "run.labels.team == 'red' && run.spend.usd > 1.0",
    "run.labels.team == 'run.spend.usd'",  # a literal is not a reference
    '"""run.spend.usd""" == "run.spend.usd" && run.rates.error > 0.2',
    "has(run.checkpoint.step) && run.checkpoint.step > 3",
    "run.checkpoint.step > 3",  # errs when there is no step: holds not
    "size(run.labels) > 1 || agent.spend.tokens >= 100",
    "tenant . effects . total > 10 && run.run_id.startsWith('r')",
    "tenant.agent == 'x'",  # no such field at the tenant level: holds not
    "run['spend']['usd'] > 5.0",  # run used as a map: left nested
    "has(run.spend) && run.effects.failed > 0",
]
CONTEXTS: list[dict[str, Any]] = [
    {"usd": 7.5, "labels": {"team": "red", "zone": "eu"}, "checkpoint": {"step": 4.0}},
    {"usd": 0.5, "labels": {}, "checkpoint": {}},
    {"usd": 2.0, "labels": {"team": "run.spend.usd"}, "checkpoint": {"step": 1}},
]


def test_flattening_leaves_literals_and_odd_uses_alone() -> None:
    assert flatten("run.labels.team == 'run.spend.usd'") == (
        "run__labels.team == 'run.spend.usd'",
        {"run__labels": ("run", "labels")},
    )
    assert flatten("has(run.spend)") is None
    assert Flat.compile("run['spend']['usd'] > 5.0") is None  # compiles, but run stays whole
    assert Flat.compile("x.run.spend.usd > 1.0") is None  # a field named run is not ours


def _fleet(ctx: dict[str, Any]) -> tuple[FleetTotals, RunKey]:
    fleet = FleetTotals()
    run = RunKey("acme", "mail", "r1")
    fleet.merge("c1", {"runs": {"acme/mail/r1": [12, 10, 3]}})
    fleet.merge("c1", {"signals": {"acme/mail/r1/i1": [ctx["usd"], 150, 2, 1]}})
    fleet.labels[run] = ctx["labels"]
    fleet.checkpoints[run] = ctx["checkpoint"]
    return fleet, run


def _series(window: float, subject: tuple[str, ...], totals: Totals, now: float) -> Series:
    series = Series(window)
    series.add(now - window, Totals())
    series.add(now, totals)
    return series


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_one_flat_program_decides_as_each_rule_alone(ctx: dict[str, Any]) -> None:
    rules = "\n".join(
        f"  - {{name: r{i}, when: {json.dumps(w)}}}" for i, w in enumerate(EXPRESSIONS)
    )
    policy = parse(f"rules:\n{rules}\n")
    fleet, run = _fleet(ctx)
    groups = groups_of(policy.rules)
    assert groups[0].flat_paths is None  # run['spend'] keeps the whole group nested
    decided = Decisions().due(groups, 1, fleet, _series, 100.0, changed={run})
    together = {rule.name for rule, _, _ in decided}
    alone = set()
    for rule in policy.rules:
        (found,) = groups_of((rule,))
        assert (found.flat_paths is None) == (rule.name in ("r9", "r10")), rule.when
        if Decisions().due([found], 1, fleet, _series, 100.0, changed={run}):
            alone.add(rule.name)
    assert together == alone  # each flat program decides as the nested context does
    assert ("r0" in together) == (ctx["usd"] > 5.0)
    assert "r5" not in together or ctx["checkpoint"].get("step", 0) > 3
    assert "r8" not in together
    for _, _, context in decided:
        assert context["run"]["labels"] == ctx["labels"]


def published(shards: dict[int, bytes]) -> dict[str, dict[str, Any]]:
    """The shards' documents as one."""
    out: dict[str, dict[str, Any]] = {"runs": {}, "signals": {}, "began": {}}
    for doc in shards.values():
        for table, entries in json.loads(doc).items():
            out[table].update(entries)
    return out


def test_the_tally_encodes_what_changed_and_forgets_the_idle() -> None:
    tally = Tally("c1")
    key = InstanceKey("acme", "mail", "r1", "i1")
    tally.signal(key, agent_pb2.Signals(usd=1.5, tokens=10))
    effect = types_pb2.Effect(capability="send", status=types_pb2.EFFECT_STATUS_FAILED)
    started = time.time()
    tally.effects(key, [effect], reads=())
    first = published(tally.documents(now=1000.0))
    ((began,),) = first.pop("began").values()  # when the run began, by this clock
    assert started - 1 <= began <= time.time()
    assert first == {
        "runs": {"acme/mail/r1": [1, 1, 1]},
        "signals": {"acme/mail/r1/i1": [1.5, 10, 0, 0]},
    }
    tally._changed.clear()
    tally.signal(key, agent_pb2.Signals(usd=1.5, tokens=10))  # the same totals again
    assert not tally._changed.is_set()
    other = InstanceKey("acme", "mail", "r2", "i2")
    tally.signal(other, agent_pb2.Signals(usd=3.0))
    later = published(tally.documents(now=1000.0 + FORGET_AFTER + 1))
    assert later.pop("began").keys() == {"acme/mail/r2"}  # r1's went with it
    assert later == {"runs": {}, "signals": {"acme/mail/r2/i2": [3.0, 0, 0, 0]}}
    assert key not in tally.signals and key.run not in tally.runs


def test_the_tally_keeps_an_idle_run_while_its_session_is_open_here() -> None:
    """An instance's signals are its lifetime totals: dropped while it is still connected,
    the evaluator would forget the run and count them all again when it next moves."""
    tally = Tally("c1")
    open_here = {"r1"}
    tally.serving = open_here.__contains__
    idle, ended = InstanceKey("acme", "mail", "r1", "i1"), InstanceKey("acme", "mail", "r2", "i2")
    for key in (idle, ended):
        tally.signal(key, agent_pb2.Signals(usd=40.0, anomalies=50))
    tally.documents(now=1000.0)
    tally.documents(now=1000.0 + FORGET_AFTER + 1)
    assert ended not in tally.signals  # r2's session is gone: dropped, its shard written
    assert idle in tally.signals
    kept = json.loads(tally._document(shard_of(idle)))["signals"]
    assert kept["acme/mail/r1/i1"] == [40.0, 0, 0, 50]
    open_here.clear()  # r1's session ends too: its entry goes at the next sweep
    tally.documents(now=1000.0 + 2 * FORGET_AFTER + 2)
    assert idle not in tally.signals and idle.run not in tally.began


def test_a_run_the_tally_forgot_counts_from_zero_when_it_returns() -> None:
    fleet = FleetTotals()
    run = ("acme", "mail", "r1")
    fleet.merge("c1", {"runs": {"acme/mail/r1": [50, 40, 4]}})
    fleet.merge("c1", {"runs": {"acme/mail/r1": [50, 40, 4]}})  # unchanged: nothing grows
    assert fleet.totals(run) == Totals(50, 40, 4)
    fleet.merge("c1", {"runs": {}})  # forgotten by its coordinator
    fleet.merge("c1", {"runs": {"acme/mail/r1": [60, 45, 5]}})  # back, counted afresh
    assert fleet.totals(run) == Totals(110, 85, 9)
    fleet.merge("c1", {"signals": {"acme/mail/r1/i1": [2.0, 5, 1, 0]}})
    fleet.merge("c1", {"signals": {}})
    fleet.merge("c1", {"signals": {"acme/mail/r1/i1": [2.5, 5, 1, 0]}})  # totals: the max
    assert fleet.spend(run) == (2.5, 5, 1)


def test_a_comment_in_a_rule_does_not_swallow_the_rules_after_it() -> None:
    policy = parse(
        "rules:\n"
        '  - {name: cap, when: "run.spend.usd > 5.0 // agreed with finance"}\n'
        "  - {name: red, when: \"run.labels.team == 'red'\"}\n"
        '  - {name: low, when: "run.spend.usd < 1.0"}\n'
    )
    fleet, run = _fleet(CONTEXTS[0])  # 7.5 USD, team red
    decided = Decisions().due(groups_of(policy.rules), 1, fleet, _series, 100.0, changed={run})
    assert {rule.name for rule, _, _ in decided} == {"cap", "red"}


def test_a_rule_whose_act_failed_is_decided_again() -> None:
    policy = parse('rules: [{name: cap, when: "run.spend.usd > 5.0"}]')
    fleet, run = _fleet(CONTEXTS[0])
    groups, decisions = groups_of(policy.rules), Decisions()

    def due() -> list[str]:
        found = decisions.due(groups, 1, fleet, _series, 100.0, changed={run})
        return [rule.name for rule, _, _ in found]

    assert due() == ["cap"]
    assert due() == []  # it acted: not again on the same subject
    decisions.again("cap", tuple(run))
    assert due() == ["cap"]  # its act failed (etcd): decided anew


def test_the_tally_splits_its_counts_by_run_and_publishes_only_what_moved() -> None:
    tally = Tally("c1")
    effect = types_pb2.Effect(capability="send", status=types_pb2.EFFECT_STATUS_LANDED)
    keys = [InstanceKey("acme", "mail", f"r{i}", f"i{i}") for i in range(200)]
    for key in keys:
        tally.effects(key, [effect], reads=())
        tally.signal(key, agent_pb2.Signals(usd=1.0))
    shards = tally.documents(now=1000.0)
    assert len(shards) == SHARDS  # 200 runs reach every shard
    seen: set[str] = set()
    for doc in shards.values():
        parsed = json.loads(doc)
        runs = set(parsed["runs"])
        assert runs == set(parsed["began"])  # a run's entries share its shard
        assert {name.rsplit("/", 1)[0] for name in parsed["signals"]} == runs
        assert not runs & seen  # and no run is in two
        seen |= runs
    assert len(seen) == 200
    assert tally.documents(now=1001.0) == {}  # nothing moved: nothing to write
    tally.signal(keys[7], agent_pb2.Signals(usd=2.0))
    ((shard, doc),) = tally.documents(now=1002.0).items()
    assert json.loads(doc)["signals"]["acme/mail/r7/i7"] == [2.0, 0, 0, 0]
    assert json.loads(shards[shard])["runs"].keys() == json.loads(doc)["runs"].keys()
