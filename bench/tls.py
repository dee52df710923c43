"""Mutual TLS for the bench (``--tls``): a development CA in the scratch dir, and who shows what.

The coordinators serve with a certificate for 127.0.0.1 and require a client certificate
signed by the CA on every call. The SDK agents present a tenant-level SPIFFE certificate
(``spiffe://tether/tenant/bench``: any agent of the bench's tenant); the admin client and
the coordinators' readiness probe present an operator's (``spiffe://tether/operator/bench``),
an admin of every tenant in the ``--rbac`` file that the coordinators get when they know
that flag. Without ``--tls`` none of this exists and everything is plaintext, as before.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

from tether._certs import issue, new_ca, spiffe_id
from tether_server import TlsFiles

TENANT = "bench"  # every bench agent's tenant (and its certificate's)
OPERATOR = "bench"
RBAC = f'operators:\n  {OPERATOR}: {{role: admin, tenants: ["*"]}}\n'


class Pki:
    """The CA, the coordinators', agents' and operator's certificates, and the RBAC file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        ca = new_ca("tether bench CA")
        ca_path, _ = ca.write(directory, "ca")

        def leaf(name: str, uri: str) -> TlsFiles:
            cert, key = issue(ca, uri=uri, dns=["localhost"], ips=["127.0.0.1"]).write(
                directory, name
            )
            return TlsFiles(cert=cert, key=key, ca=ca_path)

        self.coordinator = leaf("coordinator", "spiffe://tether/coordinator/bench")
        self.agent = leaf("agent", spiffe_id(tenant=TENANT))
        self.operator = leaf("operator", spiffe_id(operator=OPERATOR))
        self.rbac = directory / "rbac.yaml"
        self.rbac.write_text(RBAC)

    def serve_flags(self) -> tuple[str, ...]:
        """``tether serve`` flags for mutual TLS, and ``--rbac`` if the coordinator has it."""
        own = self.coordinator
        flags = ["--tls-cert", str(own.cert), "--tls-key", str(own.key), "--tls-client-ca"]
        flags.append(str(own.ca))
        if serve_has("--rbac"):
            flags += ["--rbac", str(self.rbac)]
        return tuple(flags)


def client_kwargs(files: TlsFiles | None) -> dict[str, Any]:
    """``tls_ca``, ``tls_cert`` and ``tls_key`` for ``AgentConfig`` or ``AdminClient``."""
    if files is None:
        return {}
    return {"tls_ca": str(files.ca), "tls_cert": str(files.cert), "tls_key": str(files.key)}


@functools.cache
def serve_has(flag: str) -> bool:
    """Whether ``tether serve`` (as this Python imports it) takes ``flag``."""
    done = subprocess.run(
        [sys.executable, "-m", "tether", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return flag in done.stdout
