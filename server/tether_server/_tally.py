"""Fleet-wide counts: each coordinator tallies what it sees, the evaluator merges them.

A coordinator counts the effects its streams report (per run: finished, finished writes,
failed writes) and keeps the newest signals of each instance (running totals of spend and
anomalies, as the SDK sends them). It publishes both as one key on its own lease, a few
times a second when they changed: when it dies, the key goes with it.

The evaluator merges every coordinator's key into running totals that only grow: an
effect is reported to exactly one coordinator, so effect counts add up across them (by
their increase, so that a coordinator's restart from zero loses nothing); an instance's
signals are totals of its own, so across coordinators (a reconnect moves it) the largest
one is the truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection, Iterable
from typing import Any

from tether.v1 import agent_pb2, types_pb2

from tether_server._breakers import ZERO, Totals
from tether_server._etcd import EtcdUnavailable, Store
from tether_server._store import InstanceKey, RunKey, counts_key, put_op

log = logging.getLogger("tether_server")
PUBLISH_EVERY = 0.5  # seconds; with the evaluator's 0.25 s, a trip within a heartbeat interval
Signals = tuple[float, int, int, int]  # usd, tokens, calls, anomalies
_FINISHED = (types_pb2.EFFECT_STATUS_LANDED, types_pb2.EFFECT_STATUS_FAILED)


class Tally:
    """This coordinator's counts, and their publication on its lease."""

    def __init__(self, coordinator_id: str) -> None:
        self._key = counts_key(coordinator_id)
        self.runs: dict[RunKey, list[int]] = {}  # effects, writes, failed
        self.signals: dict[InstanceKey, Signals] = {}
        self._changed = asyncio.Event()

    def effects(
        self, key: InstanceKey, effects: Iterable[types_pb2.Effect], reads: Collection[str]
    ) -> None:
        """Count the finished effects of a batch; a capability not in ``reads`` is a write."""
        counts = None
        for effect in effects:
            if effect.status not in _FINISHED:
                continue
            counts = counts or self.runs.setdefault(key.run, [0, 0, 0])
            counts[0] += 1
            if effect.capability not in reads:
                counts[1] += 1
                counts[2] += effect.status == types_pb2.EFFECT_STATUS_FAILED
        if counts is not None:
            self._changed.set()

    def signal(self, key: InstanceKey, signals: agent_pb2.Signals) -> None:
        """The instance's newest running totals."""
        self.signals[key] = (signals.usd, signals.tokens, signals.calls, signals.anomalies)
        self._changed.set()

    def document(self) -> bytes:
        return json.dumps(
            {
                "runs": {"/".join(run): counts for run, counts in self.runs.items()},
                "signals": {"/".join(key): list(s) for key, s in self.signals.items()},
            },
            separators=(",", ":"),
        ).encode()

    async def publish(self, store: Store, lease: int) -> None:
        """Put the counts on ``lease`` whenever they changed, at most every PUBLISH_EVERY."""
        self._changed.set()  # a new lease starts without the key
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await store.txn((), [put_op(self._key, self.document(), lease)])
            except EtcdUnavailable as err:  # counts wait; the halt view fails closed by itself
                log.warning("could not publish the protection counts: %s", err)
                self._changed.set()
            await asyncio.sleep(PUBLISH_EVERY)


class FleetTotals:
    """The evaluator's merge of every coordinator's counts: totals that only grow, summed
    as they arrive for each run, agent and tenant, so that reading any of them is a lookup.
    """

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, list[int]]] = {}  # source -> run -> last counts
        self.signals: dict[InstanceKey, Signals] = {}
        self._totals: dict[tuple[str, ...], Totals] = {}  # (t,), (t, a), (t, a, r)
        self._spend: dict[tuple[str, ...], tuple[float, int, int]] = {}
        self._members: dict[tuple[str, ...], set[RunKey]] = {}
        self._runs: set[RunKey] = set()
        self._born: dict[tuple[str, ...], int] = {}  # the merge that first saw a subject
        self._merges = 0
        self.changed: set[RunKey] = set()  # runs whose figures moved since ``take_changed``

    def take_changed(self) -> set[RunKey]:
        changed, self.changed = self.changed, set()
        return changed

    def known_runs(self) -> set[RunKey]:
        return set(self._runs)

    def new(self, subject: tuple[str, ...]) -> bool:
        """True when the subject first showed up in this round's merges."""
        return self._born.get(tuple(subject), -1) == self._merges

    def next_round(self) -> None:
        """Rounds count merges: subjects born before this one are history."""
        self._merges += 1

    def members_of(self, subject: tuple[str, ...]) -> set[RunKey]:
        """The runs of a tenant ``(t,)``, an agent ``(t, a)`` or a run ``(t, a, r)``."""
        return self._members.get(subject, set())

    def totals(self, subject: tuple[str, ...]) -> Totals:
        """The effect counts and anomalies of a run, an agent ``(t, a)`` or a tenant ``(t,)``."""
        return self._totals.get(tuple(subject), ZERO)

    def spend(self, subject: tuple[str, ...]) -> tuple[float, int, int]:
        return self._spend.get(tuple(subject), (0.0, 0, 0))

    def _grew(self, run: RunKey, grew: Totals, spent: tuple[float, int, int]) -> None:
        if run not in self._runs:
            self._runs.add(run)
            for depth in (1, 2, 3):
                self._members.setdefault(tuple(run[:depth]), set()).add(run)
                self._born.setdefault(tuple(run[:depth]), self._merges)
        for depth in (1, 2, 3):
            prefix = tuple(run[:depth])
            self._totals[prefix] = self._totals.get(prefix, ZERO) + grew
            u, t, c = self._spend.get(prefix, (0.0, 0, 0))
            self._spend[prefix] = (u + spent[0], t + spent[1], c + spent[2])
        self.changed.add(run)

    def merge(self, source: str, document: dict[str, Any]) -> None:
        """Take one coordinator's published counts in."""
        seen = self._seen.setdefault(source, {})
        for name, counts in document.get("runs", {}).items():
            before = seen.get(name, [0, 0, 0])
            if any(n < b for n, b in zip(counts, before, strict=True)):
                before = [0, 0, 0]  # the coordinator restarted from zero
            seen[name] = counts
            grew = Totals(*(n - b for n, b in zip(counts, before, strict=True)))
            if grew != ZERO:
                self._grew(RunKey(*name.split("/")), grew, (0.0, 0, 0))
        for name, values in document.get("signals", {}).items():
            key = InstanceKey(*name.split("/"))
            old = self.signals.get(key, (0.0, 0, 0, 0))
            usd, tokens, calls, anomalies = map(max, old, values)
            if (usd, tokens, calls, anomalies) != old:
                self.signals[key] = (usd, tokens, calls, anomalies)
                spent = (usd - old[0], tokens - old[1], calls - old[2])
                self._grew(key.run, Totals(anomalies=anomalies - old[3]), spent)
