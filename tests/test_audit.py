"""The audit is append-only and tamper-evident: a hash chain that `tether audit --verify` walks."""

from __future__ import annotations

import json
import queue
from concurrent.futures import ThreadPoolExecutor

import grpc
import tether
from aetcd import rpc
from tether.v1 import agent_pb2, agent_pb2_grpc
from tether_server._store import AUDIT, prefix_end

from tests.conftest import Coordinator, Etcd, audited, tether_cli


def _audit_kvs(etcd: Etcd) -> list[tuple[bytes, bytes]]:
    with grpc.insecure_channel(etcd.endpoint) as channel:
        resp = rpc.KVStub(channel).Range(
            rpc.RangeRequest(key=AUDIT, range_end=prefix_end(AUDIT)), timeout=5
        )
        return [(kv.key, kv.value) for kv in sorted(resp.kvs, key=lambda kv: kv.create_revision)]


def _put(etcd: Etcd, key: bytes, value: bytes) -> None:
    with grpc.insecure_channel(etcd.endpoint) as channel:
        rpc.KVStub(channel).Put(rpc.PutRequest(key=key, value=value), timeout=5)


def _delete(etcd: Etcd, key: bytes) -> None:
    with grpc.insecure_channel(etcd.endpoint) as channel:
        rpc.KVStub(channel).DeleteRange(rpc.DeleteRangeRequest(key=key), timeout=5)


def test_concurrent_kills_on_two_coordinators_keep_one_chain(
    coordinators: tuple[Coordinator, Coordinator], tenant: str
) -> None:
    a, b = coordinators
    with tether.Agent(f"agent://{tenant}/x", target=a.addr):
        clients = [tether.AdminClient(c.addr, actor=f"op-{i}") for i, c in enumerate((a, b))]

        def flip(n: int) -> None:
            client = clients[n % 2]
            sel = tether.selector(run_id=f"run-{n}", tenant=tenant)
            client.kill(sel, f"kill {n}", force=True)
            client.resume(sel, f"resume {n}")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(flip, range(24)))
        intact, count, bad, problem = clients[0].verify_audit()
        assert (intact, count, bad, problem) == (True, 48, "", "")
        entries = clients[1].audit(limit=1000)
        assert len(entries) == 48
        assert sorted(e.reason for e in entries if e.action == "kill") == sorted(
            f"kill {n}" for n in range(24)
        )
        for client in clients:
            client.close()


def test_an_edited_entry_is_detected(coord: Coordinator, etcd: Etcd, tenant: str) -> None:
    with tether.AdminClient(coord.addr, actor="alice") as admin:  # no agents: no acks to race
        admin.kill(tether.selector(tenant=tenant), "first", force=True)
        admin.resume(tether.selector(tenant=tenant), "second")
        admin.kill(tether.selector(tenant=tenant), "third", force=True)
    ok = json.loads(tether_cli("audit", "--verify", "-o", "json", addr=coord.addr).stdout)
    assert ok == {"intact": True, "entries": 3, "first_bad_id": "", "problem": ""}

    key, value = _audit_kvs(etcd)[1]
    forged = json.loads(value)
    forged["actor"] = "mallory"  # someone rewrites who resumed
    _put(etcd, key, json.dumps(forged).encode())
    result = tether_cli("audit", "--verify", addr=coord.addr)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"tether: audit chain broken at entry {key.decode().rsplit('/', 1)[1]}: "
        "its content does not match its hash: the entry was edited"
    )


def _six_entries(coord: Coordinator, etcd: Etcd, tenant: str) -> list[tuple[bytes, bytes]]:
    with tether.AdminClient(coord.addr) as admin:
        for n in range(3):
            admin.kill(tether.selector(tenant=tenant), f"k{n}", force=True)
            admin.resume(tether.selector(tenant=tenant), f"r{n}")
    return _audit_kvs(etcd)


def test_a_deleted_entry_is_detected(coord: Coordinator, etcd: Etcd, tenant: str) -> None:
    kvs = _six_entries(coord, etcd, tenant)
    _delete(etcd, kvs[2][0])
    with tether.AdminClient(coord.addr) as admin:
        intact, _, bad, problem = admin.verify_audit()
    assert not intact
    assert bad == kvs[3][0].decode().rsplit("/", 1)[1]
    assert "removed or inserted" in problem


def test_a_cut_tail_is_detected_by_the_head(coord: Coordinator, etcd: Etcd, tenant: str) -> None:
    kvs = _six_entries(coord, etcd, tenant)
    _delete(etcd, kvs[-1][0])
    with tether.AdminClient(coord.addr) as admin:
        intact, count, _, problem = admin.verify_audit()
    assert (intact, count) == (False, 5)
    assert "cut off the end" in problem


def test_an_agent_cannot_acknowledge_a_halt_it_is_not_under(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    """A KillAck names a halt; the audit takes it only for a halt the instance is under."""
    reg = agent_pb2.Register(tenant=tenant, agent="forger", run_id="f-1", instance_id="i1")
    outgoing: queue.Queue[agent_pb2.HeartbeatRequest | None] = queue.Queue()
    outgoing.put(agent_pb2.HeartbeatRequest(register=reg))
    with grpc.insecure_channel(coord.addr) as channel:
        replies = agent_pb2_grpc.AgentServiceStub(channel).Heartbeat(iter(outgoing.get, None))
        next(replies)  # the grant
        admin.kill(tether.selector(tenant=tenant), "a real kill")
        pushed = next(r for r in replies if r.order == agent_pb2.ORDER_STOP)
        for halt_id in ("tenant/someone-else", "made-up", pushed.halts[0].id):
            outgoing.put(agent_pb2.HeartbeatRequest(ack=agent_pb2.KillAck(halt_id=halt_id)))
        audited(admin, tenant, "ack")
        outgoing.put(agent_pb2.HeartbeatRequest(goodbye=agent_pb2.Goodbye()))
        outgoing.put(None)
    acks = [e for e in admin.audit() if e.action == "ack"]
    assert [e.halt_id for e in acks] == [f"tenant/{tenant}"]
