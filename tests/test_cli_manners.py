"""The CLI's manners (issue 12): what a terminal user of etcdctl, kubectl or temporal expects."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tether
from tether._cli import build_parser
from tether._cli._output import ago
from tether._cli._parser import _VERBS

from tests.conftest import Coordinator, Etcd, Pki, eventually, ok, tether_cli


def test_version() -> None:
    out = ok(tether_cli("--version"))
    assert out.startswith("tether 0.") and "grpcio" in out


def test_global_flags_go_before_or_after_the_verb(coord: Coordinator, tenant: str) -> None:
    with tether.Agent(f"agent://{tenant}/email", run_id="r-1", target=coord.addr):
        before = tether_cli("--addr", coord.addr, "-o", "json", "agents", "--tenant", tenant)
        after = tether_cli("agents", "--tenant", tenant, "-o", "json", "--addr", coord.addr)
        assert [a["run_id"] for a in json.loads(ok(before))] == ["r-1"]
        (a,), (b,) = json.loads(ok(after)), json.loads(ok(before))
        assert a["instance_id"] == b["instance_id"]
        # given on both sides, the one after the verb wins, as the last flag usually does
        both = tether_cli(
            "-o", "json", "agents", "--tenant", tenant, "-o", "table", addr=coord.addr
        )
        assert ok(both).startswith("TENANT")


def test_timeout_is_seconds_and_checked() -> None:
    result = tether_cli("agents", "--timeout", "soon")
    assert result.returncode == 2
    assert "--timeout: expected seconds between 0 and 3600, got 'soon'" in result.stderr


@pytest.mark.parametrize("addr", ["127.0.0.1", "localhost:", "::1", "host:http"])
def test_an_address_without_a_port_is_refused_with_the_fix(addr: str) -> None:
    result = tether_cli("agents", "--addr", addr)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "needs HOST:PORT with a port, e.g. " in result.stderr and ":7700" in result.stderr


def test_tether_addr_without_a_port_is_refused_too() -> None:
    result = tether_cli("halts", addr="127.0.0.1")
    assert result.returncode == 2
    assert "TETHER_ADDR '127.0.0.1' needs HOST:PORT with a port, e.g. 127.0.0.1:7700" in (
        result.stderr
    )


def test_a_refused_connection_says_where_and_what_to_check() -> None:
    result = tether_cli("agents", "--addr", "127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "tether: no coordinator answered: 127.0.0.1:1 "
        "(connection refused: is `tether serve` running there, on that port?)"
    ]


def test_an_unknown_host_says_to_check_the_name() -> None:
    result = tether_cli("halts", "--addr", "no-such-host.invalid:7700")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no-such-host.invalid:7700 (address not found: check the host name" in result.stderr


def _into_closed_pipe(*args: str, addr: str | None = None) -> subprocess.CompletedProcess[str]:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as `| head -0` would be
    env = {**os.environ, **({"TETHER_ADDR": addr} if addr else {})}
    try:
        return subprocess.run(
            [sys.executable, "-m", "tether._cli", *args],
            stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)


def test_a_closed_pipe_ends_quietly(coord: Coordinator, tenant: str) -> None:
    with tether.Agent(f"agent://{tenant}/email", run_id="r-1", target=coord.addr):
        for args in (["agents", "--tenant", tenant], ["completion", "bash"], ["--help"]):
            result = _into_closed_pipe(*args, addr=coord.addr)
            assert result.stderr == "", args
            assert result.returncode in (0, 141), args


def test_no_headers_and_wide(coord: Coordinator, tenant: str) -> None:
    uri = f"agent://{tenant}/email"
    labels = {"feature": "beta"}
    with tether.Agent(uri, run_id="r-1", target=coord.addr, capabilities=["send"], labels=labels):
        bare = ok(tether_cli("agents", "--tenant", tenant, "--no-headers", addr=coord.addr))
        assert bare.split()[:5] == [tenant, "email", "r-1", bare.split()[3], "ACTIVE"]
        assert len(bare.splitlines()) == 1
        wide = ok(tether_cli("agents", "--tenant", tenant, "-o", "wide", addr=coord.addr))
        head, row = wide.splitlines()
        assert head.split()[-3:] == ["COORDINATOR", "LABELS", "CAPABILITIES"]
        assert row.split()[-2:] == ["feature=beta", "send"]
    empty = ok(tether_cli("halts", "--tenant", tenant, "--no-headers", addr=coord.addr))
    assert empty == ""  # nothing to count, not "(none)"


def test_agents_hides_ended_instances_unless_all(coord: Coordinator, tenant: str) -> None:
    uri = f"agent://{tenant}/email"
    with tether.Agent(uri, run_id="gone", target=coord.addr):
        pass
    with tether.Agent(uri, run_id="here", target=coord.addr):
        shown = json.loads(
            ok(tether_cli("agents", "--tenant", tenant, "-o", "json", addr=coord.addr))
        )
        assert [a["run_id"] for a in shown] == ["here"]
        every = tether_cli("agents", "--all", "--tenant", tenant, "-o", "json", addr=coord.addr)
        states = {a["run_id"]: a["state"] for a in json.loads(ok(every))}
        assert states == {"gone": "EXITED", "here": "ACTIVE"}
        exited = tether_cli("agents", "--state", "exited", "--tenant", tenant, addr=coord.addr)
        assert "gone" in ok(exited) and "here" not in ok(exited)


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(0.4, "0s ago"), (4, "4s ago"), (59, "59s ago"), (60, "1m ago"), (3 * 60 + 5, "3m ago"),
     (2 * 3600, "2h ago"), (5 * 86400 + 7, "5d ago"), (-30, "in the future")],
)  # fmt: skip
def test_ages_are_relative_in_whole_units(seconds: float, said: str) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert ago(now - timedelta(seconds=seconds), now) == said
    assert ago(None) == "-"


def test_every_time_column_is_an_age_and_json_keeps_timestamps(
    coord: Coordinator, tenant: str
) -> None:
    with tether.Agent(f"agent://{tenant}/email", run_id="r-1", target=coord.addr):
        ok(tether_cli("kill", "--tenant", tenant, "--reason", "ages", addr=coord.addr))
        for verb in ("halts", "audit", "agents"):
            table = ok(tether_cli(verb, "--tenant", tenant, addr=coord.addr))
            assert "s ago" in table and "T" not in table.split("\n", 1)[1].replace(tenant, ""), verb
        (halt,) = json.loads(
            ok(tether_cli("halts", "-o", "json", "--tenant", tenant, addr=coord.addr))
        )
        assert datetime.fromisoformat(halt["created_at"]).tzinfo is not None


def test_resume_of_a_tenant_names_the_narrower_halts(coord: Coordinator, tenant: str) -> None:
    uri = f"agent://{tenant}/email"
    with tether.Agent(uri, run_id="r-1", target=coord.addr, capabilities=["send"]):
        ok(tether_cli("kill", "--agent", uri, "--reason", "x", addr=coord.addr))
        ok(
            tether_cli(
                "kill", "--tenant", tenant, "--capability", "send", "--reason", "y", addr=coord.addr
            )
        )
        said = ok(tether_cli("resume", "--tenant", tenant, addr=coord.addr))
        assert said.startswith(f"tenant {tenant} was not halted; these narrower halts remain: ")
        assert f"`tether resume --agent {uri}`" in said
        assert f"`tether resume --tenant {tenant} --capability send`" in said
        assert said.rstrip().endswith("resume them by name")
        both = json.loads(
            ok(tether_cli("resume", "--tenant", tenant, "-o", "json", addr=coord.addr))
        )
        assert both["was_halted"] is False and len(both["narrower"]) == 2
        ok(tether_cli("resume", "--agent", uri, addr=coord.addr))
        assert "narrower" not in ok(tether_cli("resume", "--agent", uri, addr=coord.addr))


def test_help_has_an_example_for_every_verb_and_the_environment() -> None:
    top = ok(tether_cli("--help"))
    for var in (
        "TETHER_ADDR",
        "TETHER_TOKEN",
        "TETHER_TLS_CA",
        "TETHER_TLS_CERT",
        "TETHER_TLS_KEY",
    ):
        assert var in top
    for verb, *_ in _VERBS:
        page = ok(tether_cli(verb, "--help"))
        examples = page.split("examples:\n", 1)[1]
        assert f"tether {verb}" in examples, verb


def _bash_complete(script: Path, line: str) -> list[str]:
    words = line.split(" ")
    program = (
        f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
        f"COMP_CWORD={len(words) - 1}; _tether; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_comes_from_the_parser(tmp_path: Path) -> None:
    script = tmp_path / "tether.bash"
    script.write_text(ok(tether_cli("completion", "bash")))
    assert _bash_complete(script, "tether ag") == ["agents"]
    assert _bash_complete(script, "tether agents --st") == ["--state"]
    assert _bash_complete(script, "tether agents --state ") == [
        "ACTIVE",
        "KILLED",
        "STALE",
        "EXITED",
    ]
    assert _bash_complete(script, "tether -o ") == ["table", "wide", "json"]
    assert _bash_complete(script, "tether kill --mode s") == ["soft"]
    assert _bash_complete(script, "tether completion ") == ["bash", "zsh", "fish"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion(shell: str, tmp_path: Path) -> None:
    script = ok(tether_cli("completion", shell))
    verbs = [name for name, *_ in _VERBS]
    if shell == "fish":
        assert all(f"-a {verb} -d " in script for verb in verbs)
        assert "-l state -x -a 'ACTIVE KILLED STALE EXITED'" in script
    else:
        assert script.startswith("#compdef tether\n") and "bashcompinit" in script
    binary = shutil.which(shell)
    if binary is None:
        return  # the text is checked above; the shell itself is not installed here
    path = tmp_path / f"tether.{shell}"
    path.write_text(script)
    result = subprocess.run([binary, "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_parser_knows_every_verb() -> None:
    parser = build_parser()
    assert parser.parse_args(["completion", "fish"]).shell == "fish"


IMPORTS = """
import sys
import tether._cli
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"tether_server", "starlette",
    "cryptography", "uvicorn", "aetcd", "yaml", "opentelemetry"})
print(",".join(heavy))
"""


def test_the_cli_imports_only_what_a_verb_needs() -> None:
    result = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def _record(**stamps: int) -> bytes:
    from google.protobuf import json_format
    from tether.v1 import types_pb2

    record = types_pb2.AgentInstance(state=types_pb2.INSTANCE_STATE_ACTIVE)
    for name, seconds in stamps.items():
        getattr(record, name).FromSeconds(seconds)
    return json_format.MessageToJson(record).encode()


def test_only_ended_records_older_than_the_retention_expire() -> None:
    from tether_server._prune import expired
    from tether_server._store import LIVE, ROSTER

    class Kv:
        def __init__(self, name: str, value: bytes) -> None:
            self.key, self.value, self.mod_revision = ROSTER + name.encode(), value, 7

    kvs = [
        Kv("t/a/r/exited-long-ago", _record(ended_at=100, last_heartbeat=90)),
        Kv("t/a/r/exited-lately", _record(ended_at=900)),
        Kv("t/a/r/stale-long-ago", _record(last_heartbeat=100)),  # no goodbye: its last beat
        Kv("t/a/r/live-old-record", _record(registered_at=10)),  # has presence: never pruned
    ]
    live = {LIVE + b"t/a/r/live-old-record"}
    found = expired(kvs, live, cutoff_ns=500 * 10**9)
    assert found == [
        (ROSTER + b"t/a/r/exited-long-ago", 7, LIVE + b"t/a/r/exited-long-ago"),
        (ROSTER + b"t/a/r/stale-long-ago", 7, LIVE + b"t/a/r/stale-long-ago"),
    ]


def test_roster_retention_is_a_duration() -> None:
    result = tether_cli("serve", "--roster-retention", "soon")
    assert result.returncode == 2
    assert "--roster-retention 'soon': give a duration from 1s to 366d, such as 24h" in (
        result.stderr
    )


def test_ended_instances_are_pruned_after_the_retention(
    etcd: Etcd, tmp_path: Path, tenant: str
) -> None:
    pruning = Coordinator(etcd).start(tmp_path, "--roster-retention", "1s")
    try:
        uri = f"agent://{tenant}/email"
        with tether.Agent(uri, run_id="ended", target=pruning.addr):
            pass
        with tether.Agent(uri, run_id="running", target=pruning.addr):

            def listed() -> list[str]:
                found = tether_cli(
                    "agents", "--all", "-o", "json", "--tenant", tenant, addr=pruning.addr
                )
                return sorted(a["run_id"] for a in json.loads(ok(found)))

            assert "ended" in listed()
            eventually(lambda: listed() == ["running"])
            time.sleep(2.5)  # passes go on, and the live instance stays, however old
            assert listed() == ["running"]
    finally:
        pruning.stop()


def test_etcds_port_is_not_taken_for_a_coordinator(etcd: Etcd) -> None:
    addr = etcd.endpoint.split("://")[-1]
    result = tether_cli("agents", "--addr", addr)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"tether: {addr} is not a tether coordinator (" in result.stderr
    assert "is it the address `tether serve --listen` serves" in result.stderr


def test_a_web_server_is_not_taken_for_a_coordinator() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        addr = f"127.0.0.1:{server.server_address[1]}"
        result = tether_cli("halts", "--addr", addr)
    finally:
        server.shutdown()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"tether: no coordinator answered: {addr} (not a gRPC server: "
        "is that the coordinator's port (`tether serve --listen`)?)"
    ]


def test_a_failed_tls_handshake_is_one_line(coord: Coordinator, pki: Pki) -> None:
    """gRPC's own handshake log line stays quiet: the user reads Tether's line only."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}  # as a shell has it
    result = subprocess.run(
        [sys.executable, "-m", "tether._cli", "agents", "--addr", coord.addr],
        capture_output=True, text=True, env={**env, "TETHER_TLS_CA": str(pki.ca)}, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"tether: no coordinator answered: {coord.addr} (TLS handshake failed")
