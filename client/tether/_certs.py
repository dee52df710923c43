"""A development PKI: a CA, and certificates whose URI SAN is a Tether SPIFFE ID.

``tether certs`` and the tests use it. Production brings its own PKI (SPIRE, cert-manager);
the same SANs work there. Needs ``cryptography`` (``pip install 'tether[permits]'``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether._errors import InvalidArgument
from tether._uri import check_name

DEFAULT_TRUST_DOMAIN = "tether"
# A trust domain: lowercase letters, digits, dots and dashes, a letter or digit at each end.
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?")
# A DNS name of letters, digits and dashes per label; a leading "*." for a wildcard.
_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)


def check_trust_domain(value: str) -> str:
    """Return ``value`` if it is a SPIFFE trust domain, such as ``tether`` or ``acme.corp``."""
    if not _TRUST_DOMAIN.fullmatch(value):  # fullmatch: "$" alone lets a trailing newline in
        raise InvalidArgument(
            f"trust domain {value!r} is not valid: use lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """``hosts`` as (DNS names, IP addresses) for a server certificate's SANs."""
    dns: list[str] = []
    ips: list[str] = []
    for host in hosts:
        try:
            ips.append(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if len(host) > 253 or not _DNS_NAME.match(host):
            raise InvalidArgument(
                f"host {host!r} is neither an IP address nor a DNS name such as "
                "tether.example.com (a leading *. makes a wildcard)"
            )
        dns.append(host.lower())
    return dns, ips


def spiffe_id(
    *, tenant: str = "", agent: str = "", operator: str = "", trust_domain: str = ""
) -> str:
    """The SPIFFE ID of an agent (tenant and agent), a tenant's agent host, or an operator."""
    domain = check_trust_domain(trust_domain or DEFAULT_TRUST_DOMAIN)
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
        """Write ``NAME.crt`` (0644) and ``NAME.key`` (0600) into ``directory``.

        Each file is replaced atomically, the key first, so a coordinator that reloads its
        certificate when the file changes never reads half a file.
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        _replace(key, self.key, 0o600)
        _replace(cert, self.cert, 0o644)
        return cert, key

    @classmethod
    def read(cls, directory: Path, name: str) -> Pem:
        """The ``NAME.crt`` and ``NAME.key`` that :meth:`write` wrote."""
        return cls(
            (directory / f"{name}.crt").read_bytes(), (directory / f"{name}.key").read_bytes()
        )


def _replace(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)  # a leftover temporary file would keep its old mode
        out.write(data)
    os.replace(temporary, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_ca(
    common_name: str = "tether development CA", *, days: float = 365, trust_domain: str = ""
) -> Pem:
    """A self-signed CA that may sign leaf certificates only.

    With ``trust_domain``, the CA carries ``spiffe://TRUST_DOMAIN`` as its URI SAN, as a
    SPIFFE signing certificate may, so ``tether certs`` can tell which domain it serves.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    builder = (
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
    )  # fmt: skip
    if trust_domain:
        uri = x509.UniformResourceIdentifier(f"spiffe://{check_trust_domain(trust_domain)}")
        builder = builder.add_extension(x509.SubjectAlternativeName([uri]), critical=False)
    return Pem(_cert_pem(builder.sign(key, hashes.SHA256())), _key_pem(key))


def trust_domain_of(ca: Pem) -> str:
    """The trust domain ``new_ca`` wrote into ``ca``; the default for a CA without one."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(ca.cert)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return DEFAULT_TRUST_DOMAIN
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").split("/", 1)[0]
    return DEFAULT_TRUST_DOMAIN


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
