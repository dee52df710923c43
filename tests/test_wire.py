"""The coordinator's hand-made bytes on the wire parse as the messages they stand for."""

from __future__ import annotations

import pytest
from tether.v1 import agent_pb2, types_pb2
from tether_server._orders import order_message, serialize, with_ack


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 300, 2**35 + 5, 2**64 - 1])
def test_a_pre_serialised_ack_parses_as_the_order_confirming_that_beat(seq: int) -> None:
    halt = types_pb2.Halt(id="h-1", reason="runaway", mode=types_pb2.KILL_MODE_HARD)
    halt.selector.scope = types_pb2.SCOPE_RUN
    halt.selector.run_id = "run-9"
    payload = order_message([halt], 41).SerializeToString()

    reply = agent_pb2.HeartbeatResponse.FromString(with_ack(payload, seq))

    assert reply.ack_seq == seq
    assert reply == order_message([halt], 41, ack_seq=seq)


def test_the_stream_serialiser_passes_pre_serialised_bytes_through() -> None:
    payload = order_message([], 7).SerializeToString()

    assert serialize(payload) is payload
    assert serialize(order_message([], 7)) == payload
