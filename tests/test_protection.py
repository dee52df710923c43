"""Automatic protection on real parts: degraded mode, signals, breakers and policy."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
import tether
from aetcd import rpc
from tether_server._store import EVALUATOR

from tests.conftest import ALICE, BOB, CAROL, Coordinator, Etcd, eventually, tether_cli
from tests.test_auth import client

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


# -- policy and breakers, against the session's two coordinators ---------------------------


def breaker_policy(tenant: str, **fields: object) -> str:
    spec = {
        "name": "email-errors", "selector": f"{{tenant: {tenant}}}", "scope": "run",
        "window": "30s", "min_calls": 10, "cooldown": "3s", "probes": 2, **fields,
    }  # fmt: skip
    body = "\n".join(f"    {k}: {v}" for k, v in spec.items() if k != "name")
    return f"breakers:\n  - name: {spec['name']}\n{body}\n"


def run_writes(agent: tether.Agent, n: int, fail_every: int = 0) -> int:
    """``n`` writes, every ``fail_every``-th failing; stops at degraded mode. Returns done."""
    for i in range(n):
        try:
            with agent.effect("send_email"):
                if fail_every and i % fail_every == 0:
                    raise RuntimeError("smtp down")
        except RuntimeError:
            pass
        except tether.CapabilityFrozen:
            return i
    return n


def breaker_state(admin: tether.AdminClient, tenant: str) -> str:
    found, _ = admin.breakers(tenant)
    return found[0].state if found else "closed"


def test_policy_apply_get_history_and_audit(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, tmp_path: Path
) -> None:
    assert admin.policy().version == 0
    first = admin.apply_policy(breaker_policy(tenant, error_rate=0.3))
    assert first.version == 1 and first.actor.startswith("anonymous@")
    with pytest.raises(tether.InvalidArgument, match=r"rules\[0\].when does not compile"):
        admin.apply_policy("rules: [{name: bad, when: 'run.spend.usd >'}]")
    assert admin.policy().version == 1  # the policy in force stays
    second = admin.apply_policy("")
    assert [v.version for v in admin.policy_history()] == [1, 2]
    assert admin.policy(1).yaml == first.yaml and admin.policy().version == second.version
    entries = [e for e in admin.audit() if e.action == "policy"]
    assert [e.reason.split(":")[0] for e in entries] == [
        "policy version 1 applied",
        "policy version 2 applied",
    ]
    assert all(e.actor == first.actor for e in entries)
    cli = tether_cli("policy", "get", addr=coord.addr)
    assert cli.returncode == 0 and "# version 2" in cli.stdout, cli.stderr
    bad = tether_cli("policy", "apply", "-f", "/nonexistent.yaml", addr=coord.addr)
    assert bad.returncode == 2 and "cannot read" in bad.stderr
    history = tether_cli("policy", "history", "-o", "json", addr=coord.addr)
    assert [v["version"] for v in json.loads(history.stdout)] == [1, 2], history.stderr
    (tmp_path / "bad.yaml").write_text("rules: [{}]")
    refused = tether_cli("policy", "apply", "-f", str(tmp_path / "bad.yaml"), addr=coord.addr)
    assert refused.returncode == 2 and "rules[0].name" in refused.stderr, refused.stderr


def test_error_rate_breaker_degrades_then_probes_close_it(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    admin.apply_policy(breaker_policy(tenant, error_rate=0.3))
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="e1", target=coord.addr, capabilities=KINDS) as agent:
        run_writes(agent, 20, fail_every=2)
        eventually(lambda: agent.frozen("send_email"))
        with agent.effect("crm_lookup"):
            pass  # reads go on
        (halt,) = admin.halts(tenant=tenant)
        assert halt.actor == "breaker:email-errors" and halt.selector.writes
        assert halt.reason.startswith("error rate 0.50 over 30s (10/20) > 0.3"), halt.reason
        listing = tether_cli("breakers", "--tenant", tenant, addr=coord.addr)
        assert "OPEN" in listing.stdout and f"{tenant}/mailer/e1" in listing.stdout
        eventually(lambda: not agent.frozen("send_email"))  # cooldown: HALF_OPEN
        assert breaker_state(admin, tenant) == "half_open"
        assert run_writes(agent, 2) == 2  # the probes land
        eventually(lambda: breaker_state(admin, tenant) == "closed")
        assert not agent.frozen("send_email")
    actions = [(e.action, e.actor) for e in admin.audit(tenant=tenant) if e.action != "policy"]
    assert actions == [("freeze", "breaker:email-errors"), ("resume", "breaker:email-errors")]


def test_a_failing_probe_reopens(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    admin.apply_policy(breaker_policy(tenant, error_rate=0.3))
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="e2", target=coord.addr, capabilities=KINDS) as agent:
        run_writes(agent, 20, fail_every=2)
        eventually(lambda: agent.frozen("send_email"))
        eventually(lambda: not agent.frozen("send_email"))
        run_writes(agent, 1, fail_every=1)
        eventually(lambda: agent.frozen("send_email"))
        assert breaker_state(admin, tenant) == "open"


class Hook:
    """A real webhook receiver on loopback; ``hold`` keeps every request hanging."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.hold = threading.Event()
        self.hold.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                hook.hold.wait(30)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/oncall"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [r["event"] for r in self.received]

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()


@pytest.fixture
def hook() -> Iterator[Hook]:
    receiver = Hook()
    yield receiver
    receiver.close()


def spend_policy(tenant: str, hook: Hook, *, dry_run: bool = False) -> str:
    return f"""
rules:
  - name: spend-cap
    selector: {{tenant: {tenant}}}
    when: "run.spend.usd > 5.0"
    action: kill
    dry_run: {str(dry_run).lower()}
notify:
  - url: {hook.url}
    events: [kill, resume, freeze, degrade, trip, policy]
"""


def test_spend_rule_kills_the_run(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, hook: Hook
) -> None:
    admin.apply_policy(spend_policy(tenant, hook))
    with tether.Agent(f"agent://{tenant}/buyer", run_id="s1", target=coord.addr) as agent:
        agent.spend(usd=3.0, tokens=1000, calls=1)
        agent.spend(usd=2.5, tokens=500, calls=1)
        eventually(lambda: agent.killed)
        with pytest.raises(tether.Killed) as err:
            agent.check()
        assert err.value.actor == "policy:spend-cap"
        assert "spent $5.50, 1500 tokens, 2 calls" in str(err.value)
    eventually(lambda: "kill" in hook.events())
    (killed,) = [r for r in hook.received if r["event"] == "kill"]
    assert killed["actor"] == "policy:spend-cap" and killed["figures"]["spend"]["usd"] == 5.5
    assert killed["selector"] == f"run/{tenant}/*/s1" and killed["time"]
    assert hook.events()[0] == "policy"


def test_dry_run_trips_nothing_but_audits_and_notifies(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, hook: Hook
) -> None:
    admin.apply_policy(spend_policy(tenant, hook, dry_run=True))
    with tether.Agent(f"agent://{tenant}/buyer", run_id="s2", target=coord.addr) as agent:
        agent.spend(usd=9.0)
        eventually(lambda: "trip" in hook.events())
        assert not agent.killed and admin.halts(tenant=tenant) == []
    (entry,) = [e for e in admin.audit(tenant=tenant) if e.action == "would_trip"]
    assert entry.actor == "policy:spend-cap" and entry.reason.startswith("would trip (kill)")
    (trip,) = [r for r in hook.received if r["event"] == "trip"]
    assert trip["reason"].startswith("would trip")


def test_the_webhook_hears_manual_orders_and_a_dead_one_delays_nothing(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, hook: Hook
) -> None:
    admin.apply_policy(spend_policy(tenant, hook))
    eventually(lambda: hook.events() == ["policy"])
    with tether.Agent(f"agent://{tenant}/buyer", run_id="w1", target=coord.addr) as agent:
        hook.hold.clear()  # the webhook now hangs on every request
        admin.kill(tether.selector(run_id="w1"), "manual stop")
        eventually(lambda: agent.killed)  # the kill landed while the webhook still hangs
        assert hook.events() == ["policy"]
        hook.hold.set()
        admin.resume(tether.selector(run_id="w1"), "all clear")
        eventually(lambda: hook.events() == ["policy", "kill", "resume"])
    kill = hook.received[1]
    assert kill["actor"].startswith("anonymous@") and kill["reason"] == "manual stop"


def test_slack_format_posts_text(
    coord: Coordinator, admin: tether.AdminClient, tenant: str, hook: Hook
) -> None:
    admin.apply_policy(f"notify: [{{url: '{hook.url}', events: [policy], format: slack}}]")
    eventually(lambda: len(hook.received) == 1)
    assert hook.received[0]["text"].startswith("tether policy:")


def test_anomaly_rate_trips_on_its_own(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    admin.apply_policy(breaker_policy(tenant, anomaly_rate=0.2, cooldown="60s"))
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="a1", target=coord.addr, capabilities=KINDS) as agent:
        for i in range(12):
            with agent.effect("crm_lookup") as fx:
                if i % 2:
                    fx.anomaly("a lookup of every customer at once")
        eventually(lambda: agent.frozen("send_email"))
        assert not agent.frozen("crm_lookup")
    (halt,) = admin.halts(tenant=tenant)
    assert halt.reason == "anomaly rate 0.50 over 30s (6/12) > 0.2", halt.reason


def test_volume_spike_trips_on_its_own(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    admin.apply_policy(breaker_policy(tenant, window="1s", volume_factor=3.0, cooldown="60s"))
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="v1", target=coord.addr, capabilities=KINDS) as agent:
        for _ in range(30):  # a steady ten a second: the baseline
            with agent.effect("crm_lookup"):
                time.sleep(0.1)
        assert not agent.frozen("send_email")
        run_writes(agent, 400)  # then a loop
        eventually(lambda: agent.frozen("send_email"))
    (halt,) = admin.halts(tenant=tenant)
    assert halt.reason.startswith("volume ") and "the baseline" in halt.reason, halt.reason


def test_agent_scope_degrades_every_instance_across_coordinators_once(
    coordinators: tuple[Coordinator, Coordinator], admin: tether.AdminClient, tenant: str
) -> None:
    policy = breaker_policy(tenant, scope="agent", min_calls=20, error_rate=0.3, cooldown="60s")
    admin.apply_policy(policy)
    uri = f"agent://{tenant}/mailer"
    a, b = coordinators
    with (
        tether.Agent(uri, run_id="x1", target=a.addr, capabilities=KINDS) as one,
        tether.Agent(uri, run_id="x2", target=b.addr, capabilities=KINDS) as two,
    ):
        run_writes(one, 12, fail_every=2)  # fewer than min_calls each: only the fleet's
        run_writes(two, 12, fail_every=2)  # counts together reach them
        eventually(lambda: one.frozen("send_email") and two.frozen("send_email"))
        assert not one.frozen("crm_lookup") and not two.killed
        time.sleep(1)  # a few more evaluation rounds: still one trip
    trips = [e for e in admin.audit(tenant=tenant) if e.actor == "breaker:email-errors"]
    assert len(trips) == 1 and trips[0].action == "freeze"
    assert trips[0].halt_id == f"agent/{tenant}/mailer#*writes"


def test_only_admins_change_the_policy_and_viewers_read_it(guarded: Coordinator) -> None:
    with client(guarded.addr, CAROL) as carol:
        with pytest.raises(tether.PermissionDenied, match="may not change the policy"):
            carol.apply_policy("")
        assert carol.policy().version == 0
        assert carol.breakers("acme") == ([], [])
    with client(guarded.addr, BOB) as bob, pytest.raises(tether.PermissionDenied):
        bob.apply_policy("")
    with client(guarded.addr, ALICE) as alice:
        assert alice.apply_policy("").actor == "operator:alice"


def evaluator_pid(etcd: Etcd) -> int:
    """The pid of the coordinator holding the evaluator key (its id is host-PID-xxxx)."""
    with grpc.insecure_channel(etcd.endpoint) as channel:
        resp = rpc.KVStub(channel).Range(rpc.RangeRequest(key=EVALUATOR))
    return int(resp.kvs[0].value.decode().split(":")[0].rsplit("-", 2)[1]) if resp.kvs else 0


def test_a_trip_survives_the_evaluator_s_death(tmp_path: Path) -> None:
    etcd = Etcd(tmp_path / "etcd").start()
    pair = [Coordinator(etcd).start(tmp_path), Coordinator(etcd).start(tmp_path)]
    try:
        leader_pid = eventually(lambda: evaluator_pid(etcd))
        leader = next(c for c in pair if c.process.pid == leader_pid)
        survivor = next(c for c in pair if c is not leader)
        with tether.AdminClient(survivor.addr) as admin:
            admin.apply_policy(breaker_policy("acme", cooldown="60s", error_rate=0.3))
            uri = "agent://acme/mailer"
            with tether.Agent(uri, run_id="f1", target=survivor.addr, capabilities=KINDS) as a:
                run_writes(a, 20, fail_every=2)
                eventually(lambda: a.frozen("send_email"))
                leader.stop(signal.SIGKILL)
                eventually(lambda: evaluator_pid(etcd) == survivor.process.pid)
                time.sleep(1)  # the new evaluator's rounds: the breaker stays OPEN, once
                assert breaker_state(admin, "acme") == "open" and a.frozen("send_email")
                trips = [e for e in admin.audit() if e.actor == "breaker:email-errors"]
                assert len(trips) == 1
                admin.resume(tether.selector(run_id="f1", tenant="acme", writes=True), "ok")
                eventually(lambda: breaker_state(admin, "acme") == "closed")
                assert not a.frozen("send_email")
    finally:
        for coordinator in pair:
            coordinator.stop()
        etcd.stop()


def test_drill_proves_a_breaker_trips_and_reads_go_on() -> None:
    result = tether_cli("drill", "--scope", "breaker", "-o", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    (report,) = json.loads(result.stdout)["drills"]
    assert report["verdict"] == "PASS" and report["scope"] == "breaker"
    texts = " ".join(c["text"] for c in report["checks"])
    assert "reads and the run go on" in texts and "error rate 0.50" in texts
    refused = tether_cli("drill", "--scope", "breaker", "--addr", "127.0.0.1:1")
    assert refused.returncode == 2 and "without --addr" in refused.stderr


def test_failures_from_before_the_policy_do_not_trip_it(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    uri = f"agent://{tenant}/mailer"
    with tether.Agent(uri, run_id="h1", target=coord.addr, capabilities=KINDS) as agent:
        admin.apply_policy("rules: [{name: watch, when: 'run.effects.total > 19', action: notify}]")
        run_writes(agent, 20, fail_every=2)  # history, seen by the evaluator without breakers
        eventually(lambda: any(e.action == "would_trip" for e in admin.audit(tenant=tenant)))
        admin.apply_policy(breaker_policy(tenant, error_rate=0.3))
        time.sleep(1.5)  # several evaluation rounds
        assert not agent.frozen("send_email") and admin.halts(tenant=tenant) == []
        run_writes(agent, 20, fail_every=2)  # new failures in the window do trip it
        eventually(lambda: agent.frozen("send_email"))
