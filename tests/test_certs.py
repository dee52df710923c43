"""``tether certs``: the development PKI, checked with cryptography, openssl and a real TLS handshake.

The verb runs as a terminal user runs it (a subprocess); its certificates are then verified
by the ``cryptography`` library, by ``openssl verify`` when openssl is on PATH, and by real
gRPC over mutual TLS on loopback.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import eventually, ok, tether_cli

OPENSSL = shutil.which("openssl")


def certs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return tether_cli("certs", *args, cwd=cwd)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    """(DNS names, IP addresses, URIs) of ``cert``'s subject alternative names."""
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        names.get_values_for_type(x509.DNSName),
        [str(ip) for ip in names.get_values_for_type(x509.IPAddress)],
        names.get_values_for_type(x509.UniformResourceIdentifier),
    )


def assert_private(key: Path) -> None:
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, oct(key.stat().st_mode)


def assert_signed(ca: Path, leaf: Path) -> None:
    """``leaf`` is signed by ``ca``: by cryptography, and by openssl when it is installed."""
    load(leaf).verify_directly_issued_by(load(ca))
    if OPENSSL is None:
        return
    for purpose in ("sslserver", "sslclient"):
        result = subprocess.run(
            [OPENSSL, "verify", "-purpose", purpose, "-CAfile", str(ca), str(leaf)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    """A directory after ``tether certs init`` with one extra host name and address."""
    ok(certs("init", "--host", "tether.example.com", "--host", "10.1.2.3", cwd=tmp_path))
    return tmp_path / "certs"


def test_init_writes_a_ca_and_a_coordinator_certificate_for_local_and_named_hosts(
    pki_dir: Path,
) -> None:
    ca = load(pki_dir / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sans(ca)[2] == ["spiffe://tether"]
    assert_signed(pki_dir / "ca.crt", pki_dir / "coordinator.crt")
    dns, ips, uris = sans(load(pki_dir / "coordinator.crt"))
    assert set(dns) == {"localhost", "tether.example.com"}
    assert set(ips) == {"127.0.0.1", "10.1.2.3"}
    assert uris == []
    for key in ("ca.key", "coordinator.key"):
        assert_private(pki_dir / key)


def test_agent_and_operator_certificates_carry_their_spiffe_id(pki_dir: Path) -> None:
    cwd = pki_dir.parent
    out = ok(certs("agent", "--tenant", "acme", "--agent", "email-campaign", cwd=cwd))
    assert "TETHER_TLS_CERT=certs/agent-acme-email-campaign.crt" in out
    ok(certs("agent", "--tenant", "globex", cwd=cwd))
    out = ok(certs("operator", "alice", cwd=cwd))
    assert "--tls-cert certs/operator-alice.crt" in out
    assert "grpcurl -cacert certs/ca.crt -cert certs/operator-alice.crt" in out
    expected = {
        "agent-acme-email-campaign": "spiffe://tether/tenant/acme/agent/email-campaign",
        "agent-globex": "spiffe://tether/tenant/globex",
        "operator-alice": "spiffe://tether/operator/alice",
    }
    for name, uri in expected.items():
        cert = load(pki_dir / f"{name}.crt")
        assert sans(cert) == ([], [], [uri])
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
        assert_signed(pki_dir / "ca.crt", pki_dir / f"{name}.crt")
        assert_private(pki_dir / f"{name}.key")


def test_a_trust_domain_chosen_at_init_names_every_identity(tmp_path: Path) -> None:
    ok(certs("init", "--dir", "pki", "--trust-domain", "acme.corp", cwd=tmp_path))
    ok(certs("operator", "bob", "--dir", "pki", cwd=tmp_path))
    assert sans(load(tmp_path / "pki" / "operator-bob.crt"))[2] == [
        "spiffe://acme.corp/operator/bob"
    ]


def test_reissuing_a_leaf_keeps_its_key_private(pki_dir: Path) -> None:
    key = pki_dir / "operator-carol.key"
    ok(certs("operator", "carol", cwd=pki_dir.parent))
    key.chmod(0o644)
    before = (pki_dir / "operator-carol.crt").read_bytes()
    ok(certs("operator", "carol", cwd=pki_dir.parent))
    assert_private(key)
    assert (pki_dir / "operator-carol.crt").read_bytes() != before


def test_etcd_gets_a_ca_of_its_own(pki_dir: Path) -> None:
    ok(certs("etcd", "--host", "*.etcd", "--host", "etcd-1", cwd=pki_dir.parent))
    assert load(pki_dir / "etcd-ca.crt").subject != load(pki_dir / "ca.crt").subject
    for leaf in ("etcd-server", "etcd-client"):
        assert_signed(pki_dir / "etcd-ca.crt", pki_dir / f"{leaf}.crt")
        assert_private(pki_dir / f"{leaf}.key")
    dns, ips, _ = sans(load(pki_dir / "etcd-server.crt"))
    assert set(dns) == {"localhost", "*.etcd", "etcd-1"}
    assert ips == ["127.0.0.1"]
    ca = (pki_dir / "etcd-ca.crt").read_bytes()
    ok(certs("etcd", cwd=pki_dir.parent))  # a second run re-issues and keeps the CA
    assert (pki_dir / "etcd-ca.crt").read_bytes() == ca


BAD_INPUT = [
    (("init",), "certs/ca.crt exists: tether certs never overwrites a CA"),
    (("agent", "--tenant", "acme", "--dir", "elsewhere"), "no CA in elsewhere/"),
    (("operator", "dave", "--dir", "elsewhere"), "run `tether certs init --dir elsewhere` first"),
    (("agent", "--tenant", "acme/x"), "tenant 'acme/x' is not a valid name"),
    (("agent", "--tenant", "acme", "--agent", "-"), "agent '-' is not a valid name"),
    (("operator", "al ice"), "operator 'al ice' is not a valid name"),
    (("init", "--dir", "new", "--host", "bad_host!"), "host 'bad_host!' is neither an IP"),
    (("init", "--dir", "new", "--trust-domain", "Tether"), "trust domain 'Tether' is not valid"),
    (("operator", "erin", "--days", "0"), "--days must be between 0 and 3650"),
    (("agent",), "the following arguments are required: --tenant"),
    (("mint",), "invalid choice: 'mint'"),
]


@pytest.mark.parametrize(("args", "says"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(pki_dir: Path, args: tuple[str, ...], says: str) -> None:
    ca = (pki_dir / "ca.key").read_bytes()
    result = certs(*args, cwd=pki_dir.parent)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert (pki_dir / "ca.key").read_bytes() == ca
    assert not (pki_dir.parent / "new").exists()


def test_without_cryptography_it_says_what_to_install(tmp_path: Path) -> None:
    # None in sys.modules makes ``import cryptography`` fail as if it were not installed.
    script = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from tether._cli import main\n"
        "raise SystemExit(main(['certs', 'init']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tether: tether certs needs cryptography: pip install 'tether[permits]'"
    )
    assert not (tmp_path / "certs").exists()


# -- a real handshake ------------------------------------------------------------------------


def _who(_: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """The peer's identity as gRPC's auth context reports it, as JSON."""
    seen = {k: [v.decode(errors="replace") for v in vs] for k, vs in context.auth_context().items()}
    return json.dumps(seen).encode()


async def _handshake(
    pki_dir: Path, client: str, target: str, server_name: str = ""
) -> dict[str, list[str]]:
    """The client's identity as a mutual-TLS gRPC server on loopback saw it."""

    def read(name: str) -> bytes:
        return (pki_dir / name).read_bytes()

    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(_who)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Who", {"Am": handler}),)
    )
    creds = grpc.ssl_server_credentials(
        [(read("coordinator.key"), read("coordinator.crt"))],
        root_certificates=read("ca.crt"),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        channel_creds = grpc.ssl_channel_credentials(
            read("ca.crt"), read(f"{client}.key"), read(f"{client}.crt")
        )
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        async with grpc.aio.secure_channel(f"{target}:{port}", channel_creds, options) as channel:
            who: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/t.Who/Am")
            reply = await who(b"", timeout=10)
        return json.loads(reply)  # type: ignore[no-any-return]
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("target", "server_name"),
    [("127.0.0.1", ""), ("localhost", ""), ("127.0.0.1", "tether.example.com")],
)
def test_the_coordinator_certificate_passes_a_real_mutual_tls_handshake(
    pki_dir: Path, target: str, server_name: str
) -> None:
    ok(certs("agent", "--tenant", "acme", "--agent", "email-campaign", cwd=pki_dir.parent))
    seen = asyncio.run(_handshake(pki_dir, "agent-acme-email-campaign", target, server_name))
    assert seen["transport_security_type"] == ["ssl"]
    # The server sees the client's SPIFFE ID as its URI SAN; the common name is not it.
    uri = "spiffe://tether/tenant/acme/agent/email-campaign"
    assert seen["peer_uri"] == [uri]
    assert seen["x509_common_name"] == ["tether agent acme/email-campaign"]


def test_a_host_the_certificate_does_not_name_is_refused(pki_dir: Path) -> None:
    ok(certs("operator", "alice", cwd=pki_dir.parent))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(_handshake(pki_dir, "operator-alice", "127.0.0.1", "elsewhere.example.com"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_of_another_ca_is_refused(pki_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    ok(certs("init", cwd=other))
    ok(certs("operator", "mallory", cwd=other))
    for suffix in ("crt", "key"):
        shutil.copy(other / "certs" / f"operator-mallory.{suffix}", pki_dir)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(_handshake(pki_dir, "operator-mallory", "127.0.0.1"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# -- etcd, with a CA of its own ------------------------------------------------------------


def _etcd_range(pki_dir: Path, endpoint: str, client: str, ca: str = "etcd-ca") -> int:
    """A Range over mutual TLS as ``client``; returns the store's revision."""
    from aetcd import rpc

    def read(name: str) -> bytes:
        return (pki_dir / name).read_bytes()

    creds = grpc.ssl_channel_credentials(
        read(f"{ca}.crt"), read(f"{client}.key"), read(f"{client}.crt")
    )
    with grpc.secure_channel(endpoint, creds) as channel:
        reply = rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"/tether/"), timeout=5)
    return int(reply.header.revision)


@pytest.fixture
def tls_etcd(pki_dir: Path, tmp_path: Path) -> Iterator[str]:
    """A real etcd serving clients and peers over TLS with the certificates of ``tether certs etcd``."""
    from tether_server import etcd_binary, free_port

    ok(certs("etcd", cwd=pki_dir.parent))
    client, peer = f"https://127.0.0.1:{free_port()}", f"https://127.0.0.1:{free_port()}"
    server, key, ca = (
        str(pki_dir / n) for n in ("etcd-server.crt", "etcd-server.key", "etcd-ca.crt")
    )
    argv = [
        etcd_binary(), "--name=tls", f"--data-dir={tmp_path / 'etcd'}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=tls={peer}",
        f"--cert-file={server}", f"--key-file={key}", f"--trusted-ca-file={ca}",
        "--client-cert-auth=true",
        f"--peer-cert-file={server}", f"--peer-key-file={key}", f"--peer-trusted-ca-file={ca}",
        "--peer-client-cert-auth=true",
    ]  # fmt: skip
    log = (tmp_path / "etcd.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield client.removeprefix("https://")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def test_etcd_serves_its_own_ca_and_refuses_tethers(pki_dir: Path, tls_etcd: str) -> None:
    eventually(lambda: _etcd_range(pki_dir, tls_etcd, "etcd-client") > 0)
    # An operator of Tether's CA is refused by etcd: no agent or operator reaches the store.
    ok(certs("operator", "alice", cwd=pki_dir.parent))
    with pytest.raises(grpc.RpcError) as refused:
        _etcd_range(pki_dir, tls_etcd, "operator-alice")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# -- the manifests that use these certificates ------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_deploy_manifests_parse_and_run_tls_with_client_auth_and_rbac() -> None:
    yaml = pytest.importorskip("yaml")
    for path in DEPLOY.rglob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text())), path
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", [])), name
        if name.startswith("coordinator"):
            flags = " ".join(service["command"])
            for flag in (
                "--tls-cert=",
                "--tls-key=",
                "--tls-client-ca=",
                "--rbac=",
                "--etcd-cert=",
            ):
                assert flag in flags, (name, flag)
    (deployment, *_) = yaml.safe_load_all((DEPLOY / "kubernetes" / "coordinator.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    flags = " ".join(container["args"])
    for flag in (
        "--tls-cert=",
        "--tls-client-ca=",
        "--rbac=",
        "--etcd-cacert=",
        "--health-listen=127.0.0.1:",
    ):
        assert flag in flags, flag
    # An etcd outage makes readiness fail; liveness must not fail with it.
    assert container["livenessProbe"]["exec"] != container["readinessProbe"]["exec"]
    assert "SERVING" not in container["livenessProbe"]["exec"]["command"][-1]
