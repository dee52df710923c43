"""The order a coordinator sends an instance, and the bytes it goes out as.

An order is a ``HeartbeatResponse``: RUN or STOP, with the halts that hold. It is built by
:func:`order_message`, serialised once per distinct order, and reused: every heartbeat ack
repeats the session's cached order with the beat's sequence number appended as raw bytes
(:func:`with_ack`), and a halt pushes one payload to every stream it touches (:class:`Push`).
The stream's serialiser (:func:`serialize`) passes those bytes through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tether.v1 import agent_pb2, types_pb2

from tether_server._selectors import is_stop

if TYPE_CHECKING:
    from tether_server._registry import Session


def any_stop(halts: Iterable[types_pb2.Halt]) -> bool:
    """True when a halt stops the whole instance, not just one capability."""
    return any(map(is_stop, halts))


def order_message(
    halts: Iterable[types_pb2.Halt], revision: int, *, ack_seq: int = 0, fail_closed: str = ""
) -> agent_pb2.HeartbeatResponse:
    """The order that ``halts`` make, as of etcd ``revision``.

    Args:
        halts: the halts that match the instance, in the order it should see them.
        revision: the etcd revision the halts were read at.
        ack_seq: the Beat this reply confirms, if any.
        fail_closed: why the coordinator stops the instance without a halt (etcd is lost).
    """
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
        session.order_bytes = order_message(session.halts, session.revision).SerializeToString()
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


@dataclass(frozen=True, slots=True)
class Push:
    """A pushed order, serialised, timed from the watch event that caused it."""

    payload: bytes
    since: float


def serialize(message: Any) -> bytes:
    """The Heartbeat stream's response serialiser.

    Acks and pushed orders arrive already serialised, once for every stream they go to;
    the grant and permit decisions arrive as messages.
    """
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())
