"""Signing effect permits and agent tokens with the coordinators' shared Ed25519 key.

A permit is ``base64url(claims JSON) "." base64url(Ed25519 signature)``; tools check it
offline with ``tether.PermitVerifier`` and the public key from ``tether permit-key``. Only a
coordinator holds the private key, so only the coordinator signs.

An agent token is ``tether-agent-v1.`` + ``base64url(claims JSON) "." base64url(signature)``,
where the signature covers a context string and then the claims. The prefix and the
context keep the two apart both ways: a permit never verifies as an agent token, and an
agent token never as a permit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from tether import PermitClaims

from tether_server._errors import Unauthenticated

AGENT_TOKEN_PREFIX = "tether-agent-v1"
_AGENT_TOKEN_CONTEXT = b"tether agent token v1\n"  # signed before the claims


@dataclass(frozen=True, slots=True)
class AgentTokenClaims:
    """What an agent token stands for: one agent of a tenant (or any, ``agent`` ''), until
    ``expires_ms``."""

    subject: str
    """The SPIFFE ID the token stands for."""
    tenant: str
    agent: str
    trust_domain: str
    issued_ms: int
    expires_ms: int
    key_id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def key_id(public: Any) -> str:
    """A short, stable name for a public key: the head of the sha256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class PermitSigner:
    """Signs permits with a coordinator's Ed25519 private key.

    Args:
        private_key: The Ed25519 private key.
        ttl: Seconds a permit stays valid after it is signed.
    """

    def __init__(self, private_key: Any, ttl: float = 5.0) -> None:
        self._key = private_key
        self._public = private_key.public_key()
        self.ttl = ttl
        self.key_id = key_id(self._public)

    @classmethod
    def from_raw(cls, raw: bytes, ttl: float = 5.0) -> PermitSigner:
        """A signer over the 32 raw bytes of an Ed25519 private key."""
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(raw), ttl)

    @classmethod
    def from_pem(cls, pem: bytes, ttl: float = 5.0) -> PermitSigner:
        """A signer over a PEM (PKCS8) private key, as ``--permit-key`` gives it."""
        return cls(serialization.load_pem_private_key(pem, password=None), ttl)

    def public_pem(self) -> str:
        """The public key as PEM (SubjectPublicKeyInfo), for ``tether permit-key``."""
        pem: bytes = self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode()

    def sign(self, **claims: Any) -> tuple[str, PermitClaims]:
        """Sign ``claims`` (all of PermitClaims but the times and key id) for ``ttl`` seconds."""
        now = int(time.time() * 1000)
        full = PermitClaims(
            issued_ms=now, expires_ms=now + int(self.ttl * 1000), key_id=self.key_id, **claims
        )
        payload = json.dumps(asdict(full), sort_keys=True, separators=(",", ":")).encode()
        return f"{_b64(payload)}.{_b64(self._key.sign(payload))}", full

    def sign_agent_token(
        self, subject: str, tenant: str, agent: str, trust_domain: str, ttl: float
    ) -> tuple[str, AgentTokenClaims]:
        """An agent token for ``subject`` (a SPIFFE ID of tenant and agent), valid ``ttl`` s."""
        now = int(time.time() * 1000)
        claims = AgentTokenClaims(
            subject, tenant, agent, trust_domain, now, now + int(ttl * 1000), self.key_id
        )
        payload = json.dumps(asdict(claims), sort_keys=True, separators=(",", ":")).encode()
        signature = self._key.sign(_AGENT_TOKEN_CONTEXT + payload)
        return f"{AGENT_TOKEN_PREFIX}.{_b64(payload)}.{_b64(signature)}", claims

    def verify_agent_token(self, token: str, trust_domain: str) -> AgentTokenClaims:
        """The claims of an agent token these coordinators signed, unexpired.

        Raises:
            Unauthenticated: malformed, signed by another key, forged, for another trust
                domain, or expired; the message says which and how to get a new one.
        """
        claims = self._agent_claims(token)
        if claims.trust_domain != trust_domain:
            raise Unauthenticated(
                f"agent token is for trust domain {claims.trust_domain!r}, not {trust_domain!r}"
            )
        if claims.expires_ms < int(time.time() * 1000):
            raise Unauthenticated(
                f"agent token for {claims.subject} expired at {_iso(claims.expires_ms)}; "
                "issue a new one with: tether token issue"
            )
        return claims

    def _agent_claims(self, token: str) -> AgentTokenClaims:
        try:
            prefix, payload_b64, signature_b64 = token.split(".")
            payload, signature = _unb64(payload_b64), _unb64(signature_b64)
            if prefix != AGENT_TOKEN_PREFIX:
                raise ValueError(prefix)
        except (ValueError, binascii.Error):
            raise Unauthenticated(
                f"malformed agent token: expected {AGENT_TOKEN_PREFIX}.CLAIMS.SIGNATURE"
            ) from None
        try:
            self._public.verify(signature, _AGENT_TOKEN_CONTEXT + payload)
            return AgentTokenClaims(**json.loads(payload))
        except Exception:
            raise Unauthenticated(
                "forged agent token: its signature does not verify with these coordinators' "
                f"key {self.key_id}; issue a new one with: tether token issue"
            ) from None
