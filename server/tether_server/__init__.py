"""The Tether coordinator: ``tether serve``."""

from tether_server._config import ConfigError, ServerConfig
from tether_server._config import load as load_config
from tether_server._drill import run_drills
from tether_server._drill_report import render as render_drill
from tether_server._launch import (
    CoordinatorProcess,
    EtcdProcess,
    LaunchError,
    ProcessExited,
    TlsFiles,
    etcd_argv,
    etcd_binary,
    free_port,
    wait_until,
)
from tether_server._server import build_server, serve

__all__ = [
    "ConfigError",
    "CoordinatorProcess",
    "EtcdProcess",
    "LaunchError",
    "ProcessExited",
    "ServerConfig",
    "TlsFiles",
    "build_server",
    "etcd_argv",
    "etcd_binary",
    "free_port",
    "load_config",
    "render_drill",
    "run_drills",
    "serve",
    "wait_until",
]
