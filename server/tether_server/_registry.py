"""Open sessions, indexed so that a halt finds its instances without a full scan."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

from tether.v1 import types_pb2

from tether_server._outbox import Mailbox
from tether_server._store import InstanceKey, checkpoint_key


class Clock(Protocol):
    """When a stream last beat: a Heartbeat session is its own clock; the instances of a
    Multiplex stream share their stream's, so one beat beats them all at no cost each."""

    at: float


class Session:
    """One connected instance. Slotted: a coordinator holds thousands."""

    __slots__ = (
        "at",
        "checkpoint_key",
        "clock",
        "end_queued",
        "halts",
        "key",
        "leave_presence",
        "order_bytes",
        "outbox",
        "reads",
        "record",
        "revision",
        "session_id",
    )

    def __init__(
        self,
        key: InstanceKey,
        session_id: str,
        record: types_pb2.AgentInstance,
        outbox: Mailbox,
        clock: Clock | None = None,
    ) -> None:
        self.key = key
        self.session_id = session_id  # the presence key's value while this stream owns it
        self.record = record
        self.checkpoint_key = checkpoint_key(key.run)
        self.at = time.monotonic()
        self.clock: Clock = self if clock is None else clock
        self.outbox = outbox  # an Outbox, or a Multiplex stream's port for this instance
        self.reads: frozenset[str] = frozenset()  # capabilities registered as reads
        self.halts: tuple[types_pb2.Halt, ...] = ()  # the order last sent: these halts match
        self.revision = 0  # the etcd revision that order reflects
        self.order_bytes: bytes | None = None  # that order serialised; None when it changed
        # The coordinator let go of it (replaced, etcd lost, shutdown): when its stream
        # ends, its presence key is left alone; a newer stream or the lease's lapse owns it.
        self.leave_presence = False
        self.end_queued = False  # silence ended it; its End is queued behind what is in flight

    @property
    def last_beat(self) -> float:
        """The ``time.monotonic()`` of its stream's last beat."""
        return self.clock.at

    @last_beat.setter
    def last_beat(self, when: float) -> None:
        self.clock.at = when


class Registry:
    """Open sessions, indexed so that a halt finds its instances without a full scan."""

    def __init__(self) -> None:
        self._by_key: dict[InstanceKey, Session] = {}
        self._by_tenant: dict[str, set[Session]] = {}
        self._by_run: dict[str, set[Session]] = {}

    def add(self, session: Session) -> Session | None:
        old = self._by_key.get(session.key)
        if old is not None:
            self.remove(old)
        self._by_key[session.key] = session
        self._by_tenant.setdefault(session.key.tenant, set()).add(session)
        self._by_run.setdefault(session.key.run_id, set()).add(session)
        return old

    def remove(self, session: Session) -> bool:
        if self._by_key.get(session.key) is not session:
            return False
        del self._by_key[session.key]
        _discard(self._by_tenant, session.key.tenant, session)
        _discard(self._by_run, session.key.run_id, session)
        return True

    def get(self, key: InstanceKey) -> Session | None:
        return self._by_key.get(key)

    def snapshot(self) -> tuple[Session, ...]:
        """Every open session, as a tuple that survives the registry changing under it."""
        return tuple(self._by_key.values())

    def serves_run(self, run_id: str) -> bool:
        return run_id in self._by_run

    def candidates(self, sel: types_pb2.Selector) -> Iterable[Session]:
        if sel.run_id:
            return tuple(self._by_run.get(sel.run_id, ()))
        if sel.tenant:
            return tuple(self._by_tenant.get(sel.tenant, ()))
        return tuple(self._by_key.values())


def _discard(index: dict[str, set[Session]], name: str, session: Session) -> None:
    members = index.get(name)
    if members is not None:
        members.discard(session)
        if not members:
            del index[name]
