"""Signing effect permits: the coordinator's half of the permit scheme.

A permit is ``base64url(claims JSON) "." base64url(Ed25519 signature)``; tools check it
offline with ``tether.PermitVerifier`` and the public key from ``tether permit-key``. Only a
coordinator holds the private key, so only the coordinator signs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import asdict
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from tether import PermitClaims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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
        self.ttl = ttl
        self.key_id = key_id(private_key.public_key())

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
        pem: bytes = self._key.public_key().public_bytes(
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
