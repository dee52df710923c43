"""Policy rules at the edge: the context a rule sees, and what it does when it holds.

The decision is the rule's compiled CEL over ``context`` (pure); acting writes the halt
with its audit entry as ``policy:NAME``, or, for a ``dry_run`` rule, only an audit entry
and a notification that it would have tripped. A rule acts once per subject and policy
version: the mark under ``/tether/protect/fired/`` says it did.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from google.protobuf import duration_pb2
from tether.v1 import admin_pb2, types_pb2

from tether_server._audit import AuditLog, new_entry
from tether_server._breakers import NO_LABELS, Scope, Series, Totals, covers, subject_of
from tether_server._etcd import Store
from tether_server._flatten import LEAVES, Path
from tether_server._halt_store import HaltStore, halt_from
from tether_server._notify import Notifier
from tether_server._policy import Action, Policy, Rule, RuleGroup
from tether_server._store import (
    RunKey,
    checkpoint_key,
    fired_key,
    from_json,
    put_op,
    range_op,
    roster_prefix,
)
from tether_server._tally import NO_CHECKPOINT, FleetTotals

_READS_PER_TXN = 32  # under etcd's 128 ops; 32 checkpoints of 512 KiB fit the 64 MiB channel
SeriesOf = Callable[[float, tuple[str, ...], Totals, float], Series]
_SCOPES = {
    Scope.RUN: types_pb2.SCOPE_RUN,
    Scope.AGENT: types_pb2.SCOPE_AGENT,
    Scope.TENANT: types_pb2.SCOPE_TENANT,
}


def selector_of(
    scope: Scope, subject: tuple[str, ...], *, writes: bool = False
) -> types_pb2.Selector:
    """The selector that halts a subject: ``(tenant,)``, ``(tenant, agent)`` or a run.

    A run's is its tenant and run id, as ``tether kill --run R --in-tenant T`` names it,
    so that the same command lifts it (a run id belongs to one agent anyway).
    """
    sel = types_pb2.Selector(scope=_SCOPES[scope], writes=writes, tenant=subject[0])
    if scope is Scope.AGENT:
        sel.agent = subject[1]
    elif scope is Scope.RUN:
        sel.run_id = subject[2]
    return sel


def figures(totals: Totals, spend: tuple[float, int, int]) -> dict[str, Any]:
    """One level of the rule context: spend, effects in the window, and rates."""
    writes, effects = totals.writes, totals.effects
    return {
        "spend": {"usd": float(spend[0]), "tokens": spend[1], "calls": spend[2]},
        "effects": {
            "total": effects, "writes": writes, "failed": totals.failed,
            "anomalies": totals.anomalies,
        },
        "rates": {
            "error": totals.failed / writes if writes else 0.0,
            "anomaly": totals.anomalies / effects if effects else 0.0,
        },
    }  # fmt: skip


def rule_reason(rule: Rule, run: dict[str, Any]) -> str:
    """Why ``rule`` acts on ``run`` (its context), with the figures."""
    spend = run["spend"]
    return (
        f"{rule.when} held: run {run['run_id']} spent ${spend['usd']:.2f}, "
        f"{spend['tokens']} tokens, {spend['calls']} calls; {run['effects']['total']} "
        f"effects, error rate {run['rates']['error']:.2f}"
    )


def rule_selector(rule: Rule, subject: tuple[str, ...]) -> types_pb2.Selector:
    """The halt ``rule`` writes on ``subject``."""
    sel = selector_of(rule.scope, subject, writes=rule.action is Action.DEGRADE)
    if rule.action is Action.FREEZE:
        sel.capability = rule.capability
    return sel


async def read_context(
    store: Store, fleet: FleetTotals, policy: Policy, groups: list[RuleGroup], runs: set[RunKey]
) -> None:
    """Read what the counts lack, for the runs to decide on: labels from the roster
    (once per run), checkpoints as last stored (when a rule reads them)."""
    if any(b.labels for b in policy.breakers) or any(g.labels for g in groups):
        unknown = list(runs - fleet.labels.keys())
        prefixes = [roster_prefix(r.tenant, r.agent) + f"{r.run_id}/".encode() for r in unknown]
        for run, kvs in zip(unknown, await _read_many(store, prefixes, prefix=True), strict=True):
            # Every instance of a run registers with the same labels; none: pruned.
            record = from_json(kvs[0].value, types_pb2.AgentInstance()) if kvs else None
            fleet.labels[run] = dict(record.labels) if record else {}
    if any(g.checkpoint for g in groups):
        ordered = list(runs)
        keys = [checkpoint_key(r) for r in ordered]
        for run, kvs in zip(ordered, await _read_many(store, keys, prefix=False), strict=True):
            if kvs:
                fleet.checkpoints[run] = json.loads(kvs[0].value)


async def _read_many(store: Store, keys: list[bytes], *, prefix: bool) -> list[Any]:
    """The kvs of each key (or prefix), a few dozen reads to a round trip."""
    found: list[Any] = []
    for start in range(0, len(keys), _READS_PER_TXN):
        ops = [range_op(k, prefix=prefix) for k in keys[start : start + _READS_PER_TXN]]
        found.extend(r.response_range.kvs for r in (await store.txn((), ops)).responses)
    return found


class RuleRunner:
    """Evaluates the rules over every known run, and acts on those that hold."""

    def __init__(self, halts: HaltStore, audit: AuditLog, store: Store, notifier: Notifier) -> None:
        self._halts = halts
        self._audit = audit
        self._store = store
        self._notifier = notifier
        self.decisions = Decisions()

    async def act(
        self, decided: Iterable[tuple[Rule, tuple[str, ...], dict[str, Any]]], version: int
    ) -> None:
        """Act on the rules that hold, once each: a subject already marked is left alone."""
        mark = b"%d" % version
        pending = list(decided)
        for i, (rule, subject, context) in enumerate(pending):
            key = fired_key(rule.name, subject)
            try:
                resp = await self._store.range(key, prefix=False)
                if resp.kvs and resp.kvs[0].value == mark:
                    continue  # it acted already, under an earlier evaluator
                await self._act(rule, subject, context["run"])
                await self._store.txn((), [put_op(key, mark)])
            except BaseException:  # etcd failed mid-batch: this and the rest act next round
                for rule_, subject_, _ in pending[i:]:
                    self.decisions.again(rule_.name, subject_)
                raise

    async def _act(self, rule: Rule, subject: tuple[str, ...], run: dict[str, Any]) -> None:
        actor, reason = f"policy:{rule.name}", rule_reason(rule, run)
        sel = rule_selector(rule, subject)
        if rule.dry_run or rule.action is Action.NOTIFY:
            reason = f"would trip ({rule.action.value}): {reason}" if rule.dry_run else reason
            entry = new_entry(admin_pb2.AUDIT_ACTION_WOULD_TRIP, sel, actor, reason)
            await self._audit.record(entry)
            self._notifier.emit("trip", actor, reason, sel, run)
            return
        request = admin_pb2.KillRequest(reason=reason)
        if not rule.hard:
            request.mode = types_pb2.KILL_MODE_SOFT
            request.grace.CopyFrom(duration_pb2.Duration(seconds=int(rule.grace)))
        await self._halts.kill(halt_from(request, sel, actor), force=True)
        event = {Action.KILL: "kill", Action.FREEZE: "freeze"}.get(rule.action, "degrade")
        self._notifier.emit(event, actor, reason, sel, run)


class Decisions:
    """Which rules hold, on which subjects: pure, given the fleet's figures."""

    def __init__(self) -> None:
        # What each window's rules last saw of each run: CEL is pure, so the same inputs
        # give the same answers, and a run whose figures did not move costs a comparison.
        self._seen: dict[float, dict[RunKey, dict[str, Any]]] = {}  # window -> run -> inputs
        self._covering: dict[tuple[float, RunKey], bool] = {}
        self._fired: set[tuple[str, tuple[str, ...]]] = set()
        self._version = -1
        self._groups: list[RuleGroup] = []  # which parse of the policy: kept, to compare

    def forget(self, gone: set[tuple[str, ...]]) -> None:
        """Drop what is kept of the runs (agents, tenants) in ``gone``: they ended."""
        for seen in self._seen.values():
            for run in [r for r in seen if r in gone]:
                del seen[run]
        for key in [k for k in self._covering if k[1] in gone]:
            del self._covering[key]
        self._fired = {(rule, subject) for rule, subject in self._fired if subject not in gone}

    def again(self, rule: str, subject: tuple[str, ...]) -> None:
        """``rule`` did not act on ``subject`` (etcd failed): decide it anew next round."""
        self._fired.discard((rule, subject))
        self._seen.clear()  # the inputs that held are seen again, so they hold again

    def due(
        self,
        groups: list[RuleGroup],
        version: int,
        fleet: FleetTotals,
        series: SeriesOf,
        now: float,
        *,
        changed: set[RunKey],
    ) -> list[tuple[Rule, tuple[str, ...], dict[str, Any]]]:
        """The rules that hold now, on runs whose figures (or whose agent's or tenant's,
        for a rule that reads them) moved, and that have not acted on their subject."""
        if version != self._version or groups is not self._groups:
            self._seen.clear()  # a policy applied again acts again
            self._covering.clear()
            self._fired.clear()
            self._version, self._groups = version, groups
        found: list[tuple[Rule, tuple[str, ...], dict[str, Any]]] = []
        for group in groups:
            level, paths = _Levels(fleet, series, group.window, now), group.flat_paths
            seen_of = self._seen.setdefault(group.window, {})
            for run in _candidates(group.depth, changed, fleet):
                if group.selects and not self._covers(group, run, fleet):
                    continue
                context = level.context(run)  # its roots are built only if read
                seen = group.inputs(context) if paths is None else level.flat(run, paths)
                if seen_of.get(run) == seen:
                    continue
                seen_of[run] = seen
                held = group.results(seen, context)
                if True in held:  # most runs: none holds
                    found += self._acting(group.rules, held, run, fleet, context)
        return found

    def _acting(
        self,
        rules: tuple[Rule, ...],
        held: list[bool],
        run: RunKey,
        fleet: FleetTotals,
        context: dict[str, Any],
    ) -> list[tuple[Rule, tuple[str, ...], dict[str, Any]]]:
        """Of the rules that hold on ``run``, those that select it and have not acted on
        their subject yet: they act now."""
        found = []
        for rule, holds in zip(rules, held, strict=True):
            if holds and covers(rule, run, fleet.labels.get(run, NO_LABELS)):
                subject = subject_of(rule.scope, run)
                if (rule.name, subject) not in self._fired:
                    self._fired.add((rule.name, subject))
                    found.append((rule, subject, context))
        return found

    def _covers(self, group: RuleGroup, run: RunKey, fleet: FleetTotals) -> bool:
        """Whether a rule of ``group`` selects ``run``; kept once its labels are known."""
        found = self._covering.get((group.window, run))
        if found is None:
            labels = fleet.labels.get(run)
            found = any(covers(r, run, labels or NO_LABELS) for r in group.rules)
            if labels is not None or not group.labels:
                self._covering[(group.window, run)] = found
        return found


def _candidates(depth: int, changed: set[RunKey], fleet: FleetTotals) -> set[RunKey]:
    """The runs whose context may differ: those that moved, and their agent's or tenant's
    other runs when a rule reads ``agent`` (depth 2) or ``tenant`` (depth 1)."""
    if depth == 3:
        return changed
    found: set[RunKey] = set()
    for run in changed:
        found |= fleet.members_of(tuple(run[:depth]))
    return found


_DEPTH = {"tenant": 1, "agent": 2, "run": 3, "run_id": 3}
_NUMERATOR = {"error": Totals._fields.index("failed"), "anomaly": Totals._fields.index("anomalies")}


class _Levels:
    """The run, agent and tenant figures of one rule's window, each computed once."""

    def __init__(self, fleet: FleetTotals, series: SeriesOf, window: float, now: float) -> None:
        self._fleet, self._series, self._window, self._now = fleet, series, window, now
        self._cache: dict[tuple[str, ...], dict[str, Any]] = {}
        self._currents: dict[tuple[str, ...], Totals] = {}

    def _level(self, subject: tuple[str, ...]) -> dict[str, Any]:
        found = self._cache.get(subject)
        if found is None:
            spend = self._fleet.spend(subject)
            found = self._cache[subject] = figures(self._current(subject), spend)
        return found

    def flat(self, run: RunKey, paths: Mapping[str, Path]) -> dict[str, Any]:
        """The values of ``paths`` (see ``_flatten``) for ``run``, as the nested context
        holds them, computed without building it."""
        out: dict[str, Any] = {}
        for name, path in paths.items():
            depth, part = _DEPTH[path[0]], path[1]
            if part in LEAVES:
                out[name] = self._leaf(run if depth == 3 else run[:depth], part, path[2])
            elif part == "labels":
                out[name] = self._fleet.labels.get(run, NO_LABELS)
            elif part == "checkpoint":
                out[name] = self._fleet.checkpoints.get(run, NO_CHECKPOINT)
            elif _DEPTH[part] <= depth:  # tenant, agent, run_id; tenant.agent is no field
                out[name] = run[_DEPTH[part] - 1]
        return out

    def _leaf(self, subject: tuple[str, ...], part: str, leaf: str) -> Any:
        if part == "spend":
            usd, tokens, calls = self._fleet.spend(subject)
            return float(usd) if leaf == "usd" else tokens if leaf == "tokens" else calls
        if part == "rates" and self._sampled(subject).stayed(_NUMERATOR[leaf]):
            return 0.0  # no failure (anomaly) in any window: the rate is 0.0, as computed
        c = self._current(subject)
        if part == "effects":
            return getattr(c, "effects" if leaf == "total" else leaf)
        if leaf == "error":
            return c.failed / c.writes if c.writes else 0.0
        return c.anomalies / c.effects if c.effects else 0.0

    def _sampled(self, subject: tuple[str, ...]) -> Series:
        """The subject's series over the window, sampled now."""
        return self._series(self._window, subject, self._fleet.totals(subject), self._now)

    def _current(self, subject: tuple[str, ...]) -> Totals:
        found = self._currents.get(subject)
        if found is None:
            found = self._currents[subject] = self._sampled(subject).current(self._now)
        return found

    def context(self, run: RunKey) -> dict[str, Any]:
        """The run's context; each of run, agent and tenant is built on first reading."""
        return _Context(self, run)  # a run is a candidate once per window and round

    def root(self, run: RunKey, name: str) -> dict[str, Any]:
        tenant, agent, run_id = run
        if name == "run":
            fleet = self._fleet
            return {
                **self._level(tuple(run)), "tenant": tenant, "agent": agent, "run_id": run_id,
                "labels": fleet.labels.get(run, NO_LABELS),
                "checkpoint": fleet.checkpoints.get(run, NO_CHECKPOINT),
            }  # fmt: skip
        if name == "agent":
            return {**self._level((tenant, agent)), "tenant": tenant, "agent": agent}
        if name == "tenant":
            return {**self._level((tenant,)), "tenant": tenant}
        raise KeyError(name)


class _Context(dict[str, Any]):
    """A rule context whose roots are computed when an expression first reads them."""

    def __init__(self, levels: _Levels, run: RunKey) -> None:
        super().__init__()
        self._levels, self._run = levels, run

    def __missing__(self, name: str) -> dict[str, Any]:
        value = self[name] = self._levels.root(self._run, name)
        return value
