"""``tether drill --scope breaker``: prove that a breaker trips by itself and reads go on.

On the drill's own fleet (it applies a policy of its own, so never on ``--addr``): one
agent whose writes fail half the time, under a breaker on the error rate. The drill
checks that the breaker degrades the run with no human, that the halt names the breaker
and its figures, that reads go on while writes are refused, and that a resume lifts it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from tether import AdminClient, Agent, CapabilityFrozen, selector

from tether_server._drill_fleet import wait
from tether_server._drill_report import Check, check, verdict

POLICY = """
breakers:
  - name: drill-errors
    selector: {{tenant: {tenant}}}
    scope: run
    window: 30s
    min_calls: 10
    error_rate: 0.3
    cooldown: 600s
"""
KINDS = {"send": "write", "lookup": "read"}
TRIP_TIMEOUT = 15.0


def _failing_writes(agent: Agent, n: int) -> float:
    """``n`` writes, every other one failing; returns when the last one ended."""
    for i in range(n):
        try:
            with agent.effect("send"):
                if i % 2 == 0:
                    raise RuntimeError("drill: the tool fails")
        except (RuntimeError, CapabilityFrozen):
            pass
    return time.monotonic()


def drill_breaker(targets: list[str]) -> dict[str, Any]:
    """Run the breaker drill on ``targets`` (the drill's own coordinators); the report."""
    tenant = f"drill-{uuid.uuid4().hex[:6]}"
    checks: list[Check] = []
    with AdminClient(",".join(targets), actor="tether-drill") as admin:
        admin.apply_policy(POLICY.format(tenant=tenant))
        uri = f"agent://{tenant}/alpha"
        with Agent(uri, run_id=f"{tenant}.r0", target=targets[0], capabilities=KINDS) as agent:
            crossed = _failing_writes(agent, 20)
            tripped = wait(lambda: agent.frozen("send"), TRIP_TIMEOUT)
            ms = (time.monotonic() - crossed) * 1e3
            said = f"the breaker degraded the run by itself ({ms:.0f} ms after the writes)"
            checks.append(check(tripped, said))
            halts = admin.halts(tenant=tenant)
            named = bool(halts) and halts[0].actor == "breaker:drill-errors"
            reason = halts[0].reason if halts else "no halt"
            checks.append(check(named, f"the halt names the breaker and its figures: {reason}"))
            go_on = not agent.frozen("lookup") and not agent.killed
            checks.append(check(go_on, "reads and the run go on"))
            admin.resume(selector(run_id=agent.run_id, tenant=tenant, writes=True), "drill over")
            lifted = wait(lambda: not agent.frozen("send"), 10)
            checks.append(check(lifted, "a resume lifts degraded mode"))
        admin.apply_policy("", note="drill over")
    return {
        "scope": "breaker", "selector": f"breaker drill-errors on tenant {tenant}",
        "checks": [c.__dict__ for c in checks],
        "verdict": verdict(checks),
    }  # fmt: skip
