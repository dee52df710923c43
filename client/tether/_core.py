"""The one engine behind ``Agent`` and ``AsyncAgent``: a stream that keeps a verdict fresh.

The engine runs on an asyncio loop. ``check()`` and ``report()`` only read or replace
attributes, so they are safe from any thread and never block: the verdict is a frozen
value swapped in whole, and the newest checkpoint simply replaces the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import grpc
from google.protobuf import struct_pb2

from tether._config import AgentConfig
from tether._errors import (
    InvalidArgument,
    TetherLost,
    Unavailable,
    from_rpc_error,
    is_permanent,
)
from tether._stop import Stopper
from tether._types import Halt, struct_to_dict
from tether._verdict import Identity, Verdict, verdict_of
from tether.v1 import agent_pb2, agent_pb2_grpc, types_pb2

log = logging.getLogger("tether")

_INITIAL_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
_GOODBYE_TIMEOUT = 5.0
DEFAULT_MAX_CHECKPOINT_BYTES = 512 * 1024


def to_struct(checkpoint: Mapping[str, Any]) -> struct_pb2.Struct:
    msg = struct_pb2.Struct()
    msg.update(checkpoint)
    return msg


class Core:
    """Holds one tether to a coordinator, reconnecting with backoff when it breaks."""

    def __init__(self, identity: Identity, config: AgentConfig) -> None:
        self.identity = identity
        self.config = config
        self._targets = config.targets
        self._connect_timeout = config.connect_timeout
        self._on_reply = config.on_reply
        self.verdict: Verdict | None = None
        self._applied: Verdict | None = None  # the verdict the last reply made, unless replaced
        self._shape: tuple[int, int, str, int] | None = None  # what that reply said, in brief
        self.ttl = 0.0
        self.halts: tuple[Halt, ...] = ()
        self.checkpoint: dict[str, Any] | None = None
        self.max_checkpoint_bytes = DEFAULT_MAX_CHECKPOINT_BYTES
        self._latest: struct_pb2.Struct | None = None
        self._reported: struct_pb2.Struct | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._registered: asyncio.Future[None] | None = None
        self._call: Any = None
        self._seq = 0
        self._interval = 1.0
        self._sender: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._ledger: deque[types_pb2.Effect] = deque()
        self._permit_requests: deque[agent_pb2.PermitRequest] = deque()
        self._permit_waiters: dict[int, asyncio.Future[agent_pb2.PermitDecision]] = {}
        self._permit_seq = 0
        self.landed: set[str] = set()  # idempotency keys that landed in this run
        self.stops = Stopper(self._wake_soon, self._checkpoint_for_ack)
        self.goodbye_confirmed = False
        self._sent_at: dict[int, float] = {}

    # -- front-door operations: never block, safe from any thread ---------------------------

    def check(self, capability: str | None = None, *, drain: bool = False) -> None:
        verdict = self.verdict
        if verdict is None:
            raise TetherLost("not registered with a coordinator yet")
        if verdict.stop is not None and not (drain and verdict.drain):
            raise verdict.stop
        if time.monotonic() - verdict.confirmed_at > self.ttl:
            raise TetherLost(f"no confirmed heartbeat reply within the lease TTL ({self.ttl:g}s)")
        if capability is not None and (frozen := verdict.frozen.get(capability)) is not None:
            raise frozen

    def verdict_drains(self) -> bool:
        """True when every halt stopping this instance lets queued work drain."""
        return self.verdict is not None and self.verdict.drain

    def report(self, checkpoint: Mapping[str, Any]) -> None:
        self._latest = self._checked(checkpoint)

    def _checked(self, checkpoint: Mapping[str, Any]) -> struct_pb2.Struct:
        """Convert now, so that a bad checkpoint fails at the caller, not on the stream."""
        try:
            json.dumps(checkpoint, allow_nan=False)  # JSON values only: no NaN, no infinity
            msg = to_struct(checkpoint)
        except (TypeError, ValueError, AttributeError) as err:
            raise InvalidArgument(
                f"checkpoint must be a JSON object of JSON values: {err}"
            ) from None
        size = msg.ByteSize()  # the coordinator measures the same way
        if size > self.max_checkpoint_bytes:
            raise InvalidArgument(
                f"checkpoint is {size} bytes; the coordinator's limit is "
                f"{self.max_checkpoint_bytes}. Checkpoint a reference to large state instead"
            )
        return msg

    # -- lifecycle, on the engine's loop ------------------------------------------------------

    async def start(self) -> None:
        """Connect and register; returns once the first reply arrived."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._registered = loop.create_future()
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name=f"tether-{self.identity.instance_id}")
        self._watchdog = loop.create_task(self._watch_ttl(), name="tether-watchdog")
        try:
            await asyncio.wait_for(asyncio.shield(self._registered), self._connect_timeout)
        except TimeoutError:
            await self.abort()
            raise Unavailable(
                f"could not register with a coordinator at {', '.join(self._targets)} "
                f"within {self._connect_timeout:g}s"
            ) from None
        except BaseException:
            await self.abort()
            raise

    async def close(self, final: Mapping[str, Any] | None) -> None:
        """Say goodbye with the final checkpoint, wait for it to be stored, and stop."""
        self._closing = True
        if final is not None:
            self._latest = self._checked(final)
        sender = self._sender
        if self._call is not None and sender is not None and not sender.done():
            assert self._wake is not None
            self._wake.set()  # the sender writes the goodbye: a stream takes one writer
            try:
                await asyncio.wait_for(asyncio.shield(self._task_done()), _GOODBYE_TIMEOUT)
            except TimeoutError:
                log.warning("tether: goodbye not confirmed in %ss", _GOODBYE_TIMEOUT)
        if not self.goodbye_confirmed:
            log.warning("tether: the final checkpoint may not be stored (no confirmed goodbye)")
        await self.abort()

    async def abort(self) -> None:
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        for task in (self._task, self._watchdog):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.verdict = Verdict(TetherLost("this agent was closed"), 0.0)

    async def _watch_ttl(self) -> None:
        """Fail closed in full when replies stop: cancel timers and in-flight work too.

        ``check()`` already refuses past the TTL on its own; this runs the stop hooks.
        """
        while True:
            await asyncio.sleep(max(self.ttl / 4, 0.05))
            before = self.verdict
            if before is None or before.stop is not None:
                continue
            if time.monotonic() - before.confirmed_at > self.ttl:
                lost = TetherLost(
                    f"no confirmed heartbeat reply within the lease TTL ({self.ttl:g}s)"
                )
                self.verdict = Verdict(lost, before.confirmed_at, before.revision, before.frozen)
                self.stops.on_order(before, self.verdict, [])

    async def _task_done(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the stream ---------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = _INITIAL_BACKOFF
        attempt = 0
        while not self._closing:
            target = self._targets[attempt % len(self._targets)]
            attempt += 1
            try:
                await self._session(target)
                backoff = _INITIAL_BACKOFF
                if self._closing:
                    return
            except grpc.RpcError as err:
                if self._closing:
                    return
                if is_permanent(err):
                    self._fail_permanently(err)
                    return
                log.info("tether: stream to %s broke (%s); reconnecting", target, err)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _fail_permanently(self, err: grpc.RpcError) -> None:
        error = from_rpc_error(err)
        if self._registered is not None and not self._registered.done():
            self._registered.set_exception(error)
            return
        self.verdict = Verdict(TetherLost(f"coordinator refused the tether: {error}"), 0.0)
        log.error("tether: giving up: %s", error)

    async def _session(self, target: str) -> None:
        options = self.config.channel_options or None
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Heartbeat()
            self._call = call
            try:
                await call.write(self.identity.register())
                first = await call.read()
                if first is grpc.aio.EOF:
                    raise await _eof_error(call)
                self._on_grant(cast(agent_pb2.HeartbeatResponse, first))
                self._sender = asyncio.create_task(self._send(call))
                try:
                    await self._read_replies(call)
                finally:
                    self._sender.cancel()
            finally:
                self._call = None

    def _on_grant(self, first: agent_pb2.HeartbeatResponse) -> None:
        grant = first.session
        self.ttl = grant.ttl_ms / 1000.0
        self._interval = max(grant.heartbeat_interval_ms / 1000.0, 0.01)
        self.max_checkpoint_bytes = grant.max_checkpoint_bytes or DEFAULT_MAX_CHECKPOINT_BYTES
        self._shape = None  # a grant is always applied in full
        if self._registered is not None and not self._registered.done():
            # The stored checkpoint is handed over once, at the first registration; later
            # reconnects keep the run's own newer progress.
            if grant.has_checkpoint:
                self.checkpoint = struct_to_dict(grant.checkpoint)
            self.landed.update(grant.landed_keys)
            self._reported = None
            self._apply(first, time.monotonic())
            self._registered.set_result(None)
        else:
            self._reported = None  # the new coordinator gets the newest checkpoint at once
            self._apply(first, time.monotonic())
        if self._on_reply is not None:
            self._on_reply(cast(Verdict, self.verdict), True)

    async def _read_replies(self, call: Any) -> None:
        on_reply = self._on_reply
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                if self._closing:
                    self.goodbye_confirmed = await call.code() == grpc.StatusCode.OK
                    return
                raise await _eof_error(call)
            sent = self._sent_at.pop(resp.ack_seq, None) if resp.ack_seq else None
            self._apply(resp, sent if sent is not None else time.monotonic())
            if on_reply is not None:
                on_reply(cast(Verdict, self.verdict), False)
            if resp.HasField("permit"):
                waiter = self._permit_waiters.get(resp.permit.request_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(resp.permit)
            if resp.order == agent_pb2.ORDER_STOP and self._wake is not None:
                self._wake.set()  # send the newest checkpoint now: it is the one to resume from

    def _apply(self, resp: agent_pb2.HeartbeatResponse, confirmed_at: float) -> None:
        before = self.verdict
        shape = (resp.revision, resp.order, resp.fail_closed_reason, len(resp.halts))
        if before is not None and before is self._applied and shape == self._shape:
            # The same order again (most replies are acks): only the confirmation is new.
            # A coordinator's order at one etcd revision is always the same order.
            self.verdict = self._applied = Verdict(
                before.stop, confirmed_at, before.revision, before.frozen, before.drain
            )
            return
        self.halts = tuple(Halt.from_pb(h) for h in resp.halts)
        self.verdict = self._applied = verdict_of(resp, self.halts, confirmed_at)
        self._shape = shape
        self.stops.on_order(before, self.verdict, list(resp.halts))

    async def _send(self, call: Any) -> None:
        """The stream's one writer: permit requests and ledger records, then beats."""
        wake = self._wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        while True:
            wake.clear()
            while self.stops.acks:
                ack = self.stops.acks.popleft()
                await call.write(agent_pb2.HeartbeatRequest(ack=ack))
            while self._permit_requests:
                request = self._permit_requests.popleft()
                await call.write(agent_pb2.HeartbeatRequest(permit=request))
            await self._send_effects(call)
            if self._closing:
                # Records made before close() may have landed in the deque while the write
                # above was in flight: closing is set after them, so this drain gets them.
                await self._send_effects(call)
                goodbye = agent_pb2.Goodbye()
                if self._latest is not None:
                    goodbye.checkpoint.CopyFrom(self._latest)
                await call.write(agent_pb2.HeartbeatRequest(goodbye=goodbye))
                await call.done_writing()
                return
            now = time.monotonic()
            stopped = self.verdict is not None and self.verdict.stop is not None
            if now >= next_beat or (stopped and self._latest is not self._reported):
                await call.write(agent_pb2.HeartbeatRequest(beat=self._beat(now)))
                next_beat = now + self._interval
            # A timer handle, not wait_for: no task is created for every beat.
            alarm = loop.call_at(loop.time() + max(next_beat - time.monotonic(), 0), wake.set)
            try:
                await wake.wait()
            finally:
                alarm.cancel()

    def _beat(self, now: float) -> agent_pb2.Beat:
        self._seq += 1
        beat = agent_pb2.Beat(seq=self._seq)
        latest = self._latest
        if latest is not None and latest is not self._reported:
            beat.checkpoint.CopyFrom(latest)
            self._reported = latest
        self._sent_at[self._seq] = now
        self._forget_old_beats(now)
        return beat

    async def _send_effects(self, call: Any) -> None:
        batch = agent_pb2.EffectBatch()
        while self._ledger:
            batch.effects.append(self._ledger.popleft())
        if not batch.effects:
            return
        try:
            await call.write(agent_pb2.HeartbeatRequest(effects=batch))
        except BaseException:
            self._ledger.extendleft(reversed(batch.effects))  # the next stream sends them
            raise

    # -- the effect gate's needs ------------------------------------------------------------

    def record(self, effect: types_pb2.Effect) -> None:
        """Queue a ledger record for the stream. Safe from any thread; never blocks."""
        self._ledger.append(effect)
        if effect.status == types_pb2.EFFECT_STATUS_LANDED and effect.key:
            self.landed.add(effect.key)
        self._wake_soon()

    def _checkpoint_for_ack(self) -> struct_pb2.Struct | None:
        """The newest checkpoint if this stream has not carried it yet, for a kill ack.

        The ack goes out before any beat, so no beat needs to repeat it: at a kill, every
        agent then sends one message, not two, when the coordinator is busiest. One the
        stream already carried is not sent again: the coordinator holds it and stores it
        at the kill.
        """
        latest = self._latest
        if latest is self._reported:
            return None
        self._reported = latest
        return latest

    def _wake_soon(self) -> None:
        if self._wake is not None and threading.get_ident() == self._loop_thread:
            self._wake.set()  # on the loop already: no self-pipe write, no extra turn
            return
        if self._loop is not None and self._wake is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and here
                self._loop.call_soon_threadsafe(self._wake.set)

    async def permit(
        self, capability: str, key: str, *, drain: bool = False
    ) -> agent_pb2.PermitDecision:
        """Ask the coordinator, over the stream, whether this effect may leave now."""
        self._permit_seq += 1
        request = agent_pb2.PermitRequest(
            request_id=self._permit_seq, capability=capability, key=key, drain=drain
        )
        waiter: asyncio.Future[agent_pb2.PermitDecision] = (
            asyncio.get_running_loop().create_future()
        )
        self._permit_waiters[request.request_id] = waiter
        self._permit_requests.append(request)
        self._wake_soon()
        try:
            return await asyncio.wait_for(waiter, max(self.ttl, 1.0))
        except TimeoutError:
            raise TetherLost(f"no permit decision within the lease TTL ({self.ttl:g}s)") from None
        finally:
            self._permit_waiters.pop(request.request_id, None)

    def _forget_old_beats(self, now: float) -> None:
        if len(self._sent_at) > 64:
            horizon = now - max(self.ttl, 1.0)
            self._sent_at = {s: t for s, t in self._sent_at.items() if t >= horizon}


async def _eof_error(call: Any) -> grpc.RpcError:
    """The stream ended without a reply; surface the coordinator's status as the error."""
    code = await call.code()
    details = await call.details()
    if code == grpc.StatusCode.OK:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="coordinator closed the stream",
        )
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
