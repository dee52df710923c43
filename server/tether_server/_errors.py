"""One error root for the coordinator, and the one table that turns errors into gRPC statuses.

Handlers raise these; the transport edge (the admin servicer's wrapper, the Heartbeat
reader) asks :func:`status_of` for the code. The table is walked along the class's MRO, so a
subclass maps like its parent. Validation shared with the SDK (agent URIs and names) goes
through :func:`check_name` and :func:`parse_agent_uri`, which raise the server's own
InvalidArgument with the SDK's message.
"""

from __future__ import annotations

import grpc
import tether


class ServerError(Exception):
    """Root of every error the coordinator turns into a gRPC status; the message says what to do."""


class InvalidArgument(ServerError):
    """The request is malformed; the message says what to fix."""


class FailedPrecondition(ServerError):
    """The request is well formed but cannot be served in the current state."""


class NotFound(ServerError):
    """The named agent, run or instance does not exist."""


class Unauthenticated(ServerError):
    """The caller did not say who it is, or said it with a credential nobody issued."""


class PermissionDenied(ServerError):
    """The caller is known but may not do this."""


class Unavailable(ServerError):
    """etcd, or this coordinator's hold on it, cannot serve the request now; retry elsewhere."""


_STATUS: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}

# What a handler may raise and have turned into a status: ``except ANSWERABLE as err``.
ANSWERABLE: tuple[type[BaseException], ...] = (ServerError,)


def status_of(err: BaseException) -> grpc.StatusCode:
    """The gRPC status for ``err``: its own class's entry, else its nearest ancestor's.

    Anything not in the table is a bug, and goes out as INTERNAL.
    """
    for cls in type(err).__mro__:
        code = _STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def check_name(what: str, value: str) -> str:
    """``tether.check_name``, raised as the server's own error.

    Raises:
        InvalidArgument: ``value`` breaks the name rule; the SDK's message says how.
    """
    try:
        return tether.check_name(what, value)
    except tether.InvalidArgument as err:
        raise InvalidArgument(str(err)) from None


def parse_agent_uri(uri: str) -> tether.AgentRef:
    """``tether.parse_agent_uri``, raised as the server's own error.

    Raises:
        InvalidArgument: ``uri`` is not ``agent://TENANT/AGENT``; the SDK's message says how.
    """
    try:
        return tether.parse_agent_uri(uri)
    except tether.InvalidArgument as err:
        raise InvalidArgument(str(err)) from None
