"""The one engine behind ``Agent`` and ``AsyncAgent``: a stream that keeps a verdict fresh.

The engine runs on an asyncio loop. ``check()`` and ``report()`` only read or replace
attributes, so they are safe from any thread and never block: the verdict is a frozen
value swapped in whole, and the newest checkpoint simply replaces the last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import Coroutine, Mapping
from typing import Any, cast

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from tether._channel import bearer, open_aio_channel, traced
from tether._config import AgentConfig
from tether._errors import InvalidArgument, TetherLost, Unavailable, from_rpc_error, is_permanent
from tether._gate import InFlight
from tether._outbound import Outbound
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
    """Holds one tether to a coordinator, reconnecting with backoff when it breaks.

    What it writes waits in ``out`` (an ``Outbound``); what a stop does is ``stops``'
    business (a ``Stopper``). The core reads replies and keeps the verdict.
    """

    def __init__(self, identity: Identity, config: AgentConfig) -> None:
        self.identity = identity
        self.config = config
        self.out = Outbound()
        self.stops = Stopper(self.out.ack)
        self.verdict: Verdict | None = None
        self._applied: Verdict | None = None  # the verdict the last reply made, unless replaced
        self._shape: tuple[int, int, str, int] | None = None  # what that reply said, in brief
        self.ttl = 0.0
        self._interval = 1.0
        self.halts: tuple[Halt, ...] = ()
        self.checkpoint: dict[str, Any] | None = None
        self.max_checkpoint_bytes = DEFAULT_MAX_CHECKPOINT_BYTES
        self.landed: set[str] = set()  # idempotency keys that landed in this run
        self.in_flight = InFlight()  # keys the gate's passes hold now
        self._closing = False
        self.goodbye_confirmed = False
        self._registered: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._call: Any = None

    # -- front-door operations: never block, safe from any thread ---------------------------

    def check(self, capability: str | None = None, *, drain: bool = False) -> None:
        verdict = self.verdict
        if verdict is None:
            raise TetherLost("not registered with a coordinator yet")
        if verdict.stop is not None and not (drain and verdict.drain):
            raise verdict.stop
        if time.monotonic() - verdict.confirmed_at > self.ttl:
            raise TetherLost(f"no confirmed heartbeat reply within the lease TTL ({self.ttl:g}s)")
        if capability is not None:
            blocked = verdict.blocks(capability, self.identity.reads)
            if blocked is not None:
                raise blocked

    def verdict_drains(self) -> bool:
        """True when every halt stopping this instance lets queued work drain."""
        return self.verdict is not None and self.verdict.drain

    def report(self, checkpoint: Mapping[str, Any]) -> None:
        self.out.latest = self._checked(checkpoint)

    def _checked(self, checkpoint: Mapping[str, Any]) -> struct_pb2.Struct:
        """Convert now, so that a bad checkpoint fails at the caller, not on the stream."""
        try:
            json.dumps(checkpoint, allow_nan=False)  # JSON values only: no NaN, no infinity
            msg = to_struct(checkpoint)
            # What protobuf cannot parse back (nested too deep), no coordinator could read.
            struct_pb2.Struct.FromString(msg.SerializeToString())
        except (TypeError, ValueError, AttributeError, RecursionError, DecodeError) as err:
            raise InvalidArgument(
                f"checkpoint must be a JSON object of JSON values, nested at most about "
                f"32 deep: {err}"
            ) from None
        size = msg.ByteSize()  # the coordinator measures the same way
        if size > self.max_checkpoint_bytes:
            raise InvalidArgument(
                f"checkpoint is {size} bytes; the coordinator's limit is "
                f"{self.max_checkpoint_bytes}. Checkpoint a reference to large state instead"
            )
        return msg

    # -- the effect gate's needs ------------------------------------------------------------

    def record(self, effect: types_pb2.Effect) -> None:
        """Queue a ledger record for the stream. Safe from any thread; never blocks."""
        if effect.status == types_pb2.EFFECT_STATUS_LANDED and effect.key:
            self.landed.add(effect.key)
        self.out.record(effect)

    def permit(
        self, capability: str, key: str, *, drain: bool = False
    ) -> Coroutine[Any, Any, agent_pb2.PermitDecision]:
        """Ask the coordinator, over the stream, whether this effect may leave now."""
        return self.out.permit(capability, key, drain, self.ttl)

    # -- lifecycle, on the engine's loop ------------------------------------------------------

    async def start(self) -> None:
        """Connect and register; returns once the first reply arrived."""
        loop = asyncio.get_running_loop()
        self.out.bind(loop)
        self._registered = loop.create_future()
        self._task = loop.create_task(self._run(), name=f"tether-{self.identity.instance_id}")
        self._watchdog = loop.create_task(self._watch_ttl(), name="tether-watchdog")
        timeout = self.config.connect_timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._registered), timeout)
        except TimeoutError:
            await self.abort()
            raise Unavailable(
                f"could not register with a coordinator at {', '.join(self.config.targets)} "
                f"within {timeout:g}s"
            ) from None
        except BaseException:
            await self.abort()
            raise

    async def close(self, final: Mapping[str, Any] | None) -> None:
        """Say goodbye with the final checkpoint, wait for it to be stored, and stop."""
        self._closing = True
        if final is not None:
            self.out.latest = self._checked(final)
        sender = self._sender
        if self._call is not None and sender is not None and not sender.done():
            self.out.wake.set()  # the sender writes the goodbye: a stream takes one writer
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
                self.verdict = dataclasses.replace(before, stop=lost)
                self.stops.on_order(before, self.verdict, [])

    async def _task_done(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the stream ---------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = _INITIAL_BACKOFF
        attempt = 0
        targets = self.config.targets
        while not self._closing:
            target = targets[attempt % len(targets)]
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
        config = self.config
        async with open_aio_channel(target, config.tls, config.channel_options) as channel:
            metadata = traced(bearer(config.token))  # the stream joins the caller's trace
            call = agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(metadata=metadata)
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
        self.out.reported = None  # the new coordinator gets the newest checkpoint at once
        self.out.signals_sent = None  # and the running totals
        registering = self._registered is not None and not self._registered.done()
        if registering:
            # The stored checkpoint is handed over once, at the first registration; later
            # reconnects keep the run's own newer progress.
            if grant.has_checkpoint:
                self.checkpoint = struct_to_dict(grant.checkpoint)
            self.landed.update(grant.landed_keys)
        self._apply(first, time.monotonic())
        if self.config.on_reply is not None:
            self.config.on_reply(cast(Verdict, self.verdict), True)
        if registering:
            cast(asyncio.Future[None], self._registered).set_result(None)

    async def _read_replies(self, call: Any) -> None:
        out, on_reply = self.out, self.config.on_reply
        beats_sent = out.beats_sent  # a reply confirms the verdict as of its beat's sending
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                if self._closing:
                    self.goodbye_confirmed = await call.code() == grpc.StatusCode.OK
                    return
                raise await _eof_error(call)
            sent = beats_sent.pop(resp.ack_seq, None) if resp.ack_seq else None
            self._apply(resp, sent if sent is not None else time.monotonic())
            if on_reply is not None:
                on_reply(cast(Verdict, self.verdict), False)
            if resp.HasField("permit"):
                out.decided(resp.permit)
            if resp.order == agent_pb2.ORDER_STOP:
                out.wake.set()  # send the newest checkpoint now: it is the one to resume from

    def _apply(self, resp: agent_pb2.HeartbeatResponse, confirmed_at: float) -> None:
        before = self.verdict
        shape = (resp.revision, resp.order, resp.fail_closed_reason, len(resp.halts))
        if before is not None and before is self._applied and shape == self._shape:
            # The same order again (most replies are acks): only the confirmation is new.
            # A coordinator's order at one etcd revision is always the same order.
            self.verdict = self._applied = dataclasses.replace(before, confirmed_at=confirmed_at)
            return
        self.halts = tuple(Halt.from_pb(h) for h in resp.halts)
        self.verdict = self._applied = verdict_of(resp, self.halts, confirmed_at)
        self._shape = shape
        self.stops.on_order(before, self.verdict, list(resp.halts))

    async def _send(self, call: Any) -> None:
        """The stream's one writer: what waits in ``out``, then beats."""
        out = self.out
        wake = out.wake
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        while True:
            wake.clear()
            await out.write_queued(call)
            if self._closing:
                await out.write_goodbye(call)
                return
            now = time.monotonic()
            stopped = self.verdict is not None and self.verdict.stop is not None
            if now >= next_beat or (stopped and out.latest is not out.reported):
                await call.write(agent_pb2.HeartbeatRequest(beat=out.beat(now, self.ttl)))
                next_beat = now + self._interval
            # A timer handle, not wait_for: no task is created for every beat.
            alarm = loop.call_at(loop.time() + max(next_beat - time.monotonic(), 0), wake.set)
            try:
                await wake.wait()
            finally:
                alarm.cancel()


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
