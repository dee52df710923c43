"""Effect permits: short-lived, signed by a coordinator, checked by the tools an agent calls.

A strict effect leaves the agent with a permit. A tool server that embeds the verifier
refuses effects whose permit is forged, expired, for another capability, or from a run that
has been halted since: the gateway enforcement that stops a buggy agent which ignores its
kill order. A permit is ``base64url(claims JSON) "." base64url(Ed25519 signature)``.
Only coordinators sign (``tether_server``); this module checks.

Key handling: the coordinators share one Ed25519 key. Give it to them with
``--permit-key FILE`` (PEM, PKCS8); without it, the first coordinator generates one and
stores it in etcd under ``/tether/keys/``, so protect etcd as you would the key. Tools only
need the public key, from ``tether permit-key``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tether._errors import TetherError

PERMIT_METADATA = "x-tether-permit"


class InvalidPermit(TetherError):
    """A permit was refused; the message says why (forged, expired, halted, ...)."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise TetherError("permits need: pip install 'tether[permits]'") from None
    return ed25519


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class PermitClaims:
    """What a permit allows: one effect of one capability, by one run, until ``expires_ms``."""

    tenant: str
    agent: str
    run_id: str
    instance_id: str
    capability: str
    key: str
    revision: int  # etcd revision of the halt view the permit was granted at
    issued_ms: int
    expires_ms: int
    key_id: str


Halted = Callable[[PermitClaims], str | None]


class PermitVerifier:
    """Checks permits offline with the coordinators' public key.

    Args:
        public_key_pem: From ``tether permit-key``.
        halted: Optional; given the claims, returns the reason the run is halted now,
            or None. ``HaltCache`` answers it from a coordinator.
        leeway: Seconds of clock skew to forgive on expiry.
    """

    def __init__(
        self, public_key_pem: str | bytes, *, halted: Halted | None = None, leeway: float = 0.0
    ) -> None:
        from cryptography.hazmat.primitives import serialization

        pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        public = serialization.load_pem_public_key(pem)
        if not isinstance(public, _crypto().Ed25519PublicKey):
            raise TetherError("the permit key must be an Ed25519 public key (tether permit-key)")
        self._public = public
        self._halted = halted
        self._leeway_ms = int(leeway * 1000)

    def verify(self, token: str, *, capability: str | None = None) -> PermitClaims:
        """Return the claims of a valid permit; raise ``InvalidPermit`` saying why not."""
        try:
            payload_b64, signature_b64 = token.split(".")
            payload, signature = _unb64(payload_b64), _unb64(signature_b64)
        except ValueError:
            raise InvalidPermit("malformed permit: expected PAYLOAD.SIGNATURE") from None
        try:
            self._public.verify(signature, payload)
        except Exception:
            raise InvalidPermit("forged permit: the signature does not verify") from None
        claims = PermitClaims(**json.loads(payload))
        if claims.expires_ms + self._leeway_ms < int(time.time() * 1000):
            raise InvalidPermit(f"expired permit for {claims.capability} of run {claims.run_id}")
        if capability is not None and claims.capability != capability:
            raise InvalidPermit(f"permit is for {claims.capability!r}, not {capability!r}")
        if self._halted is not None and (reason := self._halted(claims)):
            raise InvalidPermit(f"run {claims.run_id} is halted: {reason}")
        return claims


class HaltCache:
    """Answers ``halted`` for a verifier from a coordinator's halts, cached for ``max_age``.

    It reads halts as a viewer would, so over TLS it needs what ``AdminClient`` needs.

    Args:
        addr: ``HOST:PORT`` of a coordinator, or a comma-separated list to fail over.
        max_age: Seconds a fetched list of halts is trusted.
        tls_ca: PEM CA bundle of the coordinator; defaults to ``TETHER_TLS_CA``.
        tls_cert: PEM client certificate; defaults to ``TETHER_TLS_CERT``.
        tls_key: Its private key; defaults to ``TETHER_TLS_KEY``.
        token: Bearer token of a viewer; defaults to ``TETHER_TOKEN``.
    """

    def __init__(
        self,
        addr: str,
        max_age: float = 0.25,
        *,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
    ) -> None:
        from tether._admin import AdminClient

        self._client = AdminClient(
            addr, timeout=2.0, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        self._max_age = max_age
        self._at = 0.0
        self._halts: list[Any] = []

    def __call__(self, claims: PermitClaims) -> str | None:
        if time.monotonic() - self._at > self._max_age:
            self._halts = self._client.halts()  # fails closed: an error propagates
            self._at = time.monotonic()
        for halt in self._halts:
            sel = halt.selector
            if (
                sel.names(claims.tenant, claims.agent, claims.run_id)
                and sel.capability in ("", claims.capability)
                and not sel.labels  # labels are not in a permit: see the note in the README
                and not halt.release_gate  # nor the release that a gated resume lets run
            ):
                return f"{halt.reason} (halt {halt.id})"
        return None


class PermitInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with PERMISSION_DENIED, every call without a valid ``x-tether-permit``.

    Args:
        verifier: The ``PermitVerifier`` to check with.
        capability_for: Maps a method name to the capability its permit must name;
            None for a method means any capability will do.
    """

    def __init__(
        self, verifier: PermitVerifier, capability_for: Callable[[str], str | None] = lambda _: None
    ) -> None:
        self._verifier = verifier
        self._capability_for = capability_for

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        token = metadata.get(PERMIT_METADATA, "")
        try:
            if not token:
                raise InvalidPermit(f"no permit: send one in the {PERMIT_METADATA} metadata")
            capability = self._capability_for(handler_call_details.method)
            # verify() may ask a coordinator (HaltCache): keep it off this server's loop
            await asyncio.to_thread(self._verifier.verify, str(token), capability=capability)
        except (InvalidPermit, TetherError) as err:
            return _deny(handler, str(err))
        return handler


def _deny(handler: Any, message: str) -> Any:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        yield  # pragma: no cover - makes this an async generator

    req_stream = bool(handler and handler.request_streaming)
    resp_stream = bool(handler and handler.response_streaming)
    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(req_stream, resp_stream)]
    behaviour = streaming if resp_stream else unary
    return kind(behaviour)
