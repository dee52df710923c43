"""The authorizer and the SPIFFE mapping are pure: decided here without etcd or gRPC."""

from __future__ import annotations

import pytest
from tether.v1 import admin_pb2, types_pb2
from tether_server._errors import PermissionDenied, Unauthenticated
from tether_server._identity import Kind, Principal, principal_of_spiffe
from tether_server._rbac import CALLS, Authorizer, Grant, Role, check_registration
from tether_server._store import InstanceKey

GRANTS = {
    "alice": Grant(Role.ADMIN, frozenset({"*"})),
    "bob": Grant(Role.OPERATOR, frozenset({"acme"})),
    "carol": Grant(Role.VIEWER, frozenset({"acme", "globex"})),
}


def operator(name: str) -> Principal:
    return Principal(f"operator:{name}", Kind.OPERATOR, operator=name)


def kill(
    tenant: str = "", scope: types_pb2.Scope.ValueType = types_pb2.SCOPE_TENANT
) -> admin_pb2.KillRequest:
    return admin_pb2.KillRequest(selector=types_pb2.Selector(scope=scope, tenant=tenant))


def test_every_admin_rpc_is_in_the_table() -> None:
    methods = set(admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name)
    assert methods == set(CALLS)


@pytest.mark.parametrize(
    ("who", "request_", "allowed"),
    [
        ("carol", kill("acme"), False),
        ("bob", kill("acme"), True),
        ("bob", kill("globex"), False),
        ("bob", kill(scope=types_pb2.SCOPE_GLOBAL), False),
        ("bob", kill(scope=types_pb2.SCOPE_RUN), False),  # a run of any tenant
        ("alice", kill(scope=types_pb2.SCOPE_GLOBAL), True),
        ("carol", admin_pb2.ListAgentsRequest(tenant="globex"), True),
        ("carol", admin_pb2.ListAgentsRequest(), False),
        ("bob", admin_pb2.IssueAgentTokenRequest(tenant="acme"), False),
        ("alice", admin_pb2.IssueAgentTokenRequest(tenant="acme"), True),
        ("dave", admin_pb2.ListHaltsRequest(tenant="acme"), False),
    ],
)
def test_roles(who: str, request_: object, allowed: bool) -> None:
    authorizer = Authorizer(GRANTS, open_=False)
    method = {"KillRequest": "Kill", "ListAgentsRequest": "ListAgents"}.get(
        type(request_).__name__, type(request_).__name__.removesuffix("Request")
    )
    if allowed:
        authorizer.check(operator(who), method, request_)
    else:
        with pytest.raises(PermissionDenied):
            authorizer.check(operator(who), method, request_)


def test_anonymous_callers_are_open_only_on_an_open_coordinator() -> None:
    nobody = Principal.anonymous("ipv4:127.0.0.1:1")
    Authorizer(None, open_=True).check(nobody, "Kill", kill(scope=types_pb2.SCOPE_GLOBAL))
    with pytest.raises(Unauthenticated, match="kill needs an identity"):
        Authorizer(GRANTS, open_=False).check(nobody, "Kill", kill("acme"))
    Authorizer(GRANTS, open_=False).check(nobody, "WhoAmI", admin_pb2.WhoAmIRequest())


def test_spiffe_ids_of_this_trust_domain_only() -> None:
    agent = principal_of_spiffe("spiffe://tether/tenant/acme/agent/mail", "tether")
    assert agent == Principal("spiffe://tether/tenant/acme/agent/mail", Kind.AGENT, "acme", "mail")
    for uri in (
        "spiffe://other/tenant/acme",
        "spiffe://tether/tenant/acme/agent",
        "spiffe://tether/tenant/a b",
        "spiffe://tether/coordinator/x",
        "https://tether/operator/alice",
    ):
        assert principal_of_spiffe(uri, "tether") is None, uri


def test_registration_stays_inside_the_identity() -> None:
    key = InstanceKey("acme", "mail", "r-1", "i-1")
    check_registration(Principal("a", Kind.AGENT, "acme", "mail"), key, open_=False)
    check_registration(Principal("t", Kind.TENANT, "acme"), key, open_=False)
    check_registration(Principal.anonymous("p"), key, open_=True)
    for who in (
        Principal("a", Kind.AGENT, "acme", "other"),
        Principal("t", Kind.TENANT, "globex"),
        operator("alice"),
    ):
        with pytest.raises(PermissionDenied, match="r-1"):
            check_registration(who, key, open_=False)


def test_an_anonymous_registration_needs_an_open_coordinator() -> None:
    key = InstanceKey("acme", "mail", "r-1", "i-1")
    with pytest.raises(Unauthenticated, match="requires an agent identity"):
        check_registration(Principal.anonymous("p"), key, open_=False)
