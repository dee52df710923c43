"""Who the caller is: the one place a transport identity becomes a :class:`Principal`.

The client certificate's URI SAN, in SPIFFE form, comes first (never its common name):

- ``spiffe://TD/tenant/T/agent/A``: one agent;
- ``spiffe://TD/tenant/T``: an agent host of tenant T, any agent of it;
- ``spiffe://TD/operator/NAME``: an operator, whose role ``--rbac`` gives.

Without a certificate, an ``authorization: Bearer`` token: an agent token the coordinators
signed (``_signer``), or an admin token of ``--admin-tokens``, which names an operator.
Without either, the caller is ``anonymous@PEER``; whether that is enough is the
authorizer's call. A credential that is presented must be valid: an unknown, forged or
expired one is UNAUTHENTICATED, whatever the coordinator's mode.
"""

from __future__ import annotations

import enum
import functools
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tether

from tether_server._config import ConfigError
from tether_server._errors import InvalidArgument, Unauthenticated, Unavailable, check_name
from tether_server._signer import AGENT_TOKEN_PREFIX, PermitSigner

MIN_TOKEN_LENGTH = 16


class Kind(enum.Enum):
    """What kind of caller a principal is."""

    ANONYMOUS = "anonymous"
    AGENT = "agent"
    TENANT = "tenant"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller, as the audit names it.

    ``id`` is the certificate's SPIFFE ID, the agent token's subject (a SPIFFE ID),
    ``operator:NAME`` for an admin token, or ``anonymous@PEER``.
    """

    id: str
    kind: Kind
    tenant: str = ""
    agent: str = ""
    operator: str = ""

    @classmethod
    def anonymous(cls, peer: str) -> Principal:
        return cls(f"anonymous@{peer}", Kind.ANONYMOUS)

    @property
    def is_agent(self) -> bool:
        """An agent or an agent host: registers agents, never operates the fleet."""
        return self.kind in (Kind.AGENT, Kind.TENANT)


def check_trust_domain(domain: str) -> str:
    """``tether.check_trust_domain``, raised as a configuration error.

    Raises:
        ConfigError: ``domain`` is not a trust domain.
    """
    try:
        return tether.check_trust_domain(domain)
    except tether.InvalidArgument:
        raise ConfigError(
            f"--trust-domain {domain!r} is not a trust domain: use lowercase letters, "
            "digits, '.' and '-', e.g. tether or prod.example.com"
        ) from None


def spiffe_forms(trust_domain: str) -> str:
    """The SPIFFE IDs this coordinator accepts, for error messages."""
    base = f"spiffe://{trust_domain}"
    return f"{base}/tenant/T/agent/A, {base}/tenant/T or {base}/operator/NAME"


def spiffe_id(trust_domain: str, tenant: str, agent: str = "") -> str:
    """The SPIFFE ID of an agent of ``tenant`` (or of any agent of it, ``agent`` '')."""
    tail = f"/agent/{agent}" if agent else ""
    return f"spiffe://{trust_domain}/tenant/{tenant}{tail}"


def principal_of_spiffe(uri: str, trust_domain: str) -> Principal | None:
    """The principal a Tether SPIFFE ID of ``trust_domain`` names; None for any other URI."""
    prefix = f"spiffe://{trust_domain}/"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix) :].split("/")
    try:
        if len(parts) == 2 and parts[0] == "operator":
            return Principal(uri, Kind.OPERATOR, operator=check_name("operator", parts[1]))
        if len(parts) in (2, 4) and parts[0] == "tenant":
            tenant = check_name("tenant", parts[1])
            if len(parts) == 2:
                return Principal(uri, Kind.TENANT, tenant=tenant)
            if parts[2] == "agent":
                agent = check_name("agent", parts[3])
                return Principal(uri, Kind.AGENT, tenant=tenant, agent=agent)
    except InvalidArgument:
        return None
    return None


@functools.lru_cache(maxsize=4096)
def certificate_principal(pem: bytes, trust_domain: str) -> Principal:
    """The principal of a client certificate: its one Tether SPIFFE URI SAN.

    Cached by the certificate's bytes: a fleet's agents reconnect with the same few.

    Raises:
        Unauthenticated: no URI SAN is a Tether SPIFFE ID of ``trust_domain``; says which
            SANs were seen and what form is expected.
    """
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    found = [p for p in (principal_of_spiffe(u, trust_domain) for u in uris) if p]
    if len(found) == 1:
        return found[0]
    seen = ", ".join(uris) if uris else "no URI SAN"
    raise Unauthenticated(
        f"the client certificate has {seen}; this coordinator takes exactly one URI SAN of "
        f"the form {spiffe_forms(trust_domain)} (the common name is never used)"
    )


def bearer_of(metadata: Any) -> str:
    """The token of an ``authorization: Bearer`` header; '' without one."""
    header = str(dict(metadata or ()).get("authorization", ""))
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class AdminTokens:
    """``--admin-tokens``: bearer tokens, each standing for an operator of ``--rbac``.

    Each line is ``TOKEN OPERATOR``, ``#`` starts a comment, and a token has at least 16
    characters. The file is refused at start-up, naming the line, when a token names an
    operator that ``--rbac`` does not define (the former ``TOKEN TENANT[,TENANT]`` and
    ``TOKEN *`` lines are refused with that same message, saying how to move to ``--rbac``).
    """

    def __init__(self, operators: Mapping[str, str]) -> None:
        self._operators = dict(operators)

    @classmethod
    def load(cls, path: Path, known: frozenset[str]) -> AdminTokens:
        """Read ``path``; every operator named must be in ``known``.

        Raises:
            ConfigError: the file cannot be read, a line is malformed, or names an
                operator not in ``known``; the message names the line.
        """
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"--admin-tokens {path}: {err.strerror}") from None
        operators: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            if line := raw.split("#", 1)[0].strip():
                token, name = _token_line(line, f"--admin-tokens {path}:{number}", known)
                operators[token] = name
        if not operators:
            raise ConfigError(f"--admin-tokens {path}: no tokens in the file")
        return cls(operators)

    def operator(self, token: str) -> str | None:
        """The operator ``token`` stands for; None if it is not one of ours."""
        found = None
        for known, name in self._operators.items():  # compare every one: no timing hint
            if hmac.compare_digest(known.encode(), token.encode()):
                found = name
        return found


def _token_line(line: str, where: str, known: frozenset[str]) -> tuple[str, str]:
    fields = line.split()
    if len(fields) != 2 or len(fields[0]) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{where}: expected 'TOKEN OPERATOR', with a token of at least "
            f"{MIN_TOKEN_LENGTH} characters and an operator defined in --rbac"
        )
    token, name = fields
    if name not in known:
        raise ConfigError(
            f"{where}: the token names operator {name!r}, which --rbac does not define "
            "(lines are 'TOKEN OPERATOR'; for the former 'TOKEN TENANT[,TENANT]' form, "
            "define an operator with those tenants in --rbac and name it here)"
        )
    return token, name


SignerSource = Callable[[], PermitSigner | None]
"""The coordinators' shared signer, or None before it is loaded."""


class Authenticator:
    """Maps a call's certificate or bearer token to a principal; see the module docstring.

    Args:
        trust_domain: The SPIFFE trust domain accepted.
        admin_tokens: ``--admin-tokens``, if given.
        signer: The shared key that signs (and so verifies) agent tokens.
    """

    def __init__(
        self, trust_domain: str, admin_tokens: AdminTokens | None, signer: SignerSource
    ) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        self._admin_tokens = admin_tokens
        self._signer = signer

    def identify(self, context: Any) -> Principal:
        """The caller of the call ``context`` belongs to.

        Raises:
            Unauthenticated: a certificate or token was presented and is not valid here.
            Unavailable: an agent token arrived before the signing key was loaded.
        """
        pem = _peer_certificate(context)
        if pem is not None:
            return certificate_principal(pem, self.trust_domain)
        token = bearer_of(context.invocation_metadata())
        if token:
            return self._token_principal(token)
        return Principal.anonymous(str(context.peer()))

    def _token_principal(self, token: str) -> Principal:
        if token.startswith(AGENT_TOKEN_PREFIX + "."):
            signer = self._signer()
            if signer is None:
                raise Unavailable("the coordinator has not loaded its signing key yet; retry")
            claims = signer.verify_agent_token(token, self.trust_domain)
            spiffe = principal_of_spiffe(claims.subject, self.trust_domain)
            if spiffe is None:  # signed by us, so only a bug gets here
                raise Unauthenticated(f"agent token names {claims.subject!r}, not an agent")
            return spiffe
        name = self._admin_tokens.operator(token) if self._admin_tokens else None
        if name is None:
            raise Unauthenticated(
                "the bearer token is neither an agent token signed by these coordinators nor "
                "an admin token of --admin-tokens; check --token / TETHER_TOKEN"
            )
        return Principal(f"operator:{name}", Kind.OPERATOR, operator=name)


def _peer_certificate(context: Any) -> bytes | None:
    """The PEM of the client certificate gRPC verified for this call, if any."""
    found = context.auth_context().get("x509_pem_cert")
    return bytes(found[0]) if found else None
