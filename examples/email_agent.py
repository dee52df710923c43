"""One instance of the email-campaign agent from seed 003, tethered.

The campaign goes to 50,000 customer records in batches of 100, one batch every 2 seconds
per instance: run three instances (shards 0, 1 and 2 of 3) and the whole campaign takes
about six minutes, time enough to kill it by hand. Each instance checks the tether before
every batch (and while it waits for the next), checkpoints after it, and appends the
batch's number to the ledger file, so that anyone can prove afterwards that no batch went
out twice and none was skipped.

    python examples/email_agent.py SHARD SHARDS [--records 50000] [--batch 100] [--every 2]
        [--ledger sent.log] [--target HOST:PORT] [--campaign campaign-42] [--release 1.4.2]

Exit codes: 0 the shard is done, 3 stopped by a kill (``tether.Killed``), 1 no coordinator,
130 interrupted (Ctrl+C or SIGTERM: it says goodbye, so the instance shows EXITED).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import tether

URI = "agent://acme/email-campaign"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shard", type=int, help="which shard this instance sends, from 0")
    parser.add_argument("shards", type=int, help="how many instances share the campaign")
    parser.add_argument("--records", type=int, default=50_000, help="customer records in all")
    parser.add_argument("--batch", type=int, default=100, help="emails per batch")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between batches")
    parser.add_argument("--ledger", type=Path, default=Path("sent.log"), help="batches sent")
    parser.add_argument("--target", help="coordinator(s); default TETHER_ADDR or 127.0.0.1:7700")
    parser.add_argument("--campaign", default="campaign-42", help="the run id's prefix")
    parser.add_argument("--release", default="1.4.2", help="this build's version label")
    args = parser.parse_args(argv)
    if not 0 <= args.shard < args.shards:
        parser.error(f"SHARD must be from 0 to {args.shards - 1}")
    return args


def pause(agent: tether.Agent, seconds: float) -> None:
    """Wait for the next batch, checking the tether as it goes: a kill stops the wait."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        agent.check()
        time.sleep(min(left, 0.1))


def send(agent: tether.Agent, args: argparse.Namespace, name: str) -> None:
    """Send this shard's batches from the run's checkpoint on."""
    batches = -(-args.records // args.batch)
    checkpoint = agent.checkpoint or {}
    start, sent = checkpoint.get("batch", args.shard), checkpoint.get("sent", 0)
    print(f"[{name}] starting at batch {start} of {batches}, {sent} emails sent", flush=True)
    for batch in range(start, batches, args.shards):
        agent.check()  # raises tether.Killed when halted or fail-closed
        emails = min(args.batch, args.records - batch * args.batch)
        try:
            with agent.effect("send_email", key=f"batch-{batch}") as fx:
                fx.undo({"batch": batch, "emails": emails})  # what `tether compensate` retracts
                with args.ledger.open("a") as out:  # "send" the batch's emails
                    out.write(f"{batch}\n")
        except tether.DuplicateEffect:
            pass  # it went out before a restart, and its checkpoint did not: never twice
        sent += emails
        agent.report(checkpoint={"batch": batch + args.shards, "sent": sent})
        pause(agent, args.every)


def interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # leaves the with block, which says goodbye


def main() -> int:
    args = parse(sys.argv[1:])
    name = f"{args.campaign}.shard-{args.shard}"
    signal.signal(signal.SIGTERM, interrupted)
    try:
        with tether.Agent(
            URI,
            run_id=name,
            target=args.target,
            capabilities=["send_email"],
            release=args.release,
        ) as agent:
            send(agent, args, name)
    except tether.Killed as stop:
        print(f"[{name}] stopped: {stop}", flush=True)
        return 3
    except tether.Unavailable as err:  # no coordinator answered: is `tether serve` running?
        print(f"[{name}] {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"[{name}] interrupted; the checkpoint is stored", flush=True)
        return 130
    print(f"[{name}] done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
