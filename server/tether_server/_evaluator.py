"""One decision for the fleet: an evaluator elected through etcd decides every trip.

Every coordinator publishes its counts (``_tally``) and campaigns: it creates the
evaluator key on its own lease, guarded by ``create_revision == 0``. The one that holds
the key reads every coordinator's counts a few times a second, runs the breakers
(``_breakers.step``) and rules (``_policy``) over the fleet-wide figures, and writes the
halt, with its audit entry, as ``breaker:NAME`` or ``policy:NAME``. When it dies its
lease lapses, the key goes with it, and another coordinator takes over within the lease
TTL; the breakers' states live in etcd, so an OPEN breaker stays OPEN across the change,
and a rule that acted is marked, so it acts once. An evaluator reads the states when it is
elected (and when it had to create its key anew) and then keeps them as it writes them: it
is their only writer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from tether.v1 import admin_pb2, types_pb2

from tether_server._audit import AuditLog
from tether_server._breakers import (
    NO_LABELS,
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
)
from tether_server._etcd import EtcdUnavailable, Store
from tether_server._halt_store import HaltStore, halt_from
from tether_server._halts import HaltTable
from tether_server._notify import Notifier
from tether_server._policy import Policy, RuleGroup, groups_of
from tether_server._policy_store import PolicyStore
from tether_server._rules import RuleRunner, read_context, selector_of
from tether_server._selectors import halt_id
from tether_server._store import (
    BREAKERS,
    COUNTS,
    EVALUATOR,
    RunKey,
    absent,
    breaker_key,
    breaker_of,
    counts_source,
    put_op,
    range_op,
)
from tether_server._tally import FORGET_AFTER, FleetTotals

log = logging.getLogger("tether_server")
EVALUATE_EVERY = 0.25  # seconds between decisions while elected
# Between sweeps only runs whose figures moved are decided on (and breakers not CLOSED);
# a sweep decides on every run, for windows that slid with no new activity.
FULL_SWEEP = 5.0
_CLOSED = BreakerState()
_DEPTH = {Scope.TENANT: 1, Scope.AGENT: 2, Scope.RUN: 3}
_SCOPE_OF = {depth: scope for scope, depth in _DEPTH.items()}
DEFAULT_WINDOW = 60.0  # with no policy, ended runs are forgotten after this


def state_json(st: BreakerState, figures: dict[str, Any]) -> bytes:
    pb = st.probe_base
    return json.dumps(
        {
            "state": st.state.value,
            "since": st.since,
            "reason": st.reason,
            "probe_base": [pb.effects, pb.writes, pb.failed, pb.anomalies],
            "figures": figures,
        }
    ).encode()


def state_of(raw: bytes) -> BreakerState:
    doc = json.loads(raw)
    return BreakerState(
        State(doc["state"]), doc["since"], doc["reason"], Totals(*doc["probe_base"])
    )


async def list_breakers(store: Store, tenant: str = "") -> admin_pb2.ListBreakersResponse:
    """Every breaker state stored, per subject; with ``tenant``, that tenant's."""
    out = admin_pb2.ListBreakersResponse()
    for kv in (await store.range(BREAKERS)).kvs:
        name, subject = breaker_of(kv.key)
        if tenant and subject[0] != tenant:
            continue
        doc = json.loads(kv.value)
        item = out.breakers.add(
            name=name, subject="/".join(subject), state=doc["state"], reason=doc["reason"]
        )
        item.tenant = subject[0]
        item.since.FromNanoseconds(int(doc["since"] * 1e9))
    return out


class Evaluator:
    """Campaigns for the evaluator key; while it holds it, decides for the fleet."""

    def __init__(self, store: Store, coordinator_id: str, halts: HaltTable) -> None:
        self._store = store
        self._me = coordinator_id
        audit = AuditLog(store)
        self._halt_store = HaltStore(store, audit)
        self._policies = PolicyStore(store, audit)
        self._halts = halts
        self._notifier = Notifier(self._policies.policy)
        self._rules = RuleRunner(self._halt_store, audit, store, self._notifier)
        self.leading = False
        self._groups: tuple[Policy | None, list[RuleGroup], list[tuple[BreakerSpec, ...]]]
        self._groups = (None, [], [])
        self._keys: dict[tuple[str, tuple[str, ...]], bytes] = {}  # breaker and subject
        self._tripped: dict[str, int] = {}  # halt id -> the revision of the trip's halt
        self._reset()

    def _reset(self) -> None:
        self._fleet = FleetTotals()
        self._merged: dict[str, int] = {}  # each coordinator's counts: the revision merged
        self._vanished: dict[str, float] = {}  # a source merged whose key is gone: since when
        self._series: dict[float, dict[tuple[str, ...], Series]] = {}  # window -> subject
        # A window starts from the subject's totals when first sampled (they are history:
        # after an election, or when a policy names a subject that ran before it), except
        # for a subject that first showed up in this round: it started from nothing, so its
        # first burst counts in its window.
        self._warm = False
        self._swept = (0.0, -1)  # when, and under which policy version, all runs were seen
        self._states: dict[bytes, BreakerState] | None = None  # read anew once elected

    async def run(self, lease: int) -> None:
        """Campaign and, while elected, decide; errors are logged, never end the loop."""
        value = f"{self._me}:{lease:x}".encode()
        while True:
            try:
                await self._round(value, lease)
            except EtcdUnavailable as err:
                log.warning("protection evaluator: %s", err)
                self._states = None  # a write may have landed unseen: read them anew
            except Exception:
                log.exception("protection evaluator failed a round")
                self._states = None
            await asyncio.sleep(EVALUATE_EVERY)

    async def _round(self, value: bytes, lease: int) -> None:
        resp = await self._store.txn(
            [absent(EVALUATOR)], [put_op(EVALUATOR, value, lease)], [range_op(EVALUATOR)]
        )
        leading = resp.succeeded or resp.responses[0].response_range.kvs[0].value == value
        if leading and not self.leading:
            log.info("coordinator %s is the protection evaluator", self._me)
            self._reset()  # windows restart with the new evaluator's own samples
        elif resp.succeeded:  # the key was gone a moment: another may have written states
            self._states = None
        self.leading = leading
        if leading:
            await self.decide(time.time())

    async def decide(self, now: float) -> None:
        """One round: merge the counts, then every breaker and rule of the policy."""
        policy, version = await self._policies.policy()
        if policy is not self._groups[0]:  # parsed anew: another policy
            self._groups = (policy, groups_of(policy.rules), breaker_groups(policy.breakers))
        groups = self._groups[1]
        await self._merge(now)
        changed = self._fleet.take_changed()
        if now - self._swept[0] >= FULL_SWEEP or version != self._swept[1]:
            self._forget(policy, now)
            changed, self._swept = self._fleet.known_runs(), (now, version)
        await read_context(self._store, self._fleet, policy, groups, changed)
        states = await self._breaker_states()
        for specs in self._groups[2]:
            for spec, found in self._judged(specs, changed, states, now):
                await self._write(spec, *found)
        if groups:
            due = self._rules.decisions.due
            decided = due(groups, version, self._fleet, self.series, now, changed=changed)
            await self._rules.act(decided, version)
        self._warm = True

    async def _merge(self, now: float) -> None:
        """Take in every coordinator's counts published since the last round. A source
        whose key has been gone for FORGET_AFTER (the coordinator died, or lost etcd that
        long) no longer holds its runs: they may be forgotten (see ``_forget``)."""
        self._fleet.next_round(now)
        live = set()
        for kv in (await self._store.range(COUNTS)).kvs:
            source = counts_source(kv.key)
            live.add(source)
            self._vanished.pop(source, None)
            if self._merged.get(source) != kv.mod_revision:  # published anew since
                self._merged[source] = kv.mod_revision
                self._fleet.merge(source, json.loads(kv.value))
                await asyncio.sleep(0)  # a key holds thousands of runs: let the loop serve
        for source in self._merged.keys() - live:
            if now - self._vanished.setdefault(source, now) > FORGET_AFTER:
                del self._merged[source], self._vanished[source]
                self._fleet.merge(source, {})  # it publishes nothing any more

    def _forget(self, policy: Policy, now: float) -> None:
        """Forget the runs that ended (no coordinator publishes them) longer than the
        policy's longest window ago, from every structure kept per run (and an agent or a
        tenant with its last run): a new run of the same name starts afresh."""
        windows = [b.window for b in policy.breakers] + [r.window for r in policy.rules]
        dropped = self._fleet.forget(now - max(windows, default=DEFAULT_WINDOW))
        if not dropped:
            return
        gone = set(dropped)
        for of_window in self._series.values():
            for subject in gone & of_window.keys():
                del of_window[subject]
        for key in [k for k in self._keys if k[1] in gone]:
            del self._keys[key]
        for subject in gone:
            sel = selector_of(_SCOPE_OF[len(subject)], subject, writes=True)
            self._tripped.pop(halt_id(sel), None)
        self._rules.decisions.forget(gone)

    async def _breaker_states(self) -> dict[bytes, BreakerState]:
        """Every breaker's state: read once per election, then kept as this one writes them
        (only the evaluator writes them)."""
        if self._states is None:
            kvs = (await self._store.range(BREAKERS)).kvs
            self._states = {kv.key: state_of(kv.value) for kv in kvs}
        return self._states

    def series(self, window: float, subject: tuple[str, ...], totals: Totals, now: float) -> Series:
        """The subject's samples over ``window``, with ``totals`` added at ``now``."""
        of_window = self._series.get(window)
        if of_window is None:
            of_window = self._series[window] = {}
        found = of_window.get(subject)
        if found is None:
            found = of_window[subject] = Series(window)
            if (began := self._began(subject, window, now, totals)) is not None:
                found.add(*began)
        found.add(now, totals)
        return found

    def _began(
        self, subject: tuple[str, ...], window: float, now: float, totals: Totals
    ) -> tuple[float, Totals] | None:
        """Where a subject's first window starts, if all it did falls within the window:
        from nothing, when it showed up since the last round; when its coordinators say it
        began since ``now - window`` and under the policy in force (even when this evaluator
        was just elected), from nothing but its anomalies. Effects are counted by each
        coordinator from zero when it first heard of the run, but anomalies are the
        instance's lifetime totals, and a run that moved from a dead coordinator is stamped
        anew: they are history. None: all its totals are history."""
        if self._warm and self._fleet.new(subject):
            return now - EVALUATE_EVERY, Totals()
        began = self._fleet.began.get(subject)
        if began is not None and began >= max(now - window, self._policies.applied_at):
            # a clock ahead of ours: just before
            return min(began, now - EVALUATE_EVERY), Totals(anomalies=totals.anomalies)
        return None

    def _judged(
        self,
        specs: tuple[BreakerSpec, ...],
        changed: set[RunKey],
        states: dict[bytes, BreakerState],
        now: float,
    ) -> list[tuple[BreakerSpec, tuple[bytes, BreakerState, Event, Figures]]]:
        """What the breakers ``specs`` (one scope, window and selector: one series per
        subject) do now on the subjects due; most subjects need only their sample taken."""
        unclosed = {spec.name: _unclosed(spec, states) for spec in specs}
        every = set().union(*unclosed.values())
        found = []
        for subject in _due(specs[0], changed, every, self._fleet.labels):
            totals = self._fleet.totals(subject)
            series = self.series(specs[0].window, subject, totals, now)
            for spec in specs:
                closed = not every or subject not in unclosed[spec.name]
                if closed and not series.may_trip(spec):
                    continue  # no window of it can cross a threshold: as step would find
                if judged := self._judge(spec, subject, series, totals, states=states, now=now):
                    found.append((spec, judged))
        return found

    def _judge(
        self,
        spec: BreakerSpec,
        subject: tuple[str, ...],
        series: Series,
        totals: Totals,
        *,
        states: dict[bytes, BreakerState],
        now: float,
    ) -> tuple[bytes, BreakerState, Event, Figures] | None:
        """What the breaker does on ``subject`` now; None: nothing (most calls, so no I/O)."""
        key = self._keys.get((spec.name, subject))
        if key is None:
            key = self._keys[(spec.name, subject)] = breaker_key(spec.name, subject)
        before = states.get(key, _CLOSED)
        fig = series.figures(now, before.since)
        sel = selector_of(spec.scope, subject, writes=True) if before.state is State.OPEN else None
        if sel is not None and self._lifted(halt_id(sel)):
            st, event = BreakerState(State.CLOSED, now, "resumed by an operator"), Event.CLOSE
        else:
            st, event = step(spec, before, fig, totals, now)
        return None if event is Event.NONE else (key, st, event, fig)

    def _lifted(self, halt: str) -> bool:
        """Whether an OPEN breaker's halt was lifted by hand: gone from the halt table, once
        the table has caught up with the trip (its watch may lag the write by a moment)."""
        caught_up = self._halts.revision >= self._tripped.get(halt, 0)
        return caught_up and halt not in self._halts.halts

    async def _write(
        self,
        spec: BreakerSpec,
        key: bytes,
        st: BreakerState,
        event: Event,
        fig: Figures,
    ) -> None:
        """Store the breaker's new state, then act on it."""
        subject = breaker_of(key)[1]
        sel = selector_of(spec.scope, subject, writes=True)
        figures = fig.as_dict()
        await self._store.txn((), [put_op(key, state_json(st, figures))])
        if self._states is not None:
            self._states[key] = st
        await self._act(spec, sel, st, event, figures)

    async def _act(
        self,
        spec: BreakerSpec,
        sel: types_pb2.Selector,
        st: BreakerState,
        event: Event,
        figures: dict[str, Any],
    ) -> None:
        actor = f"breaker:{spec.name}"
        if event in (Event.TRIP, Event.REOPEN):
            request = admin_pb2.KillRequest(reason=st.reason)
            resp = await self._halt_store.kill(halt_from(request, sel, actor), force=True)
            self._tripped[halt_id(sel)] = resp.halt.revision
            self._notifier.emit("trip", actor, st.reason, sel, figures)
        elif event is Event.HALF_OPEN:
            reason = f"half-open after {spec.cooldown:g}s: {spec.probes} probe writes go through"
            await self._halt_store.resume(sel, actor, reason)
        log.info("breaker %s on %s: %s %s", spec.name, halt_id(sel), event.value, st.reason)


def breaker_groups(specs: Iterable[BreakerSpec]) -> list[tuple[BreakerSpec, ...]]:
    """The breakers by scope, window and selector, in the policy's order: those of one
    group share their subjects and each subject's series."""
    groups: dict[tuple[object, ...], list[BreakerSpec]] = {}
    for s in specs:
        groups.setdefault((s.scope, s.window, s.tenant, s.agent, s.run_id, s.labels), []).append(s)
    return [tuple(g) for g in groups.values()]


def _unclosed(spec: BreakerSpec, states: Mapping[bytes, BreakerState]) -> set[tuple[str, ...]]:
    """The subjects on which ``spec`` is not CLOSED (OPEN or HALF_OPEN)."""
    found = set()
    for key, st in states.items():
        if st.state is not State.CLOSED:
            name, subject = breaker_of(key)
            if name == spec.name:
                found.add(subject)
    return found


def _due(
    spec: BreakerSpec,
    changed: Iterable[RunKey],
    unclosed: set[tuple[str, ...]],
    labels: Mapping[RunKey, Mapping[str, str]],
) -> set[tuple[str, ...]]:
    """The subjects to decide on: those with a run that moved, and those not CLOSED."""
    if spec.tenant or spec.agent or spec.run_id or spec.labels:
        due = {
            subject_of(spec.scope, run)
            for run in changed
            if covers(spec, run, labels.get(run, NO_LABELS))
        }
    elif spec.scope is Scope.RUN:  # it covers every run: its subjects are the runs
        due = set(changed)
    else:  # their agents or tenants
        depth = _DEPTH[spec.scope]
        due = {run[:depth] for run in changed}
    return due | unclosed
