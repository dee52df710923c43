"""What a principal may do: the roles file, the one table of calls, and the one authorizer.

``--rbac FILE`` is YAML::

    operators:
      alice: {role: admin, tenants: ["*"]}
      bob:   {role: operator, tenants: [acme]}
      carol: {role: viewer, tenants: [acme, globex]}

- viewer: list, get, watch, audit, effects, halts, the permit key, whoami.
- operator: also kill and resume within its tenants.
- admin: also global kills and resumes (with ``"*"``), and agent tokens for its tenants.

A call that names no tenant (a listing of every tenant, a run kill across tenants) needs
``"*"``. Agents (certificates or tokens of a tenant) may call only WhoAmI and GetPermitKey,
and register only as what their identity names. Without ``--rbac``: a coordinator that does
not ask for client certificates is open to anonymous callers, as on a trusted loopback;
one that does makes every operator certificate a viewer of every tenant, so killing needs
``--rbac``. With ``--rbac``, an anonymous admin call is UNAUTHENTICATED.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tether.v1 import types_pb2

from tether_server._config import ConfigError, ServerConfig
from tether_server._errors import InvalidArgument, PermissionDenied, Unauthenticated, check_name
from tether_server._identity import Kind, Principal
from tether_server._store import InstanceKey

ALL = "*"


class Role(enum.IntEnum):
    """Each role may do what the ones below it may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Grant:
    """An operator's role and the tenants it covers (``"*"``: every tenant)."""

    role: Role
    tenants: frozenset[str]

    def covers(self, tenant: str) -> bool:
        """Whether the grant reaches ``tenant``; '' (every tenant) needs ``"*"``."""
        return ALL in self.tenants or (bool(tenant) and tenant in self.tenants)

    def describe(self) -> str:
        return f"role {self.role.label} of {', '.join(sorted(self.tenants))}"


OPEN = Grant(Role.ADMIN, frozenset({ALL}))  # anonymous on an open coordinator
DEFAULT_OPERATOR = Grant(Role.VIEWER, frozenset({ALL}))  # client certificates, no --rbac


@dataclass(frozen=True, slots=True)
class Rule:
    """What one AdminService call needs."""

    action: str
    """What the caller asked for, as a refusal names it."""
    role: Role | None
    """The least role; None: any caller, agents and anonymous ones included."""
    scoped: bool = True
    """The request names a tenant the grant must cover."""


# Which calls need what: the one table. Kill and resume across every tenant need ADMIN too.
CALLS: Mapping[str, Rule] = {
    "Kill": Rule("kill", Role.OPERATOR),
    "Resume": Rule("resume", Role.OPERATOR),
    "ListHalts": Rule("list halts", Role.VIEWER),
    "ListAgents": Rule("list agents", Role.VIEWER),
    "GetAgent": Rule("get an agent", Role.VIEWER),
    "WatchAgents": Rule("watch agents", Role.VIEWER),
    "ListEffects": Rule("list effects", Role.VIEWER),
    "RecordCompensation": Rule("record a compensation", Role.OPERATOR),
    "ListAudit": Rule("read the audit", Role.VIEWER),
    "VerifyAudit": Rule("verify the audit", Role.VIEWER, scoped=False),
    "GetStatus": Rule("read the coordinator status", Role.VIEWER, scoped=False),
    "IssueAgentToken": Rule("issue an agent token", Role.ADMIN),
    "GetPermitKey": Rule("read the permit key", None),
    "WhoAmI": Rule("whoami", None),
    "ApplyPolicy": Rule("change the policy", Role.ADMIN, scoped=False),
    "GetPolicy": Rule("read the policy", Role.VIEWER, scoped=False),
    "ListPolicyHistory": Rule("read the policy history", Role.VIEWER, scoped=False),
    "ListBreakers": Rule("list breakers", Role.VIEWER),
    # Its answer carries runs' figures (a tenant's, or with a grant of all), and it runs the
    # caller's CEL on the coordinator: for those who may apply a policy, as ApplyPolicy.
    "TestPolicy": Rule("test a policy", Role.ADMIN),
}
_GLOBAL_ORDERS = frozenset({"Kill", "Resume"})


@dataclass(frozen=True, slots=True)
class Target:
    """What a request addresses."""

    tenant: str
    """'' when it addresses every tenant."""
    everything: bool = False
    """A global kill or resume."""

    def describe(self) -> str:
        if self.everything:
            return "every tenant (global)"
        return f"tenant {self.tenant}" if self.tenant else "every tenant (name one)"


def target_of(method: str, request: Any) -> Target:
    """The tenant a request addresses, and whether it is a global order."""
    if hasattr(request, "selector"):
        sel = request.selector
        everything = method in _GLOBAL_ORDERS and sel.scope == types_pb2.SCOPE_GLOBAL
        return Target(str(sel.tenant), everything)
    return Target(str(getattr(request, "tenant", "")))


class Authorizer:
    """Decides every AdminService call and every registration.

    Args:
        grants: The operators of ``--rbac``; None without the file.
        open_: Anonymous callers may act (``open_to_anonymous``).
    """

    def __init__(self, grants: Mapping[str, Grant] | None, *, open_: bool) -> None:
        self._grants = dict(grants) if grants is not None else None
        self.open = open_

    @property
    def operators(self) -> frozenset[str]:
        """The operators ``--rbac`` defines."""
        return frozenset(self._grants or ())

    def grant_of(self, principal: Principal) -> Grant | None:
        """What ``principal`` may do on AdminService: None for agents, or anonymous callers of
        a coordinator that is not open."""
        if principal.kind is Kind.ANONYMOUS:
            return OPEN if self.open else None
        if principal.kind is not Kind.OPERATOR:
            return None
        if self._grants is None:
            return DEFAULT_OPERATOR
        return self._grants.get(principal.operator)

    def check(self, principal: Principal, method: str, request: Any) -> None:
        """Allow the call or raise why not.

        Raises:
            Unauthenticated: an anonymous caller where an identity is required.
            PermissionDenied: the caller is known; names it, its role and what it asked.
        """
        rule = CALLS.get(method)
        if rule is None:
            raise PermissionDenied(f"{method} is not in the authorizer's table")
        if rule.role is None:
            return
        grant = self._require_grant(principal, rule)
        target = target_of(method, request)
        if grant.role < rule.role:
            raise PermissionDenied(
                f"{principal.id} ({grant.describe()}) may not {rule.action}: "
                f"that needs role {rule.role.label}"
            )
        if target.everything and grant.role < Role.ADMIN:
            raise PermissionDenied(
                f"{principal.id} ({grant.describe()}) may not {rule.action} {target.describe()}:"
                " global kills and resumes need role admin"
            )
        if rule.scoped and not grant.covers(target.tenant):
            raise PermissionDenied(
                f"{principal.id} ({grant.describe()}) may not {rule.action} in {target.describe()}"
            )

    def _require_grant(self, principal: Principal, rule: Rule) -> Grant:
        grant = self.grant_of(principal)
        if grant is not None:
            return grant
        if principal.kind is Kind.ANONYMOUS:
            raise Unauthenticated(
                f"{rule.action} needs an identity and {principal.id} has none: present an "
                "operator's client certificate (--tls-cert/--tls-key) or an admin token "
                "(--token or TETHER_TOKEN)"
            )
        if principal.is_agent:
            raise PermissionDenied(
                f"{principal.id} is an agent identity; agents may call only WhoAmI and "
                f"GetPermitKey, not {rule.action}"
            )
        raise PermissionDenied(
            f"{principal.id}: operator {principal.operator!r} is not in --rbac, so it may "
            f"not {rule.action}"
        )


def open_to_anonymous(config: ServerConfig) -> bool:
    """Whether anonymous callers may act: no ``--rbac`` and no client certificates asked for,
    as on a trusted loopback. The one definition the authorizer and registration share."""
    return config.rbac is None and config.tls_client_ca is None


def check_registration(principal: Principal, key: InstanceKey, *, open_: bool) -> None:
    """Allow a registration as ``key`` by ``principal``, or raise why not.

    Anonymous callers register as anything only on an open coordinator (see
    ``open_to_anonymous``; run ownership still holds there). Agents register only as their
    own tenant (and agent).

    Raises:
        Unauthenticated: an anonymous caller on a coordinator that is not open.
        PermissionDenied: names the identity and what it asked for.
    """
    asked = f"{key.tenant}/{key.agent} (run {key.run_id})"
    if principal.kind is Kind.ANONYMOUS:
        if open_:
            return
        raise Unauthenticated(
            f"{principal.id} may not register {asked}: this coordinator requires an agent "
            "identity; present a client certificate (TETHER_TLS_CERT, TETHER_TLS_KEY) or an "
            "agent token (TETHER_TOKEN, from `tether token issue`)"
        )
    if principal.kind is Kind.OPERATOR:
        raise PermissionDenied(
            f"{principal.id} is an operator and may not register agents; it asked for "
            f"{asked}. Give the agent its own certificate or agent token"
        )
    if principal.kind is Kind.TENANT:
        allowed, fits = f"{principal.tenant}/*", key.tenant == principal.tenant
    else:
        allowed = f"{principal.tenant}/{principal.agent}"
        fits = (key.tenant, key.agent) == (principal.tenant, principal.agent)
    if not fits:
        raise PermissionDenied(
            f"{principal.id} may register only as {allowed}; it asked for {asked}"
        )


# -- the roles file ------------------------------------------------------------------------


def load_rbac(path: Path) -> dict[str, Grant]:
    """The operators of a ``--rbac`` file.

    Raises:
        ConfigError: unreadable, not YAML, or a field that is missing or wrong; the message
            names the field and the forms expected.
    """
    where = f"--rbac {path}"
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{where}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not YAML ({' '.join(str(err).split())})") from None
    if not isinstance(doc, dict) or set(doc) != {"operators"}:
        raise ConfigError(f"{where}: expected one top-level key, operators")
    operators = doc["operators"]
    if not isinstance(operators, dict) or not operators:
        raise ConfigError(
            f"{where}: operators must map names to {{role: ..., tenants: [...]}}, "
            "e.g. alice: {role: admin, tenants: ['*']}"
        )
    return {
        _name(where, name): _grant(f"{where}: operators.{name}", v) for name, v in operators.items()
    }


def _name(where: str, name: Any) -> str:
    try:
        return check_name("operator", str(name))
    except InvalidArgument as err:
        raise ConfigError(f"{where}: {err}") from None


def _grant(where: str, value: Any) -> Grant:
    if not isinstance(value, dict) or set(value) != {"role", "tenants"}:
        raise ConfigError(f"{where}: expected {{role: viewer|operator|admin, tenants: [...]}}")
    roles = {r.label: r for r in Role}
    if value["role"] not in roles:
        raise ConfigError(
            f"{where}.role: expected viewer, operator or admin, got {value['role']!r}"
        )
    tenants = value["tenants"]
    if not isinstance(tenants, list) or not tenants:
        raise ConfigError(f"{where}.tenants: expected a list of tenants, or ['*'] for all")
    for tenant in tenants:
        if tenant != ALL:
            try:
                check_name("tenant", str(tenant))
            except InvalidArgument as err:
                raise ConfigError(f"{where}.tenants: {err}") from None
    return Grant(roles[value["role"]], frozenset(str(t) for t in tenants))
