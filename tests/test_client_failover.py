"""Every client fails over: the CLI, AdminClient, HaltCache, the watch and the drill try each
address of a comma-separated list, and say in one line which failed and why."""

from __future__ import annotations

import re
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tether
from tether._failover import NoCoordinator
from tether_server import CoordinatorProcess, free_port

from tests.conftest import Coordinator, Etcd, eventually, ok, tether_cli


@pytest.fixture
def dead() -> str:
    """An address nothing listens on: connection refused."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def hung() -> Iterator[str]:
    """An address that accepts TCP connections and never answers: a hung coordinator."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_the_cli_goes_on_to_the_next_address(coord: Coordinator, dead: str) -> None:
    assert ok(tether_cli("halts", "--addr", f"{dead},{coord.addr}")).startswith("HALT")
    assert ok(tether_cli("halts", addr=f"{dead},{coord.addr}")).startswith("HALT")  # TETHER_ADDR


def test_the_cli_says_in_one_line_which_addresses_failed_and_why(dead: str, hung: str) -> None:
    result = tether_cli("kill", "--tenant", "acme", "--reason", "x", "--addr", f"{dead},{hung}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr == (
        f"tether: no coordinator answered: {dead} (connection refused: is `tether serve` "
        f"running there, on that port?), {hung} (deadline exceeded after 2s: is it reachable "
        "from here (a firewall?), and serving (its etcd up)?)\n"
    )


def test_a_kill_lands_through_the_next_coordinator_and_is_recorded_once(
    coordinators: tuple[Coordinator, Coordinator], hung: str, dead: str, tenant: str
) -> None:
    a, b = coordinators
    with tether.AdminClient(f"{hung},{dead},{a.addr}", connect_timeout=0.5) as admin:
        halt, already = admin.kill(tether.selector(tenant=tenant), "failover", force=True)
        assert not already
        assert admin.target == a.addr  # the one that answered is asked first from now on
        assert [h.id for h in admin.halts(tenant=tenant)] == [halt.id]
    # The same Kill retried on another coordinator (its answer lost, say) changes nothing.
    with tether.AdminClient(b.addr) as other:
        again, already = other.kill(tether.selector(tenant=tenant), "failover", force=True)
        assert (again.id, already) == (halt.id, True)
        kills = [e for e in other.audit(tenant=tenant) if e.action == "kill"]
        assert [e.changed for e in kills] == [True, False]


def test_a_refusal_is_the_answer_and_is_not_retried(
    coord: Coordinator, tmp_path: Path, tenant: str
) -> None:
    # A coordinator on an etcd of its own, where the tenant never registered, refuses the
    # kill (FAILED_PRECONDITION); the session's coordinator, second in the list, would take it.
    other_etcd = Etcd(tmp_path / "etcd").start()
    elsewhere = Coordinator(other_etcd).start(tmp_path)
    try:
        with tether.Agent(f"agent://{tenant}/w", run_id="r1", target=coord.addr):
            with tether.AdminClient(f"{elsewhere.addr},{coord.addr}") as admin:
                with pytest.raises(tether.FailedPrecondition, match="has ever registered"):
                    admin.kill(tether.selector(tenant=tenant), "no")
                assert admin.target == elsewhere.addr
            with tether.AdminClient(coord.addr) as admin:
                assert admin.halts(tenant=tenant) == []  # the second was never asked
    finally:
        elsewhere.stop()
        other_etcd.stop()


def test_no_coordinator_lists_every_address(dead: str, hung: str) -> None:
    with (
        tether.AdminClient(f"{hung},{dead}", connect_timeout=0.3) as admin,
        pytest.raises(NoCoordinator) as caught,
    ):
        admin.halts()
    assert caught.value.failures == (
        (hung, "deadline exceeded after 0.3s"),
        (dead, "connection refused"),
    )
    assert isinstance(caught.value, tether.Unavailable)


def test_halt_cache_fails_over(coord: Coordinator, dead: str, tenant: str) -> None:
    from tether._permits import HaltCache, PermitClaims

    with tether.AdminClient(coord.addr) as admin:
        admin.kill(tether.selector(tenant=tenant), "frozen", force=True)
    cache = HaltCache(f"{dead},{coord.addr}", max_age=0)
    claims = PermitClaims(tenant, "a", "r", "i", "send", "", 1, 0, 0, "k")
    assert "frozen" in (cache(claims) or "")


def test_the_watch_moves_to_the_next_coordinator_and_reports_only_news(
    etcd: Etcd, coord: Coordinator, tmp_path: Path, tenant: str
) -> None:
    doomed = Coordinator(etcd).start(tmp_path)
    events: list[tether.AgentEvent] = []
    errors: list[BaseException] = []
    admin = tether.AdminClient(f"{doomed.addr},{coord.addr}")

    def watch() -> None:
        try:
            for event in admin.watch(tenant=tenant):
                events.append(event)
        except tether.TetherError as err:
            errors.append(err)

    with tether.Agent(f"agent://{tenant}/w", run_id="r1", target=coord.addr):
        threading.Thread(target=watch, daemon=True).start()
        eventually(lambda: [e.instance.state for e in events] == [tether.State.ACTIVE])
        doomed.stop(signal.SIGKILL)
        with tether.AdminClient(coord.addr) as other:
            other.kill(tether.selector(run_id="r1"), "after the failover")
        eventually(lambda: len(events) >= 2)
    admin.close()
    assert not errors
    assert [(e.previous, e.instance.state) for e in events[:2]] == [
        (None, tether.State.ACTIVE),
        (tether.State.ACTIVE, tether.State.KILLED),
    ]
    assert admin.target == coord.addr


def test_the_drill_fails_over(coord: Coordinator, dead: str) -> None:
    result = tether_cli(
        "drill", "--scope", "run", "--addr", f"{dead},{coord.addr}", "--settle", "0.5",
        "--items", "40", "--tick", "0.005", "-o", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert re.search(r'"verdict": "PASS"', result.stdout)


def test_a_busy_coordinator_still_gets_the_kill_when_no_other_answers(
    etcd: Etcd, tmp_path: Path, tenant: str, dead: str
) -> None:
    """A coordinator whose connection is up but whose health check answers late (its loop
    busy taking in a fleet's acknowledgements; here SIGSTOPped for a second) is not given up
    after the connect timeout: once no other address answered, the Kill is sent to it with
    the call's own deadline, and lands. Before, the Kill was never sent."""
    busy = Coordinator(etcd)
    busy.process = CoordinatorProcess(etcd.url, lease_ttl=10.0)  # outlives the pause
    busy.start(tmp_path)
    try:
        with tether.AdminClient(f"{busy.addr},{dead}", connect_timeout=0.3, timeout=15) as admin:
            assert admin.halts(tenant=tenant) == []  # connected
            admin._coordinators._answered.clear()  # as after a failed call: checked again
            assert busy.process.proc is not None
            busy.process.proc.send_signal(signal.SIGSTOP)
            threading.Timer(1.0, busy.process.proc.send_signal, (signal.SIGCONT,)).start()
            halt, already = admin.kill(tether.selector(tenant=tenant), "busy", force=True)
            assert not already
            assert [h.id for h in admin.halts(tenant=tenant)] == [halt.id]
            assert admin.target == busy.addr
    finally:
        busy.stop()
