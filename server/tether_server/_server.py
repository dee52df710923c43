"""``tether serve``: the grpc.aio server, health, reflection, and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from tether.v1 import admin_pb2, admin_pb2_grpc, agent_pb2

from tether_server import _telemetry
from tether_server._admin import Admin
from tether_server._auth import Guard
from tether_server._canary import Canary
from tether_server._config import ServerConfig
from tether_server._coordinator import SERVICES, Coordinator
from tether_server._embedded import EmbeddedEtcd
from tether_server._etcd import EtcdUnavailable, Store
from tether_server._orders import serialize
from tether_server._status import status_source
from tether_server._tls import etcd_credentials, server_credentials
from tether_server._wire import MalformedRequests, beat_request, mux_request

log = logging.getLogger("tether_server")


SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.max_concurrent_streams", 100_000),
    # A second coordinator on a port in use must fail, not share it and half the traffic.
    ("grpc.so_reuseport", 0),
]
_HEARTBEAT_PARSE = agent_pb2.HeartbeatRequest.FromString
_MUX_PARSE = agent_pb2.MuxRequest.FromString


def server_options(shared: bool) -> list[tuple[str, int]]:
    """``SERVER_OPTIONS``; ``shared``: with SO_REUSEPORT on, for the workers of
    ``tether serve --workers N``, which bind one port on purpose (``_workers``)."""
    if not shared:
        return SERVER_OPTIONS
    return [*SERVER_OPTIONS[:-1], ("grpc.so_reuseport", 1)]


def agent_handler(
    heartbeat: Callable[..., Awaitable[None]],
    multiplex: Callable[..., Awaitable[None]] | None = None,
    *,
    peek: bool = False,
) -> grpc.GenericRpcHandler:
    """AgentService with ``heartbeat`` serving Heartbeat and ``multiplex``, if given,
    Multiplex (bench/bare_server.py reuses it). Replies may arrive already serialised.
    ``peek``: a bare beat reaches the handler as its seq, unparsed (``_wire.beat_request``)."""
    beat, mux = (beat_request, mux_request) if peek else (_HEARTBEAT_PARSE, _MUX_PARSE)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Heartbeat": grpc.stream_stream_rpc_method_handler(
            heartbeat, request_deserializer=beat, response_serializer=serialize
        )
    }
    if multiplex is not None:
        handlers["Multiplex"] = grpc.stream_stream_rpc_method_handler(
            multiplex, request_deserializer=mux, response_serializer=serialize
        )
    return grpc.method_handlers_generic_handler("tether.v1.AgentService", handlers)


def build_server(
    coordinator: Coordinator, health: HealthServicer, guard: Guard, canary: Canary | None = None
) -> grpc.aio.Server:
    """The coordinator's services, each call identified and authorized by ``guard``."""
    server = grpc.aio.server(
        options=server_options(coordinator.config.workers > 1),
        interceptors=[guard.interceptor(), MalformedRequests()],
    )
    sessions = coordinator.sessions
    handler = agent_handler(sessions.heartbeat, sessions.multiplex, peek=True)
    server.add_generic_rpc_handlers((handler,))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        Admin.create(
            coordinator.store,
            last_beat=coordinator.sessions.last_beat,
            permit_key=lambda: coordinator.gate.signer,
            guard=guard,
            status=status_source(coordinator, canary),
        ),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    return server


async def serve(
    config: ServerConfig,
    environ: Mapping[str, str] = os.environ,
    serving: Callable[[], object] = lambda: None,
) -> None:
    """Run one coordinator until SIGINT or SIGTERM; ``serving`` is called once it serves."""
    _telemetry.configure(environ, instance=config.coordinator_id)
    etcd_tls = etcd_credentials(config)
    embedded = None
    endpoints = config.etcd
    if not endpoints:
        embedded = EmbeddedEtcd(config.data_dir)
        await embedded.start()
        endpoints = (embedded.endpoint,)
        log.warning("embedded etcd at http://%s, data in %s", embedded.endpoint, config.data_dir)
    try:
        await _serve(config, Store(endpoints, credentials=etcd_tls), serving)
    finally:
        if embedded is not None:
            await embedded.stop()


async def _serve(config: ServerConfig, store: Store, serving: Callable[[], object]) -> None:
    health = HealthServicer()
    coordinator = Coordinator(config, store, health)
    guard = Guard.create(config, lambda: coordinator.gate.signer)  # ConfigError: bad files
    canary = _canary(coordinator) if config.canary_interval else None
    server = build_server(coordinator, health, guard, canary)
    credentials = server_credentials(config)
    shared = config.workers > 1
    bind(server, config.listen, credentials, shared=shared)
    private = canary_server(coordinator, guard, canary) if canary is not None else None
    probes = health_server(health, config.health_listen, shared) if config.health_listen else None
    runner = asyncio.create_task(coordinator.run(), name="coordinator")
    cycling: asyncio.Task[None] | None = None
    try:
        await _wait_attached(coordinator, store, config.startup_timeout)
        _tune_gc()
        await server.start()
        for extra in (probes, private):
            if extra is not None:
                await extra.start()
        log.warning(
            "tether coordinator %s serving on %s (%s)",
            config.coordinator_id, config.listen, _transport(config),
        )  # fmt: skip
        serving()
        cycling = asyncio.create_task(canary.run(), name="canary") if canary else None
        await _until_signal()
    finally:
        if cycling is not None:
            cycling.cancel()
        if canary is not None:
            canary.close()
        await health.enter_graceful_shutdown()
        await coordinator.detach()
        for extra in (probes, private):
            if extra is not None:
                await extra.stop(0)
        await server.stop(config.shutdown_grace)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.close()


def canary_server(coordinator: Coordinator, guard: Guard, canary: Canary) -> grpc.aio.Server:
    """The canary's private Unix socket, serving the Heartbeat stream and nothing else.

    It skips TLS (the socket's directory is 0700), so it must not serve AdminService or
    reflection, and registrations on it other than the canary's are held to the same rule as
    anywhere: anonymous only on an open coordinator.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[guard.interceptor()])
    server.add_generic_rpc_handlers((agent_handler(coordinator.sessions.heartbeat, peek=True),))
    server.add_insecure_port(canary.address)
    return server


def _canary(coordinator: Coordinator) -> Canary:
    """The canary of ``coordinator``, admitted by its sessions."""
    canary = Canary(
        coordinator.config, coordinator.store, coordinator.health, coordinator.attached, SERVICES
    )
    coordinator.sessions.admits = canary.admits
    return canary


def bind(
    server: grpc.aio.Server,
    listen: str,
    credentials: grpc.ServerCredentials | None,
    *,
    shared: bool = False,
) -> None:
    """Bind ``listen``, TLS when ``credentials`` are given.

    ``shared``: a worker of ``--workers N``, whose siblings hold the port already (with
    SO_REUSEPORT); its supervisor made sure that nothing else did (``check_free``).

    Raises:
        OSError: the address cannot be bound, with the reason (such as "address already in use").
    """
    if not shared:
        check_free(listen)  # gRPC would also refuse, but with a log line and no reason
    try:
        if credentials is None:
            server.add_insecure_port(listen)
        else:
            server.add_secure_port(listen, credentials)
    except RuntimeError:
        raise OSError(f"cannot listen on {listen}: gRPC could not bind it") from None


def check_free(listen: str) -> None:
    """Bind each address ``listen`` resolves to as gRPC will (SO_REUSEADDR, no reuseport)."""
    host, _, port = listen.rpartition(":")
    try:
        found = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {listen}: {err.strerror}") from None
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise OSError(f"cannot listen on {listen}: address already in use") from None


def health_server(health: HealthServicer, listen: str, shared: bool = False) -> grpc.aio.Server:
    """A plaintext server on loopback with grpc.health.v1 only, for probes that cannot do TLS.

    ``shared``: every worker of ``--workers N`` serves it on one port, as the main one; a
    probe's connection lands on one worker, as an agent's does."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(shared))])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bind(server, listen, None, shared=shared)
    return server


def _transport(config: ServerConfig) -> str:
    if config.tls_cert is None:
        return "plaintext"
    return "mutual TLS" if config.tls_client_ca else "TLS, no client certificates"


def _tune_gc() -> None:
    """Keep the cyclic garbage collector from pausing a large fleet's kill.

    A coordinator holds several hundred thousand long-lived objects (sessions, streams,
    protobuf records). With CPython's default thresholds, a 10,000-agent kill set off full
    collections of 0.8 to 1.3 s each, and the collector took 17 s of a 130 s benchmark.
    What exists once attached (modules, descriptors, the stub tables) is frozen out of every
    collection, and young collections run per 50,000 allocations instead of 700: 3.8 s in
    the same benchmark, and no full collection (bench/CHANGES.md).
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def _wait_attached(coordinator: Coordinator, store: Store, timeout: float) -> None:
    try:
        await asyncio.wait_for(coordinator.attached.wait(), timeout)
    except TimeoutError:
        raise EtcdUnavailable(
            f"etcd at {', '.join(store.endpoints)} did not answer within {timeout:g}s; "
            "is it running, and is --etcd right?"
        ) from None


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
