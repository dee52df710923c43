"""Agent configuration: one frozen dataclass and the one loader that reads the environment."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# DEFAULT_ADDR, host_port and resolve_targets live in _channel, which `tether kill` loads
# without this module; they are imported from here too.
from tether._channel import (
    DEFAULT_ADDR,
    ENV_TOKEN,
    ClientTls,
    client_tls,
    host_port,
    resolve_targets,
    tls_from_env,
)
from tether._errors import InvalidArgument

__all__ = ["DEFAULT_ADDR", "AgentConfig", "host_port", "resolve_targets"]

if TYPE_CHECKING:
    from pathlib import Path

    from tether._verdict import Verdict  # its agent stubs: not for `tether kill`


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """How one agent instance reaches its coordinators and what it tells its owner.

    Build one with ``AgentConfig.from_env(os.environ, ...)`` to honour ``TETHER_ADDR``,
    ``TETHER_TLS_CA``, ``TETHER_TLS_CERT``, ``TETHER_TLS_KEY`` and ``TETHER_TOKEN``; the
    constructor reads no environment.
    """

    targets: tuple[str, ...] = (DEFAULT_ADDR,)
    """Coordinators as ``HOST:PORT``, tried in turn when a stream breaks.

    A config built directly keeps this default and does not read ``TETHER_ADDR``; only
    ``AgentConfig.from_env`` does. ``Agent(..., config=...)`` therefore ignores
    ``TETHER_ADDR`` unless ``target`` is given or the config came from ``from_env``."""
    connect_timeout: float = 10.0
    """Seconds ``start()`` waits to register before raising ``tether.Unavailable``."""
    strict_effects: bool = False
    """Gate effects in strict mode by default (see ``Agent.effect``)."""
    channel_options: tuple[tuple[str, Any], ...] = ()
    """Extra gRPC channel arguments for the agent's channel, such as
    ``(("grpc.use_local_subchannel_pool", 1),)`` for a TCP connection of its own. Agents of
    one process (and event loop) with the same targets, credentials and options share one
    channel and one stream; different options make a channel of their own (a distinct
    option per agent, such as ``("tether.link", n)``, gives each agent its own stream)."""
    on_reply: Callable[[Verdict, bool], None] | None = None
    """Called on the agent's event loop after each coordinator reply is applied, with the
    verdict now in force and True when that reply was a session grant (a registration or
    re-registration). It must return quickly and not raise: it runs inside the stream's
    reader. None: nothing is called."""
    tls_ca: str | Path | None = None
    """PEM CA bundle that verifies the coordinator; set, the agent speaks TLS. None:
    plaintext."""
    tls_cert: str | Path | None = None
    """PEM client certificate (its URI SAN is the agent's identity), with ``tls_key``."""
    tls_key: str | Path | None = None
    """Private key of ``tls_cert``."""
    token: str | None = None
    """Signed agent token, sent as ``authorization: Bearer TOKEN`` on the stream, for
    platforms where client certificates are awkward."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) or not self.targets:
            raise InvalidArgument(
                f"targets must be a non-empty tuple of HOST:PORT, got {self.targets!r}"
            )
        self.tls  # noqa: B018 - a half-given pair fails here, not at the first connection

    @property
    def tls(self) -> ClientTls | None:
        """The TLS settings, or None for plaintext."""
        return client_tls(self.tls_ca, self.tls_cert, self.tls_key)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> AgentConfig:
        """The one loader: ``overrides`` win over ``TETHER_*`` variables, which win over
        the defaults.

        Args:
            environ: The environment to read, usually ``os.environ``. ``TETHER_ADDR`` gives
                ``targets`` (a comma-separated ``HOST:PORT`` list); ``TETHER_TLS_CA``,
                ``TETHER_TLS_CERT`` and ``TETHER_TLS_KEY`` give ``tls_*``; ``TETHER_TOKEN``
                gives ``token``.
            **overrides: Values for any of the fields, by name.
        """
        if "targets" not in overrides:
            overrides["targets"] = tuple(resolve_targets(None, environ))
        if not any(name.startswith("tls_") for name in overrides):
            overrides.update(tls_from_env(environ))
        if "token" not in overrides and environ.get(ENV_TOKEN):
            overrides["token"] = environ[ENV_TOKEN]
        return cls(**overrides)
