"""The one place a channel to a coordinator is opened: for agents, ``AdminClient`` and
``HaltCache``, plaintext or TLS from file paths, with an optional bearer token; and where
the coordinators' addresses are read (``--addr``, ``TETHER_ADDR``).

The files are read each time a channel opens, so a client whose certificate was renewed
on disk presents the new one at its next connection.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tether._errors import InvalidArgument

# grpc is imported where a channel opens, and pathlib when TLS is configured: the CLI
# parses its arguments, and refuses bad ones, before either is loaded.
if TYPE_CHECKING:
    from pathlib import Path

    import grpc
    from google.protobuf.descriptor import ServiceDescriptor

ENV_CA, ENV_CERT, ENV_KEY, ENV_TOKEN = (
    "TETHER_TLS_CA",
    "TETHER_TLS_CERT",
    "TETHER_TLS_KEY",
    "TETHER_TOKEN",
)

Metadata = tuple[tuple[str, str], ...]

DEFAULT_ADDR = "127.0.0.1:7700"


def resolve_targets(target: str | None, environ: Mapping[str, str]) -> list[str]:
    """``target``, else ``TETHER_ADDR``, else the default; a comma-separated list fails over."""
    raw = target or environ.get("TETHER_ADDR") or DEFAULT_ADDR
    targets = [t.strip() for t in raw.split(",") if t.strip()]
    if not targets:
        raise InvalidArgument(f"no coordinator address in {raw!r}: expected HOST:PORT[,HOST:PORT]")
    return targets


def host_port(raw: str) -> tuple[str, int] | None:
    """``raw`` split at its last colon into host and port; None without a port in 1..65535.

    The host is as written (brackets and all): each caller checks it its own way.
    """
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS toward a coordinator: the CA that signed its certificate, and ours, if any."""

    ca: Path
    """PEM CA bundle that verifies the coordinator's certificate."""
    cert: Path | None = None
    """PEM client certificate, for coordinators that require one (``--tls-client-ca``)."""
    key: Path | None = None
    """Private key of ``cert``."""

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC credentials from the files as they are now.

        Raises:
            InvalidArgument: a file cannot be read.
        """
        import grpc

        key = _read(self.key, "key") if self.key else None
        cert = _read(self.cert, "cert") if self.cert else None
        return grpc.ssl_channel_credentials(_read(self.ca, "ca"), key, cert)


def client_tls(
    tls_ca: str | Path | None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> ClientTls | None:
    """``ClientTls`` from paths, or None (plaintext) when no CA is given.

    Raises:
        InvalidArgument: a certificate without its key, or a certificate without a CA.
    """
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("tls_cert and tls_key go together: give both, or neither")
    if tls_ca is None:
        if tls_cert is not None:
            raise InvalidArgument(
                "a client certificate needs the coordinator's CA too: set tls_ca "
                f"(--tls-ca or {ENV_CA})"
            )
        return None
    from pathlib import Path

    cert, key = (Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else (None, None)
    return ClientTls(Path(tls_ca), cert, key)


def tls_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``tls_ca``, ``tls_cert`` and ``tls_key`` set in ``environ``, by keyword."""
    named = {"tls_ca": ENV_CA, "tls_cert": ENV_CERT, "tls_key": ENV_KEY}
    return {field: environ[var] for field, var in named.items() if environ.get(var)}


def bearer(token: str | None) -> Metadata | None:
    """The ``authorization`` metadata of a bearer token; None without one."""
    return (("authorization", f"Bearer {token}"),) if token else None


def trace_from_env(environ: Mapping[str, str]) -> Metadata:
    """W3C trace context handed down in ``TRACEPARENT`` and ``TRACESTATE``, as metadata.

    This is how a traced script passes its trace to the ``tether`` CLI (the OpenTelemetry
    convention for environment variables as context carriers).
    """
    named = (("traceparent", "TRACEPARENT"), ("tracestate", "TRACESTATE"))
    return tuple((key, environ[var]) for key, var in named if environ.get(var))


def traced(metadata: Metadata | None, fallback: Metadata = ()) -> Metadata | None:
    """``metadata`` plus the W3C trace context of the active OpenTelemetry span, if any,
    else plus ``fallback`` (see :func:`trace_from_env`)."""
    context = _active_trace() or fallback
    return (*(metadata or ()), *context) if context else metadata


def _active_trace() -> Metadata:
    # No span can be active in a process that never imported OpenTelemetry; and the SDK
    # does not depend on it, so it is never imported here first.
    if "opentelemetry.trace" not in sys.modules:
        return ()
    try:
        from opentelemetry import propagate
    except ImportError:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def open_channel(
    target: str, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking-API channel to ``target``: TLS with ``tls``, else plaintext."""
    import grpc

    if tls is None:
        return grpc.insecure_channel(target, options=list(options) or None)
    return grpc.secure_channel(target, tls.credentials(), options=list(options) or None)


def open_aio_channel(
    target: str, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: TLS with ``tls``, else plaintext."""
    import grpc

    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options) or None)
    return grpc.aio.secure_channel(target, tls.credentials(), options=list(options) or None)


def _read(path: Path, which: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidArgument(f"tls_{which} {path}: {err.strerror or err}") from None


class ServiceStub:
    """A client stub of one service of the generated API, whose methods are made when first
    used: the generated ``*_pb2_grpc`` stub makes every method of its service at once, and
    its module imports grpc's version check, for a one-shot ``tether kill`` that calls one.

    Args:
        channel: The channel its calls go over.
        service: The service's descriptor, e.g. ``admin_pb2.DESCRIPTOR.services_by_name[...]``.
    """

    def __init__(self, channel: grpc.Channel, service: ServiceDescriptor) -> None:
        self._channel = channel
        self._service = service

    def __getattr__(self, name: str) -> Any:
        """The method ``name``, as the generated stub has it (kept once made).

        Raises:
            AttributeError: the service has no such method, or only a client-streaming one
                (none of Tether's services has any).
        """
        if name.startswith("_"):  # not a method: and before __init__ (copy), not _service
            raise AttributeError(name)
        method = self._service.methods_by_name.get(name)
        if method is None or method.client_streaming:
            raise AttributeError(f"{self._service.full_name} has no method {name!r}")
        from google.protobuf.message_factory import GetMessageClass

        path = f"/{self._service.full_name}/{name}"
        make = self._channel.unary_stream if method.server_streaming else self._channel.unary_unary
        request, response = (GetMessageClass(t) for t in (method.input_type, method.output_type))
        # _registered_method, as the generated stub passes it: core interns the path once.
        call = make(  # type: ignore[call-arg]
            path,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
            _registered_method=True,
        )
        setattr(self, name, call)
        return call
