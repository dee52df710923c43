"""What one instance waits to write on its link's stream, and the wake-up that tells the writer.

It mirrors the coordinator's ``Outbox``: anything may queue from any thread without
blocking (kill acks, permit requests, ledger records, the newest checkpoint). The link's one
writer takes it from here, in that order, as frames of one ``MuxRequest`` it shares with the
other instances on the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable

from google.protobuf import struct_pb2

from tether._errors import TetherLost
from tether.v1 import agent_pb2, types_pb2

_SIGNALS_LOCK = threading.Lock()  # additions come from any thread; held for one tuple swap
_NO_SIGNALS = (0.0, 0, 0, 0)

Signals = tuple[float, int, int, int]


def _nothing() -> None:
    return None


class Outbound:
    """The queue of one instance's stream writes, which outlives any single stream."""

    __slots__ = (
        "_loop",
        "_loop_thread",
        "_notify",
        "_permit_seq",
        "_permit_waiters",
        "acks",
        "latest",
        "ledger",
        "permits",
        "reported",
        "signals",
        "signals_sent",
    )

    def __init__(self) -> None:
        self.acks: deque[agent_pb2.KillAck] = deque()
        self.permits: deque[agent_pb2.PermitRequest] = deque()
        self.ledger: deque[types_pb2.Effect] = deque()
        self.latest: struct_pb2.Struct | None = None  # the newest checkpoint reported
        self.reported: struct_pb2.Struct | None = None  # the last one this stream carried
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._notify: Callable[[], None] = _nothing  # tells the link's writer, on its loop
        self._permit_waiters: dict[int, asyncio.Future[agent_pb2.PermitDecision]] = {}
        self._permit_seq = 0  # request ids are this instance's own
        # This instance's running totals (usd, tokens, calls, anomalies): one tuple, replaced
        # whole, so that a beat never reads half an update from another thread.
        self.signals: Signals = _NO_SIGNALS
        # What this stream carried; None: nothing yet. A new stream gets the totals with its
        # first beat even when they are zero, so the coordinators know the run from then on.
        self.signals_sent: Signals | None = None

    def bind(self, loop: asyncio.AbstractEventLoop, notify: Callable[[], None]) -> None:
        """Wake-ups call ``notify`` on ``loop``, the running loop of the link's writer."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._notify = notify

    def new_stream(self) -> None:
        """A new stream: it gets the newest checkpoint and the running totals at once."""
        self.reported = None
        self.signals_sent = None

    def wake_soon(self) -> None:
        """Wake the writer. Safe from any thread; never blocks."""
        if threading.get_ident() == self._loop_thread:
            self._notify()  # on the loop already: no self-pipe write, no extra turn
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and here
                self._loop.call_soon_threadsafe(self._notify)

    # -- what others queue ----------------------------------------------------------------

    def ack(self, ack: agent_pb2.KillAck) -> None:
        """Queue a kill ack, carrying the newest checkpoint if this stream has not yet.

        The ack goes out before any beat frame, so no beat needs to repeat it. One the
        stream already carried is not sent again: the coordinator holds it and stores it
        at the kill.
        """
        self._carry_checkpoint(ack)
        self.acks.append(ack)
        self.wake_soon()

    def _carry_checkpoint(self, message: agent_pb2.KillAck | agent_pb2.Beat) -> bool:
        """Put the newest checkpoint on ``message`` if this stream has not carried it yet."""
        latest = self.latest
        if latest is None or latest is self.reported:
            return False
        message.checkpoint.CopyFrom(latest)
        self.reported = latest
        return True

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

    def take(
        self, local: int, request: agent_pb2.MuxRequest, *, beat: bool, goodbye: bool
    ) -> list[types_pb2.Effect]:
        """Append this instance's frames to ``request``: acks, permit requests, ledger
        records, then a beat frame (with ``beat``, when the checkpoint or totals changed)
        or the goodbye. Returns the ledger records taken, to queue again if the write fails.
        """
        acks, permits, frames = self.acks, self.permits, request.frames
        while acks:
            frames.add(local=local).body.ack.CopyFrom(acks.popleft())
        while permits:
            frames.add(local=local).body.permit.CopyFrom(permits.popleft())
        effects = self._take_effects(local, request)
        if goodbye:
            body = frames.add(local=local).body
            body.goodbye.SetInParent()
            if self.latest is not None:
                body.goodbye.checkpoint.CopyFrom(self.latest)
        elif beat:
            self._beat_frame(local, request)
        return effects

    def _take_effects(self, local: int, request: agent_pb2.MuxRequest) -> list[types_pb2.Effect]:
        ledger = self.ledger
        if not ledger:
            return []
        taken = [ledger.popleft() for _ in range(len(ledger))]
        request.frames.add(local=local).body.effects.effects.extend(taken)
        return taken

    def requeue(self, effects: list[types_pb2.Effect]) -> None:
        """Ledger records whose write failed: the next stream sends them first."""
        self.ledger.extendleft(reversed(effects))

    def _beat_frame(self, local: int, request: agent_pb2.MuxRequest) -> None:
        """A beat frame when the newest checkpoint or the running totals are not yet sent."""
        signals = self.signals
        fresh = self.latest is not None and self.latest is not self.reported
        if not fresh and signals == self.signals_sent:
            return
        beat = request.frames.add(local=local).body.beat
        self._carry_checkpoint(beat)
        if signals != self.signals_sent:
            usd, tokens, calls, anomalies = signals
            beat.signals.usd, beat.signals.tokens = usd, tokens
            beat.signals.calls, beat.signals.anomalies = calls, anomalies
            self.signals_sent = signals
