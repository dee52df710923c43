"""What waits to be written on the stream, and the wake-up that tells its one writer.

It mirrors the coordinator's ``Outbox``: anything may queue from any thread without
blocking (kill acks, permit requests, ledger records, the newest checkpoint), and the
stream's sender, the only task that writes, takes it from here in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any

from google.protobuf import struct_pb2

from tether._errors import TetherLost
from tether.v1 import agent_pb2, types_pb2

_BEATS_KEPT = 64  # beats awaiting their reply before old ones are forgotten
_SIGNALS_LOCK = threading.Lock()  # additions come from any thread; held for one tuple swap


class Outbound:
    """The queue of one agent's stream writes, which outlives any single stream."""

    __slots__ = (
        "_loop",
        "_loop_thread",
        "_permit_seq",
        "_permit_waiters",
        "_seq",
        "acks",
        "beats_sent",
        "latest",
        "ledger",
        "permits",
        "reported",
        "signals",
        "signals_sent",
        "wake",
    )

    def __init__(self) -> None:
        self.acks: deque[agent_pb2.KillAck] = deque()
        self.permits: deque[agent_pb2.PermitRequest] = deque()
        self.ledger: deque[types_pb2.Effect] = deque()
        self.latest: struct_pb2.Struct | None = None  # the newest checkpoint reported
        self.reported: struct_pb2.Struct | None = None  # the last one this stream carried
        self.wake = asyncio.Event()  # set when something waits to be written
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._permit_waiters: dict[int, asyncio.Future[agent_pb2.PermitDecision]] = {}
        self._permit_seq = 0
        self._seq = 0
        self.beats_sent: dict[int, float] = {}  # seq -> when sent, of beats awaiting a reply
        # This instance's running totals (usd, tokens, calls, anomalies): one tuple, replaced
        # whole, so that a beat never reads half an update from another thread.
        self.signals: tuple[float, int, int, int] = (0.0, 0, 0, 0)
        self.signals_sent: tuple[float, int, int, int] | None = None  # on this stream

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake-ups go to ``loop``, the running loop of the stream's writer."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def wake_soon(self) -> None:
        """Wake the writer. Safe from any thread; never blocks."""
        if threading.get_ident() == self._loop_thread:
            self.wake.set()  # on the loop already: no self-pipe write, no extra turn
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and here
                self._loop.call_soon_threadsafe(self.wake.set)

    # -- what others queue ----------------------------------------------------------------

    def ack(self, ack: agent_pb2.KillAck) -> None:
        """Queue a kill ack, carrying the newest checkpoint if this stream has not yet.

        The ack goes out before any beat, so no beat needs to repeat it: at a kill, every
        agent then sends one message, not two, when the coordinator is busiest. One the
        stream already carried is not sent again: the coordinator holds it and stores it
        at the kill.
        """
        self._carry_checkpoint(ack)
        self.acks.append(ack)
        self.wake_soon()

    def _carry_checkpoint(self, message: agent_pb2.KillAck | agent_pb2.Beat) -> None:
        """Put the newest checkpoint on ``message`` if this stream has not carried it yet."""
        latest = self.latest
        if latest is not None and latest is not self.reported:
            message.checkpoint.CopyFrom(latest)
            self.reported = latest

    def record(self, effect: types_pb2.Effect) -> None:
        """Queue a ledger record. Safe from any thread; never blocks."""
        self.ledger.append(effect)
        self.wake_soon()

    async def permit(
        self, capability: str, key: str, drain: bool, ttl: float
    ) -> agent_pb2.PermitDecision:
        """Queue a permit request and wait, at most ``ttl`` (or a second), for its decision."""
        self._permit_seq += 1
        request = agent_pb2.PermitRequest(
            request_id=self._permit_seq, capability=capability, key=key, drain=drain
        )
        waiter: asyncio.Future[agent_pb2.PermitDecision] = (
            asyncio.get_running_loop().create_future()
        )
        self._permit_waiters[request.request_id] = waiter
        self.permits.append(request)
        self.wake_soon()
        try:
            return await asyncio.wait_for(waiter, max(ttl, 1.0))
        except TimeoutError:
            raise TetherLost(f"no permit decision within the lease TTL ({ttl:g}s)") from None
        finally:
            self._permit_waiters.pop(request.request_id, None)

    def decided(self, decision: agent_pb2.PermitDecision) -> None:
        """A permit decision arrived: hand it to the request still waiting for it."""
        waiter = self._permit_waiters.get(decision.request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(decision)

    def add_signals(
        self, usd: float = 0.0, tokens: int = 0, calls: int = 0, anomalies: int = 0
    ) -> None:
        """Add to the running totals; the next beat carries them. Never blocks."""
        with _SIGNALS_LOCK:
            u, t, c, a = self.signals
            self.signals = (u + usd, t + tokens, c + calls, a + anomalies)

    # -- what the writer takes ------------------------------------------------------------

    async def write_queued(self, call: Any) -> None:
        """Write acks, then permit requests, then ledger records, in the order queued."""
        acks, permits = self.acks, self.permits
        while acks:
            await call.write(agent_pb2.HeartbeatRequest(ack=acks.popleft()))
        while permits:
            await call.write(agent_pb2.HeartbeatRequest(permit=permits.popleft()))
        await self._write_effects(call)

    async def write_goodbye(self, call: Any) -> None:
        """Write the goodbye with the newest checkpoint, and end this side of the stream."""
        # Records made before close() may have landed in the deque while the last write
        # was in flight: closing is set after them, so this drain gets them.
        await self._write_effects(call)
        goodbye = agent_pb2.Goodbye()
        if self.latest is not None:
            goodbye.checkpoint.CopyFrom(self.latest)
        await call.write(agent_pb2.HeartbeatRequest(goodbye=goodbye))
        await call.done_writing()

    async def _write_effects(self, call: Any) -> None:
        if not self.ledger:
            return
        batch = agent_pb2.EffectBatch()
        while self.ledger:
            batch.effects.append(self.ledger.popleft())
        try:
            await call.write(agent_pb2.HeartbeatRequest(effects=batch))
        except BaseException:
            self.ledger.extendleft(reversed(batch.effects))  # the next stream sends them
            raise

    def beat(self, now: float, ttl: float) -> agent_pb2.Beat:
        """The next beat, carrying the newest checkpoint if this stream has not yet."""
        self._seq += 1
        beat = agent_pb2.Beat(seq=self._seq)
        self._carry_checkpoint(beat)
        signals = self.signals
        if signals != self.signals_sent:
            usd, tokens, calls, anomalies = signals
            beat.signals.usd, beat.signals.tokens = usd, tokens
            beat.signals.calls, beat.signals.anomalies = calls, anomalies
            self.signals_sent = signals
        sent = self.beats_sent
        sent[self._seq] = now
        if len(sent) > _BEATS_KEPT:  # replies that never came: forget them, in place
            horizon = now - max(ttl, 1.0)
            for seq in [s for s, t in sent.items() if t < horizon]:
                del sent[seq]
        return beat
