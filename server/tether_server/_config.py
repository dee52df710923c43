"""Coordinator configuration: one frozen dataclass and the one loader that reads flags and env."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_LISTEN = "127.0.0.1:7700"
# etcd takes requests up to 1.5 MiB; a checkpoint must fit in one with room to spare.
DEFAULT_MAX_CHECKPOINT_BYTES = 512 * 1024
MIN_LEASE_TTL = 2.0  # etcd's floor with default election settings


class ConfigError(ValueError):
    """A flag or environment variable is wrong; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How one coordinator runs."""

    listen: str = DEFAULT_LISTEN
    """HOST:PORT the gRPC server binds."""
    etcd: tuple[str, ...] = ()
    """etcd client endpoints as HOST:PORT. Empty: start an embedded etcd."""
    data_dir: Path = Path(".tether")
    """Where the embedded etcd keeps its data."""
    lease_ttl: float = 10.0
    """Seconds an instance may stay silent before its lease lapses and it is STALE."""
    max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES
    """Largest checkpoint accepted, as serialised JSON."""
    checkpoint_flush_interval: float = 1.0
    """Seconds between coalesced checkpoint writes. Kills and exits flush at once."""
    admin_tokens: Path | None = None
    """File of admin bearer tokens, each mapped to an operator of ``rbac``."""
    rbac: Path | None = None
    """YAML file of operators, each with a role (viewer, operator, admin) and tenants."""
    trust_domain: str = "tether"
    """The SPIFFE trust domain of the URI SANs this coordinator accepts."""
    tls_cert: Path | None = None
    """PEM certificate the coordinator serves; with ``tls_key``, TLS is on."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, every call must present a client certificate it signed."""
    health_listen: str = ""
    """Loopback HOST:PORT serving only grpc.health.v1 in plaintext, for probes; '' for none."""
    insecure: bool = False
    """Allow a non-loopback ``listen`` without TLS and client certificates."""
    etcd_cacert: Path | None = None
    """CA bundle that verifies etcd's server certificate (as etcdctl's --cacert)."""
    etcd_cert: Path | None = None
    """Client certificate presented to etcd (as etcdctl's --cert)."""
    etcd_key: Path | None = None
    """Private key of ``etcd_cert`` (as etcdctl's --key)."""
    permit_key: Path | None = None
    """PEM file with the Ed25519 key that signs effect permits; None: shared via etcd."""
    startup_timeout: float = 15.0
    """Seconds to wait for etcd at start before giving up with a reason."""
    shutdown_grace: float = 5.0
    """Seconds open calls get to finish on shutdown."""
    coordinator_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    )
    """Names this coordinator in etcd and in AgentInstance.coordinator."""

    @property
    def heartbeat_interval(self) -> float:
        """How often agents beat: four beats per TTL keep one lost beat harmless."""
        return self.lease_ttl / 4


def parse_etcd_endpoints(raw: str) -> tuple[str, ...]:
    """``http://h:p[,http://h:p…]`` (or bare ``h:p``) into ``("h:p", …)``."""
    endpoints = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme != "http":
            raise ConfigError(f"etcd endpoint {item!r}: only http:// is supported (TLS is not yet)")
        try:
            port = url.port
        except ValueError:
            port = None
        if not url.hostname or port is None or url.path not in ("", "/"):
            raise ConfigError(f"etcd endpoint {item!r} is malformed: expected http://HOST:PORT")
        endpoints.append(f"{url.hostname}:{port}")
    if not endpoints:
        raise ConfigError(f"no etcd endpoint in {raw!r}: expected http://HOST:PORT[,…]")
    return tuple(endpoints)


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """Flags win over ``TETHER_*`` variables, which win over the defaults."""

    def pick(flag: object, var: str) -> str | None:
        return str(flag) if flag is not None else environ.get(var)

    kwargs: dict[str, object] = {}
    if listen := pick(args.listen, "TETHER_LISTEN"):
        _check_hostport(listen)
        kwargs["listen"] = listen
    if etcd := pick(args.etcd, "TETHER_ETCD"):
        kwargs["etcd"] = parse_etcd_endpoints(etcd)
    if data_dir := pick(args.data_dir, "TETHER_DATA_DIR"):
        kwargs["data_dir"] = Path(data_dir)
    if ttl := pick(args.lease_ttl, "TETHER_LEASE_TTL"):
        kwargs["lease_ttl"] = _number("--lease-ttl", ttl, MIN_LEASE_TTL, 3600.0)
    if limit := pick(args.max_checkpoint_bytes, "TETHER_MAX_CHECKPOINT_BYTES"):
        kwargs["max_checkpoint_bytes"] = int(_number("--max-checkpoint-bytes", limit, 1, 1 << 20))
    if tokens := pick(getattr(args, "admin_tokens", None), "TETHER_ADMIN_TOKENS"):
        kwargs["admin_tokens"] = Path(tokens)
    if permit_key := pick(getattr(args, "permit_key", None), "TETHER_PERMIT_KEY"):
        kwargs["permit_key"] = Path(permit_key)
    if startup := environ.get("TETHER_STARTUP_TIMEOUT"):
        kwargs["startup_timeout"] = _number("TETHER_STARTUP_TIMEOUT", startup, 0.1, 600.0)
    return ServerConfig(**kwargs)  # type: ignore[arg-type]


def _number(name: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw}")
    return value


def _check_hostport(value: str) -> None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {value!r} is malformed: expected HOST:PORT")
