"""Run the dashboard: bind first (so a busy port is one line), then serve with uvicorn."""

from __future__ import annotations

import socket
import sys

import uvicorn

from tether._dashboard._app import build_app
from tether._dashboard._calls import connector
from tether._dashboard._config import DashboardConfig

SHUTDOWN_GRACE = 2  # seconds open event streams get to close when the process stops


def bind(config: DashboardConfig) -> socket.socket:
    """The listening socket. Raises OSError with the reason, such as the port being in use."""
    return socket.create_server((config.host, config.port))


def run_dashboard(config: DashboardConfig, sock: socket.socket | None = None) -> None:
    """Serve the dashboard until SIGINT or SIGTERM; its own process, its own event loop."""
    sock = sock or bind(config)
    app = build_app(config, connector(config))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
        )
    )
    where = ", ".join(config.targets)
    print(f"tether dashboard: {config.url} (coordinators {where})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
