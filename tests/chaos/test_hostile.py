"""Hostile input against a real coordinator, through the raw generated stubs.

Whatever arrives (identifiers with ``/``, ``..``, NUL, 10 KB or unicode; Structs nested
too deep; 10,000 labels; a second register; a beat first; bytes that are not protobuf;
thousands of streams opened and dropped at once), the coordinator answers a deliberate
status with a message, never UNKNOWN or INTERNAL, and is still SERVING and answering
afterwards, with no traceback in its log. Two tenants' keys never collide.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tether
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tether.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, types_pb2
from tether_server._store import InstanceKey, instance_of, live_key, roster_key

from tests.conftest import Coordinator, Etcd, eventually

# What a coordinator may answer hostile input with: each one deliberate, with a message.
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,  # e.g. a run_id another tenant or agent owns
}
HOSTILE = [
    "a/b", "b/c", "..", ".", "../../etc", "/", "a\x00b", "\x00", "x" * 10_240, "ü" * 5_000,
    "acme\n", "\nacme", "🙂", "agent://a/b", " ", "", "a" * 128, "a" * 129, "a:b@c-d.e_f",
]  # fmt: skip
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,40}")  # valid names, kept short
VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # the rule, as the SDK states it
IDS = st.one_of(
    st.sampled_from(HOSTILE), st.text(max_size=300), st.from_regex(NAME, fullmatch=True)
)
EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def target(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """A coordinator of this module's own, so that its log holds only what we sent."""
    coordinator = Coordinator(etcd).start(tmp_path_factory.mktemp("hostile"))
    yield coordinator
    coordinator.stop()


@pytest.fixture(scope="module")
def channel(target: Coordinator) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target.addr) as ch:
        yield ch


def outcome(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with, and its message."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def assert_deliberate(status: tuple[grpc.StatusCode, str]) -> None:
    code, details = status
    assert code in DELIBERATE, f"{code.name}: {details[:300]}"
    assert code == grpc.StatusCode.OK or details, f"{code.name} without a message"


def assert_alive(target: Coordinator) -> None:
    """Still SERVING, a fresh agent still registers, nothing went out as a traceback, and
    it never failed its agents closed."""
    assert target.serving()
    with tether.Agent("agent://survivor/probe", target=target.addr) as agent:
        agent.check()
    log = target.log.read_text() if target.log else ""
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    assert "lost etcd" not in log, log[-3000:]  # no input may make it fail its fleet closed


def stream(channel: grpc.Channel, *messages: Any) -> tuple[grpc.StatusCode, str]:
    """Send messages (or raw bytes) on one Heartbeat stream; the status it ends with."""
    raw = channel.stream_stream(
        "/tether.v1.AgentService/Heartbeat",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    return outcome(lambda: list(raw(iter(messages), timeout=15)))


def register(**fields: Any) -> agent_pb2.HeartbeatRequest:
    base = {"tenant": "hostile", "agent": "a", "run_id": "r", "instance_id": "i"}
    return agent_pb2.HeartbeatRequest(register=agent_pb2.Register(**{**base, **fields}))


GOODBYE = agent_pb2.HeartbeatRequest(goodbye=agent_pb2.Goodbye())


# -- identifiers ----------------------------------------------------------------------------


@EXAMPLES
@given(ids=st.tuples(IDS, IDS, IDS, IDS), capability=IDS, label=IDS)
def test_hostile_identifiers_in_a_registration(
    channel: grpc.Channel, ids: tuple[str, str, str, str], capability: str, label: str
) -> None:
    tenant, agent, run_id, instance_id = ids
    reg = register(
        tenant=tenant, agent=agent, run_id=run_id, instance_id=instance_id,
        capabilities=[capability], labels={"k": label, label or "x": "v"},
    )  # fmt: skip
    code, details = stream(channel, reg, GOODBYE)
    assert_deliberate((code, details))
    valid = all(VALID.fullmatch(v) for v in (*ids, capability, label))
    assert (code == grpc.StatusCode.OK) == valid, details
    assert len(details) < 1000  # a 10 KB name is cut short, not echoed into a header
    uri = f"agent://{tenant}/{agent}"
    uri_reg = agent_pb2.Register(agent_uri=uri, run_id="r", instance_id="i")
    assert_deliberate(stream(channel, agent_pb2.HeartbeatRequest(register=uri_reg), GOODBYE))


@EXAMPLES
@given(tenant=IDS, agent=IDS, run_id=IDS, instance_id=IDS)
def test_hostile_identifiers_in_admin_requests(
    channel: grpc.Channel, tenant: str, agent: str, run_id: str, instance_id: str
) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    calls: list[Callable[[], Any]] = [
        lambda: admin.ListAgents(
            admin_pb2.ListAgentsRequest(tenant=tenant, agent=agent, run_id=run_id), timeout=10
        ),
        lambda: admin.GetAgent(
            admin_pb2.GetAgentRequest(
                tenant=tenant, agent=agent, run_id=run_id, instance_id=instance_id
            ),
            timeout=10,
        ),
        lambda: admin.ListEffects(
            admin_pb2.ListEffectsRequest(tenant=tenant, agent=agent, run_id=run_id), timeout=10
        ),
        lambda: admin.ListHalts(admin_pb2.ListHaltsRequest(tenant=tenant), timeout=10),
        lambda: admin.ListAudit(admin_pb2.ListAuditRequest(tenant=tenant), timeout=10),
    ]
    for scope in (types_pb2.SCOPE_TENANT, types_pb2.SCOPE_AGENT, types_pb2.SCOPE_RUN):
        sel = types_pb2.Selector(
            scope=scope, tenant=tenant, agent=agent, run_id=run_id, capability=instance_id
        )
        calls.append(functools.partial(admin.Kill, admin_pb2.KillRequest(selector=sel, reason="x")))
        calls.append(functools.partial(admin.Resume, admin_pb2.ResumeRequest(selector=sel)))
    for call in calls:
        assert_deliberate(outcome(call))


def test_tenants_keys_cannot_collide(channel: grpc.Channel) -> None:
    """Tenant ``a/b`` agent ``c`` against tenant ``a`` agent ``b/c``: both are refused."""
    for tenant, agent in (("a/b", "c"), ("a", "b/c")):
        code, details = stream(channel, register(tenant=tenant, agent=agent), GOODBYE)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a valid name" in details
    code, details = stream(
        channel,
        agent_pb2.HeartbeatRequest(
            register=agent_pb2.Register(agent_uri="agent://a/b/c", run_id="r", instance_id="i")
        ),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed agent URI" in details
    # Nor can a read that names "a/b" reach tenant a's agent b.
    assert stream(channel, register(tenant="a", agent="b", run_id="c"), GOODBYE)[0].name == "OK"
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    code, details = outcome(
        lambda: admin.ListEffects(admin_pb2.ListEffectsRequest(tenant="a/b", agent="c"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant 'a/b' is not a valid name" in details


@settings(max_examples=300, deadline=None, database=None)
@given(
    one=st.tuples(*[st.from_regex(NAME, fullmatch=True)] * 4),
    other=st.tuples(*[st.from_regex(NAME, fullmatch=True)] * 4),
)
def test_valid_names_make_distinct_keys_that_parse_back(
    one: tuple[str, str, str, str], other: tuple[str, str, str, str]
) -> None:
    """With no "/" in a name, the key builders are injective: different instances, different keys."""
    a, b = InstanceKey(*one), InstanceKey(*other)
    for build in (live_key, roster_key):
        assert instance_of(build(a)) == a
        assert (build(a) == build(b)) == (a == b)


# -- messages that do not parse, or nest too deep -------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_struct(depth: int) -> bytes:
    """A Struct ``{"x": {"x": ... {}}}`` ``depth`` deep, encoded by hand: the Python
    protobuf refuses to build one deeper than it parses."""
    struct = b""
    for _ in range(depth):
        value = _field(5, struct)  # Value.struct_value
        struct = _field(1, _field(1, b"x") + _field(2, value))  # Struct.fields entry
    return struct


@pytest.mark.parametrize("depth", [50, 200, 2_000])
def test_structs_nested_too_deep_are_refused(
    channel: grpc.Channel, target: Coordinator, depth: int
) -> None:
    checkpoint = nested_struct(depth)
    beat = _field(2, _field(2, checkpoint))  # HeartbeatRequest.beat.checkpoint
    goodbye = _field(3, _field(1, checkpoint))  # HeartbeatRequest.goodbye.checkpoint
    ack = _field(6, _field(4, checkpoint))  # HeartbeatRequest.ack.checkpoint
    for message in (beat, goodbye, ack):
        code, details = stream(channel, register(instance_id=f"deep-{depth}"), message)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "nests deeper than protobuf parses" in details
    first = stream(channel, beat)  # not even a register first
    assert first[0] == grpc.StatusCode.INVALID_ARGUMENT
    deep: dict[str, Any] = {}
    for _ in range(depth):
        deep = {"x": deep}
    with tether.Agent("agent://hostile/sdk", target=target.addr) as agent:
        with pytest.raises(tether.InvalidArgument, match="nested at most about 32 deep"):
            agent.report(deep)  # refused at the caller, not on the stream
        agent.check()
    assert_alive(target)


def test_the_deepest_checkpoint_that_parses_round_trips(channel: grpc.Channel) -> None:
    beat = _field(2, _field(2, nested_struct(31)))
    assert stream(channel, register(run_id="shallow"), beat, GOODBYE)[0] == grpc.StatusCode.OK
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    got = admin.GetAgent(admin_pb2.GetAgentRequest(tenant="hostile", agent="a", run_id="shallow"))
    assert got.checkpoint.ByteSize() == len(nested_struct(31))


def test_bytes_that_are_not_protobuf(channel: grpc.Channel, target: Coordinator) -> None:
    garbage = [b"\xff\xff\xff", _field(1, b"\xff\xfe"), _field(1, _field(1, b"\xc3\x28"))]
    for raw in garbage:
        code, details = stream(channel, raw)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not valid protobuf" in details
        for method in ("Kill", "ListAgents", "GetAgent", "ListEffects", "WatchAgents"):
            kind = channel.unary_stream if method == "WatchAgents" else channel.unary_unary
            call = kind(f"/tether.v1.AdminService/{method}", lambda b: b, lambda b: b)
            code, details = outcome(lambda call=call, raw=raw: list(call(raw, timeout=10)))  # type: ignore[misc]
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
    assert_alive(target)


# -- registrations out of order, oversized, and effects -------------------------------------


def test_ten_thousand_labels_register_twice_and_beat_first(
    channel: grpc.Channel, target: Coordinator
) -> None:
    labels = {f"k{i}": "v" for i in range(10_000)}
    code, details = stream(channel, register(labels=labels), GOODBYE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "register is" in details and "at most 65536 bytes" in details
    code, details = stream(channel, register(), register(), GOODBYE)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected register after register" in details
    beat = agent_pb2.HeartbeatRequest(beat=agent_pb2.Beat(seq=1))
    code, details = stream(channel, beat, register())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message of a Heartbeat stream must be register, got beat" in details
    assert_alive(target)


def _with_undo(size: int) -> types_pb2.Effect:
    effect = types_pb2.Effect(capability="send")
    effect.undo.update({"blob": "u" * size})
    return effect


@pytest.mark.parametrize(
    ("effect", "message"),
    [
        (types_pb2.Effect(capability="send email"), "capability 'send email' is not a valid"),
        (types_pb2.Effect(capability="x" * 10_240), "is not a valid name"),
        (types_pb2.Effect(capability="send", key="k" * 10_240), "longer than 1024 bytes"),
        (types_pb2.Effect(capability="send", error="e" * 40_000), "at most 32768"),
        (_with_undo(20_000), "undo data is over 16384 bytes"),
    ],
)
def test_hostile_effect_records_and_permit_requests(
    channel: grpc.Channel, effect: types_pb2.Effect, message: str
) -> None:
    records = agent_pb2.HeartbeatRequest(effects=agent_pb2.EffectBatch(effects=[effect]))
    code, details = stream(channel, register(instance_id="fx"), records)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    if not effect.error and not effect.HasField("undo"):  # a bad permit is refused; it holds
        permit = agent_pb2.PermitRequest(request_id=7, capability=effect.capability, key=effect.key)
        decision = _permit_decision(channel, permit)
        assert not decision.granted
        assert message in decision.refused_by.reason


def _permit_decision(
    channel: grpc.Channel, permit: agent_pb2.PermitRequest
) -> agent_pb2.PermitDecision:
    """Register, ask for a permit, and say goodbye once its decision arrived."""
    decided = threading.Event()

    def requests() -> Iterator[agent_pb2.HeartbeatRequest]:
        yield register(instance_id="permit")
        yield agent_pb2.HeartbeatRequest(permit=permit)
        decided.wait(10)
        yield GOODBYE

    stub = agent_pb2_grpc.AgentServiceStub(channel)
    for reply in stub.Heartbeat(requests(), timeout=15):
        if reply.HasField("permit"):
            decided.set()
            return reply.permit
    raise AssertionError("the stream ended without a permit decision")


# -- thousands of streams at once -----------------------------------------------------------


async def _open_and_drop(addr: str, registered: int, bare: int) -> int:
    """Open ``registered`` streams that register, and ``bare`` that send nothing; hold them
    all open at once, then drop them all at once. Returns how many registrations replied.

    They open in waves of 250: one grpc.aio client writing thousands of first messages in
    one go fails some writes on its own side ("Internal error from Core").
    """
    channels = [grpc.aio.insecure_channel(addr) for _ in range(8)]
    calls: list[Any] = []
    replied = 0
    try:
        for start in range(0, registered, 250):
            wave = [
                agent_pb2_grpc.AgentServiceStub(channels[n % 8]).Heartbeat()
                for n in range(start, min(registered, start + 250))
            ]
            calls += wave
            await asyncio.gather(
                *(c.write(register(instance_id=f"s{start + n}")) for n, c in enumerate(wave))
            )
            firsts = await asyncio.gather(*(c.read() for c in wave))
            replied += sum(1 for f in firsts if f is not grpc.aio.EOF)
        calls += [agent_pb2_grpc.AgentServiceStub(channels[n % 8]).Heartbeat() for n in range(bare)]
        await asyncio.sleep(0.5)  # the bare ones are open at the coordinator too
    finally:
        for call in calls:
            call.cancel()
        for ch in channels:
            await ch.close()
    return replied


def test_thousands_of_streams_opened_and_dropped_at_once(
    channel: grpc.Channel, target: Coordinator
) -> None:
    registered, bare = 2_000, 1_000
    assert asyncio.run(_open_and_drop(target.addr, registered, bare)) == registered
    admin = admin_pb2_grpc.AdminServiceStub(channel)

    def all_stale() -> bool:
        resp = admin.ListAgents(admin_pb2.ListAgentsRequest(tenant="hostile", run_id="r"))
        states = [a.state for a in resp.agents if a.instance_id.startswith("s")]
        return len(states) == registered and set(states) == {types_pb2.INSTANCE_STATE_STALE}

    eventually(all_stale, timeout=60, interval=0.5)
    assert_alive(target)


def test_the_log_holds_no_traceback(target: Coordinator) -> None:
    assert_alive(target)
    assert isinstance(target.log, Path)
