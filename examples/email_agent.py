"""One instance of the email-campaign agent from seed 003, tethered.

Sends its shard of the campaign in batches, checking the tether before each one and
checkpointing after it. Every batch it sends is appended to the ledger file, so the demo
can prove afterwards that no batch went out twice and none was skipped.

    python examples/email_agent.py SHARD SHARDS TOTAL LEDGER [TARGET [CAMPAIGN]]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import tether


def main() -> int:
    shard, shards, total = (int(x) for x in sys.argv[1:4])
    ledger = Path(sys.argv[4])
    target = sys.argv[5] if len(sys.argv) > 5 else None
    campaign = sys.argv[6] if len(sys.argv) > 6 else "campaign-42"
    run_id = f"{campaign}.shard-{shard}"
    with tether.Agent(
        "agent://acme/email-campaign", run_id=run_id, target=target, capabilities=["send_email"]
    ) as agent:
        start = (agent.checkpoint or {}).get("batch", shard)
        print(f"[{run_id}] starting at batch {start}", flush=True)
        try:
            for batch in range(start, total, shards):
                agent.check()  # raises tether.Killed when halted or fail-closed
                with ledger.open("a") as out:  # "send" 100 emails
                    out.write(f"{batch}\n")
                time.sleep(0.05)
                agent.report(checkpoint={"batch": batch + shards})
        except tether.Killed as stop:
            print(f"[{run_id}] stopped: {stop}", flush=True)
            return 3
    print(f"[{run_id}] done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
