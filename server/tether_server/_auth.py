"""The interceptor: every call to a ``tether.v1`` service is identified, then authorized.

``_identity`` says who the caller is, ``_rbac`` what it may do; this module runs them at the
edge, before any handler. AdminService calls are decided here from the request; a Heartbeat
or Multiplex stream is identified here and each registration on it decided in ``Sessions``
(it arrives on the stream), by the same authorizer's ``check_registration``. Handlers read
the principal with :func:`caller` and never see a certificate or a header. Health and
reflection are left alone: the transport (TLS, client certificates) already guards them.

Each call's one SERVER span starts here too (``_telemetry.server_span``), before the caller is
identified, so a refused call is traced with the status it was refused with.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tether_server._config import ConfigError, ServerConfig
from tether_server._errors import ANSWERABLE, Unauthenticated, status_of
from tether_server._identity import AdminTokens, Authenticator, Principal, SignerSource
from tether_server._rbac import Authorizer, load_rbac, open_to_anonymous
from tether_server._telemetry import current, replies_within, server_span

_SERVICES = "/tether.v1."
# Agent streams: each registration on them is decided in Sessions (check_registration).
_AGENT_STREAMS = frozenset({"Heartbeat", "Multiplex"})
_CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("tether_caller")

Admit = Callable[[Any, Any], Awaitable[Principal]]


def caller() -> Principal:
    """The principal of the call being served, as the interceptor found it.

    Raises:
        Unauthenticated: no interceptor identified this call (a server built without it).
    """
    try:
        return _CALLER.get()
    except LookupError:
        raise Unauthenticated(
            "this call was not identified: the server lacks its interceptor"
        ) from None


class Guard:
    """The coordinator's authenticator and authorizer, built from its configuration."""

    def __init__(self, authenticator: Authenticator, authorizer: Authorizer) -> None:
        self.authenticator = authenticator
        self.authorizer = authorizer

    @classmethod
    def create(cls, config: ServerConfig, signer: SignerSource) -> Guard:
        """Load ``--rbac`` and ``--admin-tokens`` as ``config`` names them.

        Raises:
            ConfigError: a file is malformed, or ``--admin-tokens`` comes without ``--rbac``.
        """
        grants = load_rbac(config.rbac) if config.rbac else None
        authorizer = Authorizer(grants, open_=open_to_anonymous(config))
        tokens = None
        if config.admin_tokens:
            if grants is None:
                raise ConfigError(
                    "--admin-tokens maps tokens to operators of --rbac: give --rbac FILE too "
                    "(lines are 'TOKEN OPERATOR'; the former 'TOKEN TENANT[,TENANT]' form is gone)"
                )
            tokens = AdminTokens.load(config.admin_tokens, authorizer.operators)
        return cls(Authenticator(config.trust_domain, tokens, signer), authorizer)

    @property
    def trust_domain(self) -> str:
        return self.authenticator.trust_domain

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _Interceptor(self)

    async def admit(self, method: str, request: Any, context: Any) -> Principal:
        """Identify the caller and, but for an agent stream, decide the call."""
        principal = self.authenticator.identify(context)
        if method not in _AGENT_STREAMS:
            self.authorizer.check(principal, method, request)
        return principal


class _Interceptor(grpc.aio.ServerInterceptor):
    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        # method -> (its handler, that handler wrapped): built once a method, not once a
        # call, since a stream holds its handler for as long as it is open. It hits for the
        # streams only: a unary handler comes back from MalformedRequests new each call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or not method.startswith(_SERVICES):
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        name = method.rsplit("/", 1)[-1]

        async def admit(request: Any, context: Any) -> Principal:
            return await self._guard.admit(name, request, context)

        wrapped = _wrapped(handler, admit, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrapped(handler: Any, admit: Admit, method: str) -> Any:
    """``handler`` with its behaviour run as the principal ``admit`` finds, or refused,
    inside the call's one SERVER span (refusals included)."""
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    field, build = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = getattr(handler, field)
    wrap = _generator if inspect.isasyncgenfunction(behaviour) else _coroutine
    return build(
        wrap(behaviour, admit, method),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _as_caller(request: Any, context: Any, admit: Admit) -> None:
    try:
        _CALLER.set(await admit(request, context))
    except ANSWERABLE as err:
        await context.abort(status_of(err), str(err))


def _coroutine(behaviour: Callable[..., Awaitable[Any]], admit: Admit, method: str) -> Any:
    """A handler that returns its reply, or writes its replies with ``context.write``."""

    async def run(request: Any, context: Any) -> Any:
        with server_span(method, context) as span, current(span):
            await _as_caller(request, context, admit)
            return await behaviour(request, context)

    return run


def _generator(behaviour: Callable[..., AsyncIterator[Any]], admit: Admit, method: str) -> Any:
    """A handler that yields its replies."""

    async def run(request: Any, context: Any) -> AsyncIterator[Any]:
        with server_span(method, context) as span:
            with current(span):
                await _as_caller(request, context, admit)
            async for reply in replies_within(span, behaviour(request, context)):
                yield reply

    return run
