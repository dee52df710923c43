"""Fleet-wide counts: each coordinator tallies what it sees, the evaluator merges them.

A coordinator counts the effects its streams report (per run: finished, finished writes,
failed writes) and keeps the newest signals of each instance (running totals of spend and
anomalies, as the SDK sends them), and when it first counted each run ("began", by its
clock). It publishes them on its own lease, a few times a second when they changed, as
``SHARDS`` keys, each run (with its instances) always in the same one: etcd refuses a
request over 1.5 MiB, which one key would pass at about 7,500 to 15,000 runs, and a key
whose runs did not move is not written again. When the coordinator dies, its keys go with
it. Each key is a source of its own to the evaluator, which is exact because the keys
split the runs and a run never moves between them.

The evaluator merges every coordinator's key into running totals that only grow: an
effect is reported to exactly one coordinator, so effect counts add up across them (by
their increase, so that a coordinator's restart from zero loses nothing); an instance's
signals are totals of its own, so across coordinators (a reconnect moves it) the largest
one is the truth. A run that no coordinator publishes any more (each dropped it after
``FORGET_AFTER`` idle, or died) is forgotten once the policy's longest window has passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from tether.v1 import agent_pb2, types_pb2

from tether_server._breakers import ZERO, Totals
from tether_server._etcd import EtcdUnavailable, Store
from tether_server._store import InstanceKey, RunKey, counts_key, put_op

log = logging.getLogger("tether_server")
PUBLISH_EVERY = 0.5  # seconds; with the evaluator's 0.25 s, a trip within a heartbeat interval
FORGET_AFTER = 600.0  # seconds an entry may stay unchanged before the tally drops it
SHARDS = 64  # keys a coordinator's counts are split over, by run
NO_CHECKPOINT: dict[str, Any] = {}
_NO_SIGNALS = (0.0, 0, 0, 0)
Signals = tuple[float, int, int, int]  # usd, tokens, calls, anomalies
_FINISHED = (types_pb2.EFFECT_STATUS_LANDED, types_pb2.EFFECT_STATUS_FAILED)


class Tally:
    """This coordinator's counts, and their publication on its lease.

    The per-beat path is a dict update: a signal that did not change marks nothing. A
    publication re-encodes only the entries that changed since the last one, and an entry
    idle for ``FORGET_AFTER`` is dropped once no session of its run is open here (``serving``;
    the run ended, or moved to another coordinator). An open run's entries are kept however
    long it idles: the evaluator forgets a run no coordinator publishes, and an instance's
    signals are its own running totals, so a live instance forgotten and heard again would
    have its lifetime spend and anomalies counted a second time.
    """

    def __init__(self, coordinator_id: str) -> None:
        self._keys = [counts_key(f"{coordinator_id}/{n}") for n in range(SHARDS)]
        self.runs: dict[RunKey, list[int]] = {}  # effects, writes, failed
        self.signals: dict[InstanceKey, Signals] = {}
        self.began: dict[RunKey, list[float]] = {}  # when this coordinator first heard of it
        self._dirty: set[RunKey | InstanceKey] = set()  # changed since the last document
        self._runs = _Encoded(self.runs)
        self._signals = _Encoded(self.signals)
        self._began = _Encoded(self.began)
        self._swept = 0.0
        self._stale: set[int] = set()  # shards to publish again
        self._changed = asyncio.Event()
        self.serving: Callable[[str], bool] = _nothing  # whether a run_id has a session here

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
            if key.run not in self.began:
                self.began[key.run] = [time.time()]
            self._dirty.add(key.run)
            self._changed.set()

    def signal(self, key: InstanceKey, signals: agent_pb2.Signals) -> None:
        """The instance's newest running totals."""
        new = (signals.usd, signals.tokens, signals.calls, signals.anomalies)
        if self.signals.get(key) != new:
            self.signals[key] = new
            if key[:3] not in self.began:  # its first signal here: the run began
                self.began[key.run] = [time.time()]
            self._dirty.add(key)
            self._changed.set()

    def documents(self, now: float | None = None) -> dict[int, bytes]:
        """The shards that changed since the last call, each as JSON; only the entries that
        changed are encoded anew."""
        now = time.monotonic() if now is None else now
        stale = self._stale
        self._runs.update(self._dirty, now, stale)
        self._signals.update(self._dirty, now, stale)
        self._began.update({key[:3] for key in self._dirty}, now, stale)  # kept while it moves
        self._dirty.clear()
        if now - self._swept >= FORGET_AFTER / 10:
            before, serving = now - FORGET_AFTER, self.serving
            for key in self._runs.forget(before, stale, serving):
                del self.runs[key]
            for key in self._signals.forget(before, stale, serving):
                del self.signals[key]
            for key in self._began.forget(before, stale, serving):
                del self.began[key]
            self._swept = now
        out = {n: self._document(n) for n in sorted(stale)}
        stale.clear()
        return out

    def _document(self, shard: int) -> bytes:
        runs, signals = self._runs.joined(shard), self._signals.joined(shard)
        began = self._began.joined(shard)
        return f'{{"runs":{{{runs}}},"signals":{{{signals}}},"began":{{{began}}}}}'.encode()

    async def publish(self, store: Store, lease: int) -> None:
        """Put the counts on ``lease`` whenever they changed, at most every PUBLISH_EVERY:
        every shard at first (a new lease starts without the keys), then those that moved."""
        self._stale.update(range(SHARDS))
        self._changed.set()
        while True:
            await self._changed.wait()
            self._changed.clear()
            for shard, doc in self.documents().items():
                try:
                    await store.txn((), [put_op(self._keys[shard], doc, lease)])
                except EtcdUnavailable as err:  # counts wait; the halt view fails closed by itself
                    log.warning("could not publish the protection counts: %s", err)
                    self._stale.add(shard)
                    self._changed.set()
            await asyncio.sleep(PUBLISH_EVERY)


def shard_of(key: tuple[str, ...]) -> int:
    """The shard of a run's entries (``key`` starts with tenant, agent, run)."""
    return zlib.crc32("/".join(key[:3]).encode()) % SHARDS


def _nothing(_: str) -> bool:
    return False


class _Encoded:
    """Each entry of one table as JSON, by shard, kept, with when it last changed."""

    def __init__(self, table: Mapping[Any, Sequence[float]]) -> None:
        self._table = table
        self._json: list[dict[tuple[str, ...], str]] = [{} for _ in range(SHARDS)]
        self._moved: dict[tuple[str, ...], float] = {}

    def update(self, dirty: Iterable[tuple[str, ...]], now: float, stale: set[int]) -> None:
        """Encode the ``dirty`` entries anew; their shards join ``stale``."""
        for key in dirty:
            values = self._table.get(key)
            if values is not None:
                shard = shard_of(key)
                self._json[shard][key] = f"{json.dumps('/'.join(key))}:{json.dumps(list(values))}"
                self._moved[key] = now
                stale.add(shard)

    def joined(self, shard: int) -> str:
        """The shard's entries as the inside of a JSON object."""
        return ",".join(self._json[shard].values())

    def forget(self, before: float, stale: set[int], serving: Callable[[str], bool]) -> list[Any]:
        """Drop the entries unchanged since ``before`` whose run is not ``serving``; the keys
        to drop from the table. Their shards join ``stale``."""
        gone = [k for k, t in self._moved.items() if t < before and not serving(k[2])]
        for key in gone:
            shard = shard_of(key)
            del self._moved[key], self._json[shard][key]
            stale.add(shard)
        return gone


class FleetTotals:
    """The evaluator's merge of every coordinator's counts: totals that only grow, summed
    as they arrive for each run, agent and tenant, so that reading any of them is a lookup.
    """

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, list[int]]] = {}  # source -> run -> last counts
        self._heard: dict[str, dict[str, Any]] = {}  # source -> instance -> signals
        self.signals: dict[InstanceKey, Signals] = {}
        self._totals: dict[tuple[str, ...], Totals] = {}  # (t,), (t, a), (t, a, r)
        self._spend: dict[tuple[str, ...], tuple[float, int, int]] = {}
        self._members: dict[tuple[str, ...], set[RunKey]] = {}
        self._runs: set[RunKey] = set()
        self._born: dict[tuple[str, ...], int] = {}  # the merge that first saw a subject
        self._merges = 0
        self._now = 0.0  # the round's time, as the evaluator gives it
        self._moved: dict[RunKey, float] = {}  # when each run's figures last moved
        # When a run (agent, tenant) began, by the clock of the coordinator that first
        # counted it: a new evaluator knows from it which counts are recent.
        self.began: dict[tuple[str, ...], float] = {}
        self.changed: set[RunKey] = set()  # runs whose figures moved since ``take_changed``
        self.labels: dict[RunKey, dict[str, str]] = {}  # read from the roster, when asked
        self.checkpoints: dict[RunKey, dict[str, Any]] = {}  # the last stored, when asked

    def take_changed(self) -> set[RunKey]:
        changed, self.changed = self.changed, set()
        return changed

    def known_runs(self) -> set[RunKey]:
        return set(self._runs)

    def new(self, subject: tuple[str, ...]) -> bool:
        """True when the subject first showed up in this round's merges."""
        return self._born.get(subject, -1) == self._merges

    def next_round(self, now: float = 0.0) -> None:
        """Rounds count merges: subjects born before this one are history."""
        self._merges += 1
        self._now = now

    def forget(self, before: float) -> list[tuple[str, ...]]:
        """Drop every run that no coordinator publishes any more (each forgot it, or died)
        and that has not moved since ``before``, with what is kept of it; an agent or a
        tenant goes with its last run. The subjects dropped: a run that comes back under
        the same name starts afresh, as a new one."""
        still = {"/".join(r): r for r, t in self._moved.items() if t < before}
        for seen in self._seen.values():  # each a lookup per still run, none per published
            for name in still.keys() & seen.keys():
                del still[name]
        for heard in self._heard.values():
            if still:
                for name in still.keys() & {name.rsplit("/", 1)[0] for name in heard}:
                    del still[name]
        gone = set(still.values())
        dropped: list[tuple[str, ...]] = []
        for run in gone:
            del self._moved[run]
            self._runs.discard(run)
            self.labels.pop(run, None)
            self.checkpoints.pop(run, None)
            for depth in (3, 2, 1):
                prefix = tuple(run[:depth])
                members = self._members.get(prefix, set())
                members.discard(run)
                if not members:  # its last run: the agent (tenant) is forgotten with it
                    tables = (self._members, self._totals, self._spend, self._born, self.began)
                    for table in tables:
                        table.pop(prefix, None)
                    dropped.append(prefix)
        for key in [k for k in self.signals if k.run in gone]:
            del self.signals[key]
        return dropped

    def members_of(self, subject: tuple[str, ...]) -> set[RunKey]:
        """The runs of a tenant ``(t,)``, an agent ``(t, a)`` or a run ``(t, a, r)``."""
        return self._members.get(subject, set())

    def totals(self, subject: tuple[str, ...]) -> Totals:
        """The effect counts and anomalies of a run, an agent ``(t, a)`` or a tenant ``(t,)``."""
        return self._totals.get(subject, ZERO)  # a RunKey finds a run's: tuples alike

    def spend(self, subject: tuple[str, ...]) -> tuple[float, int, int]:
        return self._spend.get(subject, (0.0, 0, 0))

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
        self._moved[run] = self._now

    def _began(self, run: str, began: Mapping[str, list[float]]) -> None:
        """Note when ``run`` (its agent, its tenant) began, if its coordinator says."""
        when = began.get(run)
        if when:
            parts = tuple(run.split("/"))
            for depth in (1, 2, 3):
                prefix = parts[:depth]
                self.began[prefix] = min(self.began.get(prefix, when[0]), when[0])

    def merge(self, source: str, document: dict[str, Any]) -> None:
        """Take one coordinator's published counts in."""
        seen = self._seen.setdefault(source, {})
        began: dict[str, list[float]] = document.get("began", {})
        runs: dict[str, list[int]] = document.get("runs", {})
        for name in seen.keys() - runs.keys():  # the tally forgot it: from zero, if it returns
            del seen[name]
        for name, counts in runs.items():
            before = seen.get(name)
            if before == counts:
                continue
            seen[name] = counts
            if before is None:
                self._began(name, began)
            if before is None or any(n < b for n, b in zip(counts, before, strict=True)):
                before = [0, 0, 0]  # new, or the coordinator restarted from zero
            grew = Totals(*(n - b for n, b in zip(counts, before, strict=True)))
            if grew != ZERO:
                self._grew(RunKey(*name.split("/")), grew, (0.0, 0, 0))
        signals, heard = self.signals, self._heard.setdefault(source, {})
        published: dict[str, Any] = document.get("signals", {})
        for name in heard.keys() - published.keys():
            del heard[name]
        for name, values in published.items():
            if heard.get(name) == values:
                continue  # as this coordinator published it last time
            heard[name] = values
            key = InstanceKey(*name.split("/"))
            if key.run not in self._runs:
                self._began(name.rsplit("/", 1)[0], began)
            old = signals.get(key, _NO_SIGNALS)
            usd, tokens, calls, anomalies = map(max, old, values)
            if (usd, tokens, calls, anomalies) != old:
                signals[key] = (usd, tokens, calls, anomalies)
                spent = (usd - old[0], tokens - old[1], calls - old[2])
                self._grew(key.run, Totals(anomalies=anomalies - old[3]), spent)
