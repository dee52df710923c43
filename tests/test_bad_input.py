"""Bad input gets a clear status and loses nothing. Raw stubs, as any language's client would."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
import tether
from google.protobuf import struct_pb2
from tether.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, types_pb2

from tests.conftest import Coordinator


@pytest.fixture
def channel(coord: Coordinator) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(coord.addr) as ch:
        yield ch


def _stream(channel: grpc.Channel, *messages: agent_pb2.HeartbeatRequest) -> list[Any]:
    """Send ``messages`` on one Heartbeat stream; return the replies, or raise the status."""
    call = agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(iter(messages), timeout=10)
    return list(call)


def _register(tenant: str, **kw: str) -> agent_pb2.HeartbeatRequest:
    reg = agent_pb2.Register(tenant=tenant, agent="a", run_id="r", instance_id="i")
    for name, value in kw.items():
        setattr(reg, name, value)
    return agent_pb2.HeartbeatRequest(register=reg)


class Status:
    """The code and details of a failed call."""

    def __init__(self, err: grpc.RpcError) -> None:
        call = cast(grpc.Call, err)
        self._code, self._details = call.code(), call.details() or ""

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _status(fn: Any) -> Status:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return Status(info.value)


def test_malformed_agent_uri(channel: grpc.Channel, tenant: str) -> None:
    reg = agent_pb2.Register(agent_uri="agent:/acme", run_id="r", instance_id="i")
    err = _status(lambda: _stream(channel, agent_pb2.HeartbeatRequest(register=reg)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed agent URI 'agent:/acme': expected agent://TENANT/AGENT" in err.details()
    with pytest.raises(tether.InvalidArgument, match="expected agent://TENANT/AGENT"):
        tether.Agent("email-campaign")
    bad_name = _status(lambda: _stream(channel, _register("acme corp")))
    assert bad_name.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant 'acme corp' is not a valid name" in bad_name.details()


def test_missing_registration(channel: grpc.Channel) -> None:
    beat = agent_pb2.HeartbeatRequest(beat=agent_pb2.Beat(seq=1))
    err = _status(lambda: _stream(channel, beat))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message of a Heartbeat stream must be register, got beat" in err.details()
    incomplete = _status(lambda: _stream(channel, _register("acme", run_id="")))
    assert incomplete.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "register needs run_id and instance_id" in incomplete.details()


def test_oversized_checkpoint_is_refused_and_the_last_one_kept(
    coord: Coordinator, channel: grpc.Channel, tenant: str
) -> None:
    uri = f"agent://{tenant}/a"
    with tether.Agent(uri, run_id="r", target=coord.addr) as agent:
        agent.report({"batch": 5})
        with pytest.raises(tether.InvalidArgument, match="the coordinator's limit is 524288"):
            agent.report({"blob": "x" * 600_000})
        agent.check()  # the refusal does not break the tether

    big = struct_pb2.Struct()
    big.update({"blob": "x" * 600_000})
    beat = agent_pb2.HeartbeatRequest(beat=agent_pb2.Beat(seq=1, checkpoint=big))
    err = _status(lambda: _stream(channel, _register(tenant, agent="a", instance_id="raw"), beat))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 524288 bytes" in err.details()
    with tether.AdminClient(coord.addr) as admin:
        assert admin.agent(tenant, "a", "r", "raw").checkpoint == {"batch": 5}


def test_kill_selectors_are_checked_never_widened(channel: grpc.Channel, tenant: str) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(channel)

    def kill(reason: str = "why", force: bool = False, **sel: Any) -> Status:
        req = admin_pb2.KillRequest(selector=types_pb2.Selector(**sel), reason=reason, force=force)
        return _status(lambda: stub.Kill(req, timeout=5))

    cases = [
        (kill(), "selector.scope is required: one of global, tenant, agent, run"),
        (kill(scope=42), "selector.scope 42 is unknown"),
        (kill(scope=types_pb2.SCOPE_TENANT), "a tenant halt needs selector.tenant"),
        (kill(scope=types_pb2.SCOPE_GLOBAL, tenant="acme"), "a global halt takes no selector.tenant"),
        (kill(scope=types_pb2.SCOPE_TENANT, tenant="acme", capability="send email"),
         "selector.capability 'send email' is not a valid name"),
        (kill(reason=" ", scope=types_pb2.SCOPE_GLOBAL), "reason is required"),
    ]  # fmt: skip
    for err, message in cases:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in err.details()
    unknown = kill(scope=types_pb2.SCOPE_TENANT, tenant=f"{tenant}-typo")
    assert unknown.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"no instance of tenant '{tenant}-typo' has ever registered" in unknown.details()
    assert "pass force" in unknown.details()
    halts = stub.ListHalts(admin_pb2.ListHaltsRequest(), timeout=5)
    assert list(halts.halts) == []  # nothing was halted by any of these


def test_get_agent_that_does_not_exist(channel: grpc.Channel, tenant: str) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    req = admin_pb2.GetAgentRequest(tenant=tenant, agent="nope", run_id="r")
    err = _status(lambda: stub.GetAgent(req, timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert f"no instance of agent://{tenant}/nope run r" in err.details()
