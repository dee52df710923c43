"""A kill's acknowledgements: their checkpoints are made JSON at the flush, not on arrival.

What an agent sees must not change: the checkpoint in its KillAck is the one a resume
starts from, a newer one sent after it wins, and one that is not JSON ends its stream.
"""

from __future__ import annotations

import json
import math
import queue
from collections.abc import Iterator

import grpc
import pytest
import tether
from aetcd import rpc
from google.protobuf import struct_pb2
from tether.v1 import agent_pb2, agent_pb2_grpc
from tether_server._store import RunKey, checkpoint_key

from tests.conftest import Coordinator, Etcd, audited, eventually

Requests = queue.Queue[agent_pb2.HeartbeatRequest | None]


def _stored(etcd: Etcd, run: RunKey) -> object:
    with grpc.insecure_channel(etcd.endpoint) as channel:
        resp = rpc.KVStub(channel).Range(rpc.RangeRequest(key=checkpoint_key(run)), timeout=5)
    return json.loads(resp.kvs[0].value) if resp.kvs else None


def _struct(**fields: float) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(fields)
    return out


def _drain(replies: Iterator[agent_pb2.HeartbeatResponse]) -> None:
    for _ in replies:
        pass


@pytest.fixture
def killed(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> Iterator[tuple[Requests, Iterator[agent_pb2.HeartbeatResponse], str, RunKey]]:
    """A raw agent stream, registered and then killed: its requests, replies and halt id."""
    reg = agent_pb2.Register(tenant=tenant, agent="bot", run_id="r-1", instance_id="i1")
    outgoing: Requests = queue.Queue()
    outgoing.put(agent_pb2.HeartbeatRequest(register=reg))
    with grpc.insecure_channel(coord.addr) as channel:
        replies = agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(iter(outgoing.get, None))
        next(replies)  # the grant
        admin.kill(tether.selector(tenant=tenant), "acks under test")
        pushed = next(r for r in replies if r.order == agent_pb2.ORDER_STOP)
        try:
            yield outgoing, replies, pushed.halts[0].id, RunKey(tenant, "bot", "r-1")
        finally:
            outgoing.put(None)


def test_the_checkpoint_of_a_kill_ack_is_stored_and_audited(
    etcd: Etcd,
    admin: tether.AdminClient,
    tenant: str,
    killed: tuple[Requests, Iterator[agent_pb2.HeartbeatResponse], str, RunKey],
) -> None:
    outgoing, _, halt_id, run = killed
    ack = agent_pb2.KillAck(halt_id=halt_id, checkpoint=_struct(step=7))
    outgoing.put(agent_pb2.HeartbeatRequest(ack=ack))
    assert eventually(lambda: _stored(etcd, run) == {"step": 7})
    assert audited(admin, tenant, "ack").instances == (f"{tenant}/bot/r-1/i1",)
    beat = agent_pb2.Beat(seq=1, checkpoint=_struct(step=8))  # newer than the ack's: it wins
    outgoing.put(agent_pb2.HeartbeatRequest(beat=beat))
    assert eventually(lambda: _stored(etcd, run) == {"step": 8})


def test_a_newer_checkpoint_wins_over_an_ack_not_yet_flushed(
    etcd: Etcd, killed: tuple[Requests, Iterator[agent_pb2.HeartbeatResponse], str, RunKey]
) -> None:
    outgoing, replies, halt_id, run = killed
    ack = agent_pb2.KillAck(halt_id=halt_id, checkpoint=_struct(step=1))
    outgoing.put(agent_pb2.HeartbeatRequest(ack=ack))
    beat = agent_pb2.Beat(seq=5, checkpoint=_struct(step=2))
    outgoing.put(agent_pb2.HeartbeatRequest(beat=beat))
    next(r for r in replies if r.ack_seq == 5)  # both in, most likely before a flush
    assert eventually(lambda: _stored(etcd, run) == {"step": 2})
    outgoing.put(agent_pb2.HeartbeatRequest(goodbye=agent_pb2.Goodbye()))
    _drain(replies)  # the stream ends cleanly (no error), the newest checkpoint stored
    assert _stored(etcd, run) == {"step": 2}


def test_an_ack_whose_checkpoint_is_not_json_ends_the_stream(
    etcd: Etcd, killed: tuple[Requests, Iterator[agent_pb2.HeartbeatResponse], str, RunKey]
) -> None:
    outgoing, replies, halt_id, run = killed
    ack = agent_pb2.KillAck(halt_id=halt_id, checkpoint=_struct(step=math.nan))
    outgoing.put(agent_pb2.HeartbeatRequest(ack=ack))
    with pytest.raises(grpc.RpcError) as ended:
        _drain(replies)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checkpoint is not valid JSON" in str(ended.value.details())
    assert _stored(etcd, run) is None
