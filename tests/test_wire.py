"""The coordinator's hand-made bytes on the wire parse as the messages they stand for."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from tether.v1 import agent_pb2, types_pb2
from tether_server._orders import order_message, serialize, with_ack
from tether_server._wire import beat_request, mux_request


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


def _beat(seq: int, **fields: Any) -> bytes:
    return agent_pb2.HeartbeatRequest(beat=agent_pb2.Beat(seq=seq, **fields)).SerializeToString()


@pytest.mark.parametrize("seq", [1, 127, 128, 300, 2**35 + 5, 2**63 - 1])
def test_a_bare_beat_is_peeked_at_as_its_seq_and_a_mux_beat_too(seq: int) -> None:
    assert beat_request(_beat(seq)) == seq
    assert mux_request(agent_pb2.MuxRequest(seq=seq).SerializeToString()) == seq


def _struct(**values: float) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


@pytest.mark.parametrize(
    "raw",
    [
        _beat(0),  # beat {}: no seq on the wire
        _beat(2**64 - 1),  # a 10-byte varint: the parse decides what it means
        _beat(5, checkpoint=_struct(step=1)),
        _beat(5, signals=agent_pb2.Signals(usd=1.0)),
        _beat(5) + b"\x12\x02\x08\x06",  # two beats: the last wins, as protobuf says
        _beat(5) + b"\x2a\x00",  # and a field after it
        b"\x12\x04\x08\x05\x48\x01",  # an unknown field inside the beat, after the seq
        agent_pb2.HeartbeatRequest(goodbye=agent_pb2.Goodbye()).SerializeToString(),
        agent_pb2.HeartbeatRequest(
            register=agent_pb2.Register(tenant="t", agent="a", run_id="r", instance_id="i")
        ).SerializeToString(),
        b"",
    ],
)
def test_anything_but_a_bare_beat_is_parsed_as_before(raw: bytes) -> None:
    assert beat_request(raw) == agent_pb2.HeartbeatRequest.FromString(raw)


def test_a_mux_request_with_frames_is_parsed_and_bad_bytes_still_fail_to_parse() -> None:
    frame = agent_pb2.MuxFrame(local=1, body=agent_pb2.HeartbeatRequest.FromString(_beat(2)))
    raw = agent_pb2.MuxRequest(seq=3, frames=[frame]).SerializeToString()
    assert mux_request(raw) == agent_pb2.MuxRequest.FromString(raw)
    with pytest.raises(DecodeError):
        beat_request(b"\x12\x05\x08")
    with pytest.raises(DecodeError):
        mux_request(b"\x08\xff")
