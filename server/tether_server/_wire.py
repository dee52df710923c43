"""Requests that do not parse get INVALID_ARGUMENT with what to fix, never UNKNOWN.

gRPC deserializes a request before any handler runs, and answers a parse failure with
UNKNOWN and the exception's text. ``MalformedRequests`` makes the deserializer of every
unary request lenient and answers INVALID_ARGUMENT from the edge instead. The Heartbeat
stream parses message by message inside its handler, which catches ``DecodeError`` itself
and answers with :func:`malformed`; its bare beats are not parsed at all (:func:`beat_request`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from tether.v1 import agent_pb2


def malformed(err: DecodeError) -> str:
    """The message a client gets for a request that does not parse."""
    text = str(err)
    if "MaxDepth" in text:
        return (
            "the message nests deeper than protobuf parses (about 32 levels of Struct in "
            "a checkpoint); flatten it"
        )
    return f"the message is not valid protobuf ({text}); send a message of the method's type"


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]  # generic in the stubs only


class _Malformed:
    """What the lenient deserializer returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as err:
            return _Malformed(err)

    return deserialize


def _checked(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, malformed(request.error))
        return await behavior(request, context)

    async def stream(request: Any, context: Any) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, malformed(request.error))
        async for response in behavior(request, context):
            yield response

    return stream if inspect.isasyncgenfunction(behavior) else unary


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT for a unary request whose bytes do not parse."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        parse = getattr(handler, "request_deserializer", None)
        if handler is None or handler.request_streaming or parse is None:
            return handler
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        wrapped = {kind: _checked(getattr(handler, kind))}
        replace = handler._replace  # type: ignore[attr-defined]
        return replace(request_deserializer=_lenient(parse), **wrapped)  # type: ignore[no-any-return]


# -- beats answered without a parse ---------------------------------------------------------
#
# Most of what an agent sends is a beat with nothing but its seq: no checkpoint, no signals.
# The AgentService methods take raw bytes and peek at them: such a beat arrives in the
# handler as its seq (an ``int``), and anything else as the parsed message, exactly as
# ``FromString`` gives it (a ``DecodeError`` too). Varints of at most 9 bytes (63 bits) are
# peeked at; a longer one takes the parse, which decides what it means.


def _varint_to_end(raw: bytes, at: int) -> int | None:
    """The varint starting at ``at`` if it ends exactly where ``raw`` does, else None."""
    value = shift = 0
    end = len(raw)
    while at < end:
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value if at == end else None
    return None


def beat_request(raw: bytes) -> Any:
    """Heartbeat's deserializer: a bare beat's seq, else the ``HeartbeatRequest``.

    A bare beat is ``beat { seq }`` and nothing else: tag 2 (length-delimited), its length,
    tag 1 (varint), the seq.
    """
    size = len(raw)
    if 4 <= size <= 12 and raw[0] == 0x12 and raw[1] == size - 2 and raw[2] == 0x08:
        seq = _varint_to_end(raw, 3)
        if seq is not None:
            return seq
    return agent_pb2.HeartbeatRequest.FromString(raw)


def mux_request(raw: bytes) -> Any:
    """Multiplex's deserializer: a request that is only a beat (``seq``, no frames) as its
    seq, else the ``MuxRequest``."""
    if 2 <= len(raw) <= 10 and raw[0] == 0x08:
        seq = _varint_to_end(raw, 1)
        if seq is not None:
            return seq
    return agent_pb2.MuxRequest.FromString(raw)
