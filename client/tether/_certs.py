"""A development PKI: a CA, and certificates whose URI SAN is a Tether SPIFFE ID.

``tether certs`` and the tests use it. Production brings its own PKI (SPIRE, cert-manager);
the same SANs work there. Needs ``cryptography`` (``pip install 'tether[permits]'``).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether._uri import check_name

DEFAULT_TRUST_DOMAIN = "tether"


def spiffe_id(
    *, tenant: str = "", agent: str = "", operator: str = "", trust_domain: str = ""
) -> str:
    """The SPIFFE ID of an agent (tenant and agent), a tenant's agent host, or an operator."""
    domain = trust_domain or DEFAULT_TRUST_DOMAIN
    if operator:
        if tenant or agent:
            raise ValueError("an operator's SPIFFE ID names no tenant or agent")
        return f"spiffe://{domain}/operator/{check_name('operator', operator)}"
    if not tenant:
        raise ValueError("a SPIFFE ID names an operator, or a tenant (and optionally an agent)")
    path = f"tenant/{check_name('tenant', tenant)}"
    if agent:
        path += f"/agent/{check_name('agent', agent)}"
    return f"spiffe://{domain}/{path}"


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, PEM-encoded."""

    cert: bytes
    key: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``NAME.crt`` and ``NAME.key`` (mode 0600) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(self.cert)
        key.touch(mode=0o600)
        key.write_bytes(self.key)
        return cert, key


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_ca(common_name: str = "tether development CA", *, days: float = 365) -> Pem:
    """A self-signed CA that may sign leaf certificates only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return Pem(_cert_pem(cert), _key_pem(key))


def issue(
    ca: Pem,
    *,
    uri: str = "",
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    common_name: str = "",
    days: float = 30,
    not_before: datetime.datetime | None = None,
) -> Pem:
    """A leaf certificate signed by ``ca``, good for both TLS server and client auth.

    Args:
        ca: The signing CA.
        uri: The URI SAN, normally a SPIFFE ID from :func:`spiffe_id`.
        dns: DNS SANs, for a coordinator's certificate.
        ips: IP SANs, for a coordinator reached by address.
        common_name: Informational only: Tether never trusts the common name.
        days: Validity from ``not_before``.
        not_before: Start of validity; default five minutes ago. Tests pass a past
            time with a short ``days`` to make an expired certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    both_ends = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key made by new_ca()")
    key = ec.generate_private_key(ec.SECP256R1())
    sans = _sans(uri, dns, ips)
    shown = (common_name or uri or "tether")[:64]  # X.509 caps it; only the SAN is trusted
    start = not_before or _now() - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, shown)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(both_ends), critical=False)
    )  # fmt: skip
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Pem(_cert_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key))


def _sans(uri: str, dns: Sequence[str], ips: Sequence[str]) -> list[Any]:
    from cryptography import x509

    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)] if uri else []
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return sans


def _cert_pem(cert: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined,no-any-return]


def _key_pem(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
