"""The halts in force, cached in memory from an etcd watch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tether.v1 import types_pb2

from tether_server._selectors import EMPTY, halts_instance, is_stop
from tether_server._store import InstanceKey, from_json, halt_id_of


def halt_from_kv(kv: Any) -> types_pb2.Halt:
    halt = from_json(kv.value, types_pb2.Halt())
    halt.id = halt_id_of(kv.key)
    halt.revision = kv.create_revision
    return halt


class Committing:
    """How many Kills this process is committing now (from the handler's start to its
    commit). The stream intake makes way for them, as it does for a push, so that a
    Kill's few awaits do not each wait behind thousands of records being taken in."""

    def __init__(self) -> None:
        self.kills = 0

    @contextlib.contextmanager
    def kill(self) -> Iterator[None]:
        self.kills += 1
        try:
            yield
        finally:
            self.kills -= 1


COMMITTING = Committing()
"""Per process, not per loop: a counter, so that no loop is bound to it."""


class HaltTable:
    """Every halt in force, keyed by id, as of ``revision``."""

    def __init__(self) -> None:
        self.halts: dict[str, types_pb2.Halt] = {}
        self.revision = 0

    def load(self, kvs: Iterable[Any], revision: int) -> None:
        self.halts = {h.id: h for h in map(halt_from_kv, kvs)}
        self.revision = revision

    def apply(self, event: Any) -> types_pb2.Halt:
        """Apply one watch event and advance to its revision; return the halt it put or deleted."""
        if event.type == event.PUT:
            halt = halt_from_kv(event.kv)
            self.halts[halt.id] = halt
        else:
            removed = self.halts.pop(halt_id_of(event.kv.key), None)
            halt = removed if removed is not None else halt_from_kv(event.prev_kv)
        self.revision = event.kv.mod_revision
        return halt

    def matching(self, key: InstanceKey, labels: Mapping[str, str] = EMPTY) -> list[types_pb2.Halt]:
        """The halts that apply to ``key``: whole-instance stops first, broadest scope first.

        A halt whose release gate the instance's labels pass does not apply to it.
        """
        found = [h for h in self.halts.values() if halts_instance(h, key, labels)]
        found.sort(key=lambda h: (not is_stop(h), h.selector.scope, h.revision))
        return found
