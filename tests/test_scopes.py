"""Capability freezes and label selectors: the narrow hammers."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import tether

from tests.conftest import Coordinator, Siblings, eventually


def test_capability_freeze_blocks_only_that_capability(
    coordinators: tuple[Coordinator, Coordinator],
    admin: tether.AdminClient,
    tenant: str,
    siblings: Siblings,
) -> None:
    a, b = coordinators
    uri = f"agent://{tenant}/email"
    caps = ["send_email", "read_crm"]
    with ExitStack() as stack:
        stack.enter_context(siblings.around(a.addr))
        agents = [
            stack.enter_context(tether.Agent(uri, target=c.addr, capabilities=caps)) for c in (a, b)
        ]
        freeze = tether.selector(tenant=tenant, capability="send_email")
        halt, _ = admin.kill(freeze, "unsubscribe link broken")
        assert halt.id == f"tenant/{tenant}#send_email"
        for agent in agents:
            eventually(lambda agent=agent: agent.frozen("send_email"))  # type: ignore[misc]
            with pytest.raises(tether.CapabilityFrozen) as info:
                agent.check("send_email")
            assert info.value.capability == "send_email"
            assert info.value.reason == "unsubscribe link broken"
            assert isinstance(info.value, tether.Killed)
            agent.check()  # everything else keeps flowing
            agent.check("read_crm")
            assert not agent.killed
        (listed,) = [
            i for i in admin.agents(tenant=tenant) if i.instance_id == agents[0].instance_id
        ]
        assert listed.state is tether.State.ACTIVE  # frozen, not killed
        assert [h.selector.capability for h in listed.halts] == ["send_email"]

        admin.kill(tether.selector(agent=uri), "now everything")
        for agent in agents:
            eventually(lambda agent=agent: agent.killed)  # type: ignore[misc]
            with pytest.raises(tether.Killed) as stop:
                agent.check("read_crm")
            assert not isinstance(stop.value, tether.CapabilityFrozen)

        admin.resume(tether.selector(agent=uri))
        admin.resume(freeze)
        for agent in agents:
            eventually(lambda agent=agent: not agent.frozen("send_email"))  # type: ignore[misc]
            agent.check("send_email")


def test_label_selector_halts_only_matching_instances(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, siblings: Siblings
) -> None:
    uri = f"agent://{tenant}/bot"
    with ExitStack() as stack:
        stack.enter_context(siblings.around(coord.addr))
        beta = stack.enter_context(
            tether.Agent(uri, target=coord.addr, labels={"feature": "beta", "version": "2.3.1"})
        )
        stable = stack.enter_context(
            tether.Agent(uri, target=coord.addr, labels={"feature": "stable", "version": "2.3.1"})
        )
        halt, _ = admin.kill(
            tether.selector(tenant=tenant, labels={"feature": "beta"}), "beta misbehaves"
        )
        assert halt.id == f"tenant/{tenant}+feature=beta"
        eventually(lambda: beta.killed)
        stable.check()
        states = {i.instance_id: i.state for i in admin.agents(tenant=tenant)}
        assert states == {
            beta.instance_id: tether.State.KILLED,
            stable.instance_id: tether.State.ACTIVE,
        }
        late = stack.enter_context(tether.Agent(uri, target=coord.addr, labels={"feature": "beta"}))
        with pytest.raises(tether.Killed, match="beta misbehaves"):
            late.check()  # halted on arrival, by label
