"""Many runs of one process on one Multiplex stream: the SDK's side, on a real coordinator.

Every ``Agent`` (or every ``AsyncAgent`` of one loop) of a process, for one target list and
the same credentials, shares one TCP connection and one stream; each run keeps its own
registration, verdict, checkpoint and goodbye. The connections are counted in the kernel's
socket table, through the fault proxy of tests/chaos, which also cuts the stream.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tether

from tests.chaos.proxy import Proxy
from tests.conftest import LEASE_TTL, Coordinator, eventually

SLACK = 1.0  # seconds on top of the TTL that a loaded 2-core machine may add to a stop
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
ESTABLISHED = "01"


def connections_to(port: int) -> int:
    """Established TCP connections to ``port`` on this machine (the kernel's table)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if int(remote.rsplit(":", 1)[1], 16) == port and state == ESTABLISHED:
                count += 1
    return count


class Runs:
    """Agents of one kind opened in this process: sync ``Agent``, or ``AsyncAgent`` on one
    event loop in a thread of its own. Either way the test drives them from its thread, as
    ``check()`` and ``killed`` are safe from any thread."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.open: list[tether.Agent | tether.AsyncAgent] = []
        self.grants: dict[str, int] = {}  # run id -> grants (registrations) so far
        self.replies: dict[str, int] = {}  # run id -> replies and acks so far
        self._loop: asyncio.AbstractEventLoop | None = None
        if kind == "async":
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, daemon=True).start()

    def add(self, uri: str, name: str, target: str, **options: Any) -> Any:
        run_id = f"{self.kind}-{name}"  # the tenant is cut to 40 characters: the same for both

        def seen(verdict: tether.Verdict, grant: bool) -> None:
            self.replies[run_id] = self.replies.get(run_id, 0) + 1
            self.grants[run_id] = self.grants.get(run_id, 0) + grant

        config = tether.AgentConfig(on_reply=seen, **options)
        if self._loop is None:
            agent: Any = tether.Agent(uri, run_id=run_id, target=target, config=config)
            agent.start()
        else:
            agent = tether.AsyncAgent(uri, run_id=run_id, target=target, config=config)
            asyncio.run_coroutine_threadsafe(agent.start(), self._loop).result()
        self.open.append(agent)
        return agent

    def close(self, agent: Any, checkpoint: dict[str, Any] | None = None) -> None:
        self.open.remove(agent)
        if self._loop is None:
            agent.close(checkpoint)
        else:
            asyncio.run_coroutine_threadsafe(agent.close(checkpoint), self._loop).result()

    def close_all(self) -> None:
        for agent in list(self.open):
            self.close(agent)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def acked_on(self, agents: list[Any]) -> None:
        """Each of ``agents`` keeps getting acks: a reply more than now, for every one."""
        now = {a.run_id: self.replies.get(a.run_id, 0) for a in agents}
        eventually(lambda: all(self.replies.get(r, 0) > n for r, n in now.items()))


@pytest.fixture(params=["sync", "async"])
def runs(request: pytest.FixtureRequest) -> Iterator[Runs]:
    made = Runs(request.param)
    yield made
    made.close_all()


@pytest.fixture
def proxy(coord: Coordinator) -> Iterator[Proxy]:
    link = Proxy(coord.addr).start()
    yield link
    link.close()


def test_runs_of_a_process_share_one_connection(
    runs: Runs, proxy: Proxy, admin: tether.AdminClient, tenant: str
) -> None:
    agents = [runs.add(f"agent://{tenant}/a", f"r{i}", proxy.addr) for i in range(6)]
    assert connections_to(proxy.port) == 1
    listed = {i.instance_id: i.state for i in admin.agents(tenant=tenant)}
    assert listed == {a.instance_id: tether.State.ACTIVE for a in agents}
    # The count is a real observable: a run that asks for a connection of its own gets one.
    runs.add(f"agent://{tenant}/a", "own", proxy.addr, channel_options=OWN_CONNECTION)
    assert connections_to(proxy.port) == 2
    for agent in agents:
        agent.check()


def test_a_kill_of_some_runs_on_a_stream_stops_exactly_those(
    runs: Runs, coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    doomed = [runs.add(f"agent://{tenant}/doomed", f"d{i}", coord.addr) for i in range(3)]
    spared = [runs.add(f"agent://{tenant}/spared", f"s{i}", coord.addr) for i in range(3)]
    halt, _ = admin.kill(tether.selector(agent=f"agent://{tenant}/doomed"), "these three")
    for agent in doomed:
        eventually(lambda agent=agent: agent.killed)  # type: ignore[misc]
        with pytest.raises(tether.Killed) as info:
            agent.check()
        assert info.value.halt_id == halt.id
    runs.acked_on(spared)  # acked since the kill, and still told RUN
    for agent in spared:
        agent.check()
        assert not agent.halts
    states = {i.instance_id: i.state for i in admin.agents(tenant=tenant)}
    assert states == {a.instance_id: tether.State.KILLED for a in doomed} | {
        a.instance_id: tether.State.ACTIVE for a in spared
    }

    def acked() -> list[tether.AuditEntry]:
        return [e for e in admin.audit(tenant=tenant) if e.action == "ack"]

    (ack,) = eventually(acked)  # every stopped run acknowledged it, on the one stream
    assert sorted(ack.instances) == sorted(
        f"{tenant}/doomed/{a.run_id}/{a.instance_id}" for a in doomed
    )
    admin.resume(tether.selector(agent=f"agent://{tenant}/doomed"))
    for agent in doomed:
        eventually(lambda agent=agent: not agent.killed)  # type: ignore[misc]


def test_one_runs_goodbye_leaves_the_others_running(
    runs: Runs, coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    agents = [runs.add(f"agent://{tenant}/a", f"r{i}", coord.addr) for i in range(4)]
    for i, agent in enumerate(agents):
        agent.report({"step": i})
    leaving, staying = agents[0], agents[1:]
    runs.close(leaving, {"step": "final"})  # stored before close() returns
    gone = admin.agent(tenant, "a", leaving.run_id)
    assert gone.state is tether.State.EXITED
    assert gone.checkpoint == {"step": "final"}
    time.sleep(LEASE_TTL * 1.5)  # longer than a TTL: the others are still beaten and acked
    runs.acked_on(staying)
    for agent in staying:
        agent.check()
        assert admin.agent(tenant, "a", agent.run_id).state is tether.State.ACTIVE
    eventually(lambda: admin.agent(tenant, "a", agents[3].run_id).checkpoint == {"step": 3})


def test_a_lost_stream_fails_closed_every_run_on_it_and_they_come_back(
    runs: Runs, coord: Coordinator, proxy: Proxy, admin: tether.AdminClient, tenant: str
) -> None:
    agents = [runs.add(f"agent://{tenant}/a", f"r{i}", proxy.addr) for i in range(5)]
    bystander = runs.add(f"agent://{tenant}/b", "direct", coord.addr)  # another stream
    proxy.pause()  # new connections are held ...
    cut_at = time.monotonic()
    proxy.cut()  # ... and the stream is reset
    for agent in agents:
        eventually(lambda agent=agent: agent.killed, interval=0.01)  # type: ignore[misc]
    took = time.monotonic() - cut_at
    assert took <= LEASE_TTL + SLACK  # the contract: fail closed within the TTL
    for agent in agents:
        with pytest.raises(tether.TetherLost, match="lease TTL"):
            agent.check()
    bystander.check()  # one stream lost, not the process's others
    quitter, agents = agents[0], agents[1:]
    runs.close(quitter)  # while the stream is down: it must not come back with the others
    proxy.resume()
    for agent in agents:
        eventually(lambda agent=agent: not agent.killed, timeout=30)  # type: ignore[misc]
        agent.check()
        assert runs.grants[agent.run_id] >= 2  # registered again, on the new stream
    # Under the same identity: the same instances, running, and no one left behind.
    states = {i.instance_id: i.state for i in admin.agents(tenant=tenant)}
    assert states.pop(quitter.instance_id) is not tether.State.ACTIVE
    assert states == {a.instance_id: tether.State.ACTIVE for a in [*agents, bystander]}
    assert connections_to(proxy.port) == 1
    print(f"{len(agents) + 1} runs on one stream failed closed {took:.2f}s after the cut")


def test_a_refused_registration_ends_only_that_run(
    runs: Runs, coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    agents = [runs.add(f"agent://{tenant}/a", f"r{i}", coord.addr) for i in range(3)]
    # A run belongs to the tenant that registered it first: another tenant's claim is
    # refused, on the same stream, for that instance alone.
    with pytest.raises(tether.PermissionDenied, match="belongs to another tenant"):
        runs.add(f"agent://{tenant}-other/a", "r0", coord.addr)
    runs.acked_on(agents)
    for agent in agents:
        agent.check()
    assert {i.state for i in admin.agents(tenant=tenant)} == {tether.State.ACTIVE}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"a": value}
    return value


def test_a_checkpoint_too_deep_for_the_stream_is_refused_where_it_is_reported(
    coord: Coordinator, tenant: str
) -> None:
    with tether.Agent(f"agent://{tenant}/a", run_id="deep", target=coord.addr) as agent:
        agent.report(_nested(28))  # carried in a KillAck, in a frame, in a request: fine
        with pytest.raises(tether.InvalidArgument, match="nested at most"):
            agent.report(_nested(33))  # a Struct alone would parse; the stream's could not
        agent.check()  # refused at the caller: the stream and its neighbours go on


def test_a_request_is_split_by_size_as_well_as_by_frames() -> None:
    from tether._link_stream import MOST_BYTES, chunks
    from tether.v1 import agent_pb2

    big = "x" * 200_000
    request = agent_pb2.MuxRequest(seq=7)
    for local in range(1, 13):  # 12 checkpoints of 200 KB: 2.4 MB, over a gRPC message
        frame = request.frames.add(local=local)
        frame.body.beat.checkpoint.update({"blob": big})
    parts = chunks(request, 1000)
    assert len(parts) > 1 and all(p.ByteSize() <= MOST_BYTES + 250_000 for p in parts)
    assert [f.local for p in parts for f in p.frames] == list(range(1, 13))
    assert [p.seq for p in parts] == [0] * (len(parts) - 1) + [7]  # the beat rides last


def test_blocking_on_the_shared_loop_from_a_callback_is_refused(
    coord: Coordinator, tenant: str
) -> None:
    agent = tether.Agent(f"agent://{tenant}/a", run_id="hook", target=coord.addr)
    agent.start()
    try:

        async def from_a_callback() -> None:
            agent.close()  # what a stop hook on the shared loop might try

        loop = agent._loop
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(from_a_callback(), loop)
        with pytest.raises(tether.TetherError, match="from a tether callback"):
            future.result(timeout=10)
        agent.check()  # nothing was closed, nothing deadlocked
    finally:
        agent.close()


_FORKS = """
import os, sys, time
import tether

target, tenant = sys.argv[1], sys.argv[2]
with tether.Agent(f"agent://{tenant}/a", run_id="parent", target=target) as inherited:
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            inherited.close()  # the parent's agent, copied: closing it must not wait forever
            uri = f"agent://{tenant}/a"
            with tether.Agent(uri, run_id="child", target=target, connect_timeout=2):
                code = 0
        except tether.TetherError:
            code = 0  # an answer, not a hang
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        print("hung")
    else:
        print("exit", os.waitstatus_to_exitcode(done[1]))
    sys.stdout.flush()
    os._exit(0)  # gRPC in this parent is not to be trusted after fork: no teardown
"""


def test_a_forked_child_is_never_left_waiting_on_the_parents_loop(
    coord: Coordinator, tenant: str
) -> None:
    # gRPC itself does not carry channels across fork() (the child of a process that used
    # it cannot reach a coordinator, and the parent's channels may suffer too: so this runs
    # in a process of its own). What Tether owes is that the child is not left blocked
    # forever on the parent's shared loop, whose thread does not exist in the child: it
    # gets an answer within its connect timeout.
    done = subprocess.run(
        [sys.executable, "-c", _FORKS, coord.addr, tenant],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    # "exit N": the child ended (its Agent answered, or gRPC, which does not support the
    # forked child, crashed it: its limit, not a hang); "hung": it waited on the dead loop.
    assert done.stdout.startswith("exit"), (done.stdout, done.stderr[-2000:])
