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
from typing import Any

import grpc
from tether.v1 import types_pb2

from tether_server._checkpoints import CheckpointWriter, RunFlush
from tether_server._etcd import EtcdUnavailable
from tether_server._halts import HaltTable
from tether_server._orders import Push, any_stop, order_message
from tether_server._outbox import End
from tether_server._presence import Presence
from tether_server._selectors import matches
from tether_server._telemetry import Metrics

log = logging.getLogger("tether_server")


def _news(halt: types_pb2.Halt) -> tuple[Any, ...]:
    """What of a halt its instances must hear again when it changes: a soft halt made
    hard, or a resume that now waits for another release (they are told why)."""
    return (halt.id, halt.mode, tuple(sorted(halt.release_gate.items())))


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
    ) -> None:
        self._presence = presence
        self._halts = halts
        self._checkpoints = checkpoints
        self._flush = flush
        self._metrics = metrics
        self._ttl = lease_ttl

    def on_halt(self, halt: types_pb2.Halt, since: float) -> None:
        """A halt was put or deleted: push the new order to every instance it touches."""
        revision = self._halts.revision
        payloads: dict[tuple[Any, ...], bytes] = {}  # serialise each distinct order once
        for session in self._presence.candidates(halt.selector):
            labels = session.record.labels
            if not matches(halt.selector, session.key, labels) or session.revision > revision:
                continue  # registration read a newer view than this event; it stands
            halts = tuple(self._halts.matching(session.key, labels))
            ids = tuple(map(_news, halts))  # a soft halt made hard is news too
            session.revision = revision
            session.order_bytes = None
            if ids == tuple(map(_news, session.halts)):
                continue
            was_running, session.halts = not any_stop(session.halts), halts
            payload = payloads.get(ids)
            if payload is None:
                payload = order_message(halts, revision).SerializeToString()
                payloads[ids] = payload
            session.order_bytes = payload
            session.outbox.post(Push(payload, since))
            if was_running and any_stop(halts):
                self._metrics.kills_pushed.add(1)
                self._flush.soon()

    def fail_closed(self, reason: str) -> None:
        """etcd is gone: tell every agent to stop, then let go so it finds another coordinator."""
        payload = order_message((), self._halts.revision, fail_closed=reason).SerializeToString()
        end = End(grpc.StatusCode.UNAVAILABLE, f"coordinator lost etcd ({reason}); reconnect")
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
