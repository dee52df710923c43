"""AgentConfig: the one loader, how the front doors' arguments combine with it, and the hooks."""

from __future__ import annotations

import time

import pytest
import tether

from tests.conftest import LEASE_TTL, Coordinator

NOBODY = "127.0.0.1:1"  # nothing listens there


def test_from_env_reads_tether_addr_and_overrides_win() -> None:
    assert tether.AgentConfig.from_env({}).targets == ("127.0.0.1:7700",)
    config = tether.AgentConfig.from_env({"TETHER_ADDR": "a:1, b:2,"}, connect_timeout=3.0)
    assert config.targets == ("a:1", "b:2")
    assert config.connect_timeout == 3.0
    assert tether.AgentConfig.from_env({"TETHER_ADDR": "a:1"}, targets=("c:3",)).targets == ("c:3",)
    with pytest.raises(tether.InvalidArgument, match="no coordinator address"):
        tether.AgentConfig.from_env({"TETHER_ADDR": ","})
    with pytest.raises(tether.InvalidArgument, match="non-empty tuple"):
        tether.AgentConfig(targets=())


def test_target_argument_wins_over_the_config(coord: Coordinator, tenant: str) -> None:
    config = tether.AgentConfig(targets=(NOBODY,), connect_timeout=0.5)
    with tether.Agent(f"agent://{tenant}/w", target=coord.addr, config=config) as agent:
        agent.check()


def test_config_alone_says_where_and_how_long(coord: Coordinator, tenant: str) -> None:
    with tether.Agent(f"agent://{tenant}/w", config=tether.AgentConfig(targets=(coord.addr,))):
        pass
    started = time.monotonic()
    with pytest.raises(tether.Unavailable, match=r"within 0\.3s"):
        tether.Agent(
            f"agent://{tenant}/w", config=tether.AgentConfig(targets=(NOBODY,), connect_timeout=0.3)
        ).start()
    assert time.monotonic() - started < 5


def test_target_falls_back_to_tether_addr(
    coord: Coordinator, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_ADDR", coord.addr)
    with tether.Agent(f"agent://{tenant}/w") as agent:
        agent.check()


def test_hooks_see_every_reply_on_a_channel_of_its_own(coord: Coordinator, tenant: str) -> None:
    replies: list[tuple[tether.Verdict, bool]] = []
    config = tether.AgentConfig(
        channel_options=(("grpc.use_local_subchannel_pool", 1),),
        on_reply=lambda verdict, grant: replies.append((verdict, grant)),
    )
    agent = tether.Agent(f"agent://{tenant}/w", target=coord.addr, config=config)
    assert agent.ttl == 0.0
    with agent:
        assert agent.ttl == LEASE_TTL
        assert replies[0][1] is True  # the registration's grant comes first
        assert replies[0][0].stop is None
        deadline = time.monotonic() + 15
        while len(replies) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [grant for _, grant in replies[1:3]] == [False, False]  # then beat acks
