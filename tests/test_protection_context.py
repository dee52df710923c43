"""Automatic protection, continued: `tether policy test`, labels and the checkpoint in the
rule context and in selectors, and a breaker's halt lifted through a release gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tether

from tests.conftest import ALICE, BOB, CAROL, Coordinator, eventually, ok, tether_cli
from tests.test_auth import client
from tests.test_protection import KINDS, breaker_policy, breaker_state, run_writes


def dry_run_policy(tenant: str) -> str:
    return f"""
breakers:
  - name: email-errors
    selector: {{tenant: {tenant}}}
    min_calls: 10
    error_rate: 0.3
rules:
  - name: spend-cap
    selector: {{tenant: {tenant}}}
    when: "run.spend.usd > 5.0"
    action: kill
  - name: big-spender
    selector: {{tenant: {tenant}}}
    when: "run.spend.usd > 1000.0"
"""


def published(admin: tether.AdminClient, tenant: str, runs: int) -> bool:
    """The counts of ``runs`` runs reached etcd (the tally publishes twice a second)."""
    found = admin.test_policy(dry_run_policy(tenant), tenant=tenant)
    return found.runs == runs and len(found.trips) == 2


def test_policy_test_prints_what_would_trip_and_changes_nothing(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, tmp_path: Path
) -> None:
    uri = f"agent://{tenant}/mailer"
    failing = tether.Agent(uri, run_id="bad", target=coord.addr, capabilities=KINDS)
    spending = tether.Agent(uri, run_id="rich", target=coord.addr, capabilities=KINDS)
    with failing, spending:
        assert run_writes(failing, 20, fail_every=2) == 20  # no policy: nothing trips
        spending.spend(usd=7.25, tokens=900, calls=3)
        run_writes(spending, 12)
        eventually(lambda: published(admin, tenant, 2))
        (tmp_path / "policy.yaml").write_text(dry_run_policy(tenant))
        out = ok(tether_cli("policy", "test", "-f", str(tmp_path / "policy.yaml"), addr=coord.addr))
        lines = out.splitlines()
        assert lines[0].split() == ["KIND", "NAME", "WOULD", "HALT", "ACTION", "REASON"]
        breaker = next(line for line in lines if line.startswith("breaker"))
        assert f"run/{tenant}/*/bad#*writes" in breaker and "degrade" in breaker
        assert "error rate 0.50 over the published counts (10/20) > 0.3" in breaker
        rule = next(line for line in lines if line.startswith("rule"))
        assert rule.split()[:4] == ["rule", "spend-cap", f"run/{tenant}/*/rich", "kill"]
        assert "spent $7.25, 900 tokens, 3 calls" in rule
        assert len([line for line in lines if line.startswith(("breaker", "rule"))]) == 2
        assert lines[-1].startswith("# 2 would trip, judged on ") and "since" in lines[-1]
        as_json = tether_cli(
            "policy", "test", "-f", str(tmp_path / "policy.yaml"), "--tenant", tenant,
            "-o", "json", addr=coord.addr,
        )  # fmt: skip
        found = json.loads(ok(as_json))
        assert found["runs"] == 2 and {t["name"] for t in found["trips"]} == {
            "email-errors",
            "spend-cap",
        }
        failing.check()  # nothing was halted, stored or audited
        spending.check()
        assert not failing.frozen("send_email")
    assert admin.halts(tenant=tenant) == [] and admin.policy().version == 0
    assert admin.breakers(tenant) == ([], [])
    assert admin.audit() == []  # no policy version, no trip, no "would trip"


def test_policy_test_compiles_first(coord: Coordinator, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("rules: [{name: bad, when: 'run.spend.usd >'}]")
    refused = tether_cli("policy", "test", "-f", str(tmp_path / "bad.yaml"), addr=coord.addr)
    assert refused.returncode == 2, refused.stderr
    assert "rules[0].when does not compile" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and refused.stdout == ""
    missing = tether_cli("policy", "test", addr=coord.addr)
    assert missing.returncode == 2 and "policy test needs -f FILE" in missing.stderr


def test_policy_test_is_for_those_who_may_apply_a_policy(guarded: Coordinator) -> None:
    # It runs the caller's CEL on the coordinator and answers with runs' figures: an admin's
    # call, as ApplyPolicy is, and no viewer's or operator's.
    denied = pytest.raises(tether.PermissionDenied, match="may not test a policy")
    with client(guarded.addr, CAROL) as carol, denied:  # a viewer of acme and globex
        carol.test_policy("", tenant="acme")
    with client(guarded.addr, BOB) as bob, pytest.raises(tether.PermissionDenied):
        bob.test_policy("", tenant="acme")  # an operator of acme
    with client(guarded.addr, ALICE) as alice:
        assert alice.test_policy("").runs >= 0
        assert alice.test_policy("", tenant="acme").trips == []


def test_a_rule_reads_the_run_s_labels(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    admin.apply_policy(
        f"""
rules:
  - name: red-budget
    selector: {{tenant: {tenant}}}
    when: "run.labels.team == 'red' && run.spend.usd > 1.0"
"""
    )
    uri = f"agent://{tenant}/buyer"
    red = tether.Agent(uri, run_id="red", target=coord.addr, labels={"team": "red"})
    blue = tether.Agent(uri, run_id="blue", target=coord.addr, labels={"team": "blue"})
    with red, blue:
        blue.spend(usd=2.0)
        red.spend(usd=2.0)
        eventually(lambda: red.killed)
        blue.check()
    (halt,) = admin.halts(tenant=tenant)
    assert halt.actor == "policy:red-budget" and halt.selector.run_id == "red"


def test_a_rule_reads_the_run_s_checkpoint(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    admin.apply_policy(
        f"""
rules:
  - name: too-many-steps
    selector: {{tenant: {tenant}}}
    when: "has(run.checkpoint.step) && run.checkpoint.step > 3"
"""
    )
    uri = f"agent://{tenant}/planner"
    with tether.Agent(uri, run_id="p1", target=coord.addr) as agent:
        agent.report({"step": 3})
        agent.spend(calls=1)
        eventually(lambda: admin.test_policy("", tenant=tenant).runs == 1)
        agent.check()  # step 3 holds not
        agent.report({"step": 4, "note": "looping"})
        eventually(lambda: agent.killed)
    (halt,) = admin.halts(tenant=tenant)
    assert halt.actor == "policy:too-many-steps"


def test_a_breaker_selects_by_label(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    policy = breaker_policy(tenant, error_rate=0.3, cooldown="3600s")
    admin.apply_policy(
        policy.replace(f"{{tenant: {tenant}}}", f"{{tenant: {tenant}, labels: {{zone: eu}}}}")
    )
    uri = f"agent://{tenant}/mailer"
    eu = tether.Agent(
        uri, run_id="eu", target=coord.addr, capabilities=KINDS, labels={"zone": "eu"}
    )
    us = tether.Agent(
        uri, run_id="us", target=coord.addr, capabilities=KINDS, labels={"zone": "us"}
    )
    with eu, us:
        run_writes(us, 20, fail_every=2)
        run_writes(eu, 20, fail_every=2)
        eventually(lambda: eu.frozen("send_email"))
        assert not us.frozen("send_email")
    (halt,) = admin.halts(tenant=tenant)
    assert halt.selector.run_id == "eu" and halt.actor == "breaker:email-errors"


def test_labels_in_a_breaker_selector_need_scope_run(admin: tether.AdminClient) -> None:
    policy = "breakers: [{name: b, error_rate: 0.3, scope: agent, selector: {labels: {a: b}}}]"
    with pytest.raises(tether.InvalidArgument, match="labels select runs, so they need scope: run"):
        admin.apply_policy(policy)


def test_a_breaker_s_halt_lifted_through_a_release_gate(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    policy = breaker_policy(tenant, error_rate=0.3, cooldown="3600s", scope="agent")
    admin.apply_policy(policy)
    uri = f"agent://{tenant}/mailer"
    old = tether.Agent(uri, run_id="old", target=coord.addr, capabilities=KINDS, release="1.4.2")
    new = tether.Agent(uri, run_id="new", target=coord.addr, capabilities=KINDS, release="1.4.3")
    with old, new:
        run_writes(old, 20, fail_every=2)
        eventually(lambda: old.frozen("send_email") and new.frozen("send_email"))
        resumed = ok(
            tether_cli(
                "resume", "--agent", uri, "--writes", "--require-label", "version=1.4.3",
                "--reason", "1.4.3 retries the SMTP errors", addr=coord.addr,
            )
        )  # fmt: skip
        assert "only for version=1.4.3" in resumed
        eventually(lambda: not new.frozen("send_email"))
        assert run_writes(new, 3) == 3  # the new release writes again
        assert old.frozen("send_email")  # the old one stays degraded
        frozen = pytest.raises(tether.CapabilityFrozen, match="by breaker:email-errors")
        with frozen, old.effect("send_email"):
            pass
        with old.effect("crm_lookup"):
            pass  # its reads go on
    (halt,) = admin.halts(tenant=tenant)
    assert halt.actor == "breaker:email-errors" and halt.release_gate == {"version": "1.4.3"}
    assert breaker_state(admin, tenant) == "open"  # the halt still holds: it stays OPEN
    [entry] = [e for e in admin.audit(tenant=tenant) if e.action == "resume"]
    assert entry.require_labels == {"version": "1.4.3"} and entry.actor != "breaker:email-errors"
