"""The fleet as operators see it: instance states derived from roster, presence and halts.

``Fleet`` is the pure part: given keys and watch events it says each instance's state.
``FleetReader`` reads it from etcd for ListAgents, GetAgent and WatchAgents, so that every
coordinator answers the same, and overlays the exact last heartbeat of the instances this
coordinator serves.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Protocol

from google.protobuf import json_format
from tether.v1 import admin_pb2, types_pb2

from tether_server._canary import hidden
from tether_server._errors import FailedPrecondition, NotFound
from tether_server._etcd import Store
from tether_server._halts import HaltTable
from tether_server._orders import any_stop
from tether_server._selectors import EMPTY
from tether_server._store import (
    CHECKPOINTS,
    FLEET,
    HALTS,
    LIVE,
    ROSTER,
    InstanceKey,
    RunKey,
    checkpoint_prefix,
    from_json,
    instance_of,
    prefix_end,
    range_op,
    run_of_checkpoint,
)
from tether_server._watch import watch_prefix

_ENDED = (types_pb2.INSTANCE_STATE_EXITED, types_pb2.INSTANCE_STATE_KILLED)


class Fleet:
    """Roster, presence and halts at one etcd revision, kept current by watch events."""

    def __init__(self) -> None:
        self.roster: dict[InstanceKey, types_pb2.AgentInstance] = {}
        self.live: set[InstanceKey] = set()
        self.halts = HaltTable()
        self.checkpoints: dict[RunKey, bytes] = {}
        self.revision = 0

    def load(self, kvs: Iterable[Any], revision: int) -> None:
        halts = []
        for kv in kvs:
            if kv.key.startswith(HALTS):
                halts.append(kv)
            else:
                self._put(kv)
        self.halts.load(halts, revision)
        self.revision = revision

    def _put(self, kv: Any) -> None:
        if (key := instance_of(kv.key)) is not None:
            if kv.key.startswith(ROSTER):
                self.roster[key] = from_json(kv.value, types_pb2.AgentInstance())
            else:
                self.live.add(key)
        elif (run := run_of_checkpoint(kv.key)) is not None:
            self.checkpoints[run] = bytes(kv.value)

    def apply(self, event: Any) -> set[InstanceKey] | None:
        """Apply one watch event; return the instances it may change, None for all of them."""
        kv = event.kv
        if kv.key.startswith(HALTS):
            self.halts.apply(event)
            return None
        if event.type == event.PUT:
            self._put(kv)
        key = instance_of(kv.key)
        if key is None:
            return set()
        if event.type != event.PUT:
            if kv.key.startswith(LIVE):
                self.live.discard(key)
            else:
                self.roster.pop(key, None)
        return {key}

    def _matching(
        self, key: InstanceKey, record: types_pb2.AgentInstance | None
    ) -> list[types_pb2.Halt]:
        return self.halts.matching(key, record.labels if record is not None else EMPTY)

    def state(self, key: InstanceKey) -> int:
        record = self.roster.get(key)
        return self._state(key, record, self._matching(key, record) if key in self.live else [])

    def _state(
        self, key: InstanceKey, record: types_pb2.AgentInstance | None, halts: list[types_pb2.Halt]
    ) -> int:
        """The instance's state, given the halts that apply to it (needed only while live)."""
        if key in self.live:
            halted = any_stop(halts)
            return types_pb2.INSTANCE_STATE_KILLED if halted else types_pb2.INSTANCE_STATE_ACTIVE
        if record is not None and record.state in _ENDED:
            return record.state
        return types_pb2.INSTANCE_STATE_STALE

    def instance(
        self, key: InstanceKey, *, with_checkpoint: bool = True
    ) -> types_pb2.AgentInstance:
        out = types_pb2.AgentInstance()
        record = self.roster.get(key)
        if record is not None:
            out.CopyFrom(record)
        else:  # presence without roster: registered by a coordinator mid-write
            out.tenant, out.agent, out.run_id, out.instance_id = key.parts
        halts = self._matching(key, record)
        out.state = self._state(key, record, halts)  # type: ignore[assignment]
        out.halts.extend(halts)
        stored = self.checkpoints.get(key.run)
        if with_checkpoint and stored is not None:
            json_format.Parse(stored, out.checkpoint)
        return out

    def knows(self, key: InstanceKey) -> bool:
        """False once an instance is gone from etcd entirely: its ended record was pruned."""
        return key in self.roster or key in self.live

    def ordered(self) -> Iterator[InstanceKey]:
        yield from sorted(set(self.roster) | self.live)


LastBeat = Callable[[InstanceKey], float | None]
"""``time.monotonic()`` of an instance's last beat on this coordinator; None if not served here."""


class _Filter(Protocol):
    """What the fleet requests narrow by: '' for a field matches everything."""

    @property
    def tenant(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def run_id(self) -> str: ...


def _wanted(request: _Filter, key: InstanceKey) -> bool:
    return (
        not hidden(key.tenant, request.tenant)  # the canaries, unless asked for
        and (not request.tenant or request.tenant == key.tenant)
        and (not request.agent or request.agent == key.agent)
        and (not request.run_id or request.run_id == key.run_id)
    )


def _changes(fleet: Fleet, events: Iterable[Any]) -> tuple[set[InstanceKey], set[RunKey]]:
    """Apply watch events; return the instances they may change and the runs checkpointed."""
    touched: set[InstanceKey] = set()
    runs: set[RunKey] = set()
    for event in events:
        keys = fleet.apply(event)
        touched |= set(fleet.ordered()) if keys is None else keys
        if (run := run_of_checkpoint(event.kv.key)) is not None:
            runs.add(run)
    if runs:
        touched |= {k for k in fleet.ordered() if k.run in runs}
    return touched, runs


class FleetReader:
    """Reads the fleet from etcd; instances served here get their exact last heartbeat."""

    def __init__(self, store: Store, last_beat: LastBeat) -> None:
        self._store = store
        self._last_beat = last_beat

    async def snapshot(self, tenant: str = "") -> Fleet:
        """Roster, presence, halts and (the tenant's) checkpoints at one revision."""
        checkpoints = checkpoint_prefix(tenant)
        resp = await self._store.txn(
            (), [range_op(FLEET, prefix=True), range_op(checkpoints, prefix=True)]
        )
        fleet = Fleet()
        kvs = [*resp.responses[0].response_range.kvs, *resp.responses[1].response_range.kvs]
        fleet.load(kvs, resp.header.revision)
        return fleet

    def _overlay(
        self, key: InstanceKey, instance: types_pb2.AgentInstance
    ) -> types_pb2.AgentInstance:
        beat = self._last_beat(key)
        if beat is not None:
            age = time.monotonic() - beat
            instance.last_heartbeat.FromNanoseconds(time.time_ns() - int(max(age, 0) * 1e9))
        return instance

    async def agents(self, request: admin_pb2.ListAgentsRequest) -> admin_pb2.ListAgentsResponse:
        """Every instance the request's tenant, agent, run and state select."""
        fleet = await self.snapshot(request.tenant)
        out = admin_pb2.ListAgentsResponse(revision=fleet.revision)
        for key in fleet.ordered():
            if _wanted(request, key) and (not request.state or request.state == fleet.state(key)):
                out.agents.append(self._overlay(key, fleet.instance(key)))
        return out

    async def agent(self, request: admin_pb2.GetAgentRequest) -> types_pb2.AgentInstance:
        """The one instance of a run (or the named instance of it).

        Raises:
            NotFound: no such instance.
            FailedPrecondition: the run has several instances and none was named.
        """
        fleet = await self.snapshot(request.tenant)
        found = [k for k in fleet.ordered() if _wanted(request, k)]
        if request.instance_id:
            found = [k for k in found if k.instance_id == request.instance_id]
        run = f"agent://{request.tenant}/{request.agent} run {request.run_id}"
        if not found:
            raise NotFound(
                f"no instance of {run}"
                + (f" with id {request.instance_id}" if request.instance_id else "")
            )
        if len(found) > 1:
            ids = ", ".join(k.instance_id for k in found)
            raise FailedPrecondition(f"{run} has {len(found)} instances ({ids}); name instance_id")
        return self._overlay(found[0], fleet.instance(found[0]))

    async def watch(
        self, request: admin_pb2.WatchAgentsRequest
    ) -> AsyncIterator[admin_pb2.AgentEvent]:
        """A snapshot (unless skipped), then one event per change of a selected state.

        Raises:
            WatchBroken: the etcd watch ended; the caller resubscribes.
        """
        fleet = await self.snapshot(request.tenant)
        progress = request.progress
        seen: dict[InstanceKey, int] = {}
        for key in fleet.ordered():
            if _wanted(request, key):
                seen[key] = fleet.state(key)
                if not request.skip_snapshot:
                    yield self._event(fleet, key, 0, snapshot=True, checkpoint=progress)
        # With progress the watch also covers the checkpoints, which sort just before the fleet.
        start = CHECKPOINTS if progress else FLEET
        async for resp in watch_prefix(
            self._store, start, fleet.revision + 1, end=prefix_end(FLEET)
        ):
            touched, runs = _changes(fleet, resp.events)
            fleet.revision = resp.header.revision
            for key in sorted(k for k in touched if _wanted(request, k)):
                if not fleet.knows(key):  # pruned: forgotten, not a change of state
                    seen.pop(key, None)
                    continue
                state, before = fleet.state(key), seen.get(key, 0)
                if state != before or (progress and key.run in runs):
                    seen[key] = state
                    yield self._event(fleet, key, before, checkpoint=progress)

    def _event(
        self,
        fleet: Fleet,
        key: InstanceKey,
        before: int,
        *,
        snapshot: bool = False,
        checkpoint: bool = False,
    ) -> admin_pb2.AgentEvent:
        instance = self._overlay(key, fleet.instance(key, with_checkpoint=checkpoint))
        return admin_pb2.AgentEvent(
            agent=instance,
            previous=types_pb2.InstanceState.ValueType(before),
            snapshot=snapshot,
            revision=fleet.revision,
        )
