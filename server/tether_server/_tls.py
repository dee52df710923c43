"""The coordinator's TLS: its serving credentials, reloaded when the files change, and the
credentials it reaches etcd with.

Short-lived certificates are the norm, so the files are read again whenever they change:
gRPC asks ``CertificateFiles.fetch`` at the start of every TLS handshake, and it answers
with a new configuration only when a file's identity (inode, size, mtime) moved. A
half-rotated pair (a new certificate, the old key) fails to load in gRPC, which keeps the
previous configuration; the next handshake after the key lands loads the matching pair.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from tether_server._config import ConfigError, ServerConfig

log = logging.getLogger("tether_server")

_Stamp = tuple[tuple[int, int, int], ...]


def read_pem(path: Path, flag: str) -> bytes:
    """The bytes of ``path``; a ConfigError naming ``flag`` when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{flag} {path}: {err.strerror or err}") from None


class CertificateFiles:
    """The coordinator's certificate, key and optional client CA, as files that may change."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._files = (cert, key, *((client_ca,) if client_ca else ()))
        self.client_ca = client_ca
        self._stamp = self._stamp_now()

    def _stamp_now(self) -> _Stamp:
        stats = (os.stat(path) for path in self._files)
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The configuration the files hold now.

        Raises:
            ConfigError: a file cannot be read.
        """
        cert = read_pem(self._files[0], "--tls-cert")
        key = read_pem(self._files[1], "--tls-key")
        roots = read_pem(self.client_ca, "--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """What gRPC calls per handshake: a new configuration if a file changed, else None."""
        try:
            stamp = self._stamp_now()
            if stamp == self._stamp:
                return None
            config = self.load()
        except (OSError, ConfigError) as err:  # mid-rotation: keep serving the last one
            log.warning("TLS files not reloaded: %s", err)
            return None
        self._stamp = stamp
        log.warning("TLS certificate files changed: loading them for new connections")
        return config


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials that follow the files, or None when TLS is off.

    Raises:
        ConfigError: a file cannot be read.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    for flag, path in (("--tls-cert", config.tls_cert), ("--tls-key", config.tls_key)):
        read_pem(path, flag)
    files = CertificateFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.load(),
        files.fetch,  # type: ignore[arg-type]  # None means "no change", as gRPC documents
        require_client_authentication=config.tls_client_ca is not None,
    )


def etcd_credentials(config: ServerConfig) -> grpc.ChannelCredentials | None:
    """Credentials for etcd over TLS (``https://`` endpoints), or None for plaintext.

    Raises:
        ConfigError: a file cannot be read.
    """
    if not config.etcd_tls:
        return None
    ca = read_pem(config.etcd_cacert, "--etcd-cacert") if config.etcd_cacert else None
    cert = read_pem(config.etcd_cert, "--etcd-cert") if config.etcd_cert else None
    key = read_pem(config.etcd_key, "--etcd-key") if config.etcd_key else None
    return grpc.ssl_channel_credentials(ca, key, cert)
