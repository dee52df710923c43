"""Open sessions, indexed so that a halt finds its instances without a full scan.

A coordinator holds a session for every instance it serves, thousands of them, so a session
holds only what the hot paths read, compactly: its labels as a plain dict (one shared empty
one for the many without labels), its roster record serialised and parsed again only when
it is written, and its run's entry in the index as a tuple, not a set (a run has one
instance or a few).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Protocol

from tether.v1 import types_pb2

from tether_server._outbox import Mailbox
from tether_server._selectors import EMPTY
from tether_server._store import InstanceKey, checkpoint_key

_NO_READS: frozenset[str] = frozenset()  # shared: an empty frozenset is 216 bytes each


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
        "labels",
        "leave_presence",
        "order_bytes",
        "outbox",
        "reads",
        "revision",
        "roster",
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
        # What halts match on; the record itself, parsed, would cost 1.6 KB a session.
        self.labels: Mapping[str, str] = dict(record.labels) if record.labels else EMPTY
        self.roster = record.SerializeToString()  # the roster record: see record()
        self.checkpoint_key = checkpoint_key(key.run)
        self.at = time.monotonic()
        self.clock: Clock = self if clock is None else clock
        self.outbox = outbox  # an Outbox, or a Multiplex stream's port for this instance
        self.reads: frozenset[str] = _NO_READS  # capabilities registered as reads
        self.halts: tuple[types_pb2.Halt, ...] = ()  # the order last sent: these halts match
        self.revision = 0  # the etcd revision that order reflects
        self.order_bytes: bytes | None = None  # that order serialised; None when it changed
        # The coordinator let go of it (replaced, etcd lost, shutdown): when its stream
        # ends, its presence key is left alone; a newer stream or the lease's lapse owns it.
        self.leave_presence = False
        self.end_queued = False  # silence ended it; its End is queued behind what is in flight

    def record(self) -> types_pb2.AgentInstance:
        """The instance's roster record, parsed afresh: change it, then :meth:`keep` it."""
        return types_pb2.AgentInstance.FromString(self.roster)

    def keep(self, record: types_pb2.AgentInstance) -> None:
        """Hold ``record`` as the roster record written when the session ends."""
        self.roster = record.SerializeToString()

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
        # A tuple per run: 56 bytes for one instance, where a set takes 216.
        self._by_run: dict[str, tuple[Session, ...]] = {}

    def add(self, session: Session) -> Session | None:
        old = self._by_key.get(session.key)
        if old is not None:
            self.remove(old)
        key = session.key
        self._by_key[key] = session
        self._by_tenant.setdefault(key.tenant, set()).add(session)
        self._by_run[key.run_id] = (*self._by_run.get(key.run_id, ()), session)
        return old

    def remove(self, session: Session) -> bool:
        key = session.key
        if self._by_key.get(key) is not session:
            return False
        del self._by_key[key]
        _discard(self._by_tenant, key.tenant, session)
        rest = tuple(s for s in self._by_run.get(key.run_id, ()) if s is not session)
        if rest:
            self._by_run[key.run_id] = rest
        else:
            self._by_run.pop(key.run_id, None)
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
            return self._by_run.get(sel.run_id, ())
        if sel.tenant:
            return tuple(self._by_tenant.get(sel.tenant, ()))
        return tuple(self._by_key.values())


def _discard(index: dict[str, set[Session]], name: str, session: Session) -> None:
    members = index.get(name)
    if members is not None:
        members.discard(session)
        if not members:
            del index[name]
