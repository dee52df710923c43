"""Who is connected: validated identities, the local registry, and presence in etcd.

An instance is present while its presence key lives, on this coordinator's lease. Its
roster record outlives it: that record, written at registration and again at the end,
says how it ended. Three ways out, three names:

- :meth:`Presence.forget_locally`: this coordinator stops serving the session; etcd untouched.
- :meth:`Presence.write_final`: store the final checkpoint and record, delete the presence key.
- :meth:`Presence.declare_stale`: the stream ended without goodbye, so the instance is
  STALE now, not after the TTL (unless the coordinator let go of it on purpose).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from tether.v1 import agent_pb2, types_pb2

from tether_server._checkpoints import CheckpointWriter, RunFlush
from tether_server._errors import InvalidArgument, PermissionDenied, check_name, parse_agent_uri
from tether_server._etcd import EtcdUnavailable, Store
from tether_server._gate import Gate
from tether_server._halts import HaltTable
from tether_server._ledger import decode
from tether_server._outbox import End
from tether_server._registry import Registry, Session
from tether_server._selectors import check_labels
from tether_server._store import (
    HALTS,
    InstanceKey,
    absent,
    checkpoint_key,
    delete_op,
    holds,
    ledger_prefix,
    live_key,
    owner_of,
    put_op,
    range_op,
    roster_key,
    run_owner,
    run_owner_key,
    to_json,
    txn_op,
)
from tether_server._telemetry import Metrics

log = logging.getLogger("tether_server")
# An instance's roster record carries its capabilities and labels; etcd takes 1.5 MiB a
# request, and a fleet's records are read together, so one registration stays small.
MAX_REGISTER_BYTES = 64 * 1024


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _not_owner(key: InstanceKey, kvs: Sequence[Any]) -> PermissionDenied:
    """The refusal; it names the owner only to its own tenant, so that a refusal tells no
    one which runs another tenant has."""
    tenant, agent = owner_of(bytes(kvs[0].value)) if kvs else ("?", "?")
    owner = f"{tenant}/{agent}" if tenant == key.tenant else "another tenant"
    return PermissionDenied(
        f"run {key.run_id!r} belongs to {owner}, which registered it first; "
        f"{key.tenant}/{key.agent} may not register it: use a run_id of its own"
    )


def identity_from(reg: agent_pb2.Register) -> InstanceKey:
    """Validate a registration; raises InvalidArgument with what to fix."""
    if (size := reg.ByteSize()) > MAX_REGISTER_BYTES:
        raise InvalidArgument(
            f"register is {size} bytes; at most {MAX_REGISTER_BYTES} bytes of capabilities "
            "and labels fit an instance's record"
        )
    if reg.agent_uri:
        if reg.tenant or reg.agent:
            raise InvalidArgument("register.agent_uri replaces tenant and agent; send one form")
        tenant, agent = parse_agent_uri(reg.agent_uri)
    else:
        if not reg.tenant or not reg.agent:
            raise InvalidArgument("register needs tenant and agent, or agent_uri")
        tenant = check_name("tenant", reg.tenant)
        agent = check_name("agent", reg.agent)
    # Interned: thousands of sessions share a few tenants and agents, and their keys with them.
    tenant, agent = sys.intern(tenant), sys.intern(agent)
    if not reg.run_id or not reg.instance_id:
        raise InvalidArgument("register needs run_id and instance_id")
    for cap in reg.capabilities:
        check_name("capability", cap)
    for cap in reg.read_capabilities:
        if cap not in reg.capabilities:
            raise InvalidArgument(f"read capability {cap} is not in register.capabilities")
    check_labels(reg.labels)  # as selectors name them, or no halt could match
    return InstanceKey(
        tenant,
        agent,
        check_name("run_id", reg.run_id),
        check_name("instance_id", reg.instance_id),
    )


class Presence:
    """Admits and lets go of sessions, here and in etcd."""

    def __init__(
        self,
        *,
        store: Store,
        halts: HaltTable,
        checkpoints: CheckpointWriter,
        flush: RunFlush,
        gate: Gate,
        metrics: Metrics,
        coordinator_id: str,
    ) -> None:
        self._registry = Registry()
        self._store = store
        self._halts = halts
        self._checkpoints = checkpoints
        self._flush = flush
        self._gate = gate
        self._metrics = metrics
        self._coordinator = coordinator_id

    def get(self, key: InstanceKey) -> Session | None:
        """The session served here for ``key``, if any."""
        return self._registry.get(key)

    def snapshot(self) -> tuple[Session, ...]:
        """Every session served here, as a tuple that survives admissions and departures."""
        return self._registry.snapshot()

    def candidates(self, sel: types_pb2.Selector) -> Iterable[Session]:
        """The sessions served here that ``sel`` may match: a superset, from the indexes."""
        return self._registry.candidates(sel)

    def record(self, key: InstanceKey, reg: agent_pb2.Register) -> types_pb2.AgentInstance:
        """The roster record of an instance registering now."""
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

    async def claim(
        self, key: InstanceKey, record: types_pb2.AgentInstance, session_id: str, lease: int
    ) -> tuple[bytes | None, HaltTable, list[types_pb2.Effect]]:
        """Take the run if it is ours or no one's, write presence and roster, and read the
        run's checkpoint and the halts, atomically: one transaction.

        The halts come from the same transaction, not only from the watch, so that a halt
        committed before registration is in the first reply even if the watch lags.

        Raises:
            PermissionDenied: another tenant or agent registered this run_id first;
                nothing was written and nothing of that run was read.
        """
        reads = [
            range_op(checkpoint_key(key.run)),
            range_op(HALTS, prefix=True),
            range_op(ledger_prefix(*key.run), prefix=True),
        ]
        writes = [
            put_op(live_key(key), session_id.encode(), lease),
            put_op(roster_key(key), to_json(record)),
        ]
        owner, mine = run_owner_key(key.run_id), run_owner(key.run)
        # The claim's second chance, in the same round trip: a nested transaction.
        first_time = txn_op(
            [absent(owner)], [*reads, *writes, put_op(owner, mine)], [range_op(owner)]
        )
        resp = await self._store.txn([holds(owner, mine)], [*reads, *writes], [first_time])
        responses = resp.responses
        if not resp.succeeded:  # not ours yet: taken now, unless someone else has it
            nested = responses[0].response_txn
            if not nested.succeeded:
                raise _not_owner(key, nested.responses[0].response_range.kvs)
            responses = nested.responses
        effects = decode(responses[2].response_range.kvs)
        kvs = responses[0].response_range.kvs
        halts = self._halts
        if resp.header.revision > halts.revision:
            halts = HaltTable()
            halts.load(responses[1].response_range.kvs, resp.header.revision)
        return (bytes(kvs[0].value) if kvs else None), halts, effects

    def admit(self, session: Session) -> None:
        """Serve ``session`` here; a stream it replaces is let go, its presence left alone."""
        replaced = self._registry.add(session)
        if replaced is not None:
            replaced.leave_presence = True
            replaced.outbox.post(End(grpc.StatusCode.ABORTED, "replaced by a newer stream"))
        self._metrics.sessions.add(1)

    def serves_run(self, run_id: str) -> bool:
        """Whether a session of ``run_id`` is open here."""
        return self._registry.serves_run(run_id)

    def forget_locally(self, session: Session) -> bool:
        """Stop serving ``session`` here; False when it was already gone or replaced."""
        if not self._registry.remove(session):
            return False
        self._metrics.sessions.add(-1)
        if not self._registry.serves_run(session.key.run_id):
            self._checkpoints.forget(session.checkpoint_key)
            self._gate.forget(session.key.run)
        return True

    async def declare_stale(self, session: Session) -> None:
        """The stream ended without goodbye: the instance is STALE now, not after the TTL."""
        forgotten = self.forget_locally(session)
        try:
            if forgotten and not session.leave_presence:
                await self.write_final(session)
                self._metrics.stale_declared.add(1)
            else:
                await self._checkpoints.flush([session.checkpoint_key])
        except EtcdUnavailable as err:
            log.warning("could not release %s: %s", "/".join(session.key.parts), err)

    async def write_final(self, session: Session) -> None:
        """Store the final checkpoint and record, and drop presence.

        The record keeps its ACTIVE state when the instance vanished, so readers derive
        STALE from the missing presence key; EXITED and KILLED are written as they are.
        """
        await self._flush.run_now(session.checkpoint_key, session.key.run)
        age = max(time.monotonic() - session.last_beat, 0.0)
        record = session.record()
        record.last_heartbeat.FromNanoseconds(time.time_ns() - int(age * 1e9))
        live = live_key(session.key)
        await self._store.txn(
            [holds(live, session.session_id.encode())],  # a newer stream may own it by now
            [put_op(roster_key(session.key), to_json(record)), delete_op(live)],
        )
