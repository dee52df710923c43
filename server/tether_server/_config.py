"""Coordinator configuration: one frozen dataclass and the one loader that reads flags and env."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import uuid
from collections.abc import Callable, Mapping
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
    etcd_tls: bool = False
    """Reach etcd over TLS: its endpoints were given as ``https://``."""
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
    canary_interval: float = 0.0
    """Seconds between canary cycles (a synthetic instance killed and resumed through
    etcd, its kill latency recorded, health NOT_SERVING while it fails); 0: no canary."""
    roster_retention: float = 86400.0
    """Seconds an ended instance (EXITED, STALE, or KILLED and gone) stays listed before
    its roster record is pruned; 0: kept for ever."""
    startup_timeout: float = 15.0
    """Seconds to wait for etcd at start before giving up with a reason."""
    shutdown_grace: float = 5.0
    """Seconds open calls get to finish on shutdown."""
    workers: int = 1
    """Coordinator processes behind ``listen``. More than one share the port with
    SO_REUSEPORT (the kernel spreads connections) under one supervising process; one
    binds it alone, so that a second coordinator on a port in use fails."""
    coordinator_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    )
    """Names this coordinator in etcd and in AgentInstance.coordinator."""

    @property
    def heartbeat_interval(self) -> float:
        """How often agents beat: four beats per TTL keep one lost beat harmless."""
        return self.lease_ttl / 4


def parse_etcd_endpoints(raw: str) -> tuple[str, ...]:
    """``http://h:p[,http://h:p…]`` (or bare ``h:p``) into ``("h:p", …)``; see ``etcd_scheme``."""
    return tuple(endpoint for endpoint, _ in _etcd_urls(raw))


def etcd_scheme(raw: str) -> str:
    """``http`` or ``https``: the one scheme every endpoint of ``raw`` uses."""
    schemes = {scheme for _, scheme in _etcd_urls(raw)}
    if len(schemes) > 1:
        raise ConfigError(f"etcd endpoints {raw!r} mix http:// and https://: use one")
    return schemes.pop()


def _etcd_urls(raw: str) -> list[tuple[str, str]]:
    endpoints = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https"):
            raise ConfigError(f"etcd endpoint {item!r}: expected http:// or https://")
        try:
            port = url.port
        except ValueError:
            port = None
        if not url.hostname or port is None or url.path not in ("", "/"):
            raise ConfigError(f"etcd endpoint {item!r} is malformed: expected http://HOST:PORT")
        endpoints.append((f"{url.hostname}:{port}", url.scheme))
    if not endpoints:
        raise ConfigError(f"no etcd endpoint in {raw!r}: expected http://HOST:PORT[,…]")
    return endpoints


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """Flags win over ``TETHER_*`` variables, which win over the defaults."""

    def pick(name: str, var: str) -> str | None:
        value = getattr(args, name, None)
        return str(value) if value is not None else environ.get(var)

    kwargs: dict[str, object] = {}
    if listen := pick("listen", "TETHER_LISTEN"):
        _check_hostport("--listen", listen)
        kwargs["listen"] = listen
    if etcd := pick("etcd", "TETHER_ETCD"):
        kwargs["etcd"] = parse_etcd_endpoints(etcd)
        kwargs["etcd_tls"] = etcd_scheme(etcd) == "https"
    if data_dir := pick("data_dir", "TETHER_DATA_DIR"):
        kwargs["data_dir"] = Path(data_dir)
    if ttl := pick("lease_ttl", "TETHER_LEASE_TTL"):
        kwargs["lease_ttl"] = _number("--lease-ttl", ttl, MIN_LEASE_TTL, 3600.0)
    if limit := pick("max_checkpoint_bytes", "TETHER_MAX_CHECKPOINT_BYTES"):
        kwargs["max_checkpoint_bytes"] = int(_number("--max-checkpoint-bytes", limit, 1, 1 << 20))
    for name, var, parse in _PARSED:
        if value := pick(name, var):
            kwargs[name] = parse(value)
    if startup := environ.get("TETHER_STARTUP_TIMEOUT"):
        kwargs["startup_timeout"] = _number("TETHER_STARTUP_TIMEOUT", startup, 0.1, 600.0)
    for name, var in _PATHS:
        if value := pick(name, var):
            kwargs[name] = Path(value)
    if trust_domain := pick("trust_domain", "TETHER_TRUST_DOMAIN"):
        kwargs["trust_domain"] = trust_domain
    if health := pick("health_listen", "TETHER_HEALTH_LISTEN"):
        kwargs["health_listen"] = health
    kwargs["insecure"] = bool(getattr(args, "insecure", False)) or _truthy(
        environ.get("TETHER_INSECURE", "")
    )
    config = ServerConfig(**kwargs)  # type: ignore[arg-type]
    check(config)
    return config


# (field, variable) of the file flags; each flag is the field with dashes.
_PATHS = (
    ("admin_tokens", "TETHER_ADMIN_TOKENS"),
    ("permit_key", "TETHER_PERMIT_KEY"),
    ("rbac", "TETHER_RBAC"),
    ("tls_cert", "TETHER_SERVE_TLS_CERT"),
    ("tls_key", "TETHER_SERVE_TLS_KEY"),
    ("tls_client_ca", "TETHER_SERVE_TLS_CLIENT_CA"),
    ("etcd_cacert", "TETHER_ETCD_CACERT"),
    ("etcd_cert", "TETHER_ETCD_CERT"),
    ("etcd_key", "TETHER_ETCD_KEY"),
)


def _truthy(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes", "on")


def check(config: ServerConfig) -> None:
    """Refuse combinations that cannot work or would be unsafe.

    Raises:
        ConfigError: what to add or remove.
    """
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both, or neither")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if (config.etcd_cert is None) != (config.etcd_key is None):
        raise ConfigError("--etcd-cert and --etcd-key go together: give both, or neither")
    etcd_files = (config.etcd_cacert, config.etcd_cert)
    if any(etcd_files) and not config.etcd_tls:
        raise ConfigError("--etcd-cacert/--etcd-cert/--etcd-key need https:// --etcd endpoints")
    if config.health_listen:
        _check_hostport("--health-listen", config.health_listen)
        if not is_loopback(config.health_listen):
            raise ConfigError(
                f"--health-listen {config.health_listen} serves plaintext: "
                "bind it to loopback, e.g. 127.0.0.1:7701"
            )
    if config.workers > 1:
        _check_workers(config)
    mutual = config.tls_cert is not None and config.tls_client_ca is not None
    if not (mutual or config.insecure or is_loopback(config.listen)):
        raise ConfigError(
            f"--listen {config.listen} is not loopback: add --tls-cert, --tls-key and "
            "--tls-client-ca (or --insecure on a network you trust)"
        )


def _check_workers(config: ServerConfig) -> None:
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("--workers above 1 needs SO_REUSEPORT, which this system lacks")
    for flag, listen in (("--listen", config.listen), ("--health-listen", config.health_listen)):
        if listen.endswith(":0"):
            raise ConfigError(
                f"{flag} {listen}: --workers {config.workers} share one fixed port; "
                "port 0 would give each worker its own"
            )


def cores() -> int:
    """The cores this process may use: its CPU affinity (else the machine's), capped by a
    cgroup v2 CPU quota, as a container's CPU limit sets it."""
    try:
        found = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        found = os.cpu_count() or 1
    return min(found, _quota() or found)


def _quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The cgroup v2 quota in whole cores (at least 1); None: no limit, or not readable."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


MAX_WORKERS = 256


def workers(raw: str) -> int:
    """``--workers``: a whole number from 1 to 256, or ``auto`` (one per core)."""
    text = raw.strip().lower()
    if text == "auto":
        return min(cores(), MAX_WORKERS)
    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise ConfigError(
            f"--workers {raw!r}: give a whole number from 1 to {MAX_WORKERS}, "
            f"or auto (one per core: {cores()} here)"
        )
    return int(text)


def is_loopback(hostport: str) -> bool:
    """Whether ``HOST:PORT`` binds loopback only: ``localhost``, 127.0.0.0/8 or ::1."""
    host = hostport.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}  # "ms" first: it ends in "s"
_UNITS_AND_DAYS = {**_UNITS, "d": 86400.0}


def _duration(raw: str, units: dict[str, float]) -> float:
    """``raw`` in seconds: a number, bare or with one of ``units``; -1.0 if it is not one."""
    text = raw.strip().lower()
    unit = next((u for u in units if text.endswith(u)), "")
    try:
        return float(text[: len(text) - len(unit)]) * units.get(unit, 1.0)
    except ValueError:
        return -1.0


def canary_interval(raw: str) -> float:
    """``--canary-interval``: ``60s``, ``500ms``, ``5m``, ``1h`` or seconds; ``0`` is off."""
    seconds = _duration(raw, _UNITS)
    if seconds != 0 and not 0.2 <= seconds <= 86400:  # also refuses nan
        raise ConfigError(
            f"--canary-interval {raw!r}: give a duration from 200ms to 24h, such as 60s, or 0 (off)"
        )
    return seconds


def roster_retention(raw: str) -> float:
    """``--roster-retention``: ``24h``, ``7d``, ``30m``, ``90s`` or seconds; ``0``: for ever."""
    seconds = _duration(raw, _UNITS_AND_DAYS)
    if seconds != 0 and not 1 <= seconds <= 366 * 86400:  # also refuses nan
        raise ConfigError(
            f"--roster-retention {raw!r}: give a duration from 1s to 366d, such as 24h, "
            "or 0 (keep ended instances for ever)"
        )
    return seconds


def _number(name: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw}")
    return value


def _check_hostport(flag: str, value: str) -> None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{flag} {value!r} is malformed: expected HOST:PORT")


# (field, variable, parser) of the flags that each parse their own text.
_PARSED: tuple[tuple[str, str, Callable[[str], object]], ...] = (
    ("canary_interval", "TETHER_CANARY_INTERVAL", canary_interval),
    ("roster_retention", "TETHER_ROSTER_RETENTION", roster_retention),
    ("workers", "TETHER_WORKERS", workers),
)
