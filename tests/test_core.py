"""Registration, heartbeats, checkpoints, kills and resume, on real etcd and real gRPC."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import pytest
import tether

from tests.conftest import Coordinator, eventually


def test_register_heartbeat_and_checkpoint_round_trip(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/email"
    with tether.Agent(uri, run_id="run-1", target=coord.addr) as agent:
        assert agent.checkpoint is None
        agent.check()
        agent.report({"batch": 7, "cursor": "c-7", "done": [1, 2]})
        found = eventually(lambda: admin.agent(tenant, "email", "run-1").checkpoint)
        assert found == {"batch": 7, "cursor": "c-7", "done": [1, 2]}
        assert admin.agent(tenant, "email", "run-1").state is tether.State.ACTIVE
    exited = admin.agent(tenant, "email", "run-1")
    assert exited.state is tether.State.EXITED
    assert exited.ended_at is not None
    with tether.Agent(uri, run_id="run-1", target=coord.addr) as again:
        assert again.checkpoint == {"batch": 7, "cursor": "c-7", "done": [1, 2]}


def test_final_checkpoint_is_stored_at_exit(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    agent = tether.Agent(f"agent://{tenant}/a", run_id="r", target=coord.addr)
    agent.start()
    agent.report({"step": 1})
    agent.close({"step": 2})  # stored before close() returns, with no wait for a flush
    assert admin.agent(tenant, "a", "r").checkpoint == {"step": 2}


def test_kill_reaches_every_instance_on_both_coordinators(
    coordinators: tuple[Coordinator, Coordinator], admin: tether.AdminClient, tenant: str
) -> None:
    a, b = coordinators
    uri = f"agent://{tenant}/email"
    with ExitStack() as stack:
        agents = [
            stack.enter_context(tether.Agent(uri, run_id=f"r{i}", target=c.addr))
            for i, c in enumerate([a, a, b])
        ]
        bystander = stack.enter_context(tether.Agent(f"agent://{tenant}/other", target=b.addr))
        for agent in agents:
            agent.check()
        halt, already = admin.kill(tether.selector(agent=uri), "broken unsubscribe link")
        assert not already
        for agent in agents:
            eventually(lambda a=agent: a.killed)  # type: ignore[misc]
            with pytest.raises(tether.Killed) as info:
                agent.check()
            assert info.value.reason == "broken unsubscribe link"
            assert info.value.scope == "agent"
            assert info.value.actor.startswith("anonymous@")  # the principal, not the note
            assert info.value.halt_id == halt.id
        bystander.check()  # another agent of the same tenant keeps running
        states = {i.instance_id: i.state for i in admin.agents(tenant=tenant)}
        assert states[bystander.instance_id] is tether.State.ACTIVE
        assert [states[x.instance_id] for x in agents] == [tether.State.KILLED] * 3


def _appending_to(seen: list[tether.Verdict]) -> Callable[[tether.Verdict, bool], None]:
    """An ``on_reply`` observer that keeps every verdict a reply put in force."""

    def observe(verdict: tether.Verdict, grant: bool) -> None:
        seen.append(verdict)

    return observe


def test_tenant_kill_does_not_touch_another_tenant(
    coordinators: tuple[Coordinator, Coordinator], admin: tether.AdminClient, tenant: str
) -> None:
    a, b = coordinators
    replies: list[list[tether.Verdict]] = [[], []]  # each reply the other tenant's agents got
    with ExitStack() as stack:
        mine = stack.enter_context(tether.Agent(f"agent://{tenant}/x", target=a.addr))
        theirs = [
            stack.enter_context(
                tether.Agent(
                    f"agent://{tenant}-other/x",
                    target=c.addr,
                    config=tether.AgentConfig(on_reply=_appending_to(seen)),
                )
            )
            for c, seen in zip((a, b), replies, strict=True)
        ]
        admin.kill(tether.selector(tenant=tenant), "tenant incident")
        eventually(lambda: mine.killed)
        # The other tenant's agents got every heartbeat ack since, and are still told RUN.
        counts = [len(seen) for seen in replies]
        eventually(lambda: all(len(s) > n for s, n in zip(replies, counts, strict=True)))
        assert all(seen[-1].stop is None for seen in replies)
        for agent in theirs:
            agent.check()


def test_halted_run_is_told_on_arrival(
    coordinators: tuple[Coordinator, Coordinator], admin: tether.AdminClient, tenant: str
) -> None:
    a, b = coordinators
    uri = f"agent://{tenant}/email"
    with tether.Agent(uri, run_id="campaign-42", target=a.addr) as agent:
        agent.report({"batch": 3})
    admin.kill(tether.selector(run_id="campaign-42"), "stop that run")
    for coordinator in (a, b):  # any coordinator, any worker: the first reply is the kill
        with tether.Agent(uri, run_id="campaign-42", target=coordinator.addr) as agent:
            with pytest.raises(tether.Killed) as info:
                agent.check()
            assert info.value.scope == "run"
            assert agent.checkpoint == {"batch": 3}
        with tether.Agent(uri, run_id="another-run", target=coordinator.addr) as other:
            other.check()


def test_resume_lets_the_run_carry_on_from_its_checkpoint_without_repeats(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/email-campaign"
    sent: list[int] = []
    total = 400

    def campaign(kill_after: int | None) -> None:
        with tether.Agent(uri, run_id="campaign-42", target=coord.addr) as agent:
            start = (agent.checkpoint or {}).get("batch", 0)
            try:
                for i in range(start, total):
                    agent.check()
                    sent.append(i)  # the effect
                    agent.report({"batch": i + 1})
                    if kill_after is not None and i == kill_after:
                        admin.kill(tether.selector(agent=uri), "template broken")
                        eventually(lambda: agent.killed)
            except tether.Killed:
                pass

    campaign(kill_after=120)
    assert 120 <= max(sent) < total
    assert admin.agent(tenant, "email-campaign", "campaign-42").checkpoint == {"batch": len(sent)}
    assert admin.resume(tether.selector(agent=uri), "template fixed") is not None
    campaign(kill_after=None)
    assert sent == list(range(total))  # every batch once: none lost, none sent twice


def test_kill_and_resume_converge(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    with tether.Agent(f"agent://{tenant}/a", target=coord.addr) as agent:
        sel = tether.selector(tenant=tenant)
        first, already = admin.kill(sel, "one")
        halt_id = first.id
        second, again = admin.kill(sel, "two")
        assert (already, again) == (False, True)
        assert second.id == first.id and second.reason == "one"
        eventually(lambda: agent.killed)
        assert admin.resume(sel, "fixed") is not None
        assert admin.resume(sel, "fixed again") is None
        eventually(lambda: not agent.killed)  # the resume is pushed onto the open stream too
        agent.check()

    def with_ack() -> list[tether.AuditEntry]:
        found = admin.audit(tenant=tenant)
        return found if any(e.halt_id == halt_id for e in found if e.action == "ack") else []

    entries = eventually(with_ack)
    actions = [(e.action, e.changed) for e in entries if e.action != "ack" and e.halt_id == halt_id]
    assert actions == [("kill", True), ("kill", False), ("resume", True), ("resume", False)]
    # The actor is the principal (anonymous on this open coordinator); "pytest" is the note.
    people = [e for e in entries if e.action != "ack"]
    assert all(e.actor.startswith("anonymous@") and e.actor_note == "pytest" for e in people)
    (ack,) = [e for e in entries if e.action == "ack" and e.halt_id == halt_id]
    assert ack.actor == "tether"
    assert ack.reason == "1 instance(s) stopped; 0 effect(s) were in flight"
    assert ack.instances == (f"{tenant}/a/{agent.run_id}/{agent.instance_id}",)


def test_async_agent(coord: Coordinator, admin: tether.AdminClient, tenant: str) -> None:
    import asyncio

    async def main() -> str:
        uri = f"agent://{tenant}/async"
        async with tether.AsyncAgent(uri, run_id="ra", target=coord.addr) as agent:
            agent.check()
            agent.report({"n": 1})
            await asyncio.to_thread(admin.kill, tether.selector(agent=uri), "async stop")
            for _ in range(1000):
                if agent.killed:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(tether.Killed) as info:
                agent.check()
            return info.value.reason

    assert asyncio.run(main()) == "async stop"
    assert admin.agent(tenant, "async", "ra").checkpoint == {"n": 1}
    assert admin.agent(tenant, "async", "ra").state is tether.State.KILLED
