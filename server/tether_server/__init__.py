"""The Tether coordinator: ``tether serve``."""

from tether_server._config import ConfigError, ServerConfig
from tether_server._config import load as load_config
from tether_server._server import build_server, serve

__all__ = ["ConfigError", "ServerConfig", "build_server", "load_config", "serve"]
