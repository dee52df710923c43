"""AgentService.Heartbeat: one stream, one presence key and one session per agent instance."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from tether._errors import InvalidArgument
from tether.v1 import agent_pb2, types_pb2

from tether_server._acks import AckBook
from tether_server._checkpoints import CheckpointWriter
from tether_server._gate import Gate
from tether_server._halts import HaltTable
from tether_server._leases import LeaseKeeper
from tether_server._ledger import decode
from tether_server._outbox import DONE, End, Outbox, Push
from tether_server._registry import (
    Registry,
    Session,
    any_stop,
    current_order,
    identity_from,
    now_timestamp,
    order,
    with_ack,
)
from tether_server._selectors import matches
from tether_server._store import (
    HALTS,
    EtcdUnavailable,
    InstanceKey,
    Store,
    checkpoint_key,
    delete_op,
    holds,
    ledger_prefix,
    live_key,
    put_op,
    range_op,
    roster_key,
    run_owner_key,
    to_json,
)
from tether_server._telemetry import Metrics

log = logging.getLogger("tether_server")
KILL_FLUSH_DELAY = 0.05  # seconds: long enough to gather a fleet's final checkpoints


class Sessions:
    """Serves AgentService.Heartbeat and pushes orders onto open streams."""

    def __init__(
        self,
        *,
        store: Store,
        halts: HaltTable,
        checkpoints: CheckpointWriter,
        gate: Gate,
        acks: AckBook,
        metrics: Metrics,
        coordinator_id: str,
        lease_ttl: float,
        heartbeat_interval: float,
        max_checkpoint_bytes: int,
    ) -> None:
        self.registry = Registry()
        self.keeper: LeaseKeeper | None = None
        self.serving_error = "coordinator is starting and has not reached etcd yet"
        self._store = store
        self._halts = halts
        self._checkpoints = checkpoints
        self._gate = gate
        self._acks = acks
        self._metrics = metrics
        self._coordinator = coordinator_id
        self._ttl = lease_ttl
        self._interval = heartbeat_interval
        self._max_checkpoint = max_checkpoint_bytes
        self._cleanups: set[asyncio.Task[None]] = set()
        self._serial = itertools.count(1)
        self._flushing: asyncio.Task[None] | None = None

    # -- the stream -------------------------------------------------------------------------

    async def heartbeat(self, requests: AsyncIterator[Any], context: Any) -> None:
        try:
            session = await self._open(requests, context)
        except InvalidArgument as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EtcdUnavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        end = None
        try:
            end = await self._read(session, requests)
            if end is not None:  # None: something else ended the stream
                session.outbox.post(end)
            await session.outbox.close()
        finally:
            if end is not DONE:
                self._spawn(self._drop(session))

    async def _open(self, requests: AsyncIterator[Any], context: Any) -> Session:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument("the stream closed before register was sent") from None
        if first.WhichOneof("body") != "register":
            raise InvalidArgument(
                "the first message of a Heartbeat stream must be register, "
                f"got {first.WhichOneof('body') or 'an empty message'}"
            )
        key = identity_from(first.register)
        keeper = self.keeper
        if keeper is None:
            raise EtcdUnavailable(self.serving_error)
        # Unique: the lease ID names this attachment to etcd; the serial counts its streams.
        session_id = f"{keeper.lease:x}-{next(self._serial):x}"
        record = self._record(key, first.register)
        stored, halts, effects = await self._claim(key, record, session_id, keeper.lease)
        session = Session(key, session_id, record, Outbox(context, self._pushed))
        landed = self._gate.seed(key.run, effects)
        session.halts = tuple(halts.matching(key, record.labels))
        session.revision = halts.revision
        self._checkpoints.seed(session.checkpoint_key, stored)
        if self.keeper is not keeper:  # etcd was lost while this registration was in flight
            raise EtcdUnavailable(self.serving_error)
        replaced = self.registry.add(session)
        if replaced is not None:
            replaced.detached = True
            replaced.outbox.post(End(grpc.StatusCode.ABORTED, "replaced by a newer stream"))
        self._metrics.sessions.add(1)
        grant = self._grant(session, stored)
        grant.session.landed_keys.extend(landed)
        try:
            await session.outbox.first(grant)
        except BaseException:  # the agent went away mid-registration: do not keep its session
            self._spawn(self._drop(session))
            raise
        return session

    def _record(self, key: InstanceKey, reg: agent_pb2.Register) -> types_pb2.AgentInstance:
        return types_pb2.AgentInstance(
            tenant=key.tenant,
            agent=key.agent,
            run_id=key.run_id,
            instance_id=key.instance_id,
            state=types_pb2.INSTANCE_STATE_ACTIVE,
            capabilities=reg.capabilities,
            labels=reg.labels,
            coordinator=self._coordinator,
            registered_at=now_timestamp(),
            last_heartbeat=now_timestamp(),
        )

    async def _claim(
        self, key: InstanceKey, record: types_pb2.AgentInstance, session_id: str, lease: int
    ) -> tuple[bytes | None, HaltTable, list[types_pb2.Effect]]:
        """Write presence and roster, read the run's checkpoint and the halts, atomically.

        The halts come from the same transaction, not only from the watch, so that a halt
        committed before registration is in the first reply even if the watch lags.
        """
        resp = await self._store.txn(
            (),
            [
                put_op(live_key(key), session_id.encode(), lease),
                put_op(roster_key(key), to_json(record)),
                put_op(run_owner_key(key.run_id), f"{key.tenant}/{key.agent}".encode()),
                range_op(checkpoint_key(key.run)),
                range_op(HALTS, prefix=True),
                range_op(ledger_prefix(*key.run), prefix=True),
            ],
        )
        effects = decode(resp.responses[5].response_range.kvs)
        kvs = resp.responses[3].response_range.kvs
        halts = self._halts
        if resp.header.revision > halts.revision:
            halts = HaltTable()
            halts.load(resp.responses[4].response_range.kvs, resp.header.revision)
        return (bytes(kvs[0].value) if kvs else None), halts, effects

    def _grant(self, session: Session, stored: bytes | None) -> agent_pb2.HeartbeatResponse:
        resp = order(session.halts, session.revision)
        grant = resp.session
        grant.session_id = session.session_id
        grant.ttl_ms = int(self._ttl * 1000)
        grant.heartbeat_interval_ms = int(self._interval * 1000)
        grant.coordinator = self._coordinator
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
            async for req in requests:
                kind = req.WhichOneof("body")
                if kind == "beat":
                    await session.outbox.send(self._beat(session, req.beat))
                elif kind == "effects":
                    self._effects(session, req.effects)
                elif kind == "permit":  # decided off the reader: it reads etcd
                    self._spawn(self._permit(session, req.permit))
                elif kind == "ack":
                    self._acks.add(session.key, req.ack)
                    if req.ack.HasField("checkpoint"):
                        self._offer_checkpoint(session, req.ack.checkpoint)
                elif kind == "goodbye":
                    await self._goodbye(session, req.goodbye)
                    end = DONE
                    break
                else:
                    raise InvalidArgument(f"unexpected {kind or 'empty message'} after register")
        except InvalidArgument as err:
            end = End(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EtcdUnavailable as err:
            end = End(grpc.StatusCode.UNAVAILABLE, str(err))
        except (grpc.RpcError, grpc.aio.AbortError) as err:
            # The agent went away, or (aborted) this stream was ended from elsewhere.
            end = None if isinstance(err, grpc.aio.AbortError) else end
        except Exception as err:  # a bug must end the stream, not leave it hanging
            log.exception("heartbeat stream of %s failed", "/".join(session.key.parts))
            end = End(grpc.StatusCode.INTERNAL, f"coordinator error: {type(err).__name__}")
        return end

    def _beat(self, session: Session, beat: agent_pb2.Beat) -> bytes:
        """Take a beat in; return its ack, which repeats the order that holds."""
        session.last_beat = time.monotonic()
        if beat.HasField("checkpoint"):
            self._offer_checkpoint(session, beat.checkpoint)
        return with_ack(current_order(session), beat.seq)

    def _pushed(self, seconds: float) -> None:
        self._metrics.kill_push_latency.record(seconds * 1e3)

    async def _permit(self, session: Session, request: agent_pb2.PermitRequest) -> None:
        decision = await self._gate.decide(session.key, session.record.labels, request)
        resp = order(session.halts, session.revision)
        resp.permit.CopyFrom(decision)
        session.outbox.post(resp)

    def _effects(self, session: Session, batch: agent_pb2.EffectBatch) -> None:
        self._gate.record(session.key, batch)
        if any_stop(session.halts):  # what left before the kill, and what it refused: now
            self._flush_soon()

    def _offer_checkpoint(self, session: Session, checkpoint: Any) -> None:
        size = checkpoint.ByteSize()  # the SDK measures the same way
        if size > self._max_checkpoint:
            raise InvalidArgument(
                f"checkpoint is {size} bytes; the limit is {self._max_checkpoint} bytes. "
                "Store large state elsewhere and checkpoint a reference to it; "
                "the last accepted checkpoint is kept"
            )
        try:
            value = json_format.MessageToJson(checkpoint, indent=None, sort_keys=True).encode()
        except ValueError as err:
            raise InvalidArgument(
                f"checkpoint is not valid JSON ({err}); it was not stored"
            ) from None
        self._checkpoints.offer(session.checkpoint_key, value)
        if any_stop(session.halts):  # killed: this is the checkpoint a resume starts from
            self._flush_soon()

    async def _goodbye(self, session: Session, goodbye: agent_pb2.Goodbye) -> None:
        if goodbye.HasField("checkpoint"):
            self._offer_checkpoint(session, goodbye.checkpoint)
        ended = (
            types_pb2.INSTANCE_STATE_KILLED
            if any_stop(session.halts)
            else types_pb2.INSTANCE_STATE_EXITED
        )
        session.record.state = ended
        session.record.ended_at.GetCurrentTime()
        self._release(session)
        await self._retire(session)

    # -- ending -----------------------------------------------------------------------------

    def _release(self, session: Session) -> bool:
        """Forget a session locally; False when it was already gone or replaced."""
        if not self.registry.remove(session):
            return False
        self._metrics.sessions.add(-1)
        if not self.registry.serves_run(session.key.run_id):
            self._checkpoints.forget(session.checkpoint_key)
            self._gate.forget(session.key.run)
        return True

    async def _drop(self, session: Session) -> None:
        """The stream ended without goodbye: the instance is STALE now, not after the TTL."""
        released = self._release(session)
        try:
            if released and not session.detached:
                await self._retire(session)
                self._metrics.stale_declared.add(1)
            else:
                await self._checkpoints.flush([session.checkpoint_key])
        except EtcdUnavailable as err:
            log.warning("could not release %s: %s", "/".join(session.key.parts), err)

    async def _retire(self, session: Session) -> None:
        """Store the final checkpoint and record, and drop presence.

        The record keeps its ACTIVE state when the instance vanished, so readers derive
        STALE from the missing presence key; EXITED and KILLED are written as they are.
        """
        await self._checkpoints.flush([session.checkpoint_key])
        await self._gate.ledger.flush([session.key.run])
        age = max(time.monotonic() - session.last_beat, 0.0)
        session.record.last_heartbeat.FromNanoseconds(time.time_ns() - int(age * 1e9))
        live = live_key(session.key)
        await self._store.txn(
            [holds(live, session.session_id.encode())],  # a newer stream may own it by now
            [put_op(roster_key(session.key), to_json(session.record)), delete_op(live)],
        )

    def _flush_soon(self) -> None:
        """After a kill, write checkpoints and ledger records at once, but as one batch.

        A kill reaches thousands of sessions in a few milliseconds; one flush per session
        would queue thousands of transactions. One flush a moment later carries them all.
        """
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_all())

    async def _flush_all(self) -> None:
        await asyncio.sleep(KILL_FLUSH_DELAY)
        try:
            await self._checkpoints.flush()
            await self._gate.ledger.flush()
        except EtcdUnavailable as err:
            log.warning("kill-time checkpoint flush deferred: %s", err)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    # -- pushes -----------------------------------------------------------------------------

    def on_halt(self, halt: types_pb2.Halt, since: float) -> None:
        """A halt was put or deleted: push the new order to every instance it touches."""
        revision = self._halts.revision
        payloads: dict[tuple[Any, ...], bytes] = {}  # serialise each distinct order once
        for session in self.registry.candidates(halt.selector):
            labels = session.record.labels
            if not matches(halt.selector, session.key, labels) or session.revision > revision:
                continue  # registration read a newer view than this event; it stands
            halts = tuple(self._halts.matching(session.key, labels))
            ids = tuple((h.id, h.mode) for h in halts)  # a soft halt made hard is news too
            session.revision = revision
            session.order_bytes = None
            if ids == tuple((h.id, h.mode) for h in session.halts):
                continue
            was_running, session.halts = not any_stop(session.halts), halts
            payload = payloads.get(ids)
            if payload is None:
                payload = order(halts, revision).SerializeToString()
                payloads[ids] = payload
            session.order_bytes = payload
            session.outbox.post(Push(payload, since))
            if was_running and any_stop(halts):
                self._metrics.kills_pushed.add(1)
                self._flush_soon()

    def fail_closed(self, reason: str) -> None:
        """etcd is gone: tell every agent to stop, then let go so it finds another coordinator."""
        payload = order((), self._halts.revision, fail_closed=reason).SerializeToString()
        end = End(grpc.StatusCode.UNAVAILABLE, f"coordinator lost etcd ({reason}); reconnect")
        for session in tuple(self.registry.by_key.values()):
            session.detached = True
            session.outbox.post(Push(payload, time.monotonic()))
            session.outbox.post(end)
            self._release(session)

    async def watch_silence(self) -> None:
        """Declare an instance STALE once it has been silent for a whole TTL.

        Ending the stream drops the instance's presence key: STALE is then a fact in etcd.
        """
        period = min(0.5, self._ttl / 8)
        while True:
            await asyncio.sleep(period)
            horizon = time.monotonic() - self._ttl
            for session in tuple(self.registry.by_key.values()):
                if session.last_beat < horizon and not session.ending:
                    session.ending = True
                    session.outbox.post(
                        End(grpc.StatusCode.UNAVAILABLE, f"no heartbeat for {self._ttl:g}s")
                    )

    async def drain(self) -> None:
        """Shutdown: flush checkpoints and let streams go; presence lapses with the lease."""
        for session in tuple(self.registry.by_key.values()):
            session.detached = True
            session.outbox.post(
                End(grpc.StatusCode.UNAVAILABLE, "coordinator shutting down; reconnect")
            )
        try:
            await self._checkpoints.flush()
        except EtcdUnavailable as err:
            log.warning("final checkpoint flush failed: %s", err)
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=2)
