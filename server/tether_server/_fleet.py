"""The fleet as operators see it: instance states derived from roster, presence and halts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from google.protobuf import json_format
from tether.v1 import types_pb2

from tether_server._halts import HaltTable
from tether_server._selectors import EMPTY, InstanceKey, is_full_stop
from tether_server._store import CHECKPOINTS, HALTS, LIVE, ROSTER, from_json

_ENDED = (types_pb2.INSTANCE_STATE_EXITED, types_pb2.INSTANCE_STATE_KILLED)


def _key(raw: bytes, prefix: bytes) -> InstanceKey | None:
    parts = raw[len(prefix) :].decode().split("/")
    return InstanceKey(*parts) if len(parts) == 4 else None


class Fleet:
    """Roster, presence and halts at one etcd revision, kept current by watch events."""

    def __init__(self) -> None:
        self.roster: dict[InstanceKey, types_pb2.AgentInstance] = {}
        self.live: set[InstanceKey] = set()
        self.halts = HaltTable()
        self.checkpoints: dict[tuple[str, str, str], bytes] = {}
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
        if kv.key.startswith(ROSTER) and (key := _key(kv.key, ROSTER)):
            self.roster[key] = from_json(kv.value, types_pb2.AgentInstance())
        elif kv.key.startswith(LIVE) and (key := _key(kv.key, LIVE)):
            self.live.add(key)
        elif kv.key.startswith(CHECKPOINTS):
            parts = kv.key[len(CHECKPOINTS) :].decode().split("/")
            if len(parts) == 3:
                self.checkpoints[(parts[0], parts[1], parts[2])] = bytes(kv.value)

    def apply(self, event: Any) -> set[InstanceKey] | None:
        """Apply one watch event; return the instances it may change, None for all of them."""
        kv = event.kv
        if kv.key.startswith(HALTS):
            self.halts.apply(event)
            return None
        if event.type == event.PUT:
            self._put(kv)
        elif kv.key.startswith(LIVE) and (key := _key(kv.key, LIVE)):
            self.live.discard(key)
        elif kv.key.startswith(ROSTER) and (key := _key(kv.key, ROSTER)):
            self.roster.pop(key, None)
        for prefix in (LIVE, ROSTER):
            if kv.key.startswith(prefix) and (key := _key(kv.key, prefix)):
                return {key}
        return set()

    def state(self, key: InstanceKey) -> int:
        record = self.roster.get(key)
        if key in self.live:
            halts = self.halts.matching(key, record.labels if record is not None else EMPTY)
            halted = any(map(is_full_stop, halts))
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
        stored = self.checkpoints.get((key.tenant, key.agent, key.run_id))
        if with_checkpoint and stored is not None:
            json_format.Parse(stored, out.checkpoint)
        return out

    def ordered(self) -> Iterator[InstanceKey]:
        yield from sorted(set(self.roster) | self.live)
