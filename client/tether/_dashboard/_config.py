"""What one ``tether dashboard`` process serves and which coordinators it asks."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from tether._config import host_port, resolve_targets
from tether._errors import InvalidArgument

DEFAULT_LISTEN = "127.0.0.1:7780"
AUDIT_LIMIT = 200  # audit entries the page shows, newest first


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """Settings of one dashboard process; build it with ``load_config``."""

    host: str = "127.0.0.1"
    """Address the web server binds; loopback unless the operator says otherwise."""
    port: int = 7780
    """TCP port of the web server."""
    targets: tuple[str, ...] = ("127.0.0.1:7700",)
    """Coordinators as ``HOST:PORT``; the next one is asked when one stops answering."""
    token: str | None = None
    """Admin bearer token the dashboard presents: its own credentials, not the browser's.
    None: ``TETHER_TOKEN``, as ``AdminClient`` reads it."""
    tenant: str = ""
    """Show and act on one tenant only, for a principal whose role covers only that tenant."""
    tls_ca: str | None = None
    """PEM CA that verifies the coordinators; with it the dashboard dials TLS. With none of
    the three files given, ``AdminClient`` takes ``TETHER_TLS_CA``/``_CERT``/``_KEY``."""
    tls_cert: str | None = None
    """PEM client certificate: its URI SAN is the dashboard's operator identity."""
    tls_key: str | None = None
    """Private key of ``tls_cert``."""

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach the page."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def parse_listen(raw: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as (host, port); anything else says what to give."""
    found = host_port(raw)
    if found is None or not (host := found[0].removeprefix("[").removesuffix("]")):
        raise InvalidArgument(f"--listen {raw!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, found[1]


def load_config(
    *,
    listen: str | None,
    addr: str | None,
    token: str | None,
    tenant: str | None,
    tls: Mapping[str, str | None],
    environ: Mapping[str, str],
) -> DashboardConfig:
    """The dashboard's settings from its flags, then ``TETHER_ADDR`` (``tls`` maps tls_ca,
    tls_cert, tls_key to flags). Token and TLS files stay as given: ``AdminClient`` falls
    back to ``TETHER_TOKEN`` and ``TETHER_TLS_CA``/``_CERT``/``_KEY`` for those left None."""
    host, port = parse_listen(listen or DEFAULT_LISTEN)
    return DashboardConfig(
        host=host,
        port=port,
        targets=tuple(resolve_targets(addr, environ)),
        token=token or None,
        tenant=tenant or "",
        tls_ca=tls.get("tls_ca") or None,
        tls_cert=tls.get("tls_cert") or None,
        tls_key=tls.get("tls_key") or None,
    )
