"""Roles by bearer token: ``--rbac`` names operators, ``--admin-tokens`` maps tokens to them.

A coordinator of this module's own serves plaintext on loopback with both files; the
certificate path of the same roles is in tests/test_identity.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tether

from tests.conftest import ALICE, BOB, CAROL, RBAC, Coordinator, Etcd, tether_cli


def client(addr: str, token: str | None, actor: str = "pytest") -> tether.AdminClient:
    return tether.AdminClient(addr, token=token, actor=actor, environ={})


def test_a_viewer_reads_but_cannot_kill(guarded: Coordinator) -> None:
    with client(guarded.addr, CAROL) as carol:
        assert carol.agents(tenant="acme") == []
        assert carol.halts(tenant="globex") == []
        with pytest.raises(
            tether.PermissionDenied,
            match=r"operator:carol \(role viewer of acme, globex\) may not kill: "
            "that needs role operator",
        ):
            carol.kill(tether.selector(tenant="acme"), "no", force=True)
        with pytest.raises(tether.PermissionDenied, match="may not list agents in every tenant"):
            carol.agents()  # a listing of every tenant needs "*"


def test_an_operator_acts_only_within_its_tenants(guarded: Coordinator) -> None:
    with client(guarded.addr, BOB) as bob:
        halt, _ = bob.kill(tether.selector(tenant="acme"), "mine", force=True)
        assert halt.id == "tenant/acme"
        denied = r"operator:bob \(role operator of acme\) may not"
        with pytest.raises(tether.PermissionDenied, match=f"{denied} kill in tenant globex"):
            bob.kill(tether.selector(tenant="globex"), "not mine", force=True)
        with pytest.raises(tether.PermissionDenied, match=f"{denied} resume in tenant globex"):
            bob.resume(tether.selector(tenant="globex"), "not mine")
        with pytest.raises(tether.PermissionDenied, match="global kills and resumes need role"):
            bob.kill(tether.selector(all=True), "everything", force=True)
        with pytest.raises(tether.PermissionDenied, match="kill in every tenant"):
            bob.kill(tether.selector(run_id="r-1"), "a run of any tenant", force=True)
        assert bob.resume(tether.selector(tenant="acme"), "done") is not None
    with client(guarded.addr, ALICE) as alice:
        alice.kill(tether.selector(all=True), "an admin may", force=True)
        alice.kill(tether.selector(tenant="globex"), "anywhere", force=True)
        assert {h.id for h in alice.halts()} == {"global", "tenant/globex"}
        assert alice.resume(tether.selector(all=True), "over") is not None
        alice.resume(tether.selector(tenant="globex"), "over")


def test_the_audit_names_the_token_s_operator_not_the_declared_actor(
    guarded: Coordinator,
) -> None:
    with client(guarded.addr, BOB, actor="mallory") as bob:
        halt, _ = bob.kill(tether.selector(tenant="acme"), "who am I", force=True)
        assert (halt.actor, halt.actor_note) == ("operator:bob", "mallory")
        bob.resume(tether.selector(tenant="acme"), "undo")
        entries = [e for e in bob.audit(tenant="acme") if e.halt_id == "tenant/acme"]
    assert [(e.action, e.actor, e.actor_note) for e in entries][-2:] == [
        ("kill", "operator:bob", "mallory"),
        ("resume", "operator:bob", "mallory"),
    ]
    table = tether_cli("audit", "--tenant", "acme", "--token", CAROL, addr=guarded.addr)
    assert table.returncode == 0, table.stderr
    assert "operator:bob (says mallory)" in table.stdout


def test_calls_without_a_known_identity_are_unauthenticated(guarded: Coordinator) -> None:
    with (
        client(guarded.addr, None) as anonymous,
        pytest.raises(tether.Unauthenticated, match="list halts needs an identity"),
    ):
        anonymous.halts(tenant="acme")
    with (
        client(guarded.addr, "not-a-token-at-all-xyz") as stranger,
        pytest.raises(tether.Unauthenticated, match="bearer token is neither"),
    ):
        stranger.halts(tenant="acme")
    result = tether_cli("halts", "--tenant", "acme", addr=guarded.addr)
    assert result.returncode == 1
    assert result.stderr.startswith("tether: list halts needs an identity and anonymous@")
    assert len(result.stderr.splitlines()) == 1


def test_whoami_says_who_and_what_role(guarded: Coordinator) -> None:
    with client(guarded.addr, BOB) as bob:
        me = bob.whoami()
    assert me == tether.Principal(
        "operator:bob", "operator", operator="bob", role="operator", tenants=("acme",)
    )
    with client(guarded.addr, None) as anonymous:
        nobody = anonymous.whoami()  # WhoAmI needs no identity: it says there is none
    assert (nobody.kind, nobody.role) == ("anonymous", "")
    shown = tether_cli("whoami", "--token", ALICE, addr=guarded.addr)
    assert shown.stdout.splitlines() == ["operator:alice (operator)", "role admin of *"]


def test_only_an_admin_issues_agent_tokens(guarded: Coordinator) -> None:
    with client(guarded.addr, BOB) as bob, pytest.raises(tether.PermissionDenied, match="admin"):
        bob.issue_agent_token("acme")
    with client(guarded.addr, ALICE) as alice:
        issued = alice.issue_agent_token("acme", agent="mailer", ttl=3600)
    assert issued.subject == "spiffe://tether/tenant/acme/agent/mailer"
    assert issued.token.startswith("tether-agent-v1.")


@pytest.mark.parametrize(
    ("rbac", "tokens", "message"),
    [
        (RBAC, f"{BOB} dave\n", "tokens:1: the token names operator 'dave', which --rbac does"),
        (RBAC, f"{BOB} acme,globex\n", "for the former 'TOKEN TENANT[,TENANT]' form, define"),
        (RBAC, "short bob\n", "tokens:1: expected 'TOKEN OPERATOR', with a token of at least 16"),
        (None, f"{BOB} bob\n", "--admin-tokens maps tokens to operators of --rbac: give --rbac"),
        ("operators: {bob: {role: root, tenants: [acme]}}", None, "operators.bob.role: expected"),
        ("operators: {bob: {role: viewer}}", None, "operators.bob: expected {role: viewer|oper"),
        ("operators: [bob]", None, "operators must map names to {role: ..., tenants: [...]}"),
        ("operators: {bob: {role: viewer, tenants: [a/b]}}", None, "tenants: tenant 'a/b' is"),
    ],
)
def test_a_malformed_rbac_or_tokens_file_is_bad_usage(
    etcd: Etcd, tmp_path: Path, rbac: str | None, tokens: str | None, message: str
) -> None:
    flags = ["serve", "--listen", "127.0.0.1:0", "--etcd", etcd.url]
    if rbac is not None:
        (tmp_path / "rbac.yaml").write_text(rbac)
        flags += ["--rbac", str(tmp_path / "rbac.yaml")]
    if tokens is not None:
        (tmp_path / "tokens").write_text(tokens)
        flags += ["--admin-tokens", str(tmp_path / "tokens")]
    result = tether_cli(*flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
