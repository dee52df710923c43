"""One exception root for the SDK, and the table that maps gRPC status codes onto it."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc  # imported where an error is translated: a CLI usage error never loads it


class TetherError(Exception):
    """Root of every error the Tether SDK raises."""


class InvalidArgument(TetherError):
    """The request was malformed; the message says what to fix."""


class FailedPrecondition(TetherError):
    """The request is well formed but cannot be served in the current state."""


class NotFound(TetherError):
    """The named agent, run or instance does not exist."""


class Unavailable(TetherError):
    """The coordinator, or the etcd behind it, cannot be reached."""


class PermissionDenied(TetherError):
    """The caller is known but may not do this: its role, its tenants, or its identity
    (an agent registering outside it, a run that belongs to another tenant or agent)."""


class Unauthenticated(PermissionDenied):
    """The coordinator could not tell who the caller is: no identity where one is needed,
    or a certificate or token it does not accept (unknown, forged, expired)."""


class Killed(TetherError):
    """The instance must stop: a halt matches it, or its tether is lost.

    Attributes:
        reason: Why it was killed, as the operator wrote it.
        scope: ``global``, ``tenant``, ``agent``, ``run`` or ``tether`` (fail closed).
        actor: Who ordered it.
        halt_id: The halt's id, empty when the SDK failed closed on its own.
    """

    def __init__(self, reason: str, *, scope: str, actor: str, halt_id: str = "") -> None:
        super().__init__(f"killed ({scope}) by {actor}: {reason}")
        self.reason = reason
        self.scope = scope
        self.actor = actor
        self.halt_id = halt_id


class CapabilityFrozen(Killed):
    """One capability is frozen; the instance's other work may go on.

    Attributes:
        capability: The frozen capability, such as ``send_email``.
    """

    def __init__(
        self, capability: str, reason: str, *, scope: str, actor: str, halt_id: str
    ) -> None:
        super().__init__(reason, scope=scope, actor=actor, halt_id=halt_id)
        self.capability = capability
        self.args = (f"capability {capability} frozen ({scope}) by {actor}: {reason}",)


class Degraded(CapabilityFrozen):
    """Degraded mode: every write capability is frozen, reads go on.

    A breaker or a policy rule puts it (its actor is ``breaker:NAME`` or ``policy:NAME``,
    and the reason carries the figures that tripped it), or an operator does; ``tether
    resume`` lifts it like any halt.
    """

    def __init__(
        self, capability: str, reason: str, *, scope: str, actor: str, halt_id: str
    ) -> None:
        super().__init__(capability, reason, scope=scope, actor=actor, halt_id=halt_id)
        self.args = (f"degraded ({scope}) by {actor}: write {capability} blocked: {reason}",)


class TetherLost(Killed):
    """Fail closed: no confirmed heartbeat reply within the lease TTL, or the
    coordinator said it can no longer know the halt state."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, scope="tether", actor="tether")


@functools.cache
def _by_code() -> dict[grpc.StatusCode, type[TetherError]]:
    """The table: gRPC status codes onto the SDK's exceptions (made on first use)."""
    import grpc

    return {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    }


def rpc_status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Code and details of a blocking (``grpc.Call``) or asyncio (``AioRpcError``) error."""
    import grpc

    if isinstance(err, grpc.Call | grpc.aio.AioRpcError):
        return err.code(), err.details() or ""
    return grpc.StatusCode.UNKNOWN, str(err)


def from_rpc_error(err: grpc.RpcError) -> TetherError:
    """Translate a gRPC error at the transport boundary: ``raise from_rpc_error(e) from e``."""
    code, details = rpc_status(err)
    cls = _by_code().get(code, TetherError)
    return cls(details or code.name)


def is_permanent(err: grpc.RpcError) -> bool:
    """True for errors that retrying the same request cannot fix: a malformed registration,
    or one the coordinator refuses for who the caller is."""
    import grpc

    return rpc_status(err)[0] in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    )
