"""Open sessions, indexed for fan-out, and the small pure pieces of the Heartbeat protocol."""

from __future__ import annotations

import time
from collections.abc import Iterable

from google.protobuf import timestamp_pb2
from tether._errors import InvalidArgument
from tether._uri import check_name, parse_agent_uri
from tether.v1 import agent_pb2, types_pb2

from tether_server._outbox import Outbox
from tether_server._selectors import is_stop
from tether_server._store import InstanceKey, checkpoint_key


class Session:
    """One connected instance. Slotted: a coordinator holds thousands."""

    __slots__ = (
        "checkpoint_key",
        "detached",
        "ending",
        "halts",
        "key",
        "last_beat",
        "order_bytes",
        "outbox",
        "record",
        "revision",
        "session_id",
    )

    def __init__(
        self, key: InstanceKey, session_id: str, record: types_pb2.AgentInstance, outbox: Outbox
    ) -> None:
        self.key = key
        self.session_id = session_id  # the presence key's value while this stream owns it
        self.record = record
        self.checkpoint_key = checkpoint_key(key.run)
        self.last_beat = time.monotonic()
        self.outbox = outbox
        self.halts: tuple[types_pb2.Halt, ...] = ()  # the order last sent: these halts match
        self.revision = 0  # the etcd revision that order reflects
        self.order_bytes: bytes | None = None  # that order serialised; None when it changed
        self.detached = False  # the coordinator let go of it; leave its presence alone
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
    stop = any_stop(halts) or bool(fail_closed)
    return agent_pb2.HeartbeatResponse(
        order=agent_pb2.ORDER_STOP if stop else agent_pb2.ORDER_RUN,
        halts=halts,
        ack_seq=ack_seq,
        revision=revision,
        fail_closed_reason=fail_closed,
    )


def current_order(session: Session) -> bytes:
    """The session's order, serialised once and reused by every heartbeat ack."""
    if session.order_bytes is None:
        session.order_bytes = order(session.halts, session.revision).SerializeToString()
    return session.order_bytes


_ACK_SEQ_TAG = b"\x18"  # HeartbeatResponse.ack_seq: field 3, varint


def with_ack(payload: bytes, seq: int) -> bytes:
    """``payload`` (a serialised order) confirming Beat ``seq``: the field appended as bytes.

    Protobuf parses concatenated fields as one message, so an ack costs no message build.
    """
    out = bytearray(_ACK_SEQ_TAG)
    seq &= (1 << 64) - 1
    while seq > 0x7F:
        out.append((seq & 0x7F) | 0x80)
        seq >>= 7
    out.append(seq)
    return payload + bytes(out)


def any_stop(halts: Iterable[types_pb2.Halt]) -> bool:
    """True when a halt stops the whole instance, not just one capability."""
    return any(map(is_stop, halts))


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
