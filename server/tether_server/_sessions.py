"""AgentService: one session and one presence key per agent instance, on either stream.

This module takes what a session sends: registration, beats, effects, permit requests, acks
and goodbye. It reads a Heartbeat stream (one session) itself; a Multiplex stream (many
sessions) is read by ``_mux``, which calls the same per-session steps. Who the caller is
was decided before the stream reached here (``_auth``); whether it may register as what it
asks is ``_rbac``'s call. Who is present lives in ``_presence``;
what is pushed unasked (halts, fail-closed, silence, shutdown) in ``_fanout``; the orders
themselves in ``_orders``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tether.v1 import agent_pb2, types_pb2

from tether_server._acks import AckBook
from tether_server._auth import caller
from tether_server._checkpoints import CheckpointWriter, RunFlush, checked, json_of
from tether_server._config import ServerConfig
from tether_server._errors import ANSWERABLE, InvalidArgument, status_of
from tether_server._etcd import EtcdUnavailable, Store, spawn
from tether_server._fanout import Fanout
from tether_server._gate import Gate
from tether_server._halts import HaltTable
from tether_server._identity import Principal
from tether_server._leases import LeaseKeeper
from tether_server._ledger import LedgerWriter
from tether_server._mux import MuxStream
from tether_server._orders import any_stop, current_order, order_message, with_ack
from tether_server._outbox import DONE, End, Mailbox, Outbox
from tether_server._presence import Presence, identity_from
from tether_server._rbac import check_registration, open_to_anonymous
from tether_server._registry import Clock, Session
from tether_server._store import InstanceKey
from tether_server._tally import Tally
from tether_server._telemetry import Metrics
from tether_server._wire import malformed

log = logging.getLogger("tether_server")
MAX_REGISTERING = 64


def _invalid(why: str) -> End:
    return End(grpc.StatusCode.INVALID_ARGUMENT, why)


def _nobody(register: agent_pb2.Register, metadata: Any) -> None:
    return None


class Sessions:
    """Serves AgentService (Heartbeat and Multiplex) and pushes orders onto open streams."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        store: Store,
        halts: HaltTable,
        checkpoints: CheckpointWriter,
        ledger: LedgerWriter,
        gate: Gate,
        tally: Tally,
        acks: AckBook,
        metrics: Metrics,
    ) -> None:
        self.quiet = asyncio.Event()  # no kill being pushed: see Fanout.quiet
        self.quiet.set()
        self._flush = RunFlush(checkpoints, ledger, self.quiet)
        self._presence = Presence(
            store=store, halts=halts, checkpoints=checkpoints, flush=self._flush, gate=gate,
            metrics=metrics, coordinator_id=config.coordinator_id,
        )  # fmt: skip
        tally.serving = self._presence.serves_run  # the tally keeps an open run's counts
        self._fanout = Fanout(
            presence=self._presence, halts=halts, checkpoints=checkpoints, flush=self._flush,
            metrics=metrics, lease_ttl=config.lease_ttl, quiet=self.quiet,
        )  # fmt: skip
        self._keeper: LeaseKeeper | None = None
        self._serving_error = "coordinator is starting and has not reached etcd yet"
        self._config = config
        self._open_to_anonymous = open_to_anonymous(config)
        self._max_checkpoint = config.max_checkpoint_bytes
        self._checkpoints = checkpoints
        self._gate = gate
        self._tally = tally
        self._acks = acks
        self._metrics = metrics
        self._cleanups: set[asyncio.Task[None]] = set()
        self._serial = itertools.count(1)
        # Registrations in etcd at once. Thousands of streams arriving together would
        # otherwise queue thousands of transactions ahead of the lease keep-alive, and a
        # fleet would fail closed for a registration storm.
        self._registering = asyncio.Semaphore(MAX_REGISTERING)
        # The instance a registration outside the name rules may be (the canary); None: none.
        self.admits: Callable[[agent_pb2.Register, Any], InstanceKey | None] = _nobody

    # -- the coordinator's side -------------------------------------------------------------

    def attach(self, keeper: LeaseKeeper) -> None:
        """Serve registrations on ``keeper``'s lease: the coordinator holds etcd again."""
        self._keeper = keeper

    @property
    def serving(self) -> bool:
        """Whether registrations are served: attached to etcd, and not lost since."""
        return self._keeper is not None

    def lose(self, reason: str) -> None:
        """etcd is lost: refuse registrations, stop every agent and let its stream go."""
        self._keeper = None
        self._serving_error = f"coordinator lost etcd ({reason}); try another coordinator"
        self._fanout.fail_closed(reason)

    def on_halt(self, halt: types_pb2.Halt, since: float) -> None:
        """A halt was put or deleted: queue the new order for every instance it touches."""
        self._fanout.on_halt(halt, since)

    async def push_halts(self) -> None:
        """Push the queued halts' orders, in order, without starving the loop."""
        await self._fanout.run()

    async def watch_silence(self) -> None:
        """Declare an instance STALE once it has been silent for a whole TTL."""
        await self._fanout.watch_silence()

    async def drain(self) -> None:
        """Shutdown: flush checkpoints and let streams go; presence lapses with the lease."""
        await self._fanout.drain()
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=2)

    def last_beat(self, key: InstanceKey) -> float | None:
        """The ``time.monotonic()`` of the instance's last beat, if this coordinator serves it."""
        session = self._presence.get(key)
        return None if session is None else session.last_beat

    # -- the stream -------------------------------------------------------------------------

    async def heartbeat(self, requests: AsyncIterator[Any], context: Any) -> None:
        """Serve one Heartbeat stream: register, then beats and the rest until it ends."""
        try:
            session = await self._open(requests, context, caller())
        except ANSWERABLE as err:
            await context.abort(status_of(err), str(err))
        end = None
        try:
            end = await self._read(session, requests)
            if end is not None:  # None: something else ended the stream
                session.outbox.post(end)
            await session.outbox.close()
        finally:
            if end is not DONE:
                self.let_go(session)

    async def multiplex(self, requests: AsyncIterator[Any], context: Any) -> None:
        """Serve one Multiplex stream: any number of instances, each a session of its own."""
        await MuxStream(self, context, caller()).serve(requests)

    async def _open(self, requests: AsyncIterator[Any], context: Any, who: Principal) -> Session:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument("the stream closed before register was sent") from None
        except DecodeError as err:
            raise InvalidArgument(malformed(err)) from None
        kind = "beat" if isinstance(first, int) else first.WhichOneof("body")
        if kind != "register":
            raise InvalidArgument(
                "the first message of a Heartbeat stream must be register, "
                f"got {kind or 'an empty message'}"
            )
        outbox = Outbox(context, self.pushed)
        return await self.register(first.register, context.invocation_metadata(), who, outbox)

    # -- one session's steps, whichever stream carries it -----------------------------------

    async def register(
        self,
        register: agent_pb2.Register,
        metadata: Any,
        who: Principal,
        outbox: Mailbox,
        clock: Clock | None = None,
    ) -> Session:
        """Check, claim and admit one instance, and write its grant through ``outbox``.

        Raises:
            InvalidArgument, PermissionDenied: a registration to fix; nothing was written.
            EtcdUnavailable: the coordinator does not hold etcd now.
        """
        admitted = self.admits(register, metadata)
        key = admitted or identity_from(register)
        if admitted is None:
            # before anything is written or read for the run
            check_registration(who, key, open_=self._open_to_anonymous)
        keeper = self._keeper
        if keeper is None:
            raise EtcdUnavailable(self._serving_error)
        # Unique: the lease ID names this attachment to etcd; the serial counts its sessions.
        session_id = f"{keeper.lease:x}-{next(self._serial):x}"
        record = self._presence.record(key, register)
        lease = keeper.lease
        async with self._registering:
            stored, halts, effects = await self._presence.claim(key, record, session_id, lease)
        session = Session(key, session_id, record, outbox, clock)
        if register.read_capabilities:  # else the shared empty default
            session.reads = frozenset(register.read_capabilities)
        landed = self._gate.seed(key.run, effects)
        session.halts = tuple(halts.matching(key, session.labels))
        session.revision = halts.revision
        self._checkpoints.seed(session.checkpoint_key, stored)
        if self._keeper is not keeper:  # etcd was lost while this registration was in flight
            raise EtcdUnavailable(self._serving_error)
        self._presence.admit(session)
        grant = self._grant(session, stored)
        grant.session.landed_keys.extend(landed)
        try:
            await session.outbox.first(grant)
        except BaseException:  # the agent went away mid-registration: do not keep its session
            self.let_go(session)
            raise
        return session

    def let_go(self, session: Session) -> None:
        """The session ended without goodbye (its stream did, or it alone): it is STALE now."""
        spawn(self._cleanups, self._presence.declare_stale(session))

    def take(self, session: Session, req: agent_pb2.HeartbeatRequest) -> agent_pb2.Goodbye | None:
        """Take one message after register. A beat's checkpoint and signals are taken here;
        its ack is the transport's. A goodbye is returned: end the session with :meth:`leave`.

        Raises:
            InvalidArgument: a message out of place, or a checkpoint to fix.
        """
        kind = req.WhichOneof("body")
        if kind == "beat":
            self._absorb(session, req.beat)
        elif kind == "effects":
            self._effects(session, req.effects)
        elif kind == "permit":  # decided off the reader: it reads etcd
            spawn(self._cleanups, self._permit(session, req.permit))
        elif kind == "ack":
            self._ack(session, req.ack)
        elif kind == "goodbye":
            return req.goodbye
        else:
            raise InvalidArgument(f"unexpected {kind or 'empty message'} after register")
        return None

    def _grant(self, session: Session, stored: bytes | None) -> agent_pb2.HeartbeatResponse:
        resp = order_message(session.halts, session.revision)
        grant = resp.session
        grant.session_id = session.session_id
        grant.ttl_ms = int(self._config.lease_ttl * 1000)
        grant.heartbeat_interval_ms = int(self._config.heartbeat_interval * 1000)
        grant.coordinator = self._config.coordinator_id
        grant.max_checkpoint_bytes = self._max_checkpoint
        if stored is not None:
            json_format.Parse(stored, grant.checkpoint)
            grant.has_checkpoint = True
        return resp

    async def _read(self, session: Session, requests: AsyncIterator[Any]) -> End | None:
        end: End | None = End(
            grpc.StatusCode.CANCELLED, "the agent closed its side without goodbye"
        )
        try:
            quiet = self.quiet
            async for req in requests:
                if isinstance(req, int):  # a bare beat, not parsed (_wire.beat_request)
                    session.last_beat = time.monotonic()
                    await session.outbox.send(with_ack(current_order(session), req))
                    continue
                if req.WhichOneof("body") == "beat":
                    await session.outbox.send(self._beat(session, req.beat))
                    continue
                if not quiet.is_set():
                    await quiet.wait()  # a kill is being pushed: its streams go first
                if (goodbye := self.take(session, req)) is not None:
                    await self.leave(session, goodbye)
                    end = DONE
                    break
        except ANSWERABLE as err:
            end = End(status_of(err), str(err))
        except DecodeError as err:  # parsed message by message, here, not at the edge
            end = End(grpc.StatusCode.INVALID_ARGUMENT, malformed(err))
        except (grpc.RpcError, grpc.aio.AbortError) as err:
            # The agent went away, or (aborted) this stream was ended from elsewhere.
            end = None if isinstance(err, grpc.aio.AbortError) else end
        except Exception as err:  # a bug must end the stream, not leave it hanging
            log.exception("heartbeat stream of %s failed", "/".join(session.key.parts))
            end = End(grpc.StatusCode.INTERNAL, f"coordinator error: {type(err).__name__}")
        return end

    def _ack(self, session: Session, ack: agent_pb2.KillAck) -> None:
        """Audit an acknowledgement only of a halt the instance is under: an agent must not
        write stops that never happened, in its own audit or another tenant's."""
        if any(h.id == ack.halt_id for h in session.halts):
            self._acks.add(session.key, ack)
        if ack.HasField("checkpoint"):
            self._offer_checkpoint(session, ack.checkpoint, later=True)

    def _beat(self, session: Session, beat: agent_pb2.Beat) -> bytes:
        """Take a beat in; return its ack, which repeats the order that holds."""
        session.last_beat = time.monotonic()
        self._absorb(session, beat)
        return with_ack(current_order(session), beat.seq)

    def _absorb(self, session: Session, beat: agent_pb2.Beat) -> None:
        if beat.HasField("checkpoint"):
            self._offer_checkpoint(session, beat.checkpoint)
        if beat.HasField("signals"):
            self._tally.signal(session.key, beat.signals)

    def pushed(self, seconds: float) -> None:
        """Record how long a pushed order took from its watch event to the stream."""
        self._metrics.kill_push_duration.record(seconds)

    async def _permit(self, session: Session, request: agent_pb2.PermitRequest) -> None:
        decision = await self._gate.decide(session.key, session.labels, request, session.reads)
        resp = order_message(session.halts, session.revision)
        resp.permit.CopyFrom(decision)
        session.outbox.post(resp)

    def _effects(self, session: Session, batch: agent_pb2.EffectBatch) -> None:
        self._gate.record(session.key, batch, session.reads)
        if any_stop(session.halts):  # what left before the kill, and what it refused: now
            self._flush.soon()

    def _offer_checkpoint(self, session: Session, checkpoint: Any, *, later: bool = False) -> None:
        checkpoint = checked(checkpoint, self._max_checkpoint)
        key = session.checkpoint_key
        if later:  # a kill's ack: made JSON at the flush, not while the kill is pushed
            end = session.outbox.post
            self._checkpoints.offer_later(key, checkpoint, lambda why: end(_invalid(why)))
        else:
            self._checkpoints.offer(key, json_of(checkpoint))
        if any_stop(session.halts):  # killed: this is the checkpoint a resume starts from
            self._flush.soon()

    async def leave(self, session: Session, goodbye: agent_pb2.Goodbye) -> None:
        """Goodbye: store the final checkpoint and record; the session has ended.

        Raises:
            InvalidArgument: the final checkpoint is to fix; nothing was written.
        """
        if goodbye.HasField("checkpoint"):
            self._offer_checkpoint(session, goodbye.checkpoint)
        ended = (
            types_pb2.INSTANCE_STATE_KILLED
            if any_stop(session.halts)
            else types_pb2.INSTANCE_STATE_EXITED
        )
        record = session.record()
        record.state = ended
        record.ended_at.GetCurrentTime()
        session.keep(record)
        self._presence.forget_locally(session)
        await self._presence.write_final(session)
