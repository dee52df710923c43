"""AgentService.Heartbeat: one stream, one lease and one session per agent instance."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from tether._errors import InvalidArgument
from tether._uri import check_name, parse_agent_uri
from tether.v1 import agent_pb2, types_pb2

from tether_server._acks import AckBook
from tether_server._checkpoints import CheckpointWriter
from tether_server._gate import Gate
from tether_server._halts import HaltTable
from tether_server._leases import LeaseKeeper
from tether_server._ledger import decode, run_prefix
from tether_server._selectors import InstanceKey, is_full_stop, matches
from tether_server._store import (
    CHECKPOINTS,
    HALTS,
    LIVE,
    ROSTER,
    RUNS,
    EtcdUnavailable,
    Store,
    delete_op,
    leased_by,
    path,
    put_op,
    range_op,
    to_json,
)
from tether_server._telemetry import Metrics

log = logging.getLogger("tether_server")


@dataclass(frozen=True, slots=True)
class _Push:
    """A pushed order, timed from the watch event that caused it."""

    payload: bytes
    since: float


@dataclass(frozen=True, slots=True)
class _End:
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""


_DONE = _End()


class Session:
    """One connected instance. Slotted: a coordinator holds thousands."""

    __slots__ = (
        "checkpoint_key",
        "detached",
        "ending",
        "halts",
        "key",
        "last_beat",
        "lease",
        "outbox",
        "record",
        "revision",
    )

    def __init__(self, key: InstanceKey, lease: int, record: types_pb2.AgentInstance) -> None:
        self.key = key
        self.lease = lease
        self.record = record
        self.checkpoint_key = path(CHECKPOINTS, key.tenant, key.agent, key.run_id)
        self.last_beat = time.monotonic()
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.halts: tuple[types_pb2.Halt, ...] = ()  # the order last sent: these halts match
        self.revision = 0  # the etcd revision that order reflects
        self.detached = False  # the coordinator let go of it; leave its lease alone
        self.ending = False  # its end is queued


class Registry:
    """Open sessions, indexed so that a halt finds its instances without a full scan."""

    def __init__(self) -> None:
        self.by_key: dict[InstanceKey, Session] = {}
        self._by_tenant: dict[str, set[Session]] = {}
        self._by_run: dict[str, set[Session]] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def add(self, session: Session) -> Session | None:
        old = self.by_key.get(session.key)
        if old is not None:
            self.remove(old)
        self.by_key[session.key] = session
        self._by_tenant.setdefault(session.key.tenant, set()).add(session)
        self._by_run.setdefault(session.key.run_id, set()).add(session)
        return old

    def remove(self, session: Session) -> bool:
        if self.by_key.get(session.key) is not session:
            return False
        del self.by_key[session.key]
        _discard(self._by_tenant, session.key.tenant, session)
        _discard(self._by_run, session.key.run_id, session)
        return True

    def serves_run(self, run_id: str) -> bool:
        return run_id in self._by_run

    def candidates(self, sel: types_pb2.Selector) -> Iterable[Session]:
        if sel.run_id:
            return tuple(self._by_run.get(sel.run_id, ()))
        if sel.tenant:
            return tuple(self._by_tenant.get(sel.tenant, ()))
        return tuple(self.by_key.values())


def _discard(index: dict[str, set[Session]], name: str, session: Session) -> None:
    members = index.get(name)
    if members is not None:
        members.discard(session)
        if not members:
            del index[name]


def order(
    halts: Iterable[types_pb2.Halt], revision: int, *, ack_seq: int = 0, fail_closed: str = ""
) -> agent_pb2.HeartbeatResponse:
    halts = list(halts)
    stop = stopped(halts) or bool(fail_closed)
    return agent_pb2.HeartbeatResponse(
        order=agent_pb2.ORDER_STOP if stop else agent_pb2.ORDER_RUN,
        halts=halts,
        ack_seq=ack_seq,
        revision=revision,
        fail_closed_reason=fail_closed,
    )


def stopped(halts: Iterable[types_pb2.Halt]) -> bool:
    """True when a halt stops the whole instance, not just one capability."""
    return any(map(is_full_stop, halts))


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def identity_from(reg: agent_pb2.Register) -> InstanceKey:
    """Validate a registration; raises InvalidArgument with what to fix."""
    if reg.agent_uri:
        if reg.tenant or reg.agent:
            raise InvalidArgument("register.agent_uri replaces tenant and agent; send one form")
        tenant, agent = parse_agent_uri(reg.agent_uri)
    else:
        if not reg.tenant or not reg.agent:
            raise InvalidArgument("register needs tenant and agent, or agent_uri")
        tenant, agent = check_name("tenant", reg.tenant), check_name("agent", reg.agent)
    if not reg.run_id or not reg.instance_id:
        raise InvalidArgument("register needs run_id and instance_id")
    for cap in reg.capabilities:
        check_name("capability", cap)
    return InstanceKey(
        tenant, agent, check_name("run_id", reg.run_id), check_name("instance_id", reg.instance_id)
    )


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

    # -- the stream -------------------------------------------------------------------------

    async def heartbeat(self, requests: AsyncIterator[Any], context: Any) -> None:
        try:
            session = await self._open(requests, context)
        except InvalidArgument as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EtcdUnavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        reader = asyncio.create_task(self._read(session, requests))
        clean = False
        try:
            while True:
                item = await session.outbox.get()
                if isinstance(item, _End):
                    clean = item.code == grpc.StatusCode.OK
                    if not clean:
                        await context.abort(item.code, item.details)
                    return
                if isinstance(item, _Push):
                    await context.write(item.payload)
                    self._metrics.kill_push_latency.record((time.monotonic() - item.since) * 1e3)
                else:
                    await context.write(item)
        finally:
            reader.cancel()
            if not clean:
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
        lease, ttl = await self._store.grant(self._ttl)
        record = self._record(key, first.register, lease)
        stored, halts, effects = await self._claim(key, record, lease)
        session = Session(key, lease, record)
        landed = self._gate.seed((key.tenant, key.agent, key.run_id), effects)
        session.halts = tuple(halts.matching(key, record.labels))
        session.revision = halts.revision
        self._checkpoints.seed(session.checkpoint_key, stored)
        if self.keeper is not keeper:  # etcd was lost while this registration was in flight
            raise EtcdUnavailable(self.serving_error)
        replaced = self.registry.add(session)
        if replaced is not None:
            replaced.detached = True
            replaced.outbox.put_nowait(_End(grpc.StatusCode.ABORTED, "replaced by a newer stream"))
        self._metrics.sessions.add(1)
        keeper.touch(lease)
        grant = self._grant(session, ttl, stored)
        grant.session.landed_keys.extend(landed)
        await context.write(grant)
        return session

    def _record(
        self, key: InstanceKey, reg: agent_pb2.Register, lease: int
    ) -> types_pb2.AgentInstance:
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
        self, key: InstanceKey, record: types_pb2.AgentInstance, lease: int
    ) -> tuple[bytes | None, HaltTable, list[types_pb2.Effect]]:
        """Write presence and roster, read the run's checkpoint and the halts, atomically.

        The halts come from the same transaction, not only from the watch, so that a halt
        committed before registration is in the first reply even if the watch lags.
        """
        checkpoint_key = path(CHECKPOINTS, key.tenant, key.agent, key.run_id)
        resp = await self._store.txn(
            (),
            [
                put_op(path(LIVE, *key.parts), f"{lease:x}".encode(), lease),
                put_op(path(ROSTER, *key.parts), to_json(record)),
                put_op(path(RUNS, key.run_id), f"{key.tenant}/{key.agent}".encode()),
                range_op(checkpoint_key),
                range_op(HALTS, prefix=True),
                range_op(run_prefix((key.tenant, key.agent, key.run_id)), prefix=True),
            ],
        )
        effects = decode(resp.responses[5].response_range.kvs)
        kvs = resp.responses[3].response_range.kvs
        halts = self._halts
        if resp.header.revision > halts.revision:
            halts = HaltTable()
            halts.load(resp.responses[4].response_range.kvs, resp.header.revision)
        return (bytes(kvs[0].value) if kvs else None), halts, effects

    def _grant(
        self, session: Session, ttl: float, stored: bytes | None
    ) -> agent_pb2.HeartbeatResponse:
        resp = order(session.halts, session.revision)
        grant = resp.session
        grant.session_id = f"{session.lease:x}"
        grant.ttl_ms = int(ttl * 1000)
        grant.heartbeat_interval_ms = int(self._interval * 1000)
        grant.coordinator = self._coordinator
        grant.max_checkpoint_bytes = self._max_checkpoint
        if stored is not None:
            json_format.Parse(stored, grant.checkpoint)
            grant.has_checkpoint = True
        return resp

    async def _read(self, session: Session, requests: AsyncIterator[Any]) -> None:
        end = _End(grpc.StatusCode.CANCELLED, "the agent closed its side without goodbye")
        try:
            async for req in requests:
                kind = req.WhichOneof("body")
                if kind == "beat":
                    self._beat(session, req.beat)
                elif kind == "effects":
                    self._effects(session, req.effects)
                elif kind == "permit":
                    resp = order(session.halts, session.revision)
                    resp.permit.CopyFrom(
                        self._gate.decide(session.key, session.record.labels, req.permit)
                    )
                    session.outbox.put_nowait(resp)
                elif kind == "ack":
                    self._acks.add(session.key, req.ack)
                    if req.ack.HasField("checkpoint"):
                        self._offer_checkpoint(session, req.ack.checkpoint)
                elif kind == "goodbye":
                    await self._goodbye(session, req.goodbye)
                    end = _DONE
                    break
                else:
                    raise InvalidArgument(f"unexpected {kind or 'empty message'} after register")
        except InvalidArgument as err:
            end = _End(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except EtcdUnavailable as err:
            end = _End(grpc.StatusCode.UNAVAILABLE, str(err))
        except grpc.RpcError:
            pass
        session.outbox.put_nowait(end)

    def _beat(self, session: Session, beat: agent_pb2.Beat) -> None:
        session.last_beat = time.monotonic()
        if self.keeper is not None:
            self.keeper.touch(session.lease)
        if beat.HasField("checkpoint"):
            self._offer_checkpoint(session, beat.checkpoint)
        # An ack repeats the session's current order: what was last pushed is what holds.
        session.outbox.put_nowait(order(session.halts, session.revision, ack_seq=beat.seq))

    def _effects(self, session: Session, batch: agent_pb2.EffectBatch) -> None:
        self._gate.record(session.key, batch)
        if stopped(session.halts):  # what left before the kill, and what it refused: now
            self._spawn(self._flush(session))

    def _offer_checkpoint(self, session: Session, checkpoint: Any) -> None:
        value = json_format.MessageToJson(checkpoint, indent=None, sort_keys=True).encode()
        if len(value) > self._max_checkpoint:
            raise InvalidArgument(
                f"checkpoint is {len(value)} bytes as JSON; the limit is {self._max_checkpoint} "
                "bytes. Store large state elsewhere and checkpoint a reference to it; "
                "the last accepted checkpoint is kept"
            )
        self._checkpoints.offer(session.checkpoint_key, value)
        if stopped(session.halts):  # killed: this is the checkpoint a resume starts from
            self._spawn(self._flush(session))

    async def _goodbye(self, session: Session, goodbye: agent_pb2.Goodbye) -> None:
        if goodbye.HasField("checkpoint"):
            self._offer_checkpoint(session, goodbye.checkpoint)
        ended = (
            types_pb2.INSTANCE_STATE_KILLED
            if stopped(session.halts)
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
        if self.keeper is not None:
            self.keeper.forget(session.lease)
        if not self.registry.serves_run(session.key.run_id):
            self._checkpoints.forget(session.checkpoint_key)
            self._gate.forget((session.key.tenant, session.key.agent, session.key.run_id))
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
        """Store the final checkpoint and record, drop presence, and give the lease back.

        The record keeps its ACTIVE state when the instance vanished, so readers derive
        STALE from the missing presence key; EXITED and KILLED are written as they are.
        """
        await self._checkpoints.flush([session.checkpoint_key])
        await self._gate.ledger.flush([(session.key.tenant, session.key.agent, session.key.run_id)])
        age = max(time.monotonic() - session.last_beat, 0.0)
        session.record.last_heartbeat.FromNanoseconds(time.time_ns() - int(age * 1e9))
        live = path(LIVE, *session.key.parts)
        await self._store.txn(
            [leased_by(live, session.lease)],  # a newer stream may own the instance by now
            [put_op(path(ROSTER, *session.key.parts), to_json(session.record)), delete_op(live)],
        )
        await self._store.revoke(session.lease)

    async def _flush(self, session: Session) -> None:
        try:
            await self._checkpoints.flush([session.checkpoint_key])
            await self._gate.ledger.flush(
                [(session.key.tenant, session.key.agent, session.key.run_id)]
            )
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
        payloads: dict[tuple[str, ...], bytes] = {}  # serialise each distinct order once
        for session in self.registry.candidates(halt.selector):
            labels = session.record.labels
            if not matches(halt.selector, session.key, labels) or session.revision > revision:
                continue  # registration read a newer view than this event; it stands
            halts = tuple(self._halts.matching(session.key, labels))
            ids = tuple(h.id for h in halts)
            session.revision = revision
            if ids == tuple(h.id for h in session.halts):
                continue
            was_running, session.halts = not stopped(session.halts), halts
            payload = payloads.get(ids)
            if payload is None:
                payload = order(halts, revision).SerializeToString()
                payloads[ids] = payload
            session.outbox.put_nowait(_Push(payload, since))
            if was_running and stopped(halts):
                self._metrics.kills_pushed.add(1)
                self._spawn(self._flush(session))

    def fail_closed(self, reason: str) -> None:
        """etcd is gone: tell every agent to stop, then let go so it finds another coordinator."""
        payload = order((), self._halts.revision, fail_closed=reason).SerializeToString()
        end = _End(grpc.StatusCode.UNAVAILABLE, f"coordinator lost etcd ({reason}); reconnect")
        for session in tuple(self.registry.by_key.values()):
            session.detached = True
            session.outbox.put_nowait(_Push(payload, time.monotonic()))
            session.outbox.put_nowait(end)
            self._release(session)

    def expire(self, lease: int) -> None:
        """etcd says a session's lease is gone: end that stream so the agent re-registers."""
        for session in tuple(self.registry.by_key.values()):
            if session.lease == lease:
                self._metrics.stale_declared.add(1)
                session.outbox.put_nowait(
                    _End(grpc.StatusCode.UNAVAILABLE, "session lease expired; register again")
                )

    async def watch_silence(self) -> None:
        """Declare an instance STALE once it has been silent for a whole TTL.

        The lease would lapse on its own, but only up to a renewal round later; this is
        the coordinator's own, sooner timer.
        """
        period = min(0.5, self._ttl / 8)
        while True:
            await asyncio.sleep(period)
            horizon = time.monotonic() - self._ttl
            for session in tuple(self.registry.by_key.values()):
                if session.last_beat < horizon and not session.ending:
                    session.ending = True
                    session.outbox.put_nowait(
                        _End(grpc.StatusCode.UNAVAILABLE, f"no heartbeat for {self._ttl:g}s")
                    )

    async def drain(self) -> None:
        """Shutdown: flush checkpoints and let streams go; leases lapse if nobody takes over."""
        for session in tuple(self.registry.by_key.values()):
            session.detached = True
            session.outbox.put_nowait(
                _End(grpc.StatusCode.UNAVAILABLE, "coordinator shutting down; reconnect")
            )
        try:
            await self._checkpoints.flush()
        except EtcdUnavailable as err:
            log.warning("final checkpoint flush failed: %s", err)
        if self._cleanups:
            await asyncio.wait(self._cleanups, timeout=2)
