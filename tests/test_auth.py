"""Admin tokens: a caller addresses only the tenants its token names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tether

from tests.conftest import Coordinator, Etcd
from tests.test_cli import tether_cli

OPS, ACME = "ops-token-0123456789", "acme-token-0123456789"


@pytest.fixture
def guarded(etcd: Etcd, tmp_path: Path) -> Iterator[Coordinator]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# who may stop what\n{OPS} *\n{ACME} acme\n")
    coordinator = Coordinator(etcd).start(tmp_path, "--admin-tokens", str(tokens))
    yield coordinator
    coordinator.stop()


def test_a_token_addresses_only_its_tenants(guarded: Coordinator) -> None:
    with tether.AdminClient(guarded.addr, token=ACME) as acme:
        halt, _ = acme.kill(tether.selector(tenant="acme"), "mine", force=True)
        assert halt.id == "tenant/acme"
        with pytest.raises(
            tether.PermissionDenied, match="may not address tenant 'globex', only acme"
        ):
            acme.kill(tether.selector(tenant="globex"), "not mine", force=True)
        with pytest.raises(tether.PermissionDenied, match="needs a '\\*' token"):
            acme.kill(tether.selector(all=True), "everything", force=True)
        with pytest.raises(tether.PermissionDenied, match="needs a '\\*' token"):
            acme.agents()  # an unfiltered listing reads every tenant
        assert acme.agents(tenant="acme") == []
    with tether.AdminClient(guarded.addr, token=OPS) as ops:
        ops.kill(tether.selector(all=True), "ops may", force=True)
        assert {h.id for h in ops.halts()} == {"tenant/acme", "global"}


def test_calls_without_a_known_token_are_refused(guarded: Coordinator) -> None:
    for token in (None, "not-a-token-at-all-xyz"):
        with (
            tether.AdminClient(guarded.addr, token=token, environ={}) as anonymous,
            pytest.raises(tether.PermissionDenied, match="token"),
        ):
            anonymous.halts(tenant="acme")
    result = tether_cli("halts", "--tenant", "acme", addr=guarded.addr)
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "tether: admin calls need a token: tether --token, or TETHER_TOKEN"
    )
    granted = tether_cli("halts", "--tenant", "acme", "--token", ACME, addr=guarded.addr)
    assert granted.returncode == 0, granted.stderr


def test_a_malformed_tokens_file_is_bad_usage(etcd: Etcd, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("short acme\n")
    result = tether_cli("serve", "--listen", "127.0.0.1:0", "--etcd", f"http://{etcd.endpoint}",
                        "--admin-tokens", str(tokens))  # fmt: skip
    assert result.returncode == 2
    assert "tokens:1: expected 'TOKEN TENANT[,TENANT...]'" in result.stderr
