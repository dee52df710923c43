"""``tether doctor``: against real coordinators, and its pure diagnosis on its own."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tether
from tether._cli._doctor import Seen, diagnose
from tether.v1 import admin_pb2, agent_pb2, agent_pb2_grpc
from tether_server import free_port

from tests.conftest import Coordinator, Etcd, audited, eventually, tether_cli


def _pair(coordinators: tuple[Coordinator, Coordinator]) -> str:
    return ",".join(c.addr for c in coordinators)


def test_a_healthy_pair_exits_0_with_a_summary(
    coordinators: tuple[Coordinator, Coordinator],
) -> None:
    result = tether_cli("doctor", "--addr", _pair(coordinators))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("healthy: 2 coordinator(s) SERVING on etcd cluster ")
    assert result.stdout.count("\n") == 1
    report = json.loads(tether_cli("doctor", "-o", "json", "--addr", _pair(coordinators)).stdout)
    assert report["healthy"] and report["problems"] == []
    (a, b) = report["coordinators"]
    assert a["status"]["etcdClusterId"] == b["status"]["etcdClusterId"]
    assert a["status"]["haltViewFresh"] and a["status"]["permitKeyId"]


def test_a_dead_address_is_named(coordinators: tuple[Coordinator, Coordinator]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    result = tether_cli("doctor", "--addr", f"{_pair(coordinators)},{dead}")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"{dead}: unreachable (connection refused)"]


def test_coordinators_on_two_etcd_clusters_are_a_mismatch(
    coord: Coordinator, tmp_path: Path
) -> None:
    other_etcd = Etcd(tmp_path / "etcd").start()
    elsewhere = Coordinator(other_etcd).start(tmp_path)
    try:
        result = tether_cli("doctor", "--addr", f"{coord.addr},{elsewhere.addr}")
    finally:
        elsewhere.stop()
        other_etcd.stop()
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(
        line.startswith("etcd cluster mismatch: ") and coord.addr in line and elsewhere.addr in line
        for line in lines
    ), lines
    assert any(line.startswith("permit keys differ: ") for line in lines), lines


@pytest.fixture
def deaf_agent(coord: Coordinator, tenant: str) -> Iterator[None]:
    """An agent written from the proto that beats but never acknowledges a kill."""
    stop = threading.Event()
    reg = agent_pb2.Register(tenant=tenant, agent="deaf", run_id="deaf-1", instance_id="i1")

    def requests() -> Iterator[agent_pb2.HeartbeatRequest]:
        yield agent_pb2.HeartbeatRequest(register=reg)
        seq = 0
        while not stop.wait(0.3):
            seq += 1
            yield agent_pb2.HeartbeatRequest(beat=agent_pb2.Beat(seq=seq))

    channel = grpc.insecure_channel(coord.addr)
    replies = agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(requests())

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for _ in replies:
                pass

    threading.Thread(target=read, daemon=True).start()
    yield
    stop.set()
    replies.cancel()
    channel.close()


def test_an_agent_that_never_acknowledged_a_kill_is_named(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, deaf_agent: None
) -> None:
    with tether.Agent(f"agent://{tenant}/polite", run_id="polite-1", target=coord.addr) as agent:
        eventually(lambda: len(admin.agents(tenant=tenant)) == 2)
        admin.kill(tether.selector(tenant=tenant), "stop everything")
        eventually(lambda: agent.killed)
        audited(admin, tenant, "ack")
        time.sleep(1.0)  # past the slack given below
        result = tether_cli("doctor", "--ack-slack", "0.5", "--addr", coord.addr)
    assert result.returncode == 1, result.stdout
    (line,) = result.stdout.splitlines()
    assert re.fullmatch(
        f"agent://{tenant}/deaf run deaf-1 instance i1 has not acknowledged halt "
        rf"tenant/{tenant} \(\d+s old, grace 0s\)",
        line,
    ), line


def _status(**fields: object) -> admin_pb2.CoordinatorStatus:
    base: dict[str, object] = {
        "serving": True, "etcd_cluster_id": 7, "halt_view_fresh": True,
        "halt_view_digest": "d", "permit_key_id": "k", "listen": "127.0.0.1:7700",
    }  # fmt: skip
    return admin_pb2.CoordinatorStatus(**{**base, **fields})  # type: ignore[arg-type]


def test_diagnose_names_skew_plaintext_stale_views_and_a_failing_canary() -> None:
    seen = [
        Seen("127.0.0.1:1", _status(), skew=0.1, uncertainty=0.01),
        Seen("10.0.0.2:7700", _status(listen="0.0.0.0:7700"), skew=30.0, uncertainty=0.01),
        Seen("127.0.0.1:3", _status(halt_view_fresh=False, halt_view_digest="e", halts=1)),
    ]
    seen[2].status.canary.enabled = True  # type: ignore[union-attr]
    seen[2].status.canary.problem = "canary kill not seen within 2s"  # type: ignore[union-attr]
    problems = diagnose(seen, None, max_skew=1.0)
    assert problems == [
        "10.0.0.2:7700: plaintext on a non-loopback address (0.0.0.0:7700): serve with "
        "--tls-cert, --tls-key and --tls-client-ca",
        "10.0.0.2:7700: clock +30.00s off this machine's (±0.01s)",
        "127.0.0.1:3: halt view stale: 1 halt(s) at revision 0, but etcd holds others at "
        "revision 0",
        "127.0.0.1:3: canary failing: canary kill not seen within 2s",
        "halt views differ: 127.0.0.1:1 has 0 halt(s) at revision 0, 10.0.0.2:7700 has 0 "
        "halt(s) at revision 0, 127.0.0.1:3 has 1 halt(s) at revision 0",
        "clocks differ by 30.00s between 127.0.0.1:3 and 10.0.0.2:7700",
    ]
