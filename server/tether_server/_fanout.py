"""Fan-out: what the coordinator pushes onto open streams without being asked.

A halt put or deleted pushes the new order to every instance it touches; losing etcd
pushes a fail-closed stop to all of them; silence for a TTL ends a stream; shutdown lets
every stream go. The stream reader (``_sessions``) answers what agents send; this module
speaks first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import grpc
from tether.v1 import types_pb2

from tether_server._checkpoints import CheckpointWriter, RunFlush
from tether_server._etcd import EtcdUnavailable
from tether_server._halts import HaltTable
from tether_server._orders import Push, any_stop, order_message
from tether_server._outbox import End
from tether_server._presence import Presence
from tether_server._registry import Session
from tether_server._selectors import matches
from tether_server._store import InstanceKey
from tether_server._telemetry import Metrics

log = logging.getLogger("tether_server")
# Sessions a halt's fan-out pushes before it lets the loop serve others (the Kill's reply,
# heartbeat acks); a chunk ends only between the groups of sessions sharing a writer.
CHUNK = 256


def _news(halt: types_pb2.Halt) -> tuple[Any, ...]:
    """What of a halt its instances must hear again when it changes: a soft halt made
    hard, or a resume that now waits for another release (they are told why)."""
    return (halt.id, halt.mode, tuple(sorted(halt.release_gate.items())))


_Order = tuple[tuple[types_pb2.Halt, ...], tuple[Any, ...], bytes, bool]


class _Orders:
    """The order each instance is under, computed once per distinct answer in one push.

    An order depends on the instance only through what the table's selectors and release
    gates look at: with no halt naming a run or a label, every run of one agent is under
    the same order, so a kill of 10,000 runs matches the table a few times, not 10,000.
    Keyed by the table's revision too: a later chunk sees a changed table afresh.
    """

    def __init__(self, table: HaltTable) -> None:
        self._table = table
        self._found: dict[tuple[Any, ...], _Order] = {}
        self._seen_at = -1
        self._by_run = self._by_labels = True

    def of(self, key: InstanceKey, labels: Mapping[str, str]) -> _Order:
        table = self._table
        if table.revision != self._seen_at:  # the table changed: what it looks at may too
            self._seen_at = table.revision
            every = table.halts.values()
            self._by_run = any(h.selector.run_id for h in every)
            self._by_labels = any(h.selector.labels or h.release_gate for h in every)
        memo = (
            table.revision, key.tenant, key.agent,
            key.run_id if self._by_run else "",
            tuple(sorted(labels.items())) if self._by_labels else (),
        )  # fmt: skip
        found = self._found.get(memo)
        if found is None:
            halts = tuple(table.matching(key, labels))
            payload = order_message(halts, table.revision).SerializeToString()
            found = (halts, tuple(map(_news, halts)), payload, any_stop(halts))
            self._found[memo] = found
        return found


class Fanout:
    """Pushes orders and ends onto the streams that presence serves."""

    def __init__(
        self,
        *,
        presence: Presence,
        halts: HaltTable,
        checkpoints: CheckpointWriter,
        flush: RunFlush,
        metrics: Metrics,
        lease_ttl: float,
        quiet: asyncio.Event,
    ) -> None:
        self._presence = presence
        self._halts = halts
        self._checkpoints = checkpoints
        self._flush = flush
        self._metrics = metrics
        self._ttl = lease_ttl
        self._events: deque[tuple[types_pb2.Halt, float]] = deque()  # halts not yet pushed
        self._wake = asyncio.Event()
        # Set while no halt is being pushed. What agents send back after a kill (thousands
        # of acknowledgements and ledger records at once) and the kill-time flush wait for
        # it, so that taking them in never holds up the pushes to streams not yet told.
        self.quiet = quiet

    def on_halt(self, halt: types_pb2.Halt, since: float) -> None:
        """A halt was put or deleted: queue it; :meth:`run` pushes the new orders."""
        self._events.append((halt, since))
        self._wake.set()

    async def run(self) -> None:
        """Push the queued halts in the order etcd committed them, one at a time.

        One task, so a resume never overtakes the rest of the kill before it. Each order is
        computed from the halt table as it is when its chunk is pushed, so a later chunk
        may already carry a newer halt: every instance still ends on the newest order.
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._events:
                self.quiet.clear()
                try:
                    await self._push(*self._events.popleft())
                finally:
                    self.quiet.set()
                await asyncio.sleep(0)  # what waited for this halt's pushes goes before the next

    async def _push(self, halt: types_pb2.Halt, since: float) -> None:
        """Push the new order to every instance ``halt`` touches, a chunk at a time.

        Between chunks the loop serves others: the Kill's own reply, heartbeat acks. The
        instances of one wire writer stay in one chunk, so that it sends them one message.
        """
        orders = _Orders(self._halts)
        pushed = 0
        for group in self._groups(halt.selector):
            if pushed >= CHUNK:
                pushed = 0
                await asyncio.sleep(0)
            for session in group:
                self._push_one(session, since, orders)
            pushed += len(group)

    def _groups(self, sel: types_pb2.Selector) -> list[list[Session]]:
        """The sessions ``sel`` matches, grouped by the writer they share, in order."""
        groups: dict[Any, list[Session]] = {}
        for session in self._presence.candidates(sel):
            if matches(sel, session.key, session.labels):
                groups.setdefault(session.outbox.shared, []).append(session)
        return list(groups.values())

    def _push_one(self, session: Session, since: float, orders: _Orders) -> None:
        revision = self._halts.revision
        if session.revision > revision or self._presence.get(session.key) is not session:
            return  # registration read a newer view than this table, or it has gone
        halts, ids, payload, stops = orders.of(session.key, session.labels)
        session.revision = revision
        session.order_bytes = None
        if ids == tuple(map(_news, session.halts)):
            return
        was_running, session.halts = not any_stop(session.halts), halts
        session.order_bytes = payload
        session.outbox.post(Push(payload, since))
        if was_running and stops:
            self._metrics.kills_pushed.add(1)
            self._flush.soon()

    def fail_closed(self, reason: str) -> None:
        """etcd is gone: tell every agent to stop, then let go so it finds another coordinator."""
        payload = order_message((), self._halts.revision, fail_closed=reason).SerializeToString()
        end = End(grpc.StatusCode.UNAVAILABLE, f"coordinator lost etcd ({reason}); reconnect")
        self._events.clear()  # every session it would reach is let go; the table reloads
        for session in self._presence.snapshot():
            session.leave_presence = True
            session.outbox.post(Push(payload, time.monotonic()))
            session.outbox.post(end)
            self._presence.forget_locally(session)

    async def watch_silence(self) -> None:
        """Declare an instance STALE once it has been silent for a whole TTL.

        Ending the stream drops the instance's presence key: STALE is then a fact in etcd.
        """
        period = min(0.5, self._ttl / 8)
        while True:
            await asyncio.sleep(period)
            horizon = time.monotonic() - self._ttl
            for session in self._presence.snapshot():
                if session.last_beat < horizon and not session.end_queued:
                    session.end_queued = True
                    session.outbox.post(
                        End(grpc.StatusCode.UNAVAILABLE, f"no heartbeat for {self._ttl:g}s")
                    )

    async def drain(self) -> None:
        """Shutdown: let streams go and flush checkpoints; presence lapses with the lease."""
        for session in self._presence.snapshot():
            session.leave_presence = True
            session.outbox.post(
                End(grpc.StatusCode.UNAVAILABLE, "coordinator shutting down; reconnect")
            )
        try:
            await self._checkpoints.flush()
        except EtcdUnavailable as err:
            log.warning("final checkpoint flush failed: %s", err)
