"""An agent in its own process, for tests that SIGKILL it. Prints READY once registered."""

from __future__ import annotations

import sys
import time

import tether

uri, run_id, target = sys.argv[1:4]
with tether.Agent(uri, run_id=run_id, instance_id=f"proc-{run_id}", target=target) as agent:
    print("READY", flush=True)
    i = 0
    while True:
        i += 1
        agent.report({"i": i})
        time.sleep(0.05)
