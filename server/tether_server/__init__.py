"""The Tether coordinator: ``tether serve``.

The names below are imported on first use, not with the package: the drill against
coordinators given by address runs on an SDK-only install, while the coordinator itself and
the drill's own fleet need the server extra (aetcd, grpc_health, opentelemetry).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether_server._cluster import EtcdCluster
    from tether_server._config import ConfigError, ServerConfig
    from tether_server._config import load as load_config
    from tether_server._drill import run_drills
    from tether_server._drill_report import render as render_drill
    from tether_server._launch import (
        CoordinatorProcess,
        EtcdProcess,
        LaunchError,
        ProcessExited,
        etcd_binary,
        free_port,
        wait_until,
    )
    from tether_server._server import build_server, serve
    from tether_server._tls import TlsFiles
    from tether_server._workers import supervise

# public name -> (module, name there)
_LAZY = {
    "ConfigError": ("_config", "ConfigError"),
    "EtcdCluster": ("_cluster", "EtcdCluster"),
    "ServerConfig": ("_config", "ServerConfig"),
    "load_config": ("_config", "load"),
    "run_drills": ("_drill", "run_drills"),
    "render_drill": ("_drill_report", "render"),
    "CoordinatorProcess": ("_launch", "CoordinatorProcess"),
    "EtcdProcess": ("_launch", "EtcdProcess"),
    "LaunchError": ("_launch", "LaunchError"),
    "ProcessExited": ("_launch", "ProcessExited"),
    "TlsFiles": ("_tls", "TlsFiles"),
    "etcd_binary": ("_launch", "etcd_binary"),
    "free_port": ("_launch", "free_port"),
    "wait_until": ("_launch", "wait_until"),
    "build_server": ("_server", "build_server"),
    "serve": ("_server", "serve"),
    "supervise": ("_workers", "supervise"),
}

__all__ = [
    "ConfigError",
    "CoordinatorProcess",
    "EtcdCluster",
    "EtcdProcess",
    "LaunchError",
    "ProcessExited",
    "ServerConfig",
    "TlsFiles",
    "build_server",
    "etcd_binary",
    "free_port",
    "load_config",
    "render_drill",
    "run_drills",
    "serve",
    "supervise",
    "wait_until",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use, then keep the name here.

    Raises:
        AttributeError: ``name`` is not a public name of the package.
        ImportError: its module needs a dependency that is not installed.
    """
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
