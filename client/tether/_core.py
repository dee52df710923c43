"""The per-instance half of a tether: what the coordinator last told this instance.

An instance shares its process's link (``_link``): one channel and one ``Multiplex`` stream
per target list and credentials. What stays its own is here: its registration and grant,
its verdict, what a stop does (``Stopper``), what it waits to write (``Outbound``), its
checkpoint, the keys that landed and the keys in flight.

``check()`` and ``report()`` only read or replace attributes, so they are safe from any
thread and never block: the verdict is a frozen value swapped in whole, the newest
checkpoint simply replaces the last, and the stream's confirmation is one float.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from tether._config import AgentConfig
from tether._errors import InvalidArgument, TetherError, TetherLost, Unavailable
from tether._gate import InFlight
from tether._link_stream import DEAD, Stream, status_error
from tether._outbound import Outbound
from tether._stop import Stopper
from tether._types import Halt, struct_to_dict
from tether._verdict import Identity, Verdict, verdict_of
from tether.v1 import agent_pb2, types_pb2

if TYPE_CHECKING:
    from tether._link import Link

log = logging.getLogger("tether")

_GOODBYE_TIMEOUT = 5.0
DEFAULT_MAX_CHECKPOINT_BYTES = 512 * 1024
# Ends of one instance that retrying the same registration cannot fix.
PERMANENT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        grpc.StatusCode.PERMISSION_DENIED.value[0],
        grpc.StatusCode.UNAUTHENTICATED.value[0],
        grpc.StatusCode.ABORTED.value[0],
    }
)


def to_struct(checkpoint: Mapping[str, Any]) -> struct_pb2.Struct:
    msg = struct_pb2.Struct()
    msg.update(checkpoint)
    return msg


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: its tag, its length as a varint, its bytes."""
    out, n = bytearray([tag]), len(payload)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


def _as_carried(checkpoint: bytes) -> bytes:
    """A serialised checkpoint as its deepest trip goes: MuxRequest.frames[].body.ack.checkpoint."""
    ack = _field(0x22, checkpoint)  # KillAck.checkpoint = 4
    body = _field(0x32, ack)  # HeartbeatRequest.ack = 6
    return _field(0x12, _field(0x12, body))  # MuxFrame.body = 2, MuxRequest.frames = 2


class Core:
    """One instance on a shared link: registration, verdict, stops and what it writes."""

    def __init__(self, identity: Identity, config: AgentConfig) -> None:
        self.identity = identity
        self.config = config
        self.out = Outbound()
        self.stops = Stopper(self.out.ack)
        self.verdict: Verdict | None = None
        self._applied: Verdict | None = None  # the verdict the last reply made
        self._stopping: list[types_pb2.Halt] = []  # that reply's halts
        self.stream: Stream = DEAD  # the stream this instance is registered on now
        self.pending: Stream = DEAD  # the stream its last registration was written on
        self.ttl = 0.0
        self.halts: tuple[Halt, ...] = ()
        self.checkpoint: dict[str, Any] | None = None
        self.max_checkpoint_bytes = DEFAULT_MAX_CHECKPOINT_BYTES
        self.landed: set[str] = set()  # idempotency keys that landed in this run
        self.in_flight = InFlight()  # keys the gate's passes hold now
        self.local = 0  # this instance's number on its link, given when it joins
        self.closing = False
        self.said_goodbye = False  # the writer wrote this instance's goodbye
        self.goodbye_confirmed = False
        self.link: Link | None = None
        self._registered: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[None] | None = None

    # -- front-door operations: never block, safe from any thread ---------------------------

    def check(self, capability: str | None = None, *, drain: bool = False) -> None:
        verdict = self.verdict
        if verdict is None:
            raise TetherLost("not registered with a coordinator yet")
        if verdict.stop is not None and not (drain and verdict.drain):
            raise verdict.stop.with_traceback(None)  # shared: no traceback may pile up
        confirmed = max(verdict.confirmed_at, self.stream.confirmed_at)
        if time.monotonic() - confirmed > self.ttl:
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
        verdict = self.verdict
        if verdict is not None and verdict.stop is not None:
            self.out.wake_soon()  # stopped: this is the checkpoint a resume starts from

    def _checked(self, checkpoint: Mapping[str, Any]) -> struct_pb2.Struct:
        """Convert now, so that a bad checkpoint fails at the caller, not on the stream."""
        try:
            json.dumps(checkpoint, allow_nan=False)  # JSON values only: no NaN, no infinity
            msg = to_struct(checkpoint)
            # What protobuf cannot parse back (nested too deep), no coordinator could read,
            # as deep as the stream carries it: in a KillAck, in a frame, in a request.
            agent_pb2.MuxRequest.FromString(_as_carried(msg.SerializeToString()))
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

    def end_later(self, end: Callable[[int], None]) -> bool:
        """While a stop is in force, have the link call ``end`` with the time, in one batch
        with the other passes its cancels ended; False: the caller ends its pass now."""
        link = self.link
        return link is not None and self.stops.stop_in_force.is_set() and link.ends.later(end)

    def permit(
        self, capability: str, key: str, *, drain: bool = False
    ) -> Coroutine[Any, Any, agent_pb2.PermitDecision]:
        """Ask the coordinator, over the stream, whether this effect may leave now."""
        return self.out.permit(capability, key, drain, self.ttl)

    # -- lifecycle, on the link's loop --------------------------------------------------------

    async def start(self) -> None:
        """Join the process's link and register; returns once the grant arrived."""
        from tether._link import join  # the link imports this module

        loop = asyncio.get_running_loop()
        self._registered = loop.create_future()
        self._ended = loop.create_future()
        self.link = join(self, loop)
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
        """Say goodbye with the final checkpoint, wait for it to be stored, and leave."""
        if final is not None:
            self.out.latest = self._checked(final)
        link = self.link
        if link is not None:
            link.ends.run()  # the records of passes a kill cancelled go first
        self.closing = True
        if link is not None and link.says_goodbye(self) and self._ended is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._ended), _GOODBYE_TIMEOUT)
            except TimeoutError:
                log.warning("tether: goodbye not confirmed in %ss", _GOODBYE_TIMEOUT)
        if not self.goodbye_confirmed:
            log.warning("tether: the final checkpoint may not be stored (no confirmed goodbye)")
        await self.abort()

    async def abort(self) -> None:
        """Leave the link at once; the stream and the other instances on it go on."""
        self.closing = True
        link, self.link = self.link, None
        if link is not None:
            await link.leave(self)
        self.stream = DEAD
        self.verdict = Verdict(TetherLost("this agent was closed"), 0.0)

    # -- what the link's reader hands over ----------------------------------------------------

    def on_grant(self, stream: Stream, first: agent_pb2.HeartbeatResponse, now: float) -> None:
        """The first reply of a registration on ``stream``: the grant and the order."""
        grant = first.session
        self.ttl = grant.ttl_ms / 1000.0
        self.max_checkpoint_bytes = grant.max_checkpoint_bytes or DEFAULT_MAX_CHECKPOINT_BYTES
        self.out.new_stream()  # the coordinator gets the newest checkpoint and totals at once
        registering = self._registered is not None and not self._registered.done()
        if registering:
            # The stored checkpoint is handed over once, at the first registration; later
            # reconnects keep the run's own newer progress.
            if grant.has_checkpoint:
                self.checkpoint = struct_to_dict(grant.checkpoint)
            self.landed.update(grant.landed_keys)
        self.stream = stream
        halts = tuple(Halt.from_pb(h) for h in first.halts)
        self.apply(first, halts, verdict_of(first, halts, now), grant=True)
        if registering:
            assert self._registered is not None
            self._registered.set_result(None)

    def apply(
        self,
        resp: agent_pb2.HeartbeatResponse,
        halts: tuple[Halt, ...],
        verdict: Verdict,
        *,
        grant: bool = False,
        later: list[Callable[[], None]] | None = None,
        wire: tuple[list[types_pb2.Halt], list[types_pb2.Halt]] | None = None,
    ) -> None:
        """Put the order of a reply in force (the halts and verdict are the reply's).

        With ``later`` (a reply the link dispatches to many instances), a stop's work is
        cancelled now and its acknowledgement appended there; the link wakes the writer.
        ``wire``: the reply's halts as a list, and those that stop, shared by its instances.
        """
        before = self.verdict
        self.halts = halts
        self.verdict = self._applied = verdict
        if wire is None:
            self._stopping = list(resp.halts)
            self.stops.on_order(before, verdict, self._stopping, later)
        else:
            self._stopping = wire[0]
            self.stops.on_order(before, verdict, wire[0], later, stopping=wire[1])
        if resp.HasField("permit"):
            self.out.decided(resp.permit)
        if verdict.stop is not None and later is None:
            self.out.wake_soon()  # send the newest checkpoint now: it is the one to resume from
        if self.config.on_reply is not None:
            self.config.on_reply(verdict, grant)

    def confirmed(self, sent: float) -> bool:
        """A beat sent at ``sent`` was acked: the order last given holds as of then.

        Returns False while this instance stays failed closed (the ack came too late).
        """
        before, applied = self.verdict, self._applied
        if applied is None or before is None:
            return True
        if before is not applied:  # failed closed by the watchdog: the order may hold again
            if time.monotonic() - sent > self.ttl:
                return False
            self.verdict = applied
            self.stops.on_order(before, applied, self._stopping)
        on_reply = self.config.on_reply
        if on_reply is not None:
            on_reply(dataclasses.replace(applied, confirmed_at=sent), False)
        return True

    def lost(self, now: float) -> bool:
        """Fail closed in full when no beat sent within the TTL was confirmed: stop hooks too.

        ``check()`` already refuses past the TTL on its own; this runs the stop hooks.
        Returns True when it did.
        """
        before = self.verdict
        if before is None or before.stop is not None:
            return False
        if now - max(before.confirmed_at, self.stream.confirmed_at) <= self.ttl:
            return False
        stop = TetherLost(f"no confirmed heartbeat reply within the lease TTL ({self.ttl:g}s)")
        self.verdict = dataclasses.replace(before, stop=stop)
        self.stops.on_order(before, self.verdict, [])
        return True

    def on_end(self, code: int, message: str) -> bool:
        """The coordinator ended this instance's session. True when it is over for good
        (a goodbye confirmed, or a refusal that retrying cannot fix); False: register again."""
        self.stream = self.pending = DEAD
        if code == 0 or self.closing:
            self.goodbye_confirmed = code == 0
            self._end()
            return True
        if code not in PERMANENT:
            log.info("tether: session of %s ended (%s); registering again", self.local, message)
            return False
        error = status_error(code, message)
        if self._registered is not None and not self._registered.done():
            self._registered.set_exception(error)
        else:
            self.fail(error)
        self._end()
        return True

    def fail(self, error: TetherError) -> None:
        """Stop for good: the coordinator refused this instance's tether."""
        before = self.verdict
        self.stream = DEAD
        self.verdict = Verdict(TetherLost(f"coordinator refused the tether: {error}"), 0.0)
        self.stops.on_order(before, self.verdict, [])
        log.error("tether: giving up: %s", error)

    @property
    def ended(self) -> bool:
        """True once this instance's session is over for good (goodbye or refusal)."""
        return self._ended is not None and self._ended.done()

    def _end(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def refused(self, error: TetherError) -> None:
        """The whole stream was refused (its credentials): this instance is over."""
        if self._registered is not None and not self._registered.done():
            self._registered.set_exception(error)
        else:
            self.fail(error)
        self._end()
