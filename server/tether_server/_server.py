"""``tether serve``: the grpc.aio server, health, reflection, and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from tether.v1 import admin_pb2, admin_pb2_grpc, agent_pb2

from tether_server import _telemetry
from tether_server._admin import Admin
from tether_server._auth import AdminTokens
from tether_server._config import ServerConfig
from tether_server._coordinator import Coordinator
from tether_server._embedded import EmbeddedEtcd
from tether_server._orders import serialize
from tether_server._store import EtcdUnavailable, Store

log = logging.getLogger("tether_server")


SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.max_concurrent_streams", 100_000),
]


def agent_handler(heartbeat: Callable[..., Awaitable[None]]) -> grpc.GenericRpcHandler:
    """AgentService with ``heartbeat`` serving Heartbeat (bench/bare_server.py reuses it)."""
    handler = grpc.stream_stream_rpc_method_handler(
        heartbeat,
        request_deserializer=agent_pb2.HeartbeatRequest.FromString,
        response_serializer=serialize,
    )
    return grpc.method_handlers_generic_handler("tether.v1.AgentService", {"Heartbeat": handler})


def build_server(
    coordinator: Coordinator, health: HealthServicer, tokens: AdminTokens | None = None
) -> grpc.aio.Server:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((agent_handler(coordinator.sessions.heartbeat),))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        Admin.create(
            coordinator.store,
            last_beat=coordinator.sessions.last_beat,
            permit_key=lambda: coordinator.gate.signer,
            tokens=tokens,
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


async def serve(config: ServerConfig, environ: Mapping[str, str] = os.environ) -> None:
    """Run one coordinator until SIGINT or SIGTERM."""
    _telemetry.configure(environ)
    embedded = None
    endpoints = config.etcd
    if not endpoints:
        embedded = EmbeddedEtcd(config.data_dir)
        await embedded.start()
        endpoints = (embedded.endpoint,)
        log.warning("embedded etcd at http://%s, data in %s", embedded.endpoint, config.data_dir)
    try:
        await _serve(config, Store(endpoints))
    finally:
        if embedded is not None:
            await embedded.stop()


async def _serve(config: ServerConfig, store: Store) -> None:
    tokens = AdminTokens.load(config.admin_tokens) if config.admin_tokens else None
    health = HealthServicer()
    coordinator = Coordinator(config, store, health)
    server = build_server(coordinator, health, tokens)
    if server.add_insecure_port(config.listen) == 0:
        raise OSError(f"cannot listen on {config.listen}")
    runner = asyncio.create_task(coordinator.run(), name="coordinator")
    try:
        await _wait_attached(coordinator, store, config.startup_timeout)
        _tune_gc()
        await server.start()
        log.warning("tether coordinator %s serving on %s", config.coordinator_id, config.listen)
        await _until_signal()
    finally:
        await health.enter_graceful_shutdown()
        await coordinator.detach()
        await server.stop(config.shutdown_grace)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.close()


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
