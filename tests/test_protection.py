"""Automatic protection on real parts: degraded mode, signals, breakers and policy."""

from __future__ import annotations

import pytest
import tether

from tests.conftest import Coordinator, eventually
from tests.test_cli import tether_cli

KINDS = {"send_email": "write", "crm_lookup": "read"}


def test_degraded_mode_blocks_writes_and_lets_reads_go(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="d1", target=coord.addr, capabilities=KINDS) as agent:
        sel = tether.selector(run_id="d1", tenant=tenant, writes=True)
        halt, _ = admin.kill(sel, "error rate 0.50 over 60s (10/20) > 0.15")
        eventually(lambda: agent.frozen("send_email"))
        with pytest.raises(tether.Degraded) as err, agent.effect("send_email"):
            pytest.fail("a write must not run in degraded mode")
        assert isinstance(err.value, tether.CapabilityFrozen)
        assert "error rate 0.50" in str(err.value) and err.value.halt_id == halt.id
        with agent.effect("crm_lookup"):
            pass  # reads go on
        agent.check()  # the instance itself is not stopped
        agent.check("crm_lookup")
        with pytest.raises(tether.Degraded):
            agent.check("send_email")
        with pytest.raises(tether.Degraded), agent.effect("send_email", strict=True):
            pytest.fail("a strict write must not get a permit in degraded mode")
        with agent.effect("crm_lookup", strict=True) as fx:
            assert fx.permit
        assert [h.id for h in admin.halts()] == [halt.id]
        assert agent.halts[0].selector.writes
        admin.resume(sel, "reviewed")
        eventually(lambda: not agent.frozen("send_email"))
        with agent.effect("send_email"):
            pass


def test_degraded_mode_from_the_cli(coord: Coordinator, tenant: str) -> None:
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="d2", target=coord.addr, capabilities=KINDS) as agent:
        kill = tether_cli("kill", "--agent", uri, "--writes", "--reason", "test", addr=coord.addr)
        assert kill.returncode == 0, kill.stderr
        eventually(lambda: agent.frozen("send_email"))
        assert not agent.frozen("crm_lookup") and not agent.killed
        halts = tether_cli("halts", addr=coord.addr)
        assert "writes in agent://" in halts.stdout, halts.stdout
        resume = tether_cli("resume", "--agent", uri, "--writes", "--reason", "ok", addr=coord.addr)
        assert resume.returncode == 0, resume.stderr
        eventually(lambda: not agent.frozen("send_email"))


def test_plain_capability_list_means_writes(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="d3", target=coord.addr, capabilities=["crm_lookup"]) as agent:
        admin.kill(tether.selector(run_id="d3", writes=True), "degrade")
        eventually(lambda: agent.frozen("crm_lookup"))
        agent.spend(usd=1.5, tokens=10, calls=1)  # never blocks, even degraded
        agent.anomaly("odd")


def test_bad_capability_kind_is_refused(coord: Coordinator, tenant: str) -> None:
    with pytest.raises(tether.InvalidArgument, match='use "read" or "write"'):
        tether.Agent(f"agent://{tenant}/a", target=coord.addr, capabilities={"x": "delete"})
    with pytest.raises(tether.InvalidArgument, match="writes"):
        tether.selector(tenant=tenant, capability="x", writes=True)
