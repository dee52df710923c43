"""The effect gate, the ledger, strict mode, idempotency and permits, on real parts."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import grpc
import pytest
import tether
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tether_server._signer import PermitSigner

from tests.conftest import Coordinator, Etcd, eventually, forged, settled_effects, tether_cli


def test_local_gate_records_landed_failed_and_refused(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="r1", target=coord.addr) as agent:
        with agent.effect("send_email", key="m-1") as fx:
            assert fx.permit == ""  # local mode: no round trip, no permit
        with pytest.raises(RuntimeError), agent.effect("send_email", key="m-2"):
            raise RuntimeError("smtp down")
        halt, _ = admin.kill(tether.selector(tenant=tenant, capability="send_email"), "freeze")
        eventually(lambda: agent.frozen("send_email"))
        with pytest.raises(tether.CapabilityFrozen), agent.effect("send_email", key="m-3"):
            pytest.fail("a frozen capability must not run")
        with agent.effect("read_crm"):
            pass  # other tools keep flowing

        @agent.effect("send_email", key=lambda n: f"m-{n}")
        def send(n: int) -> int:
            return n

        with pytest.raises(tether.CapabilityFrozen):
            send(4)
    rows = settled_effects(admin, tenant, 5)
    assert [(r.key, r.capability, r.status.value) for r in rows] == [
        ("m-1", "send_email", "landed"),
        ("m-2", "send_email", "failed"),
        ("m-3", "send_email", "refused"),
        ("", "read_crm", "landed"),
        ("m-4", "send_email", "refused"),
    ]
    assert rows[1].error == "RuntimeError: smtp down"
    assert rows[2].refused_by == halt.id
    assert all(r.run_id == "r1" and r.agent == "mailer" for r in rows)
    table = json.loads(
        tether_cli(
            "effects", "--agent", uri, "--status", "refused", "-o", "json", addr=coord.addr
        ).stdout
    )
    assert [row["key"] for row in table] == ["m-3", "m-4"]


def test_duplicate_keys_after_resume_do_not_run_again(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/mailer"
    sel = tether.selector(agent=uri)
    with tether.Agent(uri, run_id="r", target=coord.addr) as agent:
        for n in range(3):
            with agent.effect("send_email", key=f"batch-{n}"):
                pass
        admin.kill(sel, "stop")
        eventually(lambda: agent.killed)
    admin.resume(sel)
    with tether.Agent(uri, run_id="r", target=coord.addr) as again:
        assert again.landed_keys == {"batch-0", "batch-1", "batch-2"}
        for strict in (False, True):
            with (
                pytest.raises(tether.DuplicateEffect, match="batch-1"),
                again.effect("send_email", key="batch-1", strict=strict),
            ):
                pytest.fail("a landed key must not run again")
        with again.effect("send_email", key="batch-3", strict=True) as fx:
            assert fx.permit
    rows = settled_effects(admin, tenant, 6)
    assert [r.status.value for r in rows if r.key == "batch-1"] == [
        "landed",
        "duplicate",
        "duplicate",
    ]
    assert [r.status.value for r in rows if r.key == "batch-3"] == ["landed"]


def test_strict_mode_lets_no_effect_land_after_the_kill_commit(
    coordinators: tuple[Coordinator, Coordinator], admin: tether.AdminClient, tenant: str
) -> None:
    """A fleet hammers strict effects while it is killed, round after round.

    Each strict permit carries the etcd revision of the halt read it was granted at. Between
    a kill's commit revision and its resume's, no permit may have been granted; and no effect
    that went into the gate after Kill returned may have landed before the resume.
    """
    uri = f"agent://{tenant}/hammer"
    sel = tether.selector(agent=uri)
    with ExitStack() as stack:
        agents = [
            stack.enter_context(
                tether.Agent(
                    uri, run_id=f"r{i}", target=coordinators[i % 2].addr, strict_effects=True
                )
            )
            for i in range(4)
        ]
        after_kill = [key for n in range(5) for key in _hammer_round(admin, tenant, sel, agents, n)]

    rows = settled_effects(admin, tenant)
    landed = [r for r in rows if r.status is tether.EffectStatus.LANDED]
    refused = [r for r in rows if r.status is tether.EffectStatus.REFUSED]
    assert landed
    assert refused
    assert all(r.strict and r.permit_revision > 0 for r in landed)
    audit = admin.audit(tenant=tenant, limit=1000)
    kills = [e.revision for e in audit if e.action == "kill"]
    resumes = [e.revision for e in audit if e.action == "resume"]
    assert len(kills) == len(resumes) == 5
    for kill_rev, resume_rev in zip(kills, resumes, strict=True):
        inside = [r for r in landed if kill_rev <= r.permit_revision < resume_rev]
        assert inside == [], f"{len(inside)} strict effects landed while halted at {kill_rev}"
    assert after_kill  # the fleet did hammer the closed gate
    late = [r.key for r in landed if r.key in set(after_kill)]
    assert late == [], f"{len(late)} strict effects passed the gate after Kill returned"


def _hammer_round(
    admin: tether.AdminClient, tenant: str, sel: tether.Selector, agents: list[tether.Agent], n: int
) -> list[str]:
    """One kill under load; returns the keys that went into the gate after Kill returned."""
    stop, killed = threading.Event(), threading.Event()
    after_kill: list[str] = []
    refused_after_kill: set[str] = set()  # run ids

    def hammer(agent: tether.Agent) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key, late = f"{n}-{agent.run_id}-{i}", killed.is_set()
            if late:
                after_kill.append(key)
            try:
                with agent.effect("charge_card", key=key):
                    pass
            except tether.Killed:
                if late:
                    refused_after_kill.add(agent.run_id)
                stop.wait(0.001)

    threads = [threading.Thread(target=hammer, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    before = len(admin.effects(tenant))
    eventually(lambda: len(admin.effects(tenant)) > before + 20, timeout=30)
    admin.kill(sel, f"round {n}")
    killed.set()
    eventually(lambda: len(refused_after_kill) == len(agents))  # each hit the closed gate
    stop.set()
    for t in threads:
        t.join(10)
    admin.resume(sel, f"round {n} over")
    for a in agents:
        eventually(lambda a=a: not a.killed)  # type: ignore[misc]
    return after_kill


def test_local_mode_effects_after_the_flip_are_measured(
    coord: Coordinator,
    admin: tether.AdminClient,
    tenant: str,
    record_property: Callable[[str, object], None],
) -> None:
    uri = f"agent://{tenant}/local"
    with tether.Agent(uri, run_id="r", target=coord.addr) as agent:
        stop, killed = threading.Event(), threading.Event()
        after_kill: set[str] = set()  # keys that went into the gate after Kill returned

        def hammer() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                if killed.is_set():
                    after_kill.add(f"k{i}")
                try:
                    with agent.effect("post", key=f"k{i}"):
                        time.sleep(0.001)  # the effect itself takes a moment
                except tether.Killed:
                    return

        thread = threading.Thread(target=hammer)
        thread.start()
        eventually(lambda: len(admin.effects(tenant)) > 50)
        admin.kill(tether.selector(agent=uri), "flip")
        killed.set()
        thread.join(10)
        stop.set()
    rows = settled_effects(admin, tenant)
    late = [r for r in rows if r.status is tether.EffectStatus.LANDED and r.key in after_kill]
    record_property("local_effects_after_kill_returned", len(late))
    print(f"local mode: {len(late)} effects passed the gate after Kill returned")
    assert rows[-1].status is tether.EffectStatus.REFUSED  # and then the gate shut


def test_permits_verify_and_are_rejected_when_killed_expired_or_forged(
    coord: Coordinator, etcd: Etcd, admin: tether.AdminClient, tenant: str
) -> None:
    pem, key_id = admin.permit_key()
    verifier = tether.PermitVerifier(pem, halted=tether.HaltCache(coord.addr, max_age=0))
    uri = f"agent://{tenant}/payer"
    with tether.Agent(uri, run_id="r", target=coord.addr) as agent:
        with agent.effect("charge_card", key="c-1", strict=True) as fx:
            claims = verifier.verify(fx.permit, capability="charge_card")
        assert (claims.run_id, claims.key, claims.key_id) == ("r", "c-1", key_id)
        with pytest.raises(tether.InvalidPermit, match="not 'send_email'"):
            verifier.verify(fx.permit, capability="send_email")

        with pytest.raises(tether.InvalidPermit, match="forged"):
            verifier.verify(forged(fx.permit, run_id="someone-else"))
        other: dict[str, Any] = {  # a permit like the real one
            "tenant": tenant,
            "agent": "payer",
            "run_id": "r",
            "instance_id": "x",
            "capability": "charge_card",
            "key": "",
            "revision": 1,
        }
        fake, _ = PermitSigner.from_raw(b"\x01" * 32).sign(**other)  # an impostor's key
        with pytest.raises(tether.InvalidPermit, match="forged"):
            verifier.verify(fake)
        expired, _ = PermitSigner.from_raw(etcd.permit_key(), ttl=-1).sign(**other)
        with pytest.raises(tether.InvalidPermit, match="expired"):
            verifier.verify(expired)

        admin.kill(tether.selector(run_id="r", tenant=tenant), "stop paying")
        with pytest.raises(tether.InvalidPermit, match="halted: stop paying"):
            verifier.verify(fx.permit)  # a permit from before the kill is dead too


def test_permit_interceptor_guards_a_tool_server(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    pem, _ = admin.permit_key()
    verifier = tether.PermitVerifier(pem, halted=tether.HaltCache(coord.addr, max_age=0))

    async def scenario() -> list[str]:
        server = grpc.aio.server(interceptors=[tether.PermitInterceptor(verifier)])
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        outcomes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                tool = health_pb2_grpc.HealthStub(channel)
                uri = f"agent://{tenant}/buggy"
                async with tether.AsyncAgent(uri, run_id="rb", target=coord.addr) as agent:
                    async with agent.effect("call_tool", strict=True) as fx:
                        permit = fx.permit
                    for token in (permit, "", None):
                        metadata = ((tether.PERMIT_METADATA, token),) if token else None
                        if token is None:
                            await asyncio.to_thread(admin.kill, tether.selector(agent=uri), "buggy")
                            metadata = ((tether.PERMIT_METADATA, permit),)
                        try:
                            await tool.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
                            outcomes.append("ok")
                        except grpc.aio.AioRpcError as err:
                            outcomes.append(f"{err.code().name}: {err.details()}")
        finally:
            await server.stop(0)
        return outcomes

    ok, missing, killed = asyncio.run(scenario())
    assert ok == "ok"
    assert missing == "PERMISSION_DENIED: no permit: send one in the x-tether-permit metadata"
    assert killed.startswith("PERMISSION_DENIED: run rb is halted: buggy")


# -- one effect per idempotency key, even concurrently ------------------------------------


def _race(agent: tether.Agent, key: str, *, strict: bool, fail_first: bool = False) -> list[str]:
    """Two threads enter ``agent.effect("cap", key=key)`` at once; returns what each saw."""
    barrier, ran = threading.Barrier(2), threading.Event()

    def enter(_: int) -> str:
        barrier.wait()
        try:
            with agent.effect("cap", key=key, strict=strict):
                first = not ran.is_set()
                ran.set()
                time.sleep(0.3)  # long enough for the other thread to arrive while in flight
                if fail_first and first:
                    raise RuntimeError("upstream down")
        except tether.DuplicateEffect as dup:
            return "in flight" if dup.in_flight else "duplicate"
        except RuntimeError:
            return "failed"
        return "ran"

    with ThreadPoolExecutor(2) as pool:
        return sorted(pool.map(enter, range(2)))


@pytest.mark.parametrize("strict", [False, True], ids=["local", "strict"])
def test_two_threads_with_one_key_run_the_body_once(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, strict: bool
) -> None:
    with tether.Agent(f"agent://{tenant}/a", run_id="r", target=coord.addr) as agent:
        assert _race(agent, "k", strict=strict) == ["duplicate", "ran"]  # the second waited
        # The first failed: the waiter runs it after all.
        assert _race(agent, "k2", strict=strict, fail_first=True) == ["failed", "ran"]
    rows = sorted((r.key, r.status.value) for r in settled_effects(admin, tenant, 4))
    assert rows == [("k", "duplicate"), ("k", "landed"), ("k2", "failed"), ("k2", "landed")]


def test_two_tasks_with_one_key_run_the_body_once(coord: Coordinator, tenant: str) -> None:
    async def scenario() -> tuple[int, list[BaseException | None]]:
        runs = 0

        async def send() -> None:
            nonlocal runs
            async with agent.effect("cap", key="k"):
                runs += 1
                await asyncio.sleep(0.2)

        async with tether.AsyncAgent(f"agent://{tenant}/a", run_id="r", target=coord.addr) as agent:
            outcomes = await asyncio.gather(send(), send(), send(), return_exceptions=True)
            async with agent.effect("cap", key="k2"):  # the holder cannot wait for itself
                with pytest.raises(tether.DuplicateEffect, match="in flight"):
                    agent.effect("cap", key="k2").__enter__()
        return runs, list(outcomes)

    runs, outcomes = asyncio.run(scenario())
    assert runs == 1
    assert [type(o).__name__ for o in outcomes].count("DuplicateEffect") == 2


def _once_settled(agent: tether.Agent, key: str) -> str:
    """Enter a strict effect of ``key`` once no other holds it: "ran" or "duplicate"."""

    def attempt() -> str:
        try:
            with agent.effect("charge", key=key):
                return "ran"
        except tether.DuplicateEffect as dup:
            return "" if dup.in_flight else "duplicate"

    return eventually(attempt)


def test_strict_permits_one_key_once_across_instances_and_coordinators(
    coordinators: tuple[Coordinator, Coordinator], admin: tether.AdminClient, tenant: str
) -> None:
    """Two instances of one run, on two coordinators: the key's claim in etcd decides."""
    uri = f"agent://{tenant}/payer"
    with ExitStack() as stack:
        one, two = (
            stack.enter_context(tether.Agent(uri, run_id="r", target=c.addr, strict_effects=True))
            for c in coordinators
        )
        with one.effect("charge", key="invoice-1") as fx:
            assert fx.permit
            with pytest.raises(tether.DuplicateEffect, match="in flight"):
                two.effect("charge", key="invoice-1").__enter__()  # no second permit for it
        assert _once_settled(two, "invoice-1") == "duplicate"  # it landed: never again
        with pytest.raises(RuntimeError), one.effect("charge", key="invoice-2"):
            raise RuntimeError("card declined")
        assert _once_settled(two, "invoice-2") == "ran"  # the failed one let go of its key
    rows = settled_effects(admin, tenant, 5)
    ran = [(r.key, r.instance_id == one.instance_id) for r in rows if r.status.value == "landed"]
    assert ran == [("invoice-1", True), ("invoice-2", False)]
    assert {r.status.value for r in rows if r.key == "invoice-1"} == {"landed", "duplicate"}
