"""examples/node/agent.js, a Tether agent written in Node.js from the .proto alone, against
real coordinators: it registers, beats with a checkpoint, is killed inline, ends KILLED (not
STALE), resumes from its checkpoint, and fails closed when no beat is confirmed in the TTL.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import tether

from tests.conftest import Coordinator, Etcd, audited, eventually

NODE_DIR = Path(__file__).parent.parent / "examples" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (the agent is Node.js)"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules").is_dir(),
        reason="examples/node/node_modules is missing: run `npm ci` in examples/node",
    ),
]


class NodeAgent:
    """``node agent.js ...`` with its stdout read as JSON lines, one event each."""

    def __init__(self, *args: str) -> None:
        assert NODE is not None
        self.proc = subprocess.Popen(
            [NODE, str(NODE_DIR / "agent.js"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def next(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next line of kind ``event``; lines of other kinds before it are kept in seen."""
        while True:
            try:
                line = self.events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {event!r} line; saw {self.seen[-5:]}") from None
            self.seen.append(line)
            if line["event"] == event:
                return line

    def exit_code(self, timeout: float = 10.0) -> int:
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        assert not self.proc.stderr.read(), "node wrote to stderr"
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def node_agent(target: str, tenant: str, run: str, instance: str, *extra: str) -> NodeAgent:
    return NodeAgent(
        *("--target", target, "--tenant", tenant, "--agent", "mailer"),
        *("--run", run, "--instance", instance, "--every", "100", *extra),
    )


def test_node_agent_is_killed_inline_and_resumes_from_its_checkpoint(
    coord: Coordinator, admin: tether.AdminClient, tenant: str
) -> None:
    first = node_agent(coord.addr, tenant, "run-1", "node-1")
    try:
        assert first.next("registered")["resumed_from"] is None

        def checkpointed() -> bool:  # carried by a beat, stored by the coordinator
            stored = admin.agent(tenant, "mailer", "run-1").checkpoint
            return stored is not None and stored["batch"] >= 2

        eventually(checkpointed)
        assert admin.agent(tenant, "mailer", "run-1").state is tether.State.ACTIVE

        halt, _ = admin.kill(tether.selector(run_id="run-1"), "broken unsubscribe link")
        killed = first.next("killed")
        assert killed["halt_id"] == halt.id and killed["reason"] == "broken unsubscribe link"
        assert first.next("ended")["confirmed"] is True  # the goodbye was stored
        assert first.exit_code() == 3
    finally:
        first.close()
    final = admin.agent(tenant, "mailer", "run-1", "node-1")
    assert final.state is tether.State.KILLED  # not STALE: the goodbye came after the ack
    assert final.checkpoint == killed["checkpoint"]
    ack = audited(admin, tenant, "ack")
    assert ack.halt_id == halt.id and ack.instances == (f"{tenant}/mailer/run-1/node-1",)

    admin.resume(tether.selector(run_id="run-1"), "template fixed")
    stop_at = killed["checkpoint"]["batch"] + 3
    second = node_agent(coord.addr, tenant, "run-1", "node-2", "--batches", str(stop_at))
    try:
        assert second.next("registered")["resumed_from"] == killed["checkpoint"]
        assert second.next("batch")["batch"] == killed["checkpoint"]["batch"] + 1
        assert second.next("ended")["confirmed"] is True
        assert second.exit_code() == 0
    finally:
        second.close()
    done = admin.agent(tenant, "mailer", "run-1", "node-2")
    assert done.state is tether.State.EXITED
    assert done.checkpoint == {"batch": stop_at, "sent": stop_at * 100}


def test_node_agent_fails_closed_without_confirmed_beats_and_recovers_through_another(
    etcd: Etcd, tmp_path: Path, tenant: str
) -> None:
    first = Coordinator(etcd).start(tmp_path)
    second = Coordinator(etcd)  # its port is known to the agent, but nothing listens yet
    agent = node_agent(f"{first.addr},{second.addr}", tenant, "run-2", "node-1")
    try:
        ttl_ms = agent.next("registered")["ttl_ms"]
        agent.next("batch")
        first.stop(signal.SIGKILL)
        lost = agent.next("fail_closed", timeout=ttl_ms / 1000 + 5)
        assert "no beat confirmed within ttl_ms" in lost["reason"]
        second.start(tmp_path)
        agent.next("reconnected", timeout=15)  # the same run_id and instance_id, elsewhere
        running = agent.next("running")
        between = agent.seen[agent.seen.index(lost) : agent.seen.index(running)]
        assert not [line for line in between if line["event"] == "batch"]  # none while lost
        with tether.AdminClient(second.addr) as admin:
            found = eventually(lambda: admin.agent(tenant, "mailer", "run-2", "node-1"))
            assert found.state is tether.State.ACTIVE
        agent.proc.send_signal(signal.SIGTERM)  # a clean stop says goodbye: EXITED
        assert agent.next("ended")["confirmed"] is True
        assert agent.exit_code() == 0
    finally:
        agent.close()
        first.stop()
        second.stop()
