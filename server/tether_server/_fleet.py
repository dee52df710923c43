"""The fleet as operators see it: instance states derived from roster, presence and halts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from google.protobuf import json_format
from tether.v1 import types_pb2

from tether_server._halts import HaltTable
from tether_server._selectors import EMPTY, is_stop
from tether_server._store import (
    HALTS,
    LIVE,
    ROSTER,
    InstanceKey,
    RunKey,
    from_json,
    instance_of,
    run_of_checkpoint,
)

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

    def state(self, key: InstanceKey) -> int:
        record = self.roster.get(key)
        if key in self.live:
            halts = self.halts.matching(key, record.labels if record is not None else EMPTY)
            halted = any(map(is_stop, halts))
            return types_pb2.INSTANCE_STATE_KILLED if halted else types_pb2.INSTANCE_STATE_ACTIVE
        if record is not None and record.state in _ENDED:
            return record.state
        return types_pb2.INSTANCE_STATE_STALE

    def instance(
        self, key: InstanceKey, *, with_checkpoint: bool = True
    ) -> types_pb2.AgentInstance:
        out = types_pb2.AgentInstance()
        if (record := self.roster.get(key)) is not None:
            out.CopyFrom(record)
        else:  # presence without roster: registered by a coordinator mid-write
            out.tenant, out.agent, out.run_id, out.instance_id = key.parts
        out.state = self.state(key)  # type: ignore[assignment]
        out.halts.extend(self.halts.matching(key, out.labels))
        stored = self.checkpoints.get(key.run)
        if with_checkpoint and stored is not None:
            json_format.Parse(stored, out.checkpoint)
        return out

    def ordered(self) -> Iterator[InstanceKey]:
        yield from sorted(set(self.roster) | self.live)
