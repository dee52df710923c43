"""AgentService.Multiplex spoken from the proto: many instances of one process on one stream.

Every test drives the raw generated stub, as an agent written from ``agent.proto`` would, and
reads what the coordinator answers per local: each instance keeps Heartbeat's semantics
(grant, halts, goodbye, STALE, replacement, refusal), and a kill for many of them is one
message.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tether
from google.protobuf import struct_pb2
from tether.v1 import agent_pb2, agent_pb2_grpc
from tether_server._muxbox import alone, reply_bytes, response_bytes
from tether_server._orders import order_message
from tether_server._outbox import End

from tests.conftest import LEASE_TTL, RBAC, Coordinator, Etcd, Pki, eventually
from tests.test_tls import launch, serve_flags

OK, INVALID, DENIED, ABORTED = (
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED,
)  # fmt: skip


def register(tenant: str, run_id: str, agent: str = "mux") -> agent_pb2.HeartbeatRequest:
    reg = agent_pb2.Register(tenant=tenant, agent=agent, run_id=run_id, instance_id="i-1")
    return agent_pb2.HeartbeatRequest(register=reg)


def beat(**checkpoint: Any) -> agent_pb2.HeartbeatRequest:
    state = struct_pb2.Struct()
    state.update(checkpoint)
    return agent_pb2.HeartbeatRequest(beat=agent_pb2.Beat(checkpoint=state))


def goodbye(**checkpoint: Any) -> agent_pb2.HeartbeatRequest:
    state = struct_pb2.Struct()
    state.update(checkpoint)
    return agent_pb2.HeartbeatRequest(goodbye=agent_pb2.Goodbye(checkpoint=state))


class Mux:
    """One Multiplex stream: send frames and beats, read what comes back per local."""

    def __init__(self, channel: grpc.Channel, metadata: Any = None) -> None:
        self._out: queue.Queue[agent_pb2.MuxRequest | None] = queue.Queue()
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        self.call = stub.Multiplex(iter(self._out.get, None), timeout=60, metadata=metadata)
        self.responses: queue.Queue[agent_pb2.MuxResponse | None] = queue.Queue()
        self.seq = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.responses.put(resp)
        except grpc.RpcError:
            pass
        self.responses.put(None)

    def send(self, *frames: tuple[int, agent_pb2.HeartbeatRequest], beat: bool = False) -> None:
        self.seq += beat
        self._out.put(
            agent_pb2.MuxRequest(
                seq=self.seq if beat else 0,
                frames=[agent_pb2.MuxFrame(local=local, body=body) for local, body in frames],
            )
        )

    def next(self) -> agent_pb2.MuxResponse:
        resp = self.responses.get(timeout=15)
        assert resp is not None, f"the stream ended: {self.call.code()} {self.call.details()}"
        return resp

    def until(self, done: Callable[[agent_pb2.MuxReply], bool]) -> agent_pb2.MuxResponse:
        """The next response with a reply that ``done`` accepts (others are skipped)."""
        while True:
            resp = self.next()
            if any(map(done, resp.replies)):
                return resp

    def granted(self, *locals_: int) -> None:
        """Wait until each of ``locals_`` has its grant."""
        waiting = set(locals_)
        while waiting:
            for reply in self.next().replies:
                assert not reply.HasField("end"), reply
                if reply.reply.HasField("session"):
                    waiting -= set(reply.locals)

    def ended(self) -> grpc.StatusCode:
        """Wait for the stream to end; its status."""
        while self.responses.get(timeout=15) is not None:
            pass
        return self.call.code()

    def beat_every(self, seconds: float) -> threading.Event:
        """Beat from a thread until the returned event is set."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(seconds):
                self.send(beat=True)

        threading.Thread(target=loop, daemon=True).start()
        return stop

    def close(self) -> None:
        self._out.put(None)


def ends(reply: agent_pb2.MuxReply) -> bool:
    return reply.HasField("end")


def ending(mux: Mux, local: int) -> agent_pb2.MuxEnd:
    resp = mux.until(lambda r: ends(r) and local in r.locals)
    return next(r.end for r in resp.replies if ends(r) and local in r.locals)


def stopped(reply: agent_pb2.MuxReply) -> bool:
    return reply.HasField("reply") and reply.reply.order == agent_pb2.ORDER_STOP


@pytest.mark.parametrize("ack", [0, 1, 300, 2**64 - 1])
def test_a_hand_built_mux_response_parses_as_the_message_it_stands_for(ack: int) -> None:
    order = order_message([], 41)
    ended = End(DENIED, "may not")
    raw = response_bytes(
        ack,
        [
            reply_bytes([1, 127, 128, 2**32 - 1], order.SerializeToString()),
            reply_bytes([0], agent_pb2.HeartbeatResponse().SerializeToString()),
            reply_bytes([5], ended),
            reply_bytes([6], End()),
        ],
    )
    assert agent_pb2.MuxResponse.FromString(raw) == agent_pb2.MuxResponse(
        ack_seq=ack,
        replies=[
            agent_pb2.MuxReply(locals=[1, 127, 128, 2**32 - 1], reply=order),
            agent_pb2.MuxReply(locals=[0], reply=agent_pb2.HeartbeatResponse()),
            agent_pb2.MuxReply(locals=[5], end=agent_pb2.MuxEnd(code=7, message="may not")),
            agent_pb2.MuxReply(locals=[6], end=agent_pb2.MuxEnd()),
        ],
    )


@pytest.mark.parametrize("local", [1, 300])
def test_a_push_written_alone_parses_as_that_order_for_that_local(local: int) -> None:
    order = order_message([], 42)
    raw = alone(order.SerializeToString(), local)

    assert alone(order.SerializeToString(), local) is raw  # built once per (order, local)
    assert agent_pb2.MuxResponse.FromString(raw) == agent_pb2.MuxResponse(
        replies=[agent_pb2.MuxReply(locals=[local], reply=order)]
    )


@pytest.fixture
def channel(coord: Coordinator) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(coord.addr) as ch:
        yield ch


@pytest.fixture
def mux(channel: grpc.Channel) -> Iterator[Mux]:
    stream = Mux(channel)
    yield stream
    stream.close()


def _open(mux: Mux, tenant: str, *locals_: int) -> None:
    mux.send(*((n, register(tenant, f"r-{n}")) for n in locals_))
    mux.granted(*locals_)


def test_instances_on_one_stream_are_each_granted_and_beaten_together(
    mux: Mux, admin: tether.AdminClient, tenant: str
) -> None:
    mux.send((1, register(tenant, "r-1")), (2, register(tenant, "r-2")))
    grants: dict[int, agent_pb2.HeartbeatResponse] = {}
    while len(grants) < 2:
        for reply in mux.next().replies:
            grants.update(dict.fromkeys(reply.locals, reply.reply))
    assert {g.order for g in grants.values()} == {agent_pb2.ORDER_RUN}
    assert grants[1].session.session_id != grants[2].session.session_id
    mux.send(beat=True)
    assert mux.next() == agent_pb2.MuxResponse(ack_seq=1)  # a bare ack
    runs = {a.run_id: a.state for a in admin.agents(tenant=tenant)}
    assert runs == {"r-1": tether.State.ACTIVE, "r-2": tether.State.ACTIVE}


def test_a_kill_for_many_instances_is_one_message_and_a_halt_reaches_only_its_own(
    mux: Mux, admin: tether.AdminClient, tenant: str
) -> None:
    _open(mux, tenant, 1, 2, 3)
    admin.kill(tether.selector(tenant=tenant), "everyone", force=True)
    resp = mux.until(stopped)
    assert [sorted(r.locals) for r in resp.replies] == [[1, 2, 3]]
    assert [h.reason for h in resp.replies[0].reply.halts] == ["everyone"]
    admin.kill(tether.selector(run_id="r-2"), "run 2 as well", force=True)
    resp = mux.until(stopped)
    assert [list(r.locals) for r in resp.replies] == [[2]]
    assert len(resp.replies[0].reply.halts) == 2
    mux.send(beat=True)
    assert mux.next().ack_seq == 1


def test_each_instance_acknowledges_its_kill_and_leaves_killed(
    mux: Mux, admin: tether.AdminClient, tenant: str
) -> None:
    _open(mux, tenant, 1, 2)
    admin.kill(tether.selector(tenant=tenant), "everyone", force=True)
    halt_id = mux.until(stopped).replies[0].reply.halts[0].id
    ack = agent_pb2.HeartbeatRequest(ack=agent_pb2.KillAck(halt_id=halt_id))
    mux.send((1, ack), (2, ack), (1, goodbye(step=9)))
    assert ending(mux, 1).code == OK.value[0]
    entry = eventually(lambda: [e for e in admin.audit(tenant=tenant) if e.action == "ack"])
    assert sorted(entry[0].instances) == [f"{tenant}/mux/r-1/i-1", f"{tenant}/mux/r-2/i-1"]
    states = {a.run_id: a.state for a in admin.agents(tenant=tenant)}
    assert states == {"r-1": tether.State.KILLED, "r-2": tether.State.KILLED}  # 2 stays on
    mux.send((2, beat(step=1)), beat=True)
    assert mux.next() == agent_pb2.MuxResponse(ack_seq=1)


def test_a_goodbye_ends_one_instance_with_its_checkpoint_stored(
    mux: Mux, admin: tether.AdminClient, tenant: str
) -> None:
    _open(mux, tenant, 1, 2)
    mux.send((1, beat(step=3)), (1, goodbye(step=4)))
    assert ending(mux, 1) == agent_pb2.MuxEnd(code=0)
    states = {a.run_id: a.state for a in admin.agents(tenant=tenant)}
    assert states == {"r-1": tether.State.EXITED, "r-2": tether.State.ACTIVE}
    mux.send((1, register(tenant, "r-1")))  # its local is free again; the run resumes
    resp = mux.until(lambda r: 1 in r.locals)
    grant = resp.replies[0].reply.session
    assert grant.has_checkpoint and dict(grant.checkpoint) == {"step": 4}
    admin.kill(tether.selector(run_id="r-2"), "still here", force=True)
    assert [list(r.locals) for r in mux.until(stopped).replies] == [[2]]


def test_a_permit_is_decided_for_the_instance_that_asked(mux: Mux, tenant: str) -> None:
    reg = register(tenant, "r-1")
    reg.register.capabilities.append("send_email")
    mux.send((1, reg), (2, register(tenant, "r-2")))
    mux.granted(1, 2)
    permit = agent_pb2.PermitRequest(request_id=5, capability="send_email", key="k-1")
    mux.send((1, agent_pb2.HeartbeatRequest(permit=permit)))
    resp = mux.until(lambda r: r.reply.HasField("permit"))
    assert [list(r.locals) for r in resp.replies] == [[1]]
    decision = resp.replies[0].reply.permit
    assert (decision.request_id, decision.granted) == (5, True) and decision.permit


def test_bad_frames_end_only_their_instance(
    mux: Mux, admin: tether.AdminClient, tenant: str
) -> None:
    _open(mux, tenant, 1, 2)
    big = "x" * (2 << 20)
    mux.send((1, beat(blob=big)))
    end = ending(mux, 1)
    assert end.code == INVALID.value[0] and "the limit is" in end.message
    mux.send((2, register(tenant, "r-9")))
    assert "already open" in ending(mux, 2).message
    mux.send((0, register(tenant, "r-0")))
    assert "local 0 is reserved" in ending(mux, 0).message
    mux.send((7, beat(step=1)))
    assert "no open instance" in ending(mux, 7).message
    eventually(lambda: {a.state for a in admin.agents(tenant=tenant)} == {tether.State.STALE})
    _open(mux, tenant, 3)  # the stream itself goes on
    mux.send(beat=True)
    assert mux.next().ack_seq == 1


def test_the_same_identity_on_a_new_stream_replaces_only_that_instance(
    mux: Mux, channel: grpc.Channel, admin: tether.AdminClient, tenant: str
) -> None:
    _open(mux, tenant, 1, 2)
    newer = Mux(channel)
    try:
        _open(newer, tenant, 1)
        end = ending(mux, 1)
        assert (end.code, end.message) == (ABORTED.value[0], "replaced by a newer stream")
        admin.kill(tether.selector(tenant=tenant), "both streams", force=True)
        assert [list(r.locals) for r in mux.until(stopped).replies] == [[2]]
        assert [list(r.locals) for r in newer.until(stopped).replies] == [[1]]
    finally:
        newer.close()


def test_a_heartbeat_stream_and_a_multiplex_instance_replace_each_other(
    mux: Mux, channel: grpc.Channel, tenant: str
) -> None:
    _open(mux, tenant, 1, 2)
    outgoing: queue.Queue[agent_pb2.HeartbeatRequest | None] = queue.Queue()
    outgoing.put(register(tenant, "r-1"))
    heartbeat = agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(iter(outgoing.get, None))
    assert next(heartbeat).HasField("session")
    assert ending(mux, 1).code == ABORTED.value[0]
    mux.send((3, register(tenant, "r-1")))  # and r-1 comes back on the multiplex stream
    mux.granted(3)
    with pytest.raises(grpc.RpcError) as err:
        list(heartbeat)
    assert err.value.code() == ABORTED
    outgoing.put(None)


def test_a_lost_stream_leaves_every_instance_stale(
    mux: Mux, admin: tether.AdminClient, tenant: str
) -> None:
    _open(mux, tenant, 1, 2, 3)
    mux.call.cancel()
    eventually(lambda: [a.state for a in admin.agents(tenant=tenant)] == [tether.State.STALE] * 3)


def test_silence_ends_the_stream_and_every_instance_is_stale(
    mux: Mux, admin: tether.AdminClient, tenant: str
) -> None:
    _open(mux, tenant, 1, 2)
    assert mux.ended() == grpc.StatusCode.UNAVAILABLE  # no beat for a TTL
    assert mux.call.details() == f"no heartbeat for {LEASE_TTL:g}s"
    eventually(lambda: [a.state for a in admin.agents(tenant=tenant)] == [tether.State.STALE] * 2)


def test_beats_keep_every_instance_alive(mux: Mux, admin: tether.AdminClient, tenant: str) -> None:
    _open(mux, tenant, 1, 2)
    for _ in range(int(LEASE_TTL * 2 / 0.25)):  # twice the TTL, beating four times a second
        mux.send(beat=True)
        assert mux.next().ack_seq == mux.seq
        threading.Event().wait(0.25)
    assert {a.state for a in admin.agents(tenant=tenant)} == {tether.State.ACTIVE}


def test_a_coordinator_that_loses_etcd_stops_every_instance_and_ends_the_stream(
    tmp_path: Path, tenant: str
) -> None:
    store = Etcd(tmp_path / "etcd").start()
    coordinator = Coordinator(store).start(tmp_path)
    try:
        with grpc.insecure_channel(coordinator.addr) as ch:
            mux = Mux(ch)
            _open(mux, tenant, 1, 2, 3)
            beating = mux.beat_every(0.2)  # silence must not end the stream first
            store.stop(signal.SIGKILL)
            resp = mux.until(stopped)
            beating.set()
            assert [sorted(r.locals) for r in resp.replies] == [[1, 2, 3]]
            assert "etcd" in resp.replies[0].reply.fail_closed_reason
            assert mux.ended() == grpc.StatusCode.UNAVAILABLE
            assert "lost etcd" in (mux.call.details() or "")
            # A registration it cannot serve ends the whole stream, not only its instance,
            # so the agent moves on to another coordinator instead of retrying this one.
            again = Mux(ch)
            again.send((1, register(tenant, "r-late")))
            assert again.ended() == grpc.StatusCode.UNAVAILABLE
            assert "etcd" in (again.call.details() or "")
    finally:
        coordinator.stop()
        store.stop()


def test_a_coordinator_shutting_down_lets_the_whole_stream_go(
    etcd: Etcd, tmp_path: Path, tenant: str
) -> None:
    coordinator = Coordinator(etcd).start(tmp_path)
    try:
        with grpc.insecure_channel(coordinator.addr) as ch:
            mux = Mux(ch)
            _open(mux, tenant, 1, 2)
            coordinator.stop()
            assert mux.ended() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (mux.call.details() or "")
    finally:
        coordinator.stop()


def test_an_undecodable_message_ends_the_stream(channel: grpc.Channel) -> None:
    raw: Any = channel.stream_stream("/tether.v1.AgentService/Multiplex")
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([b"\x0a\x05ab"]), timeout=10))
    assert err.value.code() == INVALID
    assert "not valid protobuf" in (err.value.details() or "")


# -- a registration the principal may not make ---------------------------------------------


@pytest.fixture(scope="module")
def secure(etcd: Etcd, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory: Path = tmp_path_factory.mktemp("mux-secure")
    (directory / "rbac.yaml").write_text(RBAC)
    rbac = ("--rbac", str(directory / "rbac.yaml"))
    proc = launch(etcd.url, pki, directory / "coordinator.log", *serve_flags(pki), *rbac)
    yield proc.addr
    proc.stop()


def test_a_refused_registration_ends_only_its_instance(secure: str, pki: Pki) -> None:
    cert, key = pki.agent("acme", "mux")
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(secure, creds) as ch:
        mux = Mux(ch)
        try:
            mux.send((1, register("acme", "r-ok")), (2, register("globex", "r-no")))
            end = ending(mux, 2)
            assert end.code == DENIED.value[0]
            assert "may register only as acme/mux; it asked for globex/mux" in end.message
            mux.granted(1)
            mux.send(beat=True)
            assert mux.next().ack_seq == 1
            mux.send((1, goodbye()))
            assert ending(mux, 1).code == OK.value[0]
        finally:
            mux.close()
