"""The canary: ``tether serve --canary-interval`` kills and resumes a synthetic instance of the
reserved tenant ``_canary`` through etcd, records the latency, and stays out of the listings."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tether
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from tether.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from tether_server._canary import Canary
from tether_server._config import ServerConfig
from tether_server._etcd import Store

from tests.conftest import Coordinator, Etcd, Pki, eventually
from tests.test_tls import serve_flags


@pytest.fixture
def cycling(etcd: Etcd, tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator whose canary cycles every 0.3 s, exporting its metrics to its log."""
    env = {
        **os.environ,
        "TETHER_LOG_LEVEL": "INFO",
        "OTEL_METRICS_EXPORTER": "console",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    coordinator = Coordinator(etcd).start(tmp_path, "--canary-interval", "300ms", env=env)
    yield coordinator
    coordinator.stop()


def _log(coordinator: Coordinator) -> str:
    assert coordinator.log is not None
    return coordinator.log.read_text(errors="replace")


def test_the_canary_cycles_and_records_its_kill_latency(cycling: Coordinator) -> None:
    eventually(lambda: _log(cycling).count("canary kill seen in") >= 3)
    eventually(lambda: "tether.canary.kill.duration" in _log(cycling))
    with tether.AdminClient(cycling.addr) as admin:
        canary = admin.status().canary
    assert canary.enabled and canary.ok and canary.cycles >= 3, canary
    assert canary.interval.ToMilliseconds() == 300
    assert 0 < canary.last_kill.ToNanoseconds() < 2e9  # within the lease TTL


def test_the_canary_stays_out_of_listings_and_audit(cycling: Coordinator, tenant: str) -> None:
    events: list[tether.AgentEvent] = []
    with tether.AdminClient(cycling.addr) as admin:
        watcher = tether.AdminClient(cycling.addr)
        threading.Thread(target=lambda: events.extend(watcher.watch()), daemon=True).start()
        with tether.Agent(f"agent://{tenant}/w", run_id="r1", target=cycling.addr):
            eventually(lambda: any(e.instance.tenant == tenant for e in events))
            eventually(lambda: _log(cycling).count("canary kill seen in") >= 3)
            assert {a.tenant for a in admin.agents()} == {tenant}
            assert admin.halts() == []
            assert admin.audit() == []
            assert admin.verify_audit()[:2] == (True, 0)
            # Asked for by name, the canary is there.
            assert {a.agent for a in admin.agents(tenant="_canary")} == {"canary"}
        watcher.close()
    assert {e.instance.tenant for e in events} == {tenant}


def test_no_agent_can_register_as_the_canary_tenant(coord: Coordinator) -> None:
    with pytest.raises(tether.InvalidArgument, match="not a valid name"):
        tether.Agent("agent://_canary/canary", run_id="r", target=coord.addr)
    reg = agent_pb2.Register(tenant="_canary", agent="canary", run_id="r", instance_id="i")
    with grpc.insecure_channel(coord.addr) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        for metadata in ((), (("x-tether-canary", "a guess"),)):
            replies = stub.Heartbeat(
                iter([agent_pb2.HeartbeatRequest(register=reg)]), metadata=metadata, timeout=5
            )
            with pytest.raises(grpc.RpcError) as refused:
                next(replies)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid name" in (refused.value.details() or "")


def test_a_canary_that_cannot_complete_its_cycle_turns_health_not_serving(etcd: Etcd) -> None:
    """A canary whose stream finds no coordinator behind its socket: the kill path is broken."""

    async def scenario() -> tuple[int, str]:
        health, attached = HealthServicer(), asyncio.Event()
        attached.set()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        store = Store([etcd.endpoint])
        config = ServerConfig(canary_interval=0.2, lease_ttl=2.0)
        canary = Canary(config, store, health, attached, [""])
        task = asyncio.create_task(canary.run())
        try:
            for _ in range(200):  # 10 s at most
                if not canary.status().ok:
                    break
                await asyncio.sleep(0.05)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), None)
            return answer.status, canary.status().problem
        finally:
            task.cancel()
            canary.close()
            await store.close()

    status, problem = asyncio.run(scenario())
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert problem.startswith("canary stream refused: UNAVAILABLE"), problem


def test_the_canary_cycles_on_a_coordinator_with_mutual_tls_and_rbac(
    etcd: Etcd, pki: Pki, tmp_path: Path
) -> None:
    """The canary's own stream needs no certificate and passes no role check."""
    from tether_server import CoordinatorProcess, TlsFiles

    op_cert, op_key = pki.operator("alice")
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text('operators:\n  alice: {role: viewer, tenants: ["*"]}\n')
    coordinator = CoordinatorProcess(etcd.url, lease_ttl=2, tls=TlsFiles(op_cert, op_key, pki.ca))
    before = set(Path(tempfile.gettempdir()).glob("tether-canary-*/canary.sock"))
    coordinator.start(*serve_flags(pki), *("--rbac", str(rbac), "--canary-interval", "0.5"))
    try:
        with tether.AdminClient(
            coordinator.addr, tls_ca=pki.ca, tls_cert=op_cert, tls_key=op_key
        ) as admin:
            eventually(lambda: admin.status().canary.cycles >= 2)
            canary = admin.status().canary
            assert canary.ok, canary.problem
            assert admin.agents() == []  # and it stays out of the listings
        (socket,) = set(Path(tempfile.gettempdir()).glob("tether-canary-*/canary.sock")) - before
        with grpc.insecure_channel(f"unix:{socket}") as channel:  # no TLS there: no admin
            with pytest.raises(grpc.RpcError) as refused:
                admin_pb2_grpc.AdminServiceStub(channel).ListAgents(
                    admin_pb2.ListAgentsRequest(), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        coordinator.stop()
