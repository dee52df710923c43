"""TLS on every hop, with real certificates on loopback: agents, the CLI, grpcurl, etcd.

A coordinator of this module's own serves mutual TLS (``--tls-client-ca``); the session's
coordinators stay plaintext. The PKI is the session's ``pki`` fixture.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tether
from tether_server import CoordinatorProcess, TlsFiles

from tests.conftest import LEASE_TTL, Etcd, Pki, eventually

BIN = Path(sys.executable).parent
GRPCURL = shutil.which("grpcurl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def serve_flags(pki: Pki, *, client_ca: bool = True) -> list[str]:
    cert, key = pki.coordinator()
    flags = ["--tls-cert", str(cert), "--tls-key", str(key)]
    return [*flags, "--tls-client-ca", str(pki.ca)] if client_ca else flags


def operator(addr: str, pki: Pki, name: str = "alice") -> tether.AdminClient:
    """An admin client presenting operator ``name``'s certificate."""
    cert, key = pki.operator(name)
    return tether.AdminClient(addr, actor="pytest", tls_ca=pki.ca, tls_cert=cert, tls_key=key)


def launch(etcd_url: str, pki: Pki, log: Path, *flags: str) -> CoordinatorProcess:
    """A coordinator started with ``flags``, probed over TLS as operator alice."""
    cert, key = pki.operator("alice")
    proc = CoordinatorProcess(
        etcd_url, lease_ttl=LEASE_TTL, log=log, tls=TlsFiles(cert, key, pki.ca)
    )
    return proc.start(*flags, timeout=20)


@pytest.fixture(scope="module")
def mtls(etcd: Etcd, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a coordinator that requires client certificates from ``pki.ca``."""
    log = tmp_path_factory.mktemp("mtls") / "coordinator.log"
    proc = launch(etcd.url, pki, log, *serve_flags(pki))
    yield proc.addr
    proc.stop()


def test_agent_and_admin_round_trip_over_mutual_tls(mtls: str, pki: Pki, tenant: str) -> None:
    cert, key = pki.agent(tenant, "w")
    config = tether.AgentConfig(targets=(mtls,), tls_ca=pki.ca, tls_cert=cert, tls_key=key)
    with (
        tether.Agent(f"agent://{tenant}/w", run_id="r-1", config=config) as agent,
        operator(mtls, pki) as admin,
    ):
        agent.check()
        assert [i.run_id for i in admin.agents(tenant=tenant)] == ["r-1"]
        admin.kill(tether.selector(tenant=tenant), "tls test")
        eventually(lambda: agent.killed)
        with pytest.raises(tether.Killed):
            agent.check()


def test_agent_config_reads_tls_and_token_from_the_environment(pki: Pki) -> None:
    cert, key = pki.agent("acme", "w")
    env = {
        "TETHER_TLS_CA": str(pki.ca),
        "TETHER_TLS_CERT": str(cert),
        "TETHER_TLS_KEY": str(key),
        "TETHER_TOKEN": "tok",
    }
    config = tether.AgentConfig.from_env(env)
    assert (config.tls_ca, config.tls_cert, config.tls_key) == (str(pki.ca), str(cert), str(key))
    assert config.token == "tok"
    assert tether.AgentConfig.from_env({}).tls is None
    with pytest.raises(tether.InvalidArgument, match="tls_cert and tls_key go together"):
        tether.AgentConfig(tls_ca=pki.ca, tls_cert=cert)


def test_a_plaintext_client_is_refused(mtls: str) -> None:
    with tether.AdminClient(mtls, timeout=3) as admin, pytest.raises(tether.Unavailable):
        admin.agents()


def test_a_client_without_a_certificate_is_refused(mtls: str, pki: Pki) -> None:
    with (
        tether.AdminClient(mtls, timeout=3, tls_ca=pki.ca) as admin,
        pytest.raises(tether.Unavailable),
    ):
        admin.agents()
